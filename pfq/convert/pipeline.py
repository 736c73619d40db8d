"""The two conversions: a ProFound PyTorch checkpoint -> pfq model dir, and pfq model dir -> safetensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfq.convert.formats import FORMAT_NAMES, to_dense
from pfq.convert.infer import infer_spec
from pfq.convert.layout import BN_COUNTER, export_state, import_state
from pfq.convert.reader import read_source
from pfq.convert.store import check_finite, has_head, load_model_dir, save_model_dir
from pfq.io import atomic_path
from pfq.model import ModelSpec


@dataclass
class Converted:
    spec: ModelSpec
    variables: dict
    metadata: dict[str, Any]


def convert_checkpoint(
    src: str | Path, *, size: str | None = None, in_chans: int | None = None, num_classes: int | None = None
) -> Converted:
    """Read, detect, remap and check a checkpoint; nothing is written."""
    source = read_source(src)
    dense = to_dense(source.tree)
    shapes = {k: v.shape for k, v in dense.state.items()}
    spec = infer_spec(shapes, with_head=dense.with_head, size=size, in_chans=in_chans, num_classes=num_classes)
    variables = import_state(spec, dense.state, dense.with_head)
    if not dense.with_head:
        variables = {"params": {"encoder": variables["params"]["encoder"]}, "batch_stats": {}}
    check_finite(variables, str(src))
    metadata: dict[str, Any] = {
        "source_format": dense.source_format,
        "source_format_name": FORMAT_NAMES[dense.source_format],
        "source_container": source.container,
        "source_file": source.path.name,
        "source_sha256": source.sha256,
        "source_dropped_keys": dense.dropped,
        "source_filled_keys": dense.filled,
        "source_extras": dense.extras,
    }
    if dense.bn_batches_tracked is not None:
        metadata["torch_buffers"] = {BN_COUNTER: dense.bn_batches_tracked}
    return Converted(spec, variables, metadata)


def convert_file(
    src: str | Path,
    dest_dir: str | Path,
    *,
    overwrite: bool = False,
    size: str | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
) -> Converted:
    if Path(dest_dir).exists() and not overwrite:  # fail before the (possibly long) read
        raise FileExistsError(f"{dest_dir} exists; pass --overwrite to replace it")
    out = convert_checkpoint(src, size=size, in_chans=in_chans, num_classes=num_classes)
    save_model_dir(dest_dir, out.spec, out.variables, out.metadata, overwrite=overwrite)
    return out


def torch_state_dict(
    spec: ModelSpec, variables: dict, metadata: dict, *, encoder_only: bool = False
) -> dict[str, np.ndarray]:
    """Upstream dense names and PyTorch layouts. A classifier keeps `encoder.`/`head.` names (for
    `Classifier(convnextv2_*(), C)`); encoder-only output has bare names (for `convnextv2_*()`)."""
    with_head = has_head(variables) and not encoder_only
    state = export_state(spec, variables, with_head)
    if with_head:
        count = metadata.get("torch_buffers", {}).get(BN_COUNTER, 0)
        state[BN_COUNTER] = np.array(count, dtype=np.int64)
        return state
    return {k[len("encoder.") :]: v for k, v in state.items()}


def export_torch(
    src_dir: str | Path, dest: str | Path, *, overwrite: bool = False, encoder_only: bool = False
) -> dict[str, np.ndarray]:
    """Write `torch_state_dict` of a pfq model dir to a safetensors file (atomically)."""
    from safetensors.numpy import save_file

    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass --overwrite to replace it")
    spec, variables, metadata = load_model_dir(src_dir)
    state = torch_state_dict(spec, variables, metadata, encoder_only=encoder_only)
    note = {"format": "pt", "pfq_source_sha256": str(metadata.get("source_sha256", ""))}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata=note)
    return state
