"""Depthwise 7x7x7 convolution, forward + backward (grads for input and kernel), every pfq
formulation against PyTorch's `Conv3d(groups=C)` on the stage shapes of ProFound-Conv tiny.

Repetitions are interleaved across formulations (A, B, C, torch, A, B, ...) so that all see the
same background load; medians are reported with ratio = (faster of PyTorch channels_last_3d and
contiguous) / formulation (> 1: faster than PyTorch). Formulations slower than --budget seconds
per call are timed once and then skipped; direct and shifted are not run on the large shapes
(--slow-max-elems).

    python benchmarks/bench_depthwise.py                 # stage shapes of both presets
    python benchmarks/bench_depthwise.py --shapes 1,16,56,56,96

The last stdout line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pfq import xla_flags  # noqa: E402

xla_flags.set_defaults()  # before JAX starts its backend

# (N, D, H, W, C) per stage of tiny: real preset (1x3x64x224x224) and small (2x3x32x96x96).
STAGES = {
    "real s0": (1, 16, 56, 56, 96),
    "real s1": (1, 8, 28, 28, 192),
    "real s2": (1, 4, 14, 14, 384),
    "real s3": (1, 4, 14, 14, 768),
    "small s0": (2, 8, 24, 24, 96),
    "small s1": (2, 4, 12, 12, 192),
    "small s2": (2, 2, 6, 6, 384),
    "small s3": (2, 2, 6, 6, 768),
}


def make_runners(shape: tuple[int, ...], impls: list[str]) -> dict:
    """One zero-argument callable per formulation (and torch): forward + backward, blocking."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from pfq.model.depthwise import IMPLEMENTATIONS

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    k = (0.05 * rng.standard_normal((7, 7, 7, 1, shape[-1]))).astype(np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    xj, kj, gj = jnp.asarray(x), jnp.asarray(k), jnp.asarray(g)

    def jax_runner(f):
        def fwd_bwd(x, k, g):
            y, vjp = jax.vjp(f, x, k)
            return (y, *vjp(g))

        fn = jax.jit(fwd_bwd)
        return lambda: jax.block_until_ready(fn(xj, kj, gj))

    runners = {impl: jax_runner(IMPLEMENTATIONS[impl]) for impl in impls}

    def torch_runner(fmt):
        xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt).requires_grad_()
        kt = torch.from_numpy(k).permute(4, 3, 0, 1, 2).contiguous(memory_format=fmt).requires_grad_()
        gt = torch.from_numpy(g).permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)

        def run() -> None:
            y = torch.nn.functional.conv3d(xt, kt, padding=3, groups=shape[-1])
            torch.autograd.grad(y, (xt, kt), gt)

        return run

    runners["torch_contiguous"] = torch_runner(torch.contiguous_format)
    runners["torch"] = torch_runner(torch.channels_last_3d)
    return runners


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", help="N,D,H,W,C shapes (default: tiny's stage shapes)")
    p.add_argument("--impls", default="fft,fft_autodiff,direct,shifted")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=1.5, help="skip formulations slower than this (s)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument(
        "--slow-max-elems",
        type=float,
        default=2e6,
        help="run direct/shifted only on inputs with at most this many elements (they take "
        "tens of seconds on the large stage shapes)",
    )
    args = p.parse_args()
    # PyTorch's OpenMP threads sleep rather than spin at barriers: on this shared machine spinning
    # made its times up to 10x slower and erratic (see bench_step.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    shapes = {s: tuple(int(v) for v in s.split(",")) for s in args.shapes} if args.shapes else STAGES
    impls = args.impls.split(",")
    results = {}
    for label, shape in shapes.items():
        big = float(np.prod(shape)) > args.slow_max_elems
        runners = make_runners(shape, [i for i in impls if not (big and i in ("direct", "shifted"))])
        compile_s, times, skipped = {}, {n: [] for n in runners}, set()
        for name, run in runners.items():  # warm-up: compile, oneDNN primitive caches
            t0 = time.perf_counter()
            run()
            compile_s[name] = time.perf_counter() - t0
        for _ in range(args.reps):
            for name, run in runners.items():
                if name in skipped:
                    continue
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
                if times[name][-1] > args.budget:
                    skipped.add(name)
        med = {n: float(np.median(t)) for n, t in times.items()}
        best = min(med["torch"], med["torch_contiguous"])
        results[label] = {
            "shape": list(shape),
            "median_s": med,
            "speedup_vs_best_torch": {n: best / med[n] for n in med if not n.startswith("torch")},
            "first_call_s": compile_s,
            "reps": {n: len(t) for n, t in times.items()},
        }
        row = "  ".join(
            f"{n} {1e3 * med[n]:7.1f} ms" + (f" ({best / med[n]:5.2f}x)" if not n.startswith("torch") else "")
            for n in runners
        )
        print(f"{label:10s} {str(shape):24s} {row}", flush=True)
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps({"bench": "depthwise", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
