"""One training step of ProFound-Conv tiny + head: pfq (jitted, donated buffers) vs PyTorch.

A step is forward, cross-entropy loss, backward and an AdamW update (lr 1e-4, weight decay 0.05,
drop-path 0.1), fp32. Each side runs in its own worker subprocess, so peak memory (ru_maxrss)
is per side; the parent interleaves their timed steps (pfq, torch, torch_contiguous, pfq, ...)
so all see the same background load on a shared machine, and reports medians and
speedup = torch / pfq, against PyTorch in channels_last_3d (its faster layout here) and in
contiguous NCDHW. pfq runs with remat "light" (--remat), which keeps its peak memory below
PyTorch's at the real size. Each side also reports its page faults per step: on a VM, first
touches of freshly allocated memory cost both sides a large, load-dependent share of a step.

    python benchmarks/bench_step.py --preset small      # batch 2, 3x32x96x96
    python benchmarks/bench_step.py --preset real       # batch 1, 3x64x224x224 (the demo size)
    python benchmarks/bench_step.py --preset small --profile   # + where pfq's time goes
    python benchmarks/bench_step.py --preset real --order blocked   # one side after another
    python benchmarks/bench_step.py --preset real --hugepages       # all sides on huge pages

The last stdout line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

PRESETS = {
    "small": {"batch": 2, "size": (32, 96, 96)},
    "real": {"batch": 1, "size": (64, 224, 224)},
}
LR, WEIGHT_DECAY, DROP_PATH = 1e-4, 0.05, 0.1
# Side name -> (worker, PyTorch memory format). channels_last_3d is PyTorch's faster layout here
# (its depthwise conv backward is ~3x faster than in contiguous NCDHW); contiguous is the layout of
# the earlier orientation figures.
SIDES = {"pfq": ("pfq", ""), "torch": ("torch", "channels_last"), "torch_contiguous": ("torch", "contiguous")}
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ memory


class RssSampler:
    """Samples this process's resident set size in a thread, so that peaks can be attributed to
    phases (compile vs. steps); ru_maxrss alone is one lifetime maximum."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    def reset(self) -> int:
        """Return the peak since the last reset and start a new phase."""
        peak, self.peak = max(self.peak, self.current()), self.current()
        return peak


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------ workers


def parse_remat(text: str) -> tuple[bool | str, ...]:
    """'light' (every stage), 'light,none,none,none' (per stage) or '1000' (per-stage bools)."""
    if "," in text:
        return tuple(text.split(","))
    if text.isdigit():
        return tuple(c == "1" for c in text)
    return (text,) * 4


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to other
    jobs on a shared machine (though not immune: cache misses, lock and barrier waits)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _minor_faults() -> int:
    """Page faults served without I/O: each first touch of freshly mapped memory costs one."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _serve(do_step, info: dict, sampler: RssSampler) -> None:
    """Answer the parent's commands on stdin: 'step' (one timed step) or 'done'."""
    info["rss_setup_peak"] = sampler.reset()
    _emit(info)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            c0, f0, t0 = _cpu_seconds(), _minor_faults(), time.perf_counter()
            do_step()
            _emit({"time": time.perf_counter() - t0, "cpu": _cpu_seconds() - c0, "faults": _minor_faults() - f0})
        elif cmd == "done":
            _emit({"rss_steps_peak": sampler.reset(), "max_rss": max_rss_bytes()})
            return


