"""Detect which ProFound checkpoint a file holds and bring it to one dense state dict.

(A) finetuned classifier `{"model": {encoder.*, head.*}, ...extras}`;
(B) FCMAE pretraining checkpoint (sparse encoder + decoder), remapped as upstream does;
(C) a bare dense encoder state dict, with or without `encoder.` / `module.` prefixes.
The result uses classifier naming (`encoder.*`, `head.*`) whatever the source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pfq.convert.errors import ConvertError
from pfq.convert.fcmae import DROP_SUBSTRINGS, remap_sparse
from pfq.convert.layout import BN_COUNTER
from pfq.convert.torch_zip import InertNamespace, TensorRef

FORMAT_NAMES = {"A": "finetuned classifier", "B": "FCMAE pretraining (sparse)", "C": "dense encoder"}
FINAL_NORM = ("encoder.norm.weight", "encoder.norm.bias")


@dataclass
class DenseCheckpoint:
    source_format: str  # "A" | "B" | "C"
    state: dict[str, np.ndarray]  # dense upstream layouts, classifier naming, no BN counter
    with_head: bool
    dropped: list[str] = field(default_factory=list)  # source keys deliberately not converted
    filled: list[str] = field(default_factory=list)  # keys absent from the source, set to identity
    extras: dict[str, Any] = field(default_factory=dict)  # JSON-able notes on the container
    bn_batches_tracked: int | None = None


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (TensorRef, np.ndarray))


def _numpy(x: TensorRef | np.ndarray) -> np.ndarray:
    return x.numpy() if isinstance(x, TensorRef) else np.asarray(x)


def _json_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None)))


def _unwrap(tree: Any) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """The state dict inside a container, and notes on what else the container held."""
    if not isinstance(tree, Mapping):
        raise ConvertError(f"checkpoint holds a {type(tree).__name__}, not a dict")
    for key in ("model", "state_dict"):
        if isinstance(tree.get(key), Mapping):
            extras: dict[str, Any] = {"container_keys": sorted(str(k) for k in tree if k != key)}
            if type(tree.get("epoch")) is int:
                extras["epoch"] = tree["epoch"]
            if isinstance(tree.get("args"), InertNamespace):
                extras["args"] = {
                    k: v
                    for k, v in tree["args"].as_dict().items()
                    if _json_scalar(v) or (isinstance(v, (list, tuple)) and all(_json_scalar(x) for x in v))
                }
            return tree[key], extras
    return tree, {}


def _tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    bad = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not isinstance(k, str) or not _is_tensor(v)]
    if bad:
        raise ConvertError("the state dict holds entries that are not tensors", bad)
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _is_sparse(keys: list[str]) -> bool:
    return any(k == "mask_token" or k.endswith(".kernel") or ".ln." in k or ".linear." in k for k in keys)


def to_dense(tree: Any) -> DenseCheckpoint:
    """Detect the format of a loaded checkpoint and return its dense state dict (read lazily)."""
    state, extras = _unwrap(tree)
    state = _tensors(state)
    keys = list(state)
    if _is_sparse(keys):
        dropped = [k for k in keys if any(s in k for s in DROP_SUBSTRINGS)]  # never read
        dense, _, problems = remap_sparse({k: _numpy(v) for k, v in state.items() if k not in dropped})
        if problems:
            raise ConvertError("FCMAE checkpoint has kernels that cannot be remapped", problems)
        out = {f"encoder.{k}": v for k, v in dense.items()}
        last = out.get("encoder.downsample_layers.3.1.bias")
        filled = [k for k in FINAL_NORM if k not in out] if last is not None and last.ndim == 1 else []
        if filled:  # the sparse encoder has no final LayerNorm: identity (scale 1, bias 0)
            out.setdefault(FINAL_NORM[0], np.ones(last.shape, np.float32))
            out.setdefault(FINAL_NORM[1], np.zeros(last.shape, np.float32))
        return DenseCheckpoint("B", out, False, dropped, filled, extras)
    if any(k.startswith("head.") for k in keys):
        counter = state.pop(BN_COUNTER, None)
        ck = DenseCheckpoint("A", {k: _numpy(v) for k, v in state.items()}, True, extras=extras)
        if counter is not None:
            ck.bn_batches_tracked = int(_numpy(counter).reshape(()))
            ck.dropped = [BN_COUNTER]
        return ck
    dense = {(k if k.startswith("encoder.") else f"encoder.{k}"): _numpy(v) for k, v in state.items()}
    return DenseCheckpoint("C", dense, False, extras=extras)
