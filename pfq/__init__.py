"""pfq: ProFound-Conv finetuning in JAX/Flax, for studying image quality in label-efficient finetuning."""

import os as _os

__version__ = "0.1.0"

_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def _prefer_memory_frugal_cpu_schedule() -> None:
    """XLA:CPU's default concurrency-optimised (breadth-first) scheduler keeps far more
    activations alive at once: one real-size (1x3x64x224x224) tiny training step needed 3.0 GB of
    XLA temporaries with it and 2.2 GB with the depth-first one (1.1 GB with remat "light"), at no
    measurable speed cost on 2 cores (BENCHMARKS.md). XLA reads XLA_FLAGS when its CPU backend
    starts, so this acts if pfq is imported before the first JAX computation; a value the user
    set for this flag is kept. No effect on GPU/TPU.

    Why not a per-compilation option: jax 0.10.2 accepts
    `compile(compiler_options={"xla_cpu_enable_concurrency_optimized_scheduler": False})` but the
    schedule (XLA's temporary bytes) does not change, while the XLA_FLAGS setting does."""
    flags = _os.environ.get("XLA_FLAGS", "")
    if _CPU_SCHEDULER_FLAG not in flags:
        _os.environ["XLA_FLAGS"] = f"{flags} {_CPU_SCHEDULER_FLAG}=false".strip()


_prefer_memory_frugal_cpu_schedule()