def pfq_worker(args: argparse.Namespace) -> None:
    sampler = RssSampler()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pfq import xla_flags
    from pfq.model import ModelSpec, apply, count_params, init_variables
    from pfq.model.depthwise import resolve_impl

    xla_flags.set_defaults()  # read when the backend starts, at the first computation below

    spec = ModelSpec.from_size(
        args.model,
        num_classes=2,
        drop_path_rate=DROP_PATH,
        depthwise_impl=args.impl,
        dtype=args.dtype,
        remat_stages=parse_remat(args.remat),
    )
    variables = init_variables(spec, jax.random.key(0))
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, *args.size, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 2, args.batch))

    def loss_fn(params, batch_stats, x, y, key):
        variables = {"params": params, "batch_stats": batch_stats}
        logits, new_stats = apply(spec, variables, x, train=True, key=key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, new_stats

    def train_step(params, batch_stats, opt_state, x, y, key):
        key, sub = jax.random.split(key)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y, sub)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, key, loss

    key = jax.random.key(1)
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=(0, 1, 2, 5))
    lowered = step.lower(params, batch_stats, opt_state, x, y, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state = [params, batch_stats, opt_state, key]

    def do_step() -> None:
        p, s, o, k, loss = compiled(state[0], state[1], state[2], x, y, state[3])
        jax.block_until_ready((p, o, loss))
        state[:] = [p, s, o, k]

    info = {
        "side": "pfq",
        "compile_s": compile_s,
        "params": count_params(params),
        "depthwise": resolve_impl(args.impl),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    mem = compiled.memory_analysis()
    if mem is not None:
        info["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
        info["xla_argument_bytes"] = int(mem.argument_size_in_bytes)
    t0 = time.perf_counter()
    do_step()
    info["first_step_s"] = time.perf_counter() - t0
    if args.profile:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from xla_profile import profile_compiled

        info["profile"] = profile_compiled(compiled, do_step)
    _serve(do_step, info, sampler)


def torch_worker(args: argparse.Namespace) -> None:
    sampler = RssSampler()
    import numpy as np
    import torch

    from tests.torch_reference import build  # the repo root is on PYTHONPATH (see _spawn)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from pfq.model.convnext import SIZES

    depths, dims = SIZES[args.model]
    model = build(depths, dims, num_classes=2, drop_path_rate=DROP_PATH).train()
    fmt = torch.channels_last_3d if args.torch_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, *args.size), dtype=np.float32))
    x = x.contiguous(memory_format=fmt)
    y = torch.from_numpy(rng.integers(0, 2, args.batch))

    def do_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    info = {
        "side": "torch",
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "format": args.torch_format,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    t0 = time.perf_counter()
    do_step()
    info["first_step_s"] = time.perf_counter() - t0
    _serve(do_step, info, sampler)


# ------------------------------------------------------------------------------------ parent


def _spawn(side: str, args: argparse.Namespace) -> subprocess.Popen:
    worker, fmt = SIDES[side]
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--size",
        ",".join(map(str, args.size)),
        "--impl",
        args.impl,
        "--dtype",
        args.dtype,
        "--remat",
        args.remat,
        "--threads",
        str(args.threads),
        "--torch-format",
        fmt or "contiguous",
        "--torch-omp-wait",
        args.torch_omp_wait,
    ]
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if worker == "torch" and args.torch_omp_wait == "passive":
        # OpenMP threads that sleep instead of spinning at barriers: on this shared, oversubscribed
        # machine spinning made PyTorch's step up to 10x slower and erratic; passive gives it its
        # best and steadiest times (XLA's thread pool is not affected this way).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.hugepages:
        # Every side alike: glibc (>= 2.35) then asks for transparent huge pages on its large
        # allocations, so a fresh buffer costs one page fault per 2 MiB instead of per 4 KiB.
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _ask(proc: subprocess.Popen, cmd: str) -> dict:
    proc.stdin.write(cmd + "\n")
    proc.stdin.flush()
    return _read(proc)


