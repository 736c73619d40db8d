"""Planning for TPUs without one (`pfq.plan`) and the trainer's memory check (`pfq.train.fit`).

The plan tests compile the smoke model for a small described TPU slice; they need libtpu
(`pip install -e '.[tpu]'`) and are skipped, with that reason, where it is absent. The memory-check
tests run on CPU with a fake device limit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import pytest

from pfq.config import validate_config
from pfq.model import ModelSpec
from pfq.train import fit, program
from pfq.train.trainer import model_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import smoke  # noqa: E402

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU,
    reason="libtpu not installed (pip install -e '.[tpu]'); planning compiles for a described TPU slice and needs it",
)


def smoke_config(**overrides):
    c = smoke.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    validate_config(c)
    return c


# ----------------------------------------------------------------------------------------------
# The trainer's memory check, with a fake limit on CPU.
# ----------------------------------------------------------------------------------------------
def test_parse_bytes_reads_suffixes_and_rejects_junk():
    assert fit.parse_bytes("1024") == 1024
    assert fit.parse_bytes("2K") == 2048 and fit.parse_bytes("1.5G") == int(1.5 * 2**30)
    with pytest.raises(fit.DoesNotFitError, match=fit.ENV_LIMIT):
        fit.parse_bytes("lots")


def test_cpu_reports_no_limit_so_nothing_is_checked(monkeypatch):
    monkeypatch.delenv(fit.ENV_LIMIT, raising=False)
    assert fit.device_limit(jax.devices()[0]) is None
    c = smoke_config()
    fit.refuse_what_does_not_fit(c, model_spec(c, 2))  # returns without compiling anything


def two_lanes(**overrides):
    """The smoke config cut to 2 lanes (ratios 0 and 1, one seed): one cheap compile."""
    return smoke_config(**{"sweep.finetune_hq_ratios": (0.0, 1.0), "sweep.seeds": (0,), **overrides})


def test_a_step_that_cannot_fit_is_refused_naming_the_fields(monkeypatch):
    monkeypatch.delenv(fit.ENV_LIMIT, raising=False)
    c = two_lanes()
    spec = model_spec(c, 2)
    lowered, _ = program.lower_train_step(spec, c, jax.devices(), 2)
    compiled = lowered.compile()
    need = fit.step_bytes(compiled)
    assert need["total"] > need["arguments"] > 0 and need["temporaries"] > 0
    device = jax.devices()[0]
    fit.check_fits(compiled, device, c, 2, 2, limit=need["total"])  # exactly enough: fine
    with pytest.raises(fit.DoesNotFitError) as e:
        fit.check_fits(compiled, device, c, 2, 2, limit=need["total"] - 1)
    for field in (
        "config.sweep.lanes_per_group",
        "config.optim.batch_size",
        "config.model.remat_stages",
        "config.model.dtype",
    ):
        assert field in str(e.value)
    assert "2-lane" in str(e.value)

    # One lane per group needs less than two: with a limit just below the 2-lane step, the check
    # (which compiles the largest group) lets the 1-lane groups through.
    monkeypatch.setenv(fit.ENV_LIMIT, str(need["total"] - 1))
    fit.refuse_what_does_not_fit(two_lanes(**{"sweep.lanes_per_group": 1}), spec)


def test_the_predict_step_lowers_from_shapes_on_the_lane_mesh():
    """The planner compiles the trainer's predict step from shapes (CPU here; TPU in the libtpu tests):
    one evaluation batch, replicated, predicted by every lane of the group."""
    c = two_lanes()
    compiled = program.lower_predict_step(model_spec(c, 2), c, jax.devices(), 2).compile()
    (out,) = jax.tree.leaves(compiled.out_info)
    assert out.shape == (2, int(c.eval_batch_size), 2)


def test_the_trainer_refuses_before_any_data_or_workdir_and_exits_2(tmp_path, monkeypatch):
    from pfq.train.__main__ import run_sweep

    monkeypatch.setenv(fit.ENV_LIMIT, "1M")
    monkeypatch.setenv("PFQ_CACHE", str(tmp_path / "cache"))
    assert run_sweep(two_lanes(), tmp_path / "run", progress=False) == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # no phantoms generated either


# ----------------------------------------------------------------------------------------------
# Planning for a described TPU slice.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tpu():
    if not HAS_LIBTPU:
        pytest.skip("libtpu not installed (pip install -e '.[tpu]')")
    from pfq import plan

    plan.quiet_libtpu()
    return plan, plan.topology_devices("v5e:2x2")


def small_layout(plan, lanes: int, **kw) -> object:
    return plan.Layout(kw.get("depthwise", "shifted"), ("none",) * 4, kw.get("dtype", "float32"), lanes)


@needs_libtpu
def test_the_planned_function_is_the_trainers_own_step(tpu, monkeypatch):
    plan, devices = tpu
    calls = []
    real = program.jit_train_step
    monkeypatch.setattr(program, "jit_train_step", lambda *a, **k: calls.append(a) or real(*a, **k))
    lowered, mesh = plan.lower_train_step(smoke_config(), devices, 2)
    assert len(calls) == 1 and isinstance(calls[0][0], ModelSpec)
    assert mesh.devices.flat[0].platform == "tpu" and dict(mesh.shape) == {"lane": 2, "data": 2}
    # The trainer builds its step through the same function (pfq/train/trainer.py).
    source = (ROOT / "pfq" / "train" / "trainer.py").read_text()
    assert "program.jit_train_step(" in source and "jit(jax.vmap(make_train_step" not in source


@needs_libtpu
def test_memory_and_flops_grow_with_lanes_and_input_size(tpu):
    plan, devices = tpu
    chip = plan.chip_of("v5e:2x2")

    def measure(lanes, size):
        c = plan.Layout("shifted", ("none",) * 4, "float32", lanes).apply(smoke_config(**{"data.input_size": size}))
        lowered, _ = plan.lower_train_step(c, devices, lanes)
        return plan.analyse(lowered.compile(), chip)

    base = measure(4, (16, 32, 32))
    more_lanes = measure(8, (16, 32, 32))
    bigger = measure(4, (32, 64, 64))
    for r in (base, more_lanes, bigger):
        assert r["total_gib"] > 0 and r["flops"] > 0 and r["bytes"] > 0 and r["roofline_s"] > 0
    # 8 lanes on 4 chips put 2 lanes (their parameters and AdamW state) on each chip instead of 1.
    # (XLA's temporaries need not grow with them: it schedules the two lanes' work differently.)
    assert more_lanes["flops"] > 1.5 * base["flops"] and more_lanes["arguments_gib"] > 1.5 * base["arguments_gib"]
    # 8x the voxels: 8x the images in the arguments, more flops and bytes. (At these toy sizes
    # XLA's temporaries are dominated by parameter-sized buffers and need not grow.)
    assert bigger["flops"] > 1.5 * base["flops"] and bigger["bytes"] > 1.5 * base["bytes"]
    assert bigger["arguments_gib"] > base["arguments_gib"] and bigger["total_gib"] > base["total_gib"]


@needs_libtpu
def test_a_layout_that_cannot_fit_is_reported_as_not_fitting(tpu):
    plan, devices = tpu
    c = smoke_config()
    record = plan.plan_layout(c, "v5e:2x2", small_layout(plan, 2), devices, log=lambda *a, **k: None)
    assert record["fits"] and record["train"]["total_gib"] < 16
    assert record["mesh"] == [2, 2] and record["lanes_per_chip"] == 1 and record["batch_per_chip"] == 1
    assert record["lane_groups"] == 3 and record["sweep_hours"] > 0  # 6 lanes in groups of 2
    # The same layout on a chip that has (almost) no memory does not fit.
    tiny_chip = plan.Chip("TPU test", 1e-6, 197, 819)
    record = plan.plan_layout(c, "v5e:2x2", small_layout(plan, 2), devices, chip=tiny_chip, log=lambda *a, **k: None)
    assert not record["fits"]
    assert plan.best([record]) is None
    assert "NO" in plan.table([record])


def test_a_planned_layout_is_read_back_from_the_cache_and_a_changed_one_is_compiled(tmp_path, monkeypatch):
    """Runs on CPU (a stand-in chip): the analysis cache is keyed by the lowered programs, so the same
    layout is not compiled again and a different one (another lane count) is."""
    from pfq import plan

    chip = plan.Chip("stand-in", 16, 197, 819)
    quiet = lambda *a, **k: None
    layout = lambda lanes: plan.Layout("fft", ("none",) * 4, "float32", lanes)
    c = two_lanes()
    cache = tmp_path / "not-yet" / "plan"  # a fresh machine: the cache folder is made on first use
    first = plan.plan_layout(c, "cpu", layout(2), jax.devices(), chip=chip, cache=cache, log=quiet)
    assert not first["cached"] and len(list(cache.glob("*.json"))) == 1
    assert first["train"]["total_gib"] > 0 and first["train"]["flops"] > 0

    def no_compile(*a, **k):
        raise AssertionError("compiled although this layout was planned before")

    monkeypatch.setattr(plan, "_compile_and_analyse", no_compile)
    again = plan.plan_layout(c, "cpu", layout(2), jax.devices(), chip=chip, cache=cache, log=quiet)
    assert again["cached"] and again["train"] == first["train"] and again["predict"] == first["predict"]
    with pytest.raises(AssertionError, match="compiled although"):
        plan.plan_layout(c, "cpu", layout(1), jax.devices(), chip=chip, cache=cache, log=quiet)


def test_a_cache_that_cannot_be_written_or_read_costs_a_compile_not_the_plan(tmp_path):
    from pfq import plan

    chip = plan.Chip("stand-in", 16, 197, 819)
    said = []
    layout = plan.Layout("fft", ("none",) * 4, "float32", 2)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    record = plan.plan_layout(
        two_lanes(),
        "cpu",
        layout,
        jax.devices(),
        chip=chip,
        cache=blocked / "plan",
        log=lambda *a, **k: said.append(a[0]),
    )
    assert record["train"]["total_gib"] > 0 and not record["cached"]
    assert any("could not keep this layout's analyses" in s for s in said)
    cache = tmp_path / "plan"
    plan.plan_layout(two_lanes(), "cpu", layout, jax.devices(), chip=chip, cache=cache, log=lambda *a, **k: None)
    (entry,) = cache.glob("*.json")
    entry.write_text("{truncated")  # a torn or hand-edited entry: compiled again, and rewritten
    again = plan.plan_layout(
        two_lanes(), "cpu", layout, jax.devices(), chip=chip, cache=cache, log=lambda *a, **k: None
    )
    assert not again["cached"] and json.loads(entry.read_text())["train"] == again["train"]


def run_plan_cli(*args: str, timeout: int = 300, **env: str):
    """`python -m pfq.plan ARGS` from the checkout, output captured."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "pfq.plan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
        cwd=ROOT,
    )


