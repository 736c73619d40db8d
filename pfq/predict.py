"""Run a pfq model directory on volumes: class probabilities, logits, or pooled encoder features.

    python -m pfq.predict --checkpoint DIR --manifest CASES.csv --output PRED.csv [--features]
    python -m pfq.predict --checkpoint DIR --array X.npy --output Y.npy [--features] [--batch-size B]

`--manifest` takes the training manifest format (docs/data.md; label and quality columns optional)
and preprocesses each case exactly as training does, through the same cache. The preprocessing is
read from the model directory (models exported by `pfq.train` record it), else ProFound's
64x224x224 at the T2w voxel grid; `--input-size` / `--spacing` override it. Every bad row is
reported, naming line, case and file, before anything is written. The output is a CSV with one row
per case in manifest order (case_id, line, quality and the task's label where the manifest has
them, then `prob_<k>` and `predicted`, or `feature_<e>` with `--features`), or a .npy of logits
or features when PRED ends in .npy. Where the manifest has the task's labels (`--task`, default the
exported model's), `PRED_metrics.csv` holds the task's metrics overall and per quality grade.

`--array`: `X` is float32 (N, C, D, H, W) in PyTorch axis order, used as is (no preprocessing);
the output is logits (N, num_classes) or features (N, E).

Encoder-only directories need `--features`. Both inputs are volume sources (`ArrayVolumes`, the
cache's `CachedVolumes`) that reach the model through the sweep's own prediction path,
`pfq.evaluate.predict`.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from pfq import evaluate, xla_flags
from pfq.convert.errors import ConvertError
from pfq.convert.store import has_head, load_model_dir
from pfq.data.cache import CachedVolumes, VolumeCache, default_cache_root
from pfq.data.manifest import Manifest, ManifestError, label_problems, read_manifest
from pfq.data.preprocess import PreprocessConfig
from pfq.io import atomic_write_bytes, atomic_write_text
from pfq.model import ModelSpec, apply, features
from pfq.safe_open import UnsafeFileError, open_regular
from pfq.tasks import TASKS, get_task

Forward = Callable[[np.ndarray], np.ndarray]


def make_forward(spec: ModelSpec, variables: dict, *, want_features: bool) -> Forward:
    """A jitted NDHWC-batch -> (B, K) function with the variables already on the device."""
    if not want_features and not has_head(variables):
        raise ConvertError("this checkpoint is encoder-only (no classifier head); use --features")
    params = jax.device_put(variables)

    @jax.jit
    def run(v: dict, x: jax.Array) -> jax.Array:
        return features(spec, v, x) if want_features else apply(spec, v, x)[0]

    return lambda x: np.asarray(run(params, x))


def load_array(path: str | Path, in_chans: int) -> np.ndarray:
    try:
        with open_regular(path) as f:  # never a FIFO or a device
            magic = f.read(6)
    except UnsafeFileError as e:
        raise ConvertError(str(e)) from None
    if magic != b"\x93NUMPY":
        kind = "an .npz archive" if magic.startswith(b"PK") else "not a .npy file"
        raise ConvertError(f"{path}: {kind}; --array takes one (N, {in_chans}, D, H, W) array saved with np.save")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:  # object arrays, truncated headers
        raise ConvertError(f"{path}: unreadable .npy ({e})") from None
    if x.ndim != 5 or x.shape[1] != in_chans:
        raise ConvertError(f"{path}: expected an (N, {in_chans}, D, H, W) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConvertError(f"{path}: expected floating-point volumes, got {x.dtype}")
    return x


def check_finite_cases(x: np.ndarray, name: str) -> None:
    """Refuse an input with NaN/Inf values, naming the first such case (a model would turn it into
    NaN outputs without a word); reads a memory-mapped array one case at a time."""
    for index in range(x.shape[0]):
        if not np.isfinite(np.asarray(x[index])).all():
            raise ConvertError(f"{name}: case {index} holds NaN/Inf values; refusing to predict on it")


class ArrayVolumes:
    """An (N, C, D, H, W) array (PyTorch axis order) as a volume source of channels-last float32 cases."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.x[index], dtype=np.float32).transpose(1, 2, 3, 0)