def _read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker exited with {proc.wait()}")
    return json.loads(line)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, help="override the preset's batch size")
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split(",")), help="D,H,W override")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (oneDNN caches)")
    p.add_argument("--impl", default="auto", help="pfq depthwise formulation")
    p.add_argument("--dtype", default="float32", help="pfq compute dtype (the comparison is fp32)")
    p.add_argument(
        "--remat",
        default="light",
        help="pfq remat per stage: none|light|full, per stage 'light,light,none,none', or '1000'",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU cores for both sides (affinity; torch.set_num_threads)",
    )
    p.add_argument(
        "--torch-format", choices=["channels_last", "contiguous"], default="channels_last", help=argparse.SUPPRESS
    )  # set per side (SIDES); the worker reads it
    p.add_argument(
        "--torch-omp-wait",
        choices=["passive", "default"],
        default="passive",
        help="OMP_WAIT_POLICY for the PyTorch worker",
    )
    p.add_argument(
        "--order",
        choices=["interleaved", "blocked"],
        default="interleaved",
        help="interleaved: pfq, torch, ... per round (same background load for all sides); "
        "blocked: all of one side's steps, then the next side's (no side disturbs another)",
    )
    p.add_argument(
        "--hugepages",
        action="store_true",
        help="all sides with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages)",
    )
    p.add_argument(
        "--sides",
        default="pfq,torch,torch_contiguous",
        help=f"comma-separated, from {sorted(SIDES)}; torch is channels_last_3d",
    )
    p.add_argument("--profile", action="store_true", help="profile pfq's step (XLA cost analysis + trace)")
    p.add_argument("--worker", choices=["pfq", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.size = tuple(args.size or preset["size"])

    if args.worker:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        (pfq_worker if args.worker == "pfq" else torch_worker)(args)
        return

    sides = args.sides.split(",")
    print(
        f"bench_step: {args.model}, batch {args.batch}, input 3x{'x'.join(map(str, args.size))}, "
        f"{args.threads} threads, {args.steps} interleaved steps per side",
        file=sys.stderr,
    )
    procs, info = {}, {}
    for side in sides:  # set up one at a time, so compilation does not overlap the other's setup
        procs[side] = _spawn(side, args)
        info[side] = _read(procs[side])
        print(f"  {side} ready: {json.dumps({k: v for k, v in info[side].items() if k != 'profile'})}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    faults: dict[str, list[int]] = {s: [] for s in sides}

    def timed(side: str) -> None:
        r = _ask(procs[side], "step")
        times[side].append(r["time"])
        cpu[side].append(r["cpu"])
        faults[side].append(r["faults"])

    if args.order == "interleaved":
        for _ in range(args.warmup):
            for side in sides:
                _ask(procs[side], "step")
        for i in range(args.steps):
            for side in sides:
                timed(side)
            print(f"  step {i}: " + ", ".join(f"{s} {times[s][-1]:.3f}s" for s in sides), file=sys.stderr)
    else:  # blocked: each side's warm-up and timed steps back to back, one side after another
        for side in sides:
            for _ in range(args.warmup):
                _ask(procs[side], "step")
            for _ in range(args.steps):
                timed(side)
            print(f"  {side}: " + ", ".join(f"{t:.3f}s" for t in times[side]), file=sys.stderr)
    for side in sides:
        info[side].update(_ask(procs[side], "done"))
        procs[side].wait()

    result: dict = {
        "bench": "step",
        "model": args.model,
        "batch": args.batch,
        "size": list(args.size),
        "threads": args.threads,
        "steps": args.steps,
        "dtype": args.dtype,
        "remat": args.remat,
        "hugepages": args.hugepages,
        "order": args.order,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    for side in sides:
        r = info[side]
        result[side] = {
            "median_s": _median(times[side]),
            "min_s": min(times[side]),
            "median_cpu_s": _median(cpu[side]),
            "median_page_faults": _median(faults[side]),
            "times_s": [round(t, 4) for t in times[side]],
            "first_step_s": r["first_step_s"],
            "peak_rss_mb": r["max_rss"] / 2**20,
            "steps_rss_peak_mb": r["rss_steps_peak"] / 2**20,
        }
        for k in ("compile_s", "depthwise", "params", "xla_temp_bytes", "format", "backend", "omp_wait_policy"):
            if k in r:
                result[side][k] = r[k]
        if "profile" in r:
            result[side]["profile"] = r["profile"]
    for ref in [s for s in sides if s != "pfq"] if "pfq" in sides else []:
        rounds = zip(times["pfq"], times[ref], strict=True)
        result[f"vs_{ref}"] = {
            "speedup": result[ref]["median_s"] / result["pfq"]["median_s"],
            # Robustness views for a shared machine: the median of the per-round ratios (each round's
            # steps ran back to back under similar load), the ratio of the fastest (least disturbed)
            # steps, and the ratio of CPU seconds per step.
            # (blocked order has no rounds: None)
            "speedup_paired_median": _median([t / p for p, t in rounds]) if args.order == "interleaved" else None,
            "speedup_min": result[ref]["min_s"] / result["pfq"]["min_s"],
            "cpu_time_ratio": result[ref]["median_cpu_s"] / result["pfq"]["median_cpu_s"],
            "peak_rss_ratio": result["pfq"]["peak_rss_mb"] / result[ref]["peak_rss_mb"],
        }
    if "vs_torch" in result:
        result["speedup"] = result["vs_torch"]["speedup"]
    for side in sides:
        r = result[side]
        extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        print(
            f"{side:16s} median {r['median_s']:.3f} s (min {r['min_s']:.3f} s, "
            f"CPU {r['median_cpu_s']:.2f} s, {r['median_page_faults'] / 1e3:.0f}k page faults), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(steps {r['steps_rss_peak_mb']:.0f} MB){extra}"
        )
    print(
        f"1-min load average before/after the timed steps: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    for ref in [s for s in sides if f"vs_{s}" in result]:
        v = result[f"vs_{ref}"]
        paired = v["speedup_paired_median"]
        paired = f"; median of paired rounds {paired:.2f}x" if paired is not None else ""
        print(
            f"speedup {ref} / pfq: {v['speedup']:.2f}x from medians{paired}; fastest steps {v['speedup_min']:.2f}x; "
            f"CPU time {v['cpu_time_ratio']:.2f}x. Peak RSS pfq / {ref} {v['peak_rss_ratio']:.2f}"
        )
    if "profile" in result.get("pfq", {}):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from xla_profile import print_profile

        print("pfq profile (one step, traced after the timed steps' warm-up):")
        print_profile(result["pfq"]["profile"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
