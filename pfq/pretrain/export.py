"""pfq FCMAE parameters -> upstream's FCMAE checkpoint layout ("format B"), and the encoder as a pfq
model directory.

Format B is the state dict of upstream's `FCMAE` module: the sparse (MinkowskiEngine) encoder's names
and layouts (`*.kernel` flattened with the first spatial axis fastest, `(1, C)` biases and GRN
parameters, `.ln.` / `.linear.` wrappers, no final LayerNorm) followed by the dense `proj`,
`decoder.*`, `pred` and `mask_token`. It is the exact inverse of what `pfq.convert` reads, so
`tools/convert_weights.py` turns the export back into the same encoder.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from pfq.convert.layout import export_state
from pfq.io import atomic_write_bytes
from pfq.pretrain.model import FCMAESpec, Params


def _sparse_entry(name: str, v: np.ndarray) -> tuple[str, np.ndarray]:
    """One dense upstream encoder entry (no `encoder.` prefix) -> its sparse name and layout."""
    parts = name.split(".")
    if parts[0] == "downsample_layers" and parts[1] != "0":
        if parts[2] == "0":  # the LayerNorm before a transition
            return ".".join(parts[:3] + ["ln", parts[3]]), v
        if parts[3] == "bias":
            return name, v.reshape(1, -1)
        if parts[1] == "3":  # 1x1x1 stride-1: MinkowskiEngine stores a plain (in, out) matrix
            return ".".join(parts[:3] + ["kernel"]), v[:, :, 0, 0, 0].T
        k = v.shape[-1]  # (out, in, a, b, c) -> (k^3, in, out), flat index a + k b + k^2 c
        return ".".join(parts[:3] + ["kernel"]), v.transpose(4, 3, 2, 1, 0).reshape(k**3, v.shape[1], v.shape[0])
    if parts[0] == "stages":
        layer, leaf = parts[3], parts[4]
        if layer == "dwconv" and leaf == "weight":
            k = v.shape[-1]
            return ".".join(parts[:4] + ["kernel"]), v[:, 0].transpose(3, 2, 1, 0).reshape(k**3, v.shape[0])
        if layer == "dwconv":
            return name, v.reshape(1, -1)
        if layer == "norm":
            return ".".join(parts[:4] + ["ln", leaf]), v
        if layer in ("pwconv1", "pwconv2"):
            return ".".join(parts[:4] + ["linear", leaf]), v
        if layer == "grn":
            return name, v.reshape(1, -1)
    return name, v  # the stem: a dense Conv3d and LayerNorm even in the sparse model


def _dense_entry(path: tuple, v: np.ndarray) -> tuple[str, np.ndarray]:
    """A decoder-side pfq leaf -> upstream's dense PyTorch name and layout."""
    *middle, leaf = (str(p) for p in path)
    if leaf == "kernel" and v.ndim == 5:
        return ".".join(middle + ["weight"]), v.transpose(4, 3, 0, 1, 2)
    if leaf == "kernel":
        return ".".join(middle + ["weight"]), v.T
    if "grn" in middle:
        return ".".join(middle + [leaf]), v.reshape(1, 1, 1, 1, -1)
    return ".".join(middle + ["weight" if leaf == "scale" else leaf]), v


def _leaves(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def fcmae_state_dict(spec: FCMAESpec, params: Params) -> dict[str, np.ndarray]:
    """Upstream's `FCMAE.state_dict()` names, order and layouts (float32 numpy)."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    out = {"mask_token": params["mask_token"].reshape(1, -1, 1, 1, 1)}
    dense = export_state(spec.encoder, {"params": {"encoder": params["encoder"]}}, with_head=False)
    for name, v in dense.items():
        name = name[len("encoder.") :]
        if not name.startswith("norm."):  # the sparse encoder has no final LayerNorm
            sparse_name, w = _sparse_entry(name, v)
            out[f"encoder.{sparse_name}"] = w
    for part in ("proj", "decoder", "pred"):
        for path, v in _leaves({part: params[part]}):
            name, w = _dense_entry(path, v)
            out[name] = w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_format_b(path: str | Path, spec: FCMAESpec, params: Params, metadata: dict[str, str] | None = None) -> Path:
    """Write `fcmae_state_dict` as a safetensors file (atomically); `tools/convert_weights.py` reads it."""
    from safetensors.numpy import save

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(fcmae_state_dict(spec, params), metadata={"format": "pt", **(metadata or {})}))
    return path


def encoder_variables(params: Params) -> dict:
    """The pretrained encoder as pfq encoder-only variables; its final LayerNorm (never trained by
    FCMAE) is identity, as the converter sets it for an FCMAE checkpoint."""
    encoder = jax.tree.map(np.asarray, params["encoder"])
    encoder["norm"] = {"scale": np.ones_like(encoder["norm"]["scale"]), "bias": np.zeros_like(encoder["norm"]["bias"])}
    return {"params": {"encoder": encoder}, "batch_stats": {}}
