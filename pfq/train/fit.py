"""Refuse a compiled step that cannot fit in device memory, before the first step runs.

XLA's memory analysis of the compiled step (arguments + outputs - donated + temporaries, per device)
is compared with what the device reports it can allocate (`device.memory_stats()["bytes_limit"]`,
available on GPU and TPU; CPU reports nothing, so nothing is checked there). `PFQ_DEVICE_MEMORY_LIMIT`
(bytes, or with a K/M/G suffix for KiB/MiB/GiB) sets a lower limit by hand, e.g. on a shared GPU.
"""

from __future__ import annotations

import os

GIB = 2**30
ENV_LIMIT = "PFQ_DEVICE_MEMORY_LIMIT"


class DoesNotFitError(ValueError):
    """The compiled step needs more memory per device than the device has; names what to change."""


def parse_bytes(text: str) -> int:
    text = text.strip()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text)
    except ValueError:
        raise DoesNotFitError(f"{ENV_LIMIT}={text!r} is not a byte count (e.g. 15000000000 or 14G)") from None
    return int(value * scale)


def device_limit(device) -> int | None:
    """Bytes the device can allocate: the smaller of its own report and PFQ_DEVICE_MEMORY_LIMIT."""
    limits = []
    if os.environ.get(ENV_LIMIT):
        limits.append(parse_bytes(os.environ[ENV_LIMIT]))
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def step_bytes(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program from XLA's memory analysis."""
    m = compiled.memory_analysis()
    args, out, alias, temp = (
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.temp_size_in_bytes),
    )
    return {
        "arguments": args,
        "outputs": out,
        "aliased": alias,
        "temporaries": temp,
        "total": args + out - alias + temp,
    }


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in $PFQ_CACHE/jax (or ~/.cache/pfq/jax) unless the user
    chose one (JAX_COMPILATION_CACHE_DIR): the trainer's compile of the step then reuses the check's,
    and a rerun or a resumed run does not compile again."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    base = os.environ.get("PFQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pfq")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "jax"))


def refuse_what_does_not_fit(config, spec) -> None:
    """Before any data is loaded: compile the largest lane group's train step from shapes on this
    run's devices and raise DoesNotFitError if it needs more memory than a device has. Does nothing
    (and compiles nothing) where the device reports no limit and PFQ_DEVICE_MEMORY_LIMIT is unset,
    e.g. on CPU. With the persistent compilation cache the trainer's own compile then reuses it."""
    import jax

    from pfq.train import lanes as lanes_lib
    from pfq.train import program

    devices = jax.devices()
    limit = device_limit(devices[0])
    if limit is None:
        return
    if devices[0].platform != "cpu":  # not for a limit set by hand on CPU (tests)
        enable_compilation_cache()
    s = config.sweep
    lanes = lanes_lib.make_lanes(s.finetune_hq_ratios, s.inits, s.train_sizes, s.seeds)
    size = max(len(g) for g in lanes_lib.group_lanes(lanes, int(s.lanes_per_group)))
    lowered, mesh = program.lower_train_step(spec, config, devices, size)
    check_fits(lowered.compile(), devices[0], config, size, -(-size // mesh.shape["lane"]), limit)


def check_fits(compiled, device, config, num_lanes: int, lanes_per_chip: int, limit: int | None = None) -> None:
    """Raise DoesNotFitError, naming the config fields to change, if `compiled` cannot fit on `device`."""
    limit = device_limit(device) if limit is None else limit
    if limit is None:
        return
    need = step_bytes(compiled)
    if need["total"] <= limit:
        return
    m = config.model
    raise DoesNotFitError(
        f"the compiled {num_lanes}-lane train step needs {need['total'] / GIB:.2f} GiB per device "
        f"(arguments {need['arguments'] / GIB:.2f}, temporaries {need['temporaries'] / GIB:.2f}) but "
        f"{getattr(device, 'device_kind', device)} can allocate {limit / GIB:.2f} GiB. Lower "
        f"config.sweep.lanes_per_group (now {int(config.sweep.get('lanes_per_group', 0))}, {lanes_per_chip} lane(s) "
        f"per device) or config.optim.batch_size (now {int(config.optim.batch_size)}), or set "
        f"config.model.remat_stages (now {tuple(m.remat_stages)}; 'full' keeps least) or "
        f"config.model.dtype='bfloat16' (now {m.dtype!r}). `python -m pfq.plan` compares these without a device."
    )
