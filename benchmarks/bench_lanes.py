"""K lanes vmapped in one step vs K sequential single-lane steps, measured side by side.

    python benchmarks/bench_lanes.py [--lanes 1 2 4 8] [--batch 2] [--size 16,32,32] [--reps 5]

For each K: compile time of the K-lane program, median time of one K-lane step, median time of K
single-lane steps run back to back (same program, same data), and the per-lane cost ratio
vmapped / sequential (< 1: lanes are cheaper together). Rounds alternate between the two so that
machine noise hits both alike. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pfq import xla_flags
from pfq.config import base_config
from pfq.model import ModelSpec, init_variables
from pfq.train.optim import make_optimizer
from pfq.train.step import init_state, make_train_step


def stacked_state(spec, tx, lanes):
    states = [init_state(init_variables(spec, jax.random.key(i)), tx) for i in range(lanes)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", default="16,32,32")
    parser.add_argument("--depths", default="1,1,2,1")
    parser.add_argument("--dims", default="16,32,64,128")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.size.split(","))
    spec = ModelSpec(
        depths=tuple(int(v) for v in args.depths.split(",")), dims=tuple(int(v) for v in args.dims.split(","))
    )
    optim = base_config().optim
    optim.update({"lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 1, "grad_clip": 1.0})
    tx = make_optimizer(optim, init_variables(spec, jax.random.key(0))["params"], spec.depths, 100)
    step = make_train_step(spec, tx)
    rng = np.random.default_rng(0)
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"model depths={spec.depths} dims={spec.dims}, batch {args.batch}, input {shape}"
    )
    print(f"{'K':>3} {'compile K (s)':>14} {'vmapped step (s)':>17} {'K sequential (s)':>17} {'per-lane ratio':>15}")
    figures = []
    single = jax.jit(jax.vmap(step), donate_argnums=0)
    for k in args.lanes:
        batch = {
            "image": jnp.asarray(rng.normal(size=(k, args.batch) + shape + (3,)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 2, (k, args.batch)), jnp.int32),
        }
        keys = jnp.stack([jax.random.key(i) for i in range(k)])
        vstate = stacked_state(spec, tx, k)
        t0 = time.perf_counter()
        vstep = jax.jit(jax.vmap(step), donate_argnums=0).lower(vstate, batch, keys).compile()
        compile_s = time.perf_counter() - t0
        # Sequential: the same per-lane program (a 1-lane vmap), one lane after another.
        lane_states = [stacked_state(spec, tx, 1) for _ in range(k)]
        lane_batches = [jax.tree.map(lambda x, i=i: x[i : i + 1], batch) for i in range(k)]
        lane_keys = [keys[i : i + 1] for i in range(k)]
        for i in range(k):  # warm-up (compiles the 1-lane program once)
            lane_states[i], m = single(lane_states[i], lane_batches[i], lane_keys[i])
        vstate, m = vstep(vstate, batch, keys)
        jax.block_until_ready(m)
        vt, st = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            vstate, m = vstep(vstate, batch, keys)
            jax.block_until_ready(m)
            vt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(k):
                lane_states[i], m = single(lane_states[i], lane_batches[i], lane_keys[i])
            jax.block_until_ready(m)
            st.append(time.perf_counter() - t0)
        v, s = statistics.median(vt), statistics.median(st)
        figures.append(
            {
                "lanes": k,
                "compile_s": round(compile_s, 2),
                "vmapped_step_s": round(v, 4),
                "sequential_s": round(s, 4),
                "per_lane_ratio": round(v / s, 3),
            }
        )
        print(f"{k:>3} {compile_s:>14.1f} {v:>17.3f} {s:>17.3f} {v / s:>15.2f}")
    print(
        json.dumps(
            {
                "benchmark": "lanes",
                "device": jax.devices()[0].device_kind,
                "batch": args.batch,
                "input": list(shape),
                "results": figures,
            }
        )
    )


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    main()
