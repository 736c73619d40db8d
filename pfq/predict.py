"""Run a pfq model directory on volumes: logits, or pooled encoder features.

    python -m pfq.predict --checkpoint DIR --array X.npy --output Y.npy [--features] [--batch-size B]

`X` is float32 (N, C, D, H, W) in PyTorch axis order and is used as is (no preprocessing); it is
moved to channels-last (N, D, H, W, C) batch by batch. The output is logits (N, num_classes) or,
with `--features`, the final-normed pooled features (N, E); encoder-only directories need
`--features`. Inputs are chosen in one mutually exclusive argparse group and reach the model as
NCDHW batches (`iter_array_batches`); another input kind joins that group with its own batch
iterator and writer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from pfq.convert.errors import ConvertError
from pfq.convert.store import has_head, load_model_dir
from pfq.model import ModelSpec, apply, features

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
    x = np.load(path, mmap_mode="r", allow_pickle=False)
    if x.ndim != 5 or x.shape[1] != in_chans:
        raise ConvertError(f"{path}: expected an (N, {in_chans}, D, H, W) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConvertError(f"{path}: expected floating-point volumes, got {x.dtype}")
    return x


def iter_array_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]


def run_batches(forward: Forward, batches: Iterator[np.ndarray], batch_size: int) -> np.ndarray:
    """Apply `forward` to NCDHW batches; a short last batch is zero-padded so one compile serves all
    (samples never interact in eval mode: BatchNorm uses running statistics, GRN is per sample)."""
    outs = []
    for b in batches:
        n = b.shape[0]
        x = np.ascontiguousarray(np.asarray(b, dtype=np.float32).transpose(0, 2, 3, 4, 1))
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        outs.append(forward(x)[:n])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def save_array_atomically(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary sibling, then rename: a kill or a full disk never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pfq.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="pfq model directory (from tools/convert_weights.py or pfq.train)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--array", help="float32 .npy of shape (N, C, D, H, W), used without preprocessing")
    p.add_argument("--output", required=True, help=".npy to write: logits (N, classes) or features (N, E)")
    p.add_argument("--features", action="store_true", help="write pooled, normed encoder features instead")
    p.add_argument("--batch-size", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be positive", file=sys.stderr)
        return 2
    try:
        spec, variables, _ = load_model_dir(args.checkpoint)
        forward = make_forward(spec, variables, want_features=args.features)
        x = load_array(args.array, spec.in_chans)
        batch_size = min(args.batch_size, max(x.shape[0], 1))
        y = run_batches(forward, iter_array_batches(x, batch_size), batch_size)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_array_atomically(Path(args.output), y)
    print(f"wrote {args.output}: {y.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
