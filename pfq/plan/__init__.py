"""Plan a sweep for TPUs without having one: compile the trainer's programs ahead of time for a
described topology, read XLA's memory and cost analyses, and rank candidate layouts.

    python -m pfq.plan --config configs/pirads_binary.py --topology v5e:2x4 --topology v4:2x2x1

With libtpu installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes the chips
of a slice (e.g. "v5e:2x4") on a CPU-only host, and `jit(f).lower(<ShapeDtypeStructs sharded on a
mesh of those devices>).compile()` builds the real TPU executable. The functions compiled here are
`pfq.train.program`'s, the ones the trainer runs: the vmapped, state-donating train step on the
(lane, data) mesh with the trainer's shardings, and the lane-vmapped predict step.

How each figure is made (all per chip, all compiler estimates, not measurements):
  memory      XLA's memory analysis: arguments + outputs - aliased (donated) + temporaries.
  fits        memory <= (1 - headroom) x the chip's HBM.
  roofline    max(flops / peak bf16 FLOP/s, bytes accessed / HBM bandwidth), from XLA's cost analysis
              and the published chip figures in CHIPS. A lower bound: it assumes perfect overlap and
              full MXU use. f32 matmuls at default precision run as one bf16 pass on the MXU, but the
              depthwise formulations ask for HIGHEST precision (several passes), which it ignores.
              Not a lower bound for `shifted`: its loop correction (below) overcounts bytes (2.7x
              XLA's count for the fully unrolled loop at 1x8x16x16x64), and bytes decide its roofline.
  xla         XLA's own `optimal_seconds`; reported as unusable when it is not positive (TPU
              programs with convolutions have given negative values).
  sweep time  lane groups x steps x the train step's roofline, plus evaluation batches x the predict
              step's roofline.
Where an estimate and a real run disagree, the real run wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from pfq.faults import maybe_fail
from pfq.io import atomic_write_text
from pfq.model import ModelSpec
from pfq.model.convnext import remat_mode
from pfq.model.depthwise import depthwise_conv3d, resolve_impl
from pfq.tasks import get_task
from pfq.train import lanes as lanes_lib
from pfq.train import program

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # peak dense bf16 matmul throughput per chip
    hbm_gbps: float  # HBM bandwidth per chip, GB/s


# Published per-chip figures (Google Cloud TPU system-architecture pages for v4, v5e, v5p and v6e:
# peak bf16 compute, HBM capacity, HBM bandwidth). v5e's page gives "16 GB, 819 GBps".
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32, 275, 1200),
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
    # NVIDIA H100 SXM (80 GB HBM3, 3.35 TB/s) and H200 (141 GB HBM3e, 4.8 TB/s) data sheets: 989 dense
    # bf16 TFLOP/s. Planned through the CUDA plugin (`pip install -e '.[cuda13]'`) without a GPU;
    # XLA:GPU gives memory but no cost analysis, so GPU rows have no time estimate.
    "h100": Chip("NVIDIA H100 80GB HBM3", 80, 989, 3350),
    "h200": Chip("NVIDIA H200", 141, 989, 4800),
}
GPUS = ("h100", "h200")


def _gpu_target_config(chip: Chip) -> str:
    """A GpuTargetConfig (text proto) for a Hopper GPU: what XLA:GPU would read from the device."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_gbps * 1e9)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {int(chip.hbm_gib * GIB)} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 28 }} runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{chip.name}"
"""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the planner may change: numerics-preserving choices plus the lane grouping."""

    depthwise: str
    remat: tuple[str, ...]
    dtype: str
    lanes_per_group: int

    def label(self) -> str:
        modes = [remat_mode(m) for m in self.remat]
        remat = modes[0] if len(set(modes)) == 1 else "/".join(modes)
        return f"{self.depthwise} remat={remat} {self.dtype} G={self.lanes_per_group}"

    def apply(self, config: ConfigDict) -> ConfigDict:
        c = ConfigDict(config.to_dict())
        c.model.depthwise, c.model.remat_stages, c.model.dtype = self.depthwise, tuple(self.remat), self.dtype
        c.sweep.lanes_per_group = int(self.lanes_per_group)
        return c


