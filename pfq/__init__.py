"""pfq: ProFound-Conv finetuning in JAX/Flax, for studying image quality in label-efficient finetuning."""

import importlib.util as _importlib_util
import mmap as _mmap
import os as _os
from pathlib import Path as _Path

__version__ = "0.1.0"

_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def _xla_defines_flag(flag: str) -> bool:
    """Whether the installed jaxlib's XLA knows `flag`, read from its shared libraries without
    importing jaxlib (~10 ms). XLA aborts the whole process on an unknown XLA_FLAGS entry, so a
    flag that a future XLA drops must not be set; when unsure (no jaxlib found), say no."""
    spec = _importlib_util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.lstrip("-").encode()
    for root in spec.submodule_search_locations:
        for lib in sorted(_Path(root).glob("*.so")):
            try:
                with open(lib, "rb") as f, _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) as data:
                    if data.find(needle) >= 0:
                        return True
            except (OSError, ValueError):  # unreadable or empty file
                continue
    return False


def _prefer_memory_frugal_cpu_schedule() -> None:
    """XLA:CPU's default concurrency-optimised (breadth-first) scheduler keeps far more
    activations alive at once: one real-size (1x3x64x224x224) tiny training step needed 3.0 GB of
    XLA temporaries with it and 2.2 GB with the depth-first one (1.1 GB with remat "light"), at no
    measurable speed cost on 2 cores (BENCHMARKS.md). XLA reads XLA_FLAGS when its CPU backend
    starts, so this acts if pfq is imported before the first JAX computation; a value the user
    set for this flag is kept, and the flag is left out where the installed XLA lacks it.
    No effect on GPU/TPU.

    Why not a per-compilation option: jax 0.10.2 accepts
    `compile(compiler_options={"xla_cpu_enable_concurrency_optimized_scheduler": False})` but the
    schedule (XLA's temporary bytes) does not change, while the XLA_FLAGS setting does."""
    flags = _os.environ.get("XLA_FLAGS", "")
    if _CPU_SCHEDULER_FLAG not in flags and _xla_defines_flag(_CPU_SCHEDULER_FLAG):
        _os.environ["XLA_FLAGS"] = f"{flags} {_CPU_SCHEDULER_FLAG}=false".strip()


_prefer_memory_frugal_cpu_schedule()
