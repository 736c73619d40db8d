"""Model size from a dense state dict's shapes: depths, dims, in_chans and num_classes.

Works on names and shapes only (classifier naming: `encoder.*`, `head.*`), so it can be checked for
every preset without allocating a model. Any value may be forced; the forced model is then checked
key by key against the file like any other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pfq.convert.errors import ConvertError
from pfq.model import SIZES, ModelSpec

_STAGE_KEY = re.compile(r"^encoder\.stages\.(\d+)\.(\d+)\.")
STEM = "encoder.downsample_layers.0.0.weight"
HEAD_OUT = "head.3.weight"


def size_name(depths: tuple[int, ...], dims: tuple[int, ...]) -> str:
    """The upstream preset with these depths and dims, or "custom"."""
    for name, (d, w) in SIZES.items():
        if tuple(depths) == d and tuple(dims) == w:
            return name
    return "custom"


def _dim(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int, problems: list[str]) -> int:
    shape = shapes.get(key)
    if shape is None or len(shape) <= axis:
        problems.append(f"missing: {key}" if shape is None else f"{key}: shape {tuple(shape)} has no axis {axis}")
        return 0
    return int(shape[axis])


def infer_spec(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    with_head: bool,
    size: str | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
) -> ModelSpec:
    problems: list[str] = []
    if size is not None:
        if size not in SIZES:
            raise ConvertError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
        depths, dims = SIZES[size]
    else:
        dims = (
            _dim(shapes, STEM, 0, problems),
            *(_dim(shapes, f"encoder.downsample_layers.{i}.1.weight", 0, problems) for i in (1, 2, 3)),
        )
        blocks: dict[int, set[int]] = {}
        for key in shapes:
            m = _STAGE_KEY.match(key)
            if m:
                blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        depths = tuple(max(blocks.get(i, {-1})) + 1 for i in range(4))
        problems += [f"encoder.stages.{i}.*: no blocks" for i in range(4) if depths[i] == 0]
    if in_chans is None:
        in_chans = _dim(shapes, STEM, 1, problems)
    if not with_head:
        if num_classes is not None:
            raise ConvertError("--num-classes applies to classifier checkpoints; this one has no head")
        num_classes = 2  # unused: an encoder-only spec never builds the head's weights
    elif num_classes is None:
        num_classes = _dim(shapes, HEAD_OUT, 0, problems)
    if not problems and min(*dims, *depths, in_chans, num_classes) <= 0:
        problems.append(
            f"non-positive size: depths {depths}, dims {dims}, in_chans {in_chans}, num_classes {num_classes}"
        )
    if problems:
        raise ConvertError(
            "cannot infer the model size from the checkpoint's shapes (force it with --size/--in-chans/--num-classes)",
            problems,
        )
    return ModelSpec(depths=tuple(depths), dims=tuple(dims), in_chans=in_chans, num_classes=num_classes)