# ----------------------------------------------------------------------------------------------
# Topologies and the abstract inputs of the trainer's programs.
# ----------------------------------------------------------------------------------------------
# libtpu, loaded on a host without a TPU, looks for one and prints warnings about missing TPU VM
# metadata; these settings (only defaults: a value already set is kept) say that this process only
# compiles. ALLOW_MULTIPLE_LIBTPU_LOAD lets several planners (or tests) share the host.
_COMPILE_ONLY_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_STDERR_LOG_LEVEL": "3",
    "TPU_MIN_LOG_LEVEL": "3",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def quiet_libtpu() -> None:
    """Set libtpu's compile-only defaults; call before the first topology is described."""
    for key, value in _COMPILE_ONLY_ENV.items():
        os.environ.setdefault(key, value)


def analysis_cache(folder: str = "") -> Path | None:
    """Where compiled programs' analyses are kept (default $PFQ_CACHE/plan or ~/.cache/pfq/plan), so a
    layout planned once is read back instead of compiled again; 'none': no cache. JAX's own persistent
    compilation cache cannot serve here: an executable compiled for a described TPU cannot be loaded
    back without a TPU client (jax 0.10.2 warns "PjRtCompiler must be constructed with a Client")."""
    if folder == "none":
        return None
    if not folder:
        base = os.environ.get("PFQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pfq")
        folder = os.path.join(base, "plan")
    return Path(folder)


def _read_cached(path: Path | None) -> dict | None:
    """A cache entry's analyses, or None when there is none (an unreadable entry is a miss too)."""
    if path is None or not path.is_file():
        return None
    try:
        analyses = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return analyses if isinstance(analyses, dict) and {"train", "predict", "compile_s"} <= analyses.keys() else None


