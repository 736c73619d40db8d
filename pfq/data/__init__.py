"""Data: phantoms, manifests, NIfTI preprocessing, the cache, stratified sets and the Grain pipeline."""
