"""pfq variables <-> upstream dense PyTorch state dicts: names, shapes and layouts, leaf by leaf.

The table is derived from `abstract_variables(spec)`, whose paths mirror the torch names
(`params/encoder/stages/2/4/dwconv/kernel` <-> `encoder.stages.2.4.dwconv.weight`), so one walk
gives the name and layout transform of every leaf (docs/checkpoints.md, "Names and layouts").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from pfq.convert.errors import ConvertError
from pfq.model import ModelSpec, abstract_variables

Path_ = tuple[Any, ...]
BN_COUNTER = "head.1.num_batches_tracked"  # torch-only buffer: dropped on import, re-emitted on export
FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@dataclass(frozen=True)
class Leaf:
    path: Path_  # e.g. ("params", "encoder", "stages", 2, 4, "dwconv", "kernel")
    torch_name: str
    pfq_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    kind: str  # "conv" (k..., in, out)<->(out, in, k...), "dense" (transpose), "reshape", "copy"

    def to_pfq(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            w = w.transpose(2, 3, 4, 1, 0)
        elif self.kind == "dense":
            w = w.T
        return np.ascontiguousarray(w.reshape(self.pfq_shape))

    def to_torch(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w)
        if self.kind == "conv":
            w = w.transpose(4, 3, 0, 1, 2)
        elif self.kind == "dense":
            w = w.T
        return np.ascontiguousarray(w.reshape(self.torch_shape))


def _walk(tree: Mapping, prefix: Path_ = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _leaf(path: Path_, shape: tuple[int, ...]) -> Leaf:
    collection, *middle, name = path
    torch_name = ".".join(str(p) for p in middle + [_LEAF_NAMES.get((collection, name), name)])
    if name == "kernel" and len(shape) == 5:
        return Leaf(path, torch_name, shape, (shape[4], shape[3], *shape[:3]), "conv")
    if name == "kernel" and len(shape) == 2:
        return Leaf(path, torch_name, shape, shape[::-1], "dense")
    if "grn" in middle:
        return Leaf(path, torch_name, shape, (1, 1, 1, 1, shape[-1]), "reshape")
    return Leaf(path, torch_name, shape, shape, "copy")


def leaf_table(spec: ModelSpec, with_head: bool = True) -> list[Leaf]:
    """Every variable of the model (encoder only if not `with_head`), in state-dict order."""
    leaves = [_leaf(p, tuple(v.shape)) for p, v in _walk(abstract_variables(spec))]
    if not with_head:
        leaves = [x for x in leaves if x.path[1] == "encoder"]
    return leaves


def expected_torch_shapes(spec: ModelSpec, with_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Upstream dense state-dict names (classifier naming, `encoder.` prefix) and shapes."""
    shapes = {x.torch_name: x.torch_shape for x in leaf_table(spec, with_head)}
    if with_head:
        shapes[BN_COUNTER] = ()
    return shapes


def _set(tree: dict, path: Path_, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: Path_) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _mismatch_listing(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> list[str]:
    problems = [f"missing: {k} (expected shape {tuple(s)})" for k, s in expected.items() if k not in got]
    problems += [f"unexpected: {k} (shape {tuple(s)})" for k, s in got.items() if k not in expected]
    problems += [
        f"wrong shape: {k}: got {tuple(got[k])}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in got and tuple(got[k]) != tuple(s)
    ]
    return problems


def import_state(spec: ModelSpec, state: Mapping[str, np.ndarray], with_head: bool) -> dict:
    """Dense upstream state dict (classifier naming, no BN counter) -> pfq variables, float32.

    Every leaf is a fresh copy: a zero-copy device_put (JAX on CPU) would otherwise alias the
    caller's buffers, e.g. a torch model's BN statistics that its next training forward updates
    in place while a dispatched pfq computation still reads them.
    Raises ConvertError listing every missing, unexpected and mis-shaped key.
    """
    leaves = leaf_table(spec, with_head)
    problems = _mismatch_listing(
        {x.torch_name: x.torch_shape for x in leaves}, {k: np.shape(v) for k, v in state.items()}
    )
    if problems:
        raise ConvertError(f"checkpoint does not match a {describe(spec, with_head)}", problems)
    variables: dict = {"params": {}, "batch_stats": {}}
    for x in leaves:
        w = np.asarray(state[x.torch_name])
        if w.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{x.torch_name}: expected a floating tensor, got {w.dtype}")
        _set(variables, x.path, x.to_pfq(w.astype(np.float32, copy=True)))
    return variables


def export_state(spec: ModelSpec, variables: Mapping, with_head: bool) -> dict[str, np.ndarray]:
    """pfq variables -> dense upstream state dict (classifier naming, without the BN counter)."""
    return {x.torch_name: x.to_torch(_get(variables, x.path)) for x in leaf_table(spec, with_head)}


def variables_problems(spec: ModelSpec, variables: Mapping, with_head: bool) -> list[str]:
    """Every path of `variables` that is missing, unexpected or mis-shaped for `spec`."""
    expected = {"/".join(map(str, x.path)): x.pfq_shape for x in leaf_table(spec, with_head)}
    got = {"/".join(map(str, p)): np.shape(v) for p, v in _walk(variables)}
    return _mismatch_listing(expected, got)


def describe(spec: ModelSpec, with_head: bool) -> str:
    what = f"classifier with {spec.num_classes} classes" if with_head else "bare encoder"
    return f"ProFound-Conv {what} (depths {tuple(spec.depths)}, dims {tuple(spec.dims)}, in_chans {spec.in_chans})"