def _write_cached(path: Path | None, analyses: dict, log: Callable[..., None]) -> None:
    """Keep a compile's analyses; a cache that cannot be written costs a recompile later, never this
    plan's result (a compile takes minutes)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(analyses))
    except OSError as e:
        log(f"[plan] warning: could not keep this layout's analyses in {path.parent}: {e}", flush=True)


def _analysis_key(*parts: str) -> str:
    """Content key of a planned layout: the lowered programs' text (shapes, shardings, every op), the
    topology and chip, and the compiler's versions."""
    digest = hashlib.sha256()
    versions = f"jax {jax.__version__} jaxlib {jax.lib.__version__} libtpu {_libtpu_version()}"
    for part in (versions, *parts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def chip_of(topology: str) -> Chip:
    kind = topology.split(":", 1)[0]
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation in {topology!r}; use one of {sorted(CHIPS)} (e.g. v5e:2x4)")
    return CHIPS[kind]


def topology_devices(topology: str) -> list:
    """The devices of a described TPU slice (needs libtpu; no TPU needed), or of `h100:N` / `h200:N`
    GPUs on one host (needs the CUDA plugin; no GPU needed)."""
    chip = chip_of(topology)
    from jax.experimental import topologies

    kind, _, shape = topology.partition(":")
    if kind in GPUS:
        jax.devices()  # initialises the backends, which registers the CUDA plugin
        try:
            desc = topologies.get_topology_desc(
                platform="cuda", target_config=_gpu_target_config(chip), topology=f"1x1x{int(shape or 1)}"
            )
        except Exception as e:
            raise ValueError(
                f"cannot describe {topology!r}: {e}. Planning for GPUs needs the CUDA plugin "
                "(`pip install -e '.[cuda13]'`; no GPU needed); shapes look like h100:8"
            ) from None
        return list(desc.devices)

    try:
        # v4 and v5p chips have two TensorCores that JAX drives as one device (megacore), as on a TPU VM.
        kwargs = {"chip_config_name": "megacore"} if topology.startswith(("v4:", "v5p:")) else {}
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    except Exception as e:  # libtpu missing, or a shape this generation does not have
        raise ValueError(
            f"cannot describe TPU topology {topology!r}: {e}. Install libtpu with "
            "`pip install -e '.[tpu]'`; shapes look like v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4"
        ) from None
    return list(desc.devices)


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def platform_of(devices: list) -> str:
    """'tpu' or 'gpu' (the backend names `resolve_impl` knows) for described devices."""
    platform = devices[0].platform
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def model_spec_for(config: ConfigDict, platform: str = "tpu") -> ModelSpec:
    """The trainer's model spec, with 'auto' resolved for the target platform, not this host."""
    from pfq.train.trainer import model_spec

    spec = model_spec(config, get_task(config.task).num_classes)
    return dataclasses.replace(spec, depthwise_impl=resolve_impl(spec.depthwise_impl, platform))


def lower_train_step(config: ConfigDict, devices: list, num_lanes: int):
    """The trainer's train step for a group of `num_lanes`, lowered for `devices`: (lowered, mesh)."""
    return program.lower_train_step(model_spec_for(config, platform_of(devices)), config, devices, num_lanes)


def lower_predict_step(config: ConfigDict, devices: list, num_lanes: int):
    """The trainer's predict step (every lane scores one eval batch) lowered for `devices`."""
    return program.lower_predict_step(model_spec_for(config, platform_of(devices)), config, devices, num_lanes)


# ----------------------------------------------------------------------------------------------
# Reading a compiled program.
# ----------------------------------------------------------------------------------------------
def analyse(compiled, chip: Chip, extra: dict | None = None) -> dict:
    """Per-chip memory and cost of a compiled program, with the roofline time; `extra` flops and
    bytes are added to XLA's counts (see `shifted_loop_correction`)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list | tuple) else (cost or {})
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = args + out - alias + temp
    extra = extra or {"flops": 0.0, "bytes": 0.0}
    record = {
        "arguments_gib": args / GIB,
        "outputs_gib": out / GIB,
        "aliased_gib": alias / GIB,
        "temp_gib": temp / GIB,
        "total_gib": total / GIB,
    }
    if "flops" not in cost:  # XLA:GPU has no cost analysis
        return {
            **record,
            "flops": None,
            "bytes": None,
            "roofline_s": None,
            "bound": None,
            "xla_s": None,
            "xla_s_raw": None,
            "xla_flops": None,
            "loop_correction_flops": None,
        }
    flops = float(cost.get("flops", 0.0)) + extra["flops"]
    nbytes = float(cost.get("bytes accessed", 0.0)) + extra["bytes"]
    compute_s, memory_s = flops / (chip.bf16_tflops * 1e12), nbytes / (chip.hbm_gbps * 1e9)
    xla_s = cost.get("optimal_seconds")
    return {
        **record,
        "flops": flops,
        "bytes": nbytes,
        "roofline_s": max(compute_s, memory_s),
        "bound": "compute" if compute_s >= memory_s else "memory",
        "xla_s": float(xla_s) if xla_s is not None and float(xla_s) > 0 else None,
        "xla_s_raw": None if xla_s is None else float(xla_s),
        "xla_flops": float(cost.get("flops", 0.0)),
        "loop_correction_flops": extra["flops"],
    }


def shifted_loop_correction(spec: ModelSpec, samples_per_chip: int, input_size, chip: Chip, devices: list) -> dict:
    """Flops and bytes XLA's cost analysis leaves out of the `shifted` depthwise formulation.

    XLA counts a while loop's body once, and `shifted` runs each depthwise convolution (forward,
    input gradient, kernel gradient) as a scan of kd*kh = 49 iterations. For each stage this compiles
    the depthwise forward + backward alone at the stage's per-chip shape on one described chip and
    adds 48 more iterations' worth (its cost less nothing: an upper bound by the few ops outside the
    loop) per block, plus one forward more per block for stages with remat 'full'. Flops come out
    right (within 4% of the fully unrolled program's count at 1x8x16x16x64); bytes do not: the pad,
    zero-fill and reductions outside the loop are counted 49 times, 2.7x the unrolled program's bytes
    at that shape, so memory-bound `shifted` rooflines are upper bounds.
    """
    if spec.depthwise_impl != "shifted":
        return {"flops": 0.0, "bytes": 0.0}
    trips = 7 * 7
    stride = (4, 8, 16, 16)
    mesh = Mesh(np.array(devices[:1]), ("one",))
    rep = NamedSharding(mesh, PartitionSpec())
    flops = nbytes = 0.0
    for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims, strict=True)):
        shape = (samples_per_chip,) + tuple(int(n) // stride[i] for n in input_size) + (dim,)
        x = jax.ShapeDtypeStruct(shape, jnp.dtype(spec.dtype), sharding=rep)
        k = jax.ShapeDtypeStruct((7, 7, 7, 1, dim), jnp.float32, sharding=rep)
        both = lambda x, k, g: jax.vjp(_shifted, x, k)[1](g)  # forward, input and kernel gradients
        per_block = (trips - 1) * np.array(_cost(jax.jit(both).lower(x, k, x).compile()))
        if i < len(spec.remat_stages) and remat_mode(spec.remat_stages[i]) == "full":  # forward recomputed
            per_block += (trips - 1) * np.array(_cost(jax.jit(_shifted).lower(x, k).compile()))
        flops += depth * per_block[0]
        nbytes += depth * per_block[1]
    return {"flops": float(flops), "bytes": float(nbytes)}


def _shifted(x, k):
    return depthwise_conv3d(x, k, impl="shifted")


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list | tuple) else (cost or {})
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def sweep_groups(config: ConfigDict) -> list[int]:
    """Sizes of the sweep's lane groups under the config's `sweep.lanes_per_group`."""
    s = config.sweep
    lanes = lanes_lib.make_lanes(s.finetune_hq_ratios, s.inits, s.train_sizes, s.seeds)
    return [len(g) for g in lanes_lib.group_lanes(lanes, int(s.lanes_per_group))]


def plan_layout(
    config: ConfigDict,
    topology: str,
    layout: Layout,
    devices: list,
    *,
    headroom: float = 0.1,
    test_cases: int = 300,
    chip: Chip | None = None,
    cache: Path | None = None,
    log=print,
) -> dict:
    """Compile the train and predict steps of one layout and return its record; with `cache`, the
    compiled programs' analyses are read from there when these exact programs were planned before."""
    chip = chip or chip_of(topology)
    c = layout.apply(config)
    groups = sweep_groups(c)
    size = max(groups)
    record = {
        "topology": topology,
        "chip": chip.name,
        "chips": len(devices),
        "hbm_gib": chip.hbm_gib,
        "layout": layout.label(),
        **dataclasses.asdict(layout),
        "lane_groups": len(groups),
        "lanes": sum(groups),
        "config_batch": int(c.optim.batch_size),
        "input_size": list(c.data.input_size),
    }
    lowered, mesh = lower_train_step(c, devices, size)
    lane_axis, data_axis = mesh.shape["lane"], mesh.shape["data"]
    record.update(
        mesh=[lane_axis, data_axis],
        chips_used=lane_axis * data_axis,
        lanes_per_chip=size // lane_axis,
        batch_per_chip=int(c.optim.batch_size) // data_axis,
    )
    predict_lowered = lower_predict_step(c, devices, size)
    key = _analysis_key(topology, chip.name, lowered.as_text(), predict_lowered.as_text())
    path = cache / f"{key}.json" if cache is not None else None
    analyses = _read_cached(path)
    cached = analyses is not None
    if cached:
        log(f"[plan] {topology}: {layout.label()}: read from {path} (planned before)", flush=True)
    else:
        log(f"[plan] {topology}: compiling train step, {layout.label()} ...", flush=True)
        maybe_fail(f"plan_compile:{topology}")  # the reliability tests' stand-in for a compiler crash
        analyses = _compile_and_analyse(c, chip, devices, record, lowered, predict_lowered)
        _write_cached(path, analyses, log)
    record.update(analyses, cached=cached)  # compile_s: the time of the compile that made the entry
    train, predict = record["train"], record["predict"]
    record["fits"] = train["total_gib"] <= (1 - headroom) * chip.hbm_gib
    flops = "no cost analysis" if train["flops"] is None else f"{train['flops'] / 1e12:.3f} TFLOP/chip"
    log(
        f"[plan] {topology}: {layout.label()}: {train['total_gib']:.2f} GiB/chip, {flops}, "
        f"compiled in {record['compile_s']:.0f} s",
        flush=True,
    )
    steps = int(c.optim.steps)
    eval_batches = math.ceil(test_cases / int(c.eval_batch_size))
    record["test_cases"] = test_cases
    if train["roofline_s"] is None or predict["roofline_s"] is None:
        record.update(train_hours=None, eval_hours=None, sweep_hours=None)
    else:
        record["train_hours"] = len(groups) * steps * train["roofline_s"] / 3600
        record["eval_hours"] = len(groups) * eval_batches * predict["roofline_s"] / 3600
        record["sweep_hours"] = record["train_hours"] + record["eval_hours"]
    return record


def _compile_and_analyse(c: ConfigDict, chip: Chip, devices: list, record: dict, lowered, predict_lowered) -> dict:
    """Compile both programs; their memory and cost analyses with compile times."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    spec = model_spec_for(c, platform_of(devices))
    samples = record["lanes_per_chip"] * record["batch_per_chip"]
    train = analyse(compiled, chip, shifted_loop_correction(spec, samples, c.data.input_size, chip, devices))
    t0 = time.perf_counter()
    # Prediction: each chip holds its lanes and scores the whole eval batch (forward only: a third
    # of the forward+backward correction).
    fwd = shifted_loop_correction(
        spec, record["lanes_per_chip"] * int(c.eval_batch_size), c.data.input_size, chip, devices
    )
    fwd = {k: v / 3 for k, v in fwd.items()}
    predict = analyse(predict_lowered.compile(), chip, fwd)
    return {"train": train, "predict": predict, "compile_s": compile_s, "predict_compile_s": time.perf_counter() - t0}


def candidate_layouts(
    config: ConfigDict,
    chips: int,
    depthwise: Iterable[str],
    remat: Iterable[str],
    dtypes: Iterable[str],
    lanes_per_group: Iterable[int],
) -> list[Layout]:
    """Every combination asked for; 'config' in remat keeps the config's per-stage setting."""
    stages = lambda r: tuple(remat_mode(m) for m in config.model.remat_stages) if r == "config" else (r,) * 4
    return [Layout(d, stages(r), t, int(g)) for d in depthwise for r in remat for t in dtypes for g in lanes_per_group]


def default_lane_groups(config: ConfigDict, chips: int) -> list[int]:
    """Group sizes worth comparing on `chips` chips: the smallest group that uses every chip by
    splitting each lane's batch, one lane per chip, and two lanes per chip."""
    batch = int(config.optim.batch_size)
    split = max(1, chips // math.gcd(batch, chips))
    return sorted({split, chips, 2 * chips})


def best(records: list[dict]) -> dict | None:
    """The fitting layout with the shortest estimated sweep."""
    fitting = [r for r in records if r.get("fits")]
    hours = lambda r: r["sweep_hours"] if r["sweep_hours"] is not None else math.inf
    return min(fitting, key=lambda r: (hours(r), r["train"]["total_gib"])) if fitting else None


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------
def table(records: list[dict]) -> str:
    wide = max([38] + [len(r["layout"]) for r in records if "layout" in r])  # layout names vary in length
    head = (
        f"{'topology':<10} {'layout':<{wide}} {'mesh':>6} {'lanes/chip':>10} {'b/chip':>6} {'GiB/chip':>9} "
        f"{'(arg+tmp)':>12} {'fits':>5} {'TFLOP/step':>10} {'GB/step':>8} {'roofline':>9} {'xla':>8} "
        f"{'sweep h':>8} {'compile':>8}"
    )
    lines = [head, "-" * len(head)]
    num = lambda v, fmt, scale=1.0: "n/a" if v is None else format(v / scale, fmt)
    for r in records:
        if "error" in r:  # a topology whose planning process died
            lines.append(f"{r['topology']:<10} NOT PLANNED: {r['error']}")
            continue
        t = r["train"]
        xla = f"{t['xla_s']:.3f}s" if t["xla_s"] is not None else "n/a"
        roofline = f"{t['roofline_s']:.3f}s" if t["roofline_s"] is not None else "n/a"
        lines.append(
            f"{r['topology']:<10} {r['layout']:<{wide}} {r['mesh'][0]:>2}x{r['mesh'][1]:<3} {r['lanes_per_chip']:>10} "
            f"{r['batch_per_chip']:>6} {t['total_gib']:>6.2f}/{r['hbm_gib']:<3g}"
            f"{t['arguments_gib']:>6.2f}+{t['temp_gib']:<5.2f} {'yes' if r['fits'] else 'NO':>5} "
            f"{num(t['flops'], '.3f', 1e12):>10} {num(t['bytes'], '.1f', 1e9):>8} {roofline:>9} "
            f"{xla:>8} {num(r['sweep_hours'], '.1f'):>8} {r['compile_s']:>7.0f}s"
        )
    return "\n".join(lines)
