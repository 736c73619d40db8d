"""The pfq model directory: an Orbax checkpoint of the variables plus `pfq_model.json`.

    DIR/pfq_model.json   size, depths, dims, in_chans, num_classes (null: encoder only), provenance
    DIR/variables/       Orbax PyTree checkpoint of {"params": ..., ["batch_stats": ...]}

Writes are atomic: everything goes to a hidden sibling temp dir that is renamed into place, so a
failed write leaves no partial DIR, and an existing DIR is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pfq.convert.errors import ConvertError
from pfq.convert.infer import size_name
from pfq.convert.layout import describe, variables_problems
from pfq.io import atomic_dir
from pfq.model import ModelSpec, abstract_variables
from pfq.safe_open import UnsafeFileError, read_regular

METADATA_FILE = "pfq_model.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


def has_head(variables: Mapping) -> bool:
    return "head" in variables.get("params", {})


def model_metadata(spec: ModelSpec, with_head: bool) -> dict[str, Any]:
    return {
        "pfq_model_format": FORMAT_VERSION,
        "size": size_name(spec.depths, spec.dims),
        "depths": list(spec.depths),
        "dims": list(spec.dims),
        "in_chans": spec.in_chans,
        "num_classes": spec.num_classes if with_head else None,
    }


def save_model_dir(
    dest_dir: str | Path, spec: ModelSpec, variables: dict, metadata: dict, *, overwrite: bool = False
) -> Path:
    """Write `variables` (full classifier, or `{"params": {"encoder": ...}}`) and metadata to `dest_dir`.

    The structural fields of the metadata (size, depths, dims, in_chans, num_classes) come from
    `spec` and `variables`; `metadata` adds provenance (source format, sha256, ...).
    """
    with_head = has_head(variables)
    problems = variables_problems(spec, variables, with_head)
    if problems:
        raise ConvertError(f"variables do not match a {describe(spec, with_head)}", problems)
    tree = {"params": jax.tree.map(np.asarray, dict(variables["params"]))}
    if with_head:
        tree["batch_stats"] = jax.tree.map(np.asarray, dict(variables["batch_stats"]))
    meta = {**metadata, **model_metadata(spec, with_head)}
    text = json.dumps(meta, indent=2, sort_keys=True)
    with atomic_dir(dest_dir, overwrite=overwrite) as tmp:
        ocp.PyTreeCheckpointer().save(tmp / VARIABLES_DIR, tree)
        (tmp / METADATA_FILE).write_text(text + "\n")
    return Path(dest_dir).absolute()


MAX_METADATA_BYTES = 1 << 20


def _positive_ints(value: Any, count: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and len(value) > 0
        and all(type(v) is int and v > 0 for v in value)
    )


def metadata_problems(meta: Any) -> list[str]:
    """What is wrong with a parsed `pfq_model.json` (empty when it describes a model)."""
    if not isinstance(meta, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(meta), "null")
        return [f"the file holds a JSON {kind}, not an object"]
    problems = []
    depths, dims = meta.get("depths"), meta.get("dims")
    if not _positive_ints(depths, 4):
        problems.append(f"'depths' must be a list of 4 positive integers, got {depths!r:.80}")
    if not _positive_ints(dims, 4):
        problems.append(f"'dims' must be a list of 4 positive integers, got {dims!r:.80}")
    if not _positive_ints([meta.get("in_chans")]):
        problems.append(f"'in_chans' must be a positive integer, got {meta.get('in_chans')!r:.80}")
    if "num_classes" not in meta or not (meta["num_classes"] is None or _positive_ints([meta["num_classes"]])):
        got = meta.get("num_classes", "(missing)")
        problems.append(f"'num_classes' must be a positive integer or null, got {got!r:.80}")
    return problems


def read_metadata(src_dir: str | Path) -> dict[str, Any]:
    """`pfq_model.json`, checked: a JSON object with the model's structural fields."""
    if "\x00" in str(src_dir):
        raise ConvertError(f"{str(src_dir)!r}: the path contains a NUL byte")
    path = Path(src_dir) / METADATA_FILE
    if not Path(src_dir).is_dir():
        raise ConvertError(f"{src_dir}: not a pfq model directory (not a folder)")
    if not path.exists() and not path.is_symlink():
        raise ConvertError(f"{src_dir}: not a pfq model directory (no {METADATA_FILE})")
    try:
        meta = json.loads(read_regular(path, MAX_METADATA_BYTES).decode("utf-8"))
    except UnsafeFileError as e:
        raise ConvertError(f"{path}: {e.reason}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    problems = metadata_problems(meta)
    if problems:
        raise ConvertError(f"{path}: not a usable model description", problems)
    if meta.get("pfq_model_format") != FORMAT_VERSION:
        raise ConvertError(f"{path}: unsupported pfq_model_format {meta.get('pfq_model_format')!r:.80}")
    return meta


def spec_from_metadata(meta: Mapping[str, Any]) -> ModelSpec:
    kwargs = {} if meta["num_classes"] is None else {"num_classes": int(meta["num_classes"])}
    return ModelSpec(depths=tuple(meta["depths"]), dims=tuple(meta["dims"]), in_chans=int(meta["in_chans"]), **kwargs)


def nonfinite_problems(variables: Mapping) -> list[str]:
    """One line per floating-point array holding NaN or Inf (a diverged or damaged model)."""
    problems = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) and array.size:
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            if bad:
                problems.append(f"{jax.tree_util.keystr(keys)}: {bad} of {array.size} values are NaN/Inf")
    return problems


def check_finite(variables: Mapping, where: str) -> None:
    problems = nonfinite_problems(variables)
    if problems:
        raise ConvertError(
            f"{where}: the weights hold non-finite values (a diverged or damaged model); refusing to use them", problems
        )


def load_model_dir(src_dir: str | Path) -> tuple[ModelSpec, dict, dict]:
    """(spec, variables as numpy arrays, metadata). Encoder-only: params {"encoder"}, batch_stats {}.

    For encoder-only directories `metadata["num_classes"]` is None and `spec.num_classes` is the
    ModelSpec default; set it with `dataclasses.replace` before building a head.
    """
    meta = read_metadata(src_dir)
    spec = spec_from_metadata(meta)
    full = abstract_variables(spec)
    # Restoring against a target keeps the integer list keys (Orbax alone would return strings).
    target = (
        {"params": full["params"]}
        if meta["num_classes"] is not None
        else {"params": {"encoder": full["params"]["encoder"]}}
    )
    if meta["num_classes"] is not None:
        target["batch_stats"] = full["batch_stats"]
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    path = (Path(src_dir) / VARIABLES_DIR).absolute()
    if not path.is_dir():
        raise ConvertError(f"{src_dir}: not a complete pfq model directory (no {VARIABLES_DIR}/ folder)")
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged checkpoint
        text = " ".join(str(e).split())
        raise ConvertError(
            f"{src_dir}: the stored {VARIABLES_DIR}/ cannot be read ({type(e).__name__}: {text[:300]})"
        ) from None
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    problems = variables_problems(spec, variables, meta["num_classes"] is not None)
    if problems:
        raise ConvertError(f"{src_dir}: stored variables do not match its metadata", problems)
    check_finite(variables, str(src_dir))
    return spec, variables, meta
