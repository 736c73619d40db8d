"""Pure-function view of the model: plain nested dicts of arrays in, arrays out.

The trainer vmaps over lanes and Orbax saves pytrees, so the model is used through
`init_variables` / `apply` / `features`, which hide NNX's object graph. Variables are
`{"params": {...}, "batch_stats": {...}}`, keyed like the PyTorch state dict
(`variables["params"]["encoder"]["stages"][2][4]["dwconv"]["kernel"]`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jax
from flax import nnx

from pfq.model.convnext import Classifier, ModelSpec

Variables = dict[str, Any]


def _pure(state) -> dict:
    """nnx.State -> nested dict of arrays (newer Flax spells it nnx.to_pure_dict)."""
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


@lru_cache(maxsize=32)
def _graph(spec: ModelSpec):
    """Graph definition and abstract state of a spec, built without allocating parameters."""
    abstract = nnx.eval_shape(lambda: Classifier(spec, nnx.Rngs(0)))
    graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    return graphdef, params, stats


def init_variables(spec: ModelSpec, key: jax.Array) -> Variables:
    """Fresh parameters (trunc-normal 0.02 weights, zero biases, identity norms) and BN statistics."""
    return _jitted_init(spec)(key)


@lru_cache(maxsize=32)
def _jitted_init(spec: ModelSpec):
    # Jitted: eager NNX construction dispatches one op per initialiser, seconds for a real model.
    def init(key: jax.Array) -> Variables:
        model = Classifier(spec, nnx.Rngs(params=key))
        _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return {"params": _pure(params), "batch_stats": _pure(stats)}

    return jax.jit(init)


def abstract_variables(spec: ModelSpec) -> Variables:
    """Shapes and dtypes of `init_variables(spec, ...)` as jax.ShapeDtypeStruct leaves."""
    _, params, stats = _graph(spec)
    to_sds = lambda s: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _pure(s))
    return {"params": to_sds(params), "batch_stats": to_sds(stats)}


def _merge(spec: ModelSpec, variables: Variables) -> Classifier:
    graphdef, params, stats = _graph(spec)
    params, stats = jax.tree.map(lambda x: x, (params, stats))  # fresh copies: replace mutates
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(stats, variables["batch_stats"])
    return nnx.merge(graphdef, params, stats)


def apply(
    spec: ModelSpec, variables: Variables, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
) -> tuple[jax.Array, dict]:
    """Logits (N, num_classes) and the (possibly updated) BatchNorm statistics."""
    model = _merge(spec, variables)
    logits = model(x, train=train, key=key)
    stats = _pure(nnx.state(model, nnx.BatchStat))
    return logits, stats


def features(spec: ModelSpec, variables: Variables, x: jax.Array) -> jax.Array:
    """Pooled, final-normed encoder features (N, E), eval mode."""
    return _merge(spec, variables).features(x)


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