def test_plan_cli_without_libtpu_says_how_to_install(tmp_path):
    if HAS_LIBTPU:
        pytest.skip("libtpu is installed here")
    proc = run_plan_cli("--config", str(ROOT / "configs" / "smoke.py"), "--out", str(tmp_path / "p.json"))
    assert proc.returncode == 2 and "pip install -e '.[tpu]'" in proc.stderr


def test_lanes_per_group_splits_each_init_in_order():
    from pfq.train import lanes as lanes_lib

    lanes = lanes_lib.make_lanes((0.0, 0.5, 1.0), ("scratch", "models/x"), (50,), (0, 1, 2))
    assert [len(g) for g in lanes_lib.group_lanes(lanes)] == [9, 9]
    groups = lanes_lib.group_lanes(lanes, 4)
    assert [len(g) for g in groups] == [4, 4, 1, 4, 4, 1]
    assert all(len({lane.init for lane in g}) == 1 for g in groups)
    assert [lane.index for g in groups for lane in g] == [lane.index for lane in lanes]
    with pytest.raises(ValueError, match="lanes_per_group"):
        smoke_config(**{"sweep.lanes_per_group": -1})


def test_plan_cli_reads_configs_like_train(tmp_path):
    """A packaged name works, and a misspelt override stops with exit status 2 naming the field."""
    proc = run_plan_cli("--config", "smoke", "--config.optim.stepz=3", "--out", str(tmp_path / "p.json"))
    assert proc.returncode == 2 and "config.optim.stepz" in proc.stderr and "config.optim.steps" in proc.stderr
    assert not (tmp_path / "p.json").exists()


@needs_libtpu
def test_a_topology_whose_compiler_crashes_costs_only_its_own_rows(tmp_path):
    """Each topology is planned in its own process: one killed mid-compile (the fault injection's
    stand-in for libtpu's segmentation faults) is reported as not planned, and the others are."""

    out = tmp_path / "plan.json"
    topologies = ["--topology", "v5e:2x2", "--topology", "v6e:2x2"]
    options = ["--lanes_per_group", "2", "--cache", "none", "--out", str(out)]
    proc = run_plan_cli(
        "--config", "smoke", *topologies, *options, timeout=600, PFQ_FAULT_POINT="plan_compile:v5e:2x2:1"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())
    (crashed,) = [r for r in records if r["topology"] == "v5e:2x2"]
    assert "SIGKILL" in crashed["error"] and "train" not in crashed
    (planned,) = [r for r in records if r["topology"] == "v6e:2x2"]
    assert planned["fits"] and planned["train"]["flops"] > 0
    assert "v5e:2x2: not planned: the planning process for v5e:2x2 stopped with signal SIGKILL" in proc.stdout
    assert "v6e:2x2: best fitting layout" in proc.stdout
