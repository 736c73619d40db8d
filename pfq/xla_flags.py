"""XLA settings that pfq's command-line entry points apply before JAX starts its CPU backend.

Library code never edits the environment on import: `python -m pfq.train`, `pfq.predict`,
`pfq.data` and the benchmarks call `set_defaults()` first thing; a program that imports pfq as a
library can call it too (before its first JAX computation) or set `XLA_FLAGS` itself.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
from pathlib import Path

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def xla_defines_flag(flag: str) -> bool:
    """Whether the installed jaxlib's XLA knows `flag`, read from its shared libraries without
    importing jaxlib (~10 ms). XLA aborts the whole process on an unknown XLA_FLAGS entry, so a
    flag that a future XLA drops must not be set; when unsure (no jaxlib found), say no."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.lstrip("-").encode()
    for root in spec.submodule_search_locations:
        for lib in sorted(Path(root).glob("*.so")):
            try:
                with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    if data.find(needle) >= 0:
                        return True
            except (OSError, ValueError):  # unreadable or empty file
                continue
    return False


def set_defaults() -> None:
    """Prefer XLA:CPU's depth-first (memory-frugal) scheduler. The default concurrency-optimised
    (breadth-first) one keeps far more activations alive at once: one real-size (1x3x64x224x224)
    tiny training step needed 3.0 GB of XLA temporaries with it and 2.2 GB with the depth-first one
    (1.1 GB with remat "light"), at no measurable speed cost on 2 cores (BENCHMARKS.md). XLA reads
    XLA_FLAGS when its CPU backend starts, so this acts only before the first JAX computation; a
    value the user set for this flag is kept, and the flag is left out where the installed XLA lacks
    it. No effect on GPU/TPU.

    Why not a per-compilation option: jax 0.10.2 accepts
    `compile(compiler_options={"xla_cpu_enable_concurrency_optimized_scheduler": False})` but the
    schedule (XLA's temporary bytes) does not change, while the XLA_FLAGS setting does."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG not in flags and xla_defines_flag(CPU_SCHEDULER_FLAG):
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
