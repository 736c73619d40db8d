"""Numeric effect of bf16 compute (fp32 parameters) against fp32, on CPU: class probabilities of a
forward pass and the parameter gradients of one training step, same variables and input.

    python benchmarks/bf16_effect.py [--size 16,32,32] [--depthwise fft]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pfq import xla_flags
from pfq.model import ModelSpec, apply, init_variables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="16,32,32")
    p.add_argument("--depthwise", default="fft")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    xla_flags.set_defaults()  # before JAX starts its backend
    size = tuple(int(s) for s in args.size.split(","))
    specs = {
        dt: ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), depthwise_impl=args.depthwise, dtype=dt)
        for dt in ("float32", "bfloat16")
    }
    variables = init_variables(specs["float32"], jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, *size, 3))

    def probs(spec):
        return jax.jit(lambda v, x: jax.nn.softmax(apply(spec, v, x)[0].astype(jnp.float32)))(variables, x)

    def grads(spec):
        loss = lambda v, x: jnp.sum(apply(spec, v, x, train=True)[0].astype(jnp.float32)[:, 1])
        return jax.jit(jax.grad(loss))(variables, x)["params"]

    dp = float(jnp.max(jnp.abs(probs(specs["float32"]) - probs(specs["bfloat16"]))))
    g32, g16 = grads(specs["float32"]), grads(specs["bfloat16"])
    rel = [
        float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(a) + 1e-12))
        for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True)
    ]
    print(
        f"bf16 vs fp32 ({args.depthwise}, input {size}): max |probability difference| {dp:.2e}; "
        f"gradient relative L2 difference per tensor: median {np.median(rel):.3f}, max {max(rel):.3f} "
        f"over {len(rel)} tensors"
    )


if __name__ == "__main__":
    main()
