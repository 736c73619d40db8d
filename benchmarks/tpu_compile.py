"""Compile one 7x7x7 depthwise convolution (forward + input and kernel gradients) for a described
TPU, per formulation, on this CPU host; print compile time (wall and this process's CPU), XLA's
flops, bytes, optimal_seconds and temporaries, and each formulation's compile-time ratio to the
first one. Needs libtpu (`pip install -e '.[tpu]'`), no TPU.

    python benchmarks/tpu_compile.py --impls shifted,direct,fft --shape 1,16,16,16,256

Each formulation is compiled in a fresh subprocess, so that nothing is shared between them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pfq import plan
from pfq.model.depthwise import depthwise_conv3d
impl, shape, dtype, topology = sys.argv[1], tuple(int(s) for s in sys.argv[2].split(",")), sys.argv[3], sys.argv[4]
plan.quiet_libtpu()
devices = plan.topology_devices(topology)
rep = NamedSharding(Mesh(np.array(devices[:1]), ("one",)), P())
f = lambda x, k: jnp.sum(depthwise_conv3d(x, k, impl=impl).astype(jnp.float32) ** 2)
x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=rep)
k = jax.ShapeDtypeStruct((7, 7, 7, 1, shape[-1]), jnp.float32, sharding=rep)
lowered = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, k)
t0, c0 = time.perf_counter(), time.process_time()
compiled = lowered.compile()
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
print(json.dumps({"impl": impl, "compile_wall_s": wall, "compile_cpu_s": cpu, "flops": cost.get("flops"),
                  "bytes": cost.get("bytes accessed"), "optimal_seconds": cost.get("optimal_seconds"),
                  "temp_mib": mem.temp_size_in_bytes / 2**20}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="shifted,direct,fft")
    p.add_argument("--shape", default="1,16,16,16,256", help="N,D,H,W,C of the activation")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--topology", default="v5e:2x2")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    rows = []
    for impl in args.impls.split(","):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, impl, args.shape, args.dtype, args.topology],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"{impl}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{impl:>8}: compile {r['compile_wall_s']:7.1f} s wall {r['compile_cpu_s']:7.1f} s CPU "
            f"({r['compile_cpu_s'] / rows[0]['compile_cpu_s']:5.1f}x {rows[0]['impl']}), XLA flops "
            f"{r['flops'] / 1e9:.3f} G, bytes {r['bytes'] / 1e9:.3f} G, optimal_seconds {r['optimal_seconds']:.3g}, "
            f"temporaries {r['temp_mib']:.1f} MiB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