def save_array_atomically(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def preprocess_config(
    meta: dict, input_size: Sequence[int] | None, spacing: Sequence[float] | None
) -> PreprocessConfig:
    """The command line's choice, else what the model directory recorded (`pfq.train` exports),
    else ProFound's input (64x224x224 at the T2w grid)."""
    recorded = meta.get("preprocess") or {}
    size = input_size or recorded.get("input_size") or PreprocessConfig().input_size
    spacing = spacing or recorded.get("spacing")
    return PreprocessConfig(
        input_size=tuple(int(n) for n in size), spacing=tuple(float(s) for s in spacing) if spacing else None
    )


def load_manifest_volumes(
    path: str | Path, config: PreprocessConfig, *, cache_dir: str | None = None, workers: int = 0, progress: bool = True
) -> tuple[Manifest, CachedVolumes]:
    """Every case preprocessed (through the training cache); `ManifestError` lists every bad row."""
    manifest = read_manifest(path, require_quality=False)
    cache = VolumeCache(cache_dir or default_cache_root(), config)
    paths, problems = cache.prepare(manifest.cases, workers=workers, progress=progress, desc="preprocessing (cached)")
    if problems:
        raise ManifestError(path, problems)
    return manifest, CachedVolumes(paths)


def manifest_labels(manifest: Manifest, task_name: str | None) -> list[int | None] | None:
    """The task's class per case (None where the cell is empty or invalid), or None when there is
    no task or the manifest lacks its column."""
    task = TASKS.get(task_name or "")
    if task is None or not any(task.column in c.raw for c in manifest.cases):
        return None
    labels, _ = label_problems(manifest, task)  # -1 where empty or invalid: unlabelled here
    return [None if label < 0 else int(label) for label in labels]


def prediction_table(
    manifest: Manifest, values: np.ndarray, labels: list[int | None] | None, *, want_features: bool
) -> tuple[list[str], list[list]]:
    """(header, rows): one row per case in manifest order; `values` are class probabilities, or
    features with `want_features`."""
    header, columns = ["case_id", "line"], [[c.case_id for c in manifest.cases], [c.line for c in manifest.cases]]
    if any(c.quality for c in manifest.cases):
        header.append("quality")
        columns.append([c.quality or "" for c in manifest.cases])
    if labels is not None:
        header.append("label")
        columns.append(["" if label is None else label for label in labels])
    if want_features:
        header += [f"feature_{e}" for e in range(values.shape[1])]
        columns += [list(col) for col in values.T.tolist()]
    else:
        header += [f"prob_{k}" for k in range(values.shape[1])] + ["predicted"]
        columns += [[f"{p:.6g}" for p in col] for col in values.T] + [np.argmax(values, axis=1).tolist()]
    return header, [list(row) for row in zip(*columns, strict=True)]


def labelled_metrics(manifest: Manifest, probs: np.ndarray, labels: list[int | None], task_name: str) -> list[dict]:
    """The task's metrics (`pfq.evaluate.score`) on the cases with a valid label: all of them, then
    the HQ and LQ ones where the manifest grades quality."""
    valid = np.array([label is not None for label in labels])
    y = np.array([-1 if label is None else label for label in labels])
    quality = np.array([c.quality or "" for c in manifest.cases])
    groups = [("all", valid)] + [(q, valid & (quality == q)) for q in ("hq", "lq") if (quality == q).any()]
    return [
        {"cases": name, "n": int(mask.sum()), "task": task_name, **evaluate.score(y[mask], probs[mask], task_name)}
        for name, mask in groups
        if mask.any()
    ]


def save_table_atomically(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pfq.predict", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="pfq model directory (from tools/convert_weights.py or pfq.train)"
    )
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--manifest", help="CSV of cases (t2w, highb, adc paths; docs/data.md), preprocessed as in training"
    )
    inputs.add_argument("--array", help="float32 .npy of shape (N, C, D, H, W), used without preprocessing")
    p.add_argument(
        "--output",
        required=True,
        help="file to write: with --manifest a .csv table (or .npy array); with --array a .npy of "
        "logits (N, classes) or features (N, E)",
    )
    p.add_argument("--features", action="store_true", help="write pooled, normed encoder features instead")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="--manifest: volume size after crop/pad (default: as recorded by training, else 64 224 224)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("D", "H", "W"),
        help="--manifest: resample to this spacing in mm (default: as recorded, else the T2w grid)",
    )
    p.add_argument(
        "--task",
        help="--manifest: the task whose label column to report and score (default: the "
        "task an exported model was trained on)",
    )
    p.add_argument("--cache-dir", help="--manifest: preprocessed-volume cache (default $PFQ_CACHE/volumes)")
    p.add_argument("--workers", type=int, default=0, help="--manifest: processes that preprocess cases")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _predict_manifest(args, spec: ModelSpec, meta: dict, forward: Forward) -> int:
    if spec.in_chans != 3:
        raise ConvertError(
            f"{args.checkpoint}: a manifest gives 3 channels (t2w, highb, adc); this model takes {spec.in_chans}"
        )
    task_name = args.task or meta.get("task")
    if task_name is not None:
        task = get_task(task_name)
        if not args.features and task.num_classes != spec.num_classes:
            raise ConvertError(f"--task {task_name} has {task.num_classes} classes; this model has {spec.num_classes}")
    config = preprocess_config(meta, args.input_size, args.spacing)
    trained = preprocess_config(meta, None, None)
    if meta.get("preprocess") and trained.key() != config.key():
        print(
            f"note: this model was trained on input {trained.input_size} at spacing "
            f"{trained.spacing or 'T2w grid'}; predicting on {config.input_size} at "
            f"{config.spacing or 'T2w grid'}",
            file=sys.stderr,
        )
    manifest, volumes = load_manifest_volumes(
        args.manifest, config, cache_dir=args.cache_dir, workers=args.workers, progress=not args.no_progress
    )
    batch_size = min(args.batch_size, len(volumes))
    y = evaluate.predict(forward, volumes, np.arange(len(volumes)), batch_size, progress=not args.no_progress)
    out = Path(args.output)
    labels = manifest_labels(manifest, task_name)
    values = y if args.features else np.asarray(jax.nn.softmax(y.astype(np.float64), axis=1))
    if out.suffix == ".npy":
        save_array_atomically(out, y)
    else:
        save_table_atomically(out, *prediction_table(manifest, values, labels, want_features=args.features))
    size = "x".join(map(str, config.input_size))
    print(
        f"wrote {out}: {len(volumes)} cases, {y.shape[1]} {'features' if args.features else 'classes'} "
        f"(input {size}, spacing {config.spacing or 'T2w grid'})"
    )
    if labels is not None and not args.features:
        _write_metrics(out.with_name(f"{out.stem}_metrics.csv"), labelled_metrics(manifest, values, labels, task_name))
    return 0


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    columns = list(metrics[0]) if metrics else ["cases", "n", "task"]
    save_table_atomically(path, columns, [[row[c] for c in columns] for row in metrics])
    for row in metrics:
        print(f"  {row['cases']:>3}: n={row['n']:<5} auc={row['auc']:.3f}  accuracy={row['accuracy']:.3f}")
    print(f"wrote {path}: metrics on the {metrics[0]['n'] if metrics else 0} cases with a valid label")


def output_problem(path: Path) -> str | None:
    """Why `path` cannot receive the output (checked before any work), or None."""
    if "\x00" in str(path):
        return f"--output {str(path)!r} contains a NUL byte"
    if path.is_dir():
        return f"--output {path} is a folder; name a file in it"
    if not path.parent.is_dir():
        return f"--output {path}: the folder {path.parent} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be positive", file=sys.stderr)
        return 2
    problem = output_problem(Path(args.output))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        spec, variables, meta = load_model_dir(args.checkpoint)
        forward = make_forward(spec, variables, want_features=args.features)
        if args.manifest:
            return _predict_manifest(args, spec, meta, forward)
        x = load_array(args.array, spec.in_chans)
        batch_size = min(args.batch_size, max(x.shape[0], 1))
        check_finite_cases(x, args.array)
        y = evaluate.predict(forward, ArrayVolumes(x), np.arange(x.shape[0]), batch_size)
        if y.shape[0] == 0:  # no cases: still one column per class (or feature)
            y = np.zeros((0, spec.dims[-1] if args.features else spec.num_classes), np.float32)
    except (ConvertError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_array_atomically(Path(args.output), y)
    print(f"wrote {args.output}: {y.shape}")
    return 0


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    sys.exit(main())
