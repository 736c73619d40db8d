"""XLA's own account of one pfq training step's memory, per remat mode, without running it.

Compiles the same step as bench_step.py (tiny + head, AdamW, donated state) from abstract shapes
and prints `compiled.memory_analysis()`: temporaries (activations kept for the backward plus
scratch), arguments, and XLA's FLOP count, which shows what remat recomputes. Deterministic, so
it is the number to compare layouts and policies by; RSS adds the runtime and compiler on top.

    python benchmarks/step_memory.py --preset real --remat none light full
    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true \\
        python benchmarks/step_memory.py --preset real --remat none light   # XLA's default scheduler
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pfq import xla_flags  # noqa: E402

xla_flags.set_defaults()  # before JAX starts its backend

PRESETS = {"small": (2, (32, 96, 96)), "real": (1, (64, 224, 224))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="real")
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--remat",
        nargs="+",
        default=["none", "light", "full"],
        help="modes for all stages, or per stage as light,light,none,none",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impl", default="auto", help="depthwise formulation")
    args = p.parse_args()

    import os

    import jax
    import jax.numpy as jnp
    import optax

    from pfq.model import ModelSpec, abstract_variables, apply

    batch, size = PRESETS[args.preset]
    tx = optax.adamw(1e-4, weight_decay=0.05)
    rows = []
    for mode in args.remat:
        spec = ModelSpec.from_size(
            args.model,
            num_classes=2,
            drop_path_rate=0.1,
            dtype=args.dtype,
            depthwise_impl=args.impl,
            remat_stages=tuple(mode.split(",")) if "," in mode else (mode,) * 4,
        )
        v = abstract_variables(spec)
        opt = jax.eval_shape(tx.init, v["params"])
        x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
        y = jax.ShapeDtypeStruct((batch,), jnp.int32)

        def loss_fn(params, stats, x, y, key, spec=spec):
            logits, new = apply(spec, {"params": params, "batch_stats": stats}, x, train=True, key=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        def step(params, stats, opt_state, x, y, key, loss_fn=loss_fn):
            (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new, opt_state, loss

        t0 = time.perf_counter()
        compiled = (
            jax.jit(step, donate_argnums=(0, 1, 2))
            .lower(v["params"], v["batch_stats"], opt, x, y, jax.random.key(0))
            .compile()
        )
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        row = {
            "remat": mode,
            "temp_mib": mem.temp_size_in_bytes / 2**20,
            "argument_mib": mem.argument_size_in_bytes / 2**20,
            "gflop": cost["flops"] / 1e9,
            "compile_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"remat {mode:6s}: XLA temporaries {row['temp_mib']:7.0f} MiB, arguments "
            f"{row['argument_mib']:5.0f} MiB, {row['gflop']:6.1f} GFLOP, compile {row['compile_s']:.1f} s",
            flush=True,
        )
    print(
        json.dumps(
            {
                "bench": "step_memory",
                "preset": args.preset,
                "model": args.model,
                "dtype": args.dtype,
                "impl": args.impl,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
