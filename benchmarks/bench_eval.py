"""One-pass evaluation (predict the test pool once, score stratified subsets of the predictions) vs
naive evaluation (run inference again for every test ratio and subset draw), side by side.

    python benchmarks/bench_eval.py [--pool 240] [--ratios 0 0.25 0.5 0.75 1] [--draws 5] [--lanes 4]

Both paths use the same jitted, lane-vmapped predict step and the same subsets; the script checks
that they give the same metrics and prints the time of each and the speedup. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pfq import evaluate, xla_flags
from pfq.model import ModelSpec, init_variables
from pfq.train.step import make_predict_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=240)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", default="16,32,32")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.size.split(","))
    spec = ModelSpec(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))
    variables = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[init_variables(spec, jax.random.key(i)) for i in range(args.lanes)]
    )
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(args.pool,) + shape + (3,)).astype(np.float32)
    labels = rng.integers(0, 2, args.pool)
    is_hq = np.arange(args.pool) % 2 == 0
    size = evaluate.max_test_size(is_hq, labels, args.ratios, 2)
    subsets = evaluate.test_subsets(is_hq, labels, args.ratios, size, args.draws, 0, 2)
    predict = jax.jit(jax.vmap(make_predict_step(spec), in_axes=(0, None)))

    def infer(indices: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(indices), args.batch):
            chunk = indices[start : start + args.batch]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], args.batch - len(chunk))])
            out.append(np.asarray(predict(variables, pool[padded]))[:, : len(chunk)])
        return np.concatenate(out, axis=1)

    infer(np.arange(args.batch))  # compile once, outside both timings
    t0 = time.perf_counter()
    probs = infer(np.arange(args.pool))
    one_pass = {
        key: [evaluate.score(labels[idx], probs[lane, idx])["auc"] for lane in range(args.lanes)]
        for key, idx in subsets.items()
    }
    one_pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {}
    for key, idx in subsets.items():
        p = infer(idx)
        naive[key] = [evaluate.score(labels[idx], p[lane])["auc"] for lane in range(args.lanes)]
    naive_s = time.perf_counter() - t0
    max_diff = max(abs(a - b) for key in subsets for a, b in zip(one_pass[key], naive[key], strict=True))
    print(
        f"device {jax.devices()[0].device_kind}; pool {args.pool}, {len(args.ratios)} ratios x {args.draws} draws "
        f"of {size} cases, {args.lanes} lanes, input {shape}"
    )
    print(
        f"one-pass {one_pass_s:.2f} s, naive {naive_s:.2f} s, speedup {naive_s / one_pass_s:.1f}x, "
        f"max AUC difference {max_diff:.2e}"
    )
    print(
        json.dumps(
            {
                "benchmark": "eval",
                "pool": args.pool,
                "subsets": len(subsets),
                "subset_size": size,
                "lanes": args.lanes,
                "one_pass_s": round(one_pass_s, 3),
                "naive_s": round(naive_s, 3),
                "speedup": round(naive_s / one_pass_s, 2),
                "max_auc_diff": max_diff,
            }
        )
    )


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    main()
