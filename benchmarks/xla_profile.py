"""Where a compiled JAX computation spends its time on the device: a jax.profiler trace summed per
HLO instruction, joined with the compiled HLO text to name each instruction's kind (FFT, matmul,
fusion, ...), pass (forward or backward) and the pfq source line it comes from.

    from xla_profile import profile_compiled, print_profile
    prof = profile_compiled(compiled, run_once)   # run_once() executes `compiled` once and blocks
    print_profile(prof)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Op:
    opcode: str
    shape: str
    kind: str  # coarse category
    backward: bool  # created by JAX's transpose of a JVP
    source: str  # "file.py:line function" of the innermost frame in pfq, or ""


def _source_table(hlo: str, marker: str) -> dict[int, str]:
    """stack_frame_id -> 'file:line function' of the innermost frame whose file path contains
    `marker` (walking callers outwards), from the tables at the top of the HLO text."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section is None or not line[:1].isdigit():
            if line.startswith(("%", "ENTRY", "HloModule")) and section:
                break
            continue
        idx, rest = line.split(" ", 1)
        i = int(idx)
        if section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FunctionNames":
            funcs[i] = rest.strip('"')
        elif section == "FileLocations":
            f = dict(re.findall(r"(\w+)=(\d+)", rest))
            locs[i] = (int(f["file_name_id"]), int(f["function_name_id"]), int(f["line"]))
        else:
            f = dict(re.findall(r"(\w+)=(\d+)", rest))
            frames[i] = (int(f["file_location_id"]), int(f["parent_frame_id"]))
    out: dict[int, str] = {}
    for fid in frames:
        cur, seen = fid, set()
        while cur in frames and cur not in seen:
            seen.add(cur)
            loc, parent = frames[cur]
            file_id, func_id, lineno = locs[loc]
            path = files.get(file_id, "")
            if marker in path:
                out[fid] = f"{Path(path).name}:{lineno} {funcs.get(func_id, '?')}"
                break
            cur = parent
        else:
            out.setdefault(fid, "")
    return out


def _kind(opcode: str, name: str, fusion_kind: str) -> str:
    if opcode == "fft":
        return "fft"
    if opcode in ("dot", "convolution") or name.startswith(("ynn_fusion", "onednn")) or "dot" in name:
        return "matmul/conv (dot, YNNPACK/oneDNN fusions, convolution)"
    if opcode in ("copy", "transpose") or "transpose" in name or name.startswith("copy"):
        return "layout copies/transposes"
    if fusion_kind == "kInput" or "reduce" in name:
        return "reductions (fused)"
    if opcode == "fusion":
        return "elementwise (fused)"
    return opcode


def hlo_ops(hlo: str, marker: str = "/pfq/") -> dict[str, Op]:
    """Instruction name -> Op for every instruction of the compiled HLO text."""
    sources = _source_table(hlo, marker)
    ops: dict[str, Op] = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m or m.group(1) in ops:
            continue
        name, shape, opcode = m.groups()
        fk = re.search(r"kind=(k\w+)", line)
        sf = re.search(r"stack_frame_id=(\d+)", line)
        ops[name] = Op(
            opcode,
            shape,
            _kind(opcode, name, fk.group(1) if fk else ""),
            "transpose(jvp" in line,
            sources.get(int(sf.group(1)), "") if sf else "",
        )
    return ops


def trace_seconds(run_once: Callable[[], None], steps: int = 2) -> collections.Counter:
    """Seconds per run spent in each traced XLA instruction, from a jax.profiler trace."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run_once()
        files = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(files[0]))["traceEvents"] if files else []
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            per_op[e["name"]] += e["dur"] / 1e6 / steps
    return per_op


def profile_compiled(compiled, run_once: Callable[[], None], steps: int = 2, top: int = 15) -> dict:
    """XLA's cost analysis and a traced breakdown of `compiled` by kind, pass and source line.

    Times are summed over instructions; XLA:CPU can run independent instructions concurrently, so
    the sum may exceed the wall time a little."""
    out: dict = {}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost:
        out["cost_gflop"] = float(cost.get("flops", 0.0)) / 1e9
        out["cost_gbytes_accessed"] = float(cost.get("bytes accessed", 0.0)) / 1e9
    ops = hlo_ops(compiled.as_text())
    per_op = {n: s for n, s in trace_seconds(run_once, steps).items() if n in ops}
    by_kind: collections.Counter = collections.Counter()
    by_pass: collections.Counter = collections.Counter()
    by_source: collections.Counter = collections.Counter()
    for name, sec in per_op.items():
        op = ops[name]
        by_kind[op.kind] += sec
        by_pass["backward" if op.backward else "forward (and optimizer)"] += sec
        by_source[op.source or "(no pfq source line: matmul library fusions, loss, optimizer)"] += sec
    out["op_seconds_total"] = sum(per_op.values())
    out["by_kind"] = dict(by_kind.most_common())
    out["by_pass"] = dict(by_pass.most_common())
    out["by_source"] = dict(by_source.most_common(top))
    out["top_ops"] = [
        [n, round(s, 4), ops[n].opcode, ops[n].shape, ops[n].source]
        for n, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    ]
    return out


def print_profile(prof: dict) -> None:
    print(
        f"  XLA cost analysis: {prof.get('cost_gflop', 0):.1f} GFLOP, "
        f"{prof.get('cost_gbytes_accessed', 0):.1f} GB accessed; traced op time "
        f"{prof['op_seconds_total']:.3f} s per step"
    )
    for title, key in (("by kind", "by_kind"), ("by pass", "by_pass"), ("by pfq source line", "by_source")):
        print(f"  {title}:")
        for k, v in prof[key].items():
            print(f"    {v:7.3f} s  {k}")
    print("  costliest instructions:")
    for name, sec, opcode, shape, src in prof["top_ops"]:
        print(f"    {sec:7.3f} s  {opcode:11s} {shape[:44]:44s} {src[:40]:40s} {name}")
