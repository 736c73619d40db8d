"""`python -m pfq.plan [--config NAME|FILE] [--config.x.y=v ...] --topology v5e:2x4 [--topology ...]`

Compiles the sweep's train and predict steps for each TPU topology and candidate layout on this
(CPU-only) host, prints a table and writes one JSON record per topology x layout (see
`pfq.plan` for how every figure is made). Needs libtpu: `pip install -e '.[tpu]'`.

Exit status: 0 done (even if nothing fits: the table says so); 2 a bad config, topology or option.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from pfq.config import command_line_overrides, load_config, parse_flags

# Read as `python -m pfq.train` reads it: a packaged name or a file, checked overrides.
_CONFIG = flags.DEFINE_string(
    "config",
    "pirads_binary",
    "A packaged config's name (pirads_binary, isup, ...) or a config file; override fields with --config.x.y=value.",
)
_TOPOLOGY = flags.DEFINE_multi_string("topology", ["v5e:2x4"], "TPU slice, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4.")
_DEPTHWISE = flags.DEFINE_list(
    "depthwise",
    ["config"],
    "Depthwise formulations to compare (direct, fft, shifted; 'config': the config's, with 'auto' resolved for TPU).",
)
_REMAT = flags.DEFINE_list("remat", ["config"], "Remat per stage to compare: config, none, light, full.")
_DTYPE = flags.DEFINE_list("dtype", ["config"], "Compute dtypes to compare: config, float32, bfloat16.")
_LANES = flags.DEFINE_list(
    "lanes_per_group",
    ["auto"],
    "Lane-group sizes to compare; 'auto': the batch split over "
    "all chips, one lane per chip and two lanes per chip; 'config': the config's.",
)
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free when judging whether a layout fits.")
_TEST_CASES = flags.DEFINE_integer("test_cases", 300, "Test-pool size assumed for the evaluation time estimate.")
_OUT = flags.DEFINE_string("out", "plan.json", "JSON file: one record per topology x layout.")
_CACHE = flags.DEFINE_string(
    "cache",
    "",
    "Folder of planned layouts' analyses, keyed by the lowered programs, topology and compiler versions "
    "(default $PFQ_CACHE/plan or ~/.cache/pfq/plan): a layout planned before is not compiled again; 'none': off.",
)


def _resolve(values: list[str], from_config) -> list:
    return list(dict.fromkeys(from_config if v == "config" else v for v in values))


def main(argv: list[str]) -> int:
    del argv
    from pfq import plan
    from pfq.model.depthwise import resolve_impl

    plan.quiet_libtpu()
    logging.getLogger("jax").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'": expected here
    try:
        config = load_config(_CONFIG.value, command_line_overrides())
        if not plan.libtpu_available() and not all(t.startswith(plan.GPUS) for t in _TOPOLOGY.value):
            raise ValueError("libtpu is not installed; `pip install -e '.[tpu]'` (works on a CPU-only machine)")
        cache = plan.analysis_cache(_CACHE.value)
        depthwise = _resolve(_DEPTHWISE.value, config.model.depthwise)
        for d in depthwise:
            resolve_impl(d, "tpu")  # a known name (or 'auto', resolved per topology below)
        remat = _resolve(_REMAT.value, "config")
        dtypes = _resolve(_DTYPE.value, config.model.dtype)
        for r in remat:
            if r not in ("config", "none", "light", "full"):
                raise ValueError(f"--remat: unknown mode {r!r}; use config, none, light or full")
        for t in dtypes:
            if t not in ("float32", "bfloat16"):
                raise ValueError(f"--dtype: {t!r}; use float32 or bfloat16")
        topologies = [(t, plan.topology_devices(t)) for t in _TOPOLOGY.value]
    except ValueError as e:  # ConfigError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _LANES.value != ["auto"]:
        try:
            sizes = [int(config.sweep.lanes_per_group) if v == "config" else int(v) for v in _LANES.value]
        except ValueError:
            print(f"error: --lanes_per_group: integers, 'config' or 'auto', got {_LANES.value}", file=sys.stderr)
            return 2
    child = os.environ.get(_CHILD_ENV)  # "TOPOLOGY\nRECORDS_FILE" when planning one topology for a parent
    out = Path(_OUT.value)
    if child:
        only, records_file = child.split("\n")
        out = Path(records_file)
        topologies = [(t, d) for t, d in topologies if t == only]
    records = []
    for topology, devices in topologies:
        if len(topologies) > 1:
            records += _plan_in_child(topology)
            out.write_text(json.dumps(records, indent=1))
            continue
        if _LANES.value == ["auto"]:
            sizes = plan.default_lane_groups(config, len(devices))
        platform = plan.platform_of(devices)
        resolved = list(dict.fromkeys(resolve_impl(d, platform) for d in depthwise))
        for layout in plan.candidate_layouts(config, len(devices), resolved, remat, dtypes, sizes):
            records.append(
                plan.plan_layout(
                    config,
                    topology,
                    layout,
                    devices,
                    headroom=_HEADROOM.value,
                    test_cases=_TEST_CASES.value,
                    cache=cache,
                )
            )
            out.write_text(json.dumps(records, indent=1))  # after each compile: they take minutes
    if child:
        return 0
    print(plan.table(records))
    for topology, _ in topologies:
        choice = plan.best([r for r in records if r["topology"] == topology])
        failed = [r["error"] for r in records if r["topology"] == topology and "error" in r]
        if choice is None and failed:
            print(f"{topology}: not planned: {failed[0]}")
        elif choice is None:
            print(
                f"{topology}: no layout fits; try --config.sweep.lanes_per_group smaller, --remat full, "
                f"--dtype bfloat16, or a smaller --config.optim.batch_size"
            )
        else:
            hours = "no time estimate" if choice["sweep_hours"] is None else f"~{choice['sweep_hours']:.1f} h sweep"
            print(
                f"{topology}: best fitting layout {choice['layout']} ({choice['train']['total_gib']:.2f} GiB/chip, "
                f"{hours}, compiler estimate)"
            )
    print(f"records: {_OUT.value}")
    return 0


_CHILD_ENV = "PFQ_PLAN_ONE_TOPOLOGY"


def _plan_in_child(topology: str) -> list[dict]:
    """Plan one topology in a child process (same arguments), so that a compiler crash costs that
    topology's rows only: libtpu 0.0.42.1 has died with a segmentation fault inside its convolution
    emitter while compiling the real-size step for v4 and v5p. Returns the child's records, plus an
    `error` record if it did not finish."""
    with tempfile.TemporaryDirectory() as tmp:
        records_file = Path(tmp) / "records.json"
        env = dict(os.environ, **{_CHILD_ENV: f"{topology}\n{records_file}"})
        code = subprocess.run([sys.executable, "-m", "pfq.plan", *sys.argv[1:]], env=env).returncode
        records = json.loads(records_file.read_text()) if records_file.exists() else []
    if code != 0:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        records.append(
            {
                "topology": topology,
                "error": f"the planning process for {topology} stopped with {how} (a compiler crash, if a "
                "signal; its last progress line above names the layout); the layouts listed for it finished",
            }
        )
    return records


if __name__ == "__main__":
    if not os.environ.get("JAX_PLATFORMS"):  # planning only compiles: never start an accelerator backend
        import jax

        jax.config.update("jax_platforms", "cpu")
    app.run(main, flags_parser=parse_flags)
