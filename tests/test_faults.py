"""Kill anywhere, lose nothing: a sweep SIGKILLed (or hit by a failing disk, or left with a damaged
checkpoint) at many points and restarted ends with results byte-identical to an uninterrupted run.

Kill points are deterministic (`pfq.faults`, armed by PFQ_FAULT_POINT in the child's environment):
the chain below restarts one workdir after every fault, so each link starts from whatever the
previous one left (including half-written Orbax temporaries and `.tmp` outputs). A randomised
variant (kills after random delays) and a longer chain over two lane groups are marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import random
import resource
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from studykit import KILLED, cli_env, run_train, small_sweep_config, train_command

from pfq import faults
from pfq.results import read_results

OUTPUTS = ("results.csv", "predictions.csv")


def committed_steps(workdir: Path, group: int = 0) -> list[int]:
    folder = workdir / "checkpoints" / f"group{group}"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def damage_truncate(workdir: Path) -> str:
    """Truncate every data file of the latest committed checkpoint's state to half its size."""
    step = committed_steps(workdir)[-1]
    for f in (workdir / "checkpoints" / "group0" / str(step) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(workdir / "checkpoints" / "group0" / str(step))


def damage_missing_item(workdir: Path) -> str:
    """Delete the latest committed checkpoint's `meta` item."""
    step = committed_steps(workdir)[-1]
    shutil.rmtree(workdir / "checkpoints" / "group0" / str(step) / "meta")
    return "item 'meta' is missing"


def small_file_limit():
    """In the child: no file may grow past 64 KiB (EFBIG, a real OS error, as on a full disk). Every
    checkpoint holds larger files; outputs and config.json are smaller."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


# Links: (fault, expected exit status, damage applied before the run). Each point is reachable
# whatever the previous link left behind (a kill during an asynchronous save may or may not leave
# that checkpoint committed): step-numbered points only move forward along a chain.
TRAINING_CHAIN = [  # from an empty workdir and an empty preprocessing cache
    ("cache_write:10", KILLED, None),  # preprocessing: the 10th cache entry written, not yet renamed
    ("train_step:3", KILLED, None),  # mid-training, the step-2 checkpoint possibly half written
    ("checkpoint_async:4", KILLED, None),  # while the step-4 checkpoint is being written
    ("train_step:5", KILLED, None),
    ("small_file_limit", 1, None),  # a real EFBIG inside Orbax's background write
    ("checkpoint_async:6", KILLED, None),  # while the final checkpoint is being written
    ("checkpoint_wait:1", KILLED, damage_truncate),  # the latest checkpoint truncated beforehand
]
OUTPUT_CHAIN = [  # from the reference's checkpoints, its outputs removed
    ("predict_batch:2", KILLED, damage_missing_item),  # the final checkpoint lacks an item
    ("evaluate:2", KILLED, None),  # scoring the test subsets
    ("write:results.csv:1", KILLED, None),  # temporary results file written, not yet renamed
    ("write:run.json:1", KILLED, None),  # results written, run not yet marked complete
    ("write:heatmap_auc.png:1", KILLED, None),  # run complete, report half done
]


def run_chain(workdir: Path, study: Path, chain: list, **caches) -> int:
    """Run each link, check how it ended, then a clean run; returns the number of kills."""
    kills = 0
    for fault, expected, damage in chain:
        note = damage(workdir) if damage else None
        if fault == "small_file_limit":
            before = {
                s: sorted(p.name for p in (workdir / "checkpoints/group0" / str(s)).rglob("*"))
                for s in committed_steps(workdir)
            }
            proc = run_train(workdir, study, preexec_fn=small_file_limit, **caches)
            assert proc.returncode == expected, proc.stderr[-3000:]
            error = proc.stderr[proc.stderr.index("error:") :]
            assert "could not write a checkpoint" in error and "File too large" in error, error
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            for s, names in before.items():  # the checkpoints that were there are untouched
                assert sorted(p.name for p in (workdir / "checkpoints/group0" / str(s)).rglob("*")) == names
            continue
        proc = run_train(workdir, study, fault=fault, **caches)
        name, count, action = faults.parse(fault)
        assert f"pfq.faults: {action} at {name}:{count}" in proc.stderr, (fault, proc.returncode, proc.stderr[-3000:])
        assert proc.returncode == expected, (fault, proc.stderr[-3000:])
        kills += expected == KILLED
        if note:  # the damaged checkpoint was reported, set aside, and an older one used
            assert "is unreadable" in proc.stderr and note in proc.stderr, proc.stderr[-3000:]
            assert any((workdir / "checkpoints" / "group0.unreadable").iterdir())
    final = run_train(workdir, study, **caches)
    assert final.returncode == 0, final.stderr[-3000:]
    return kills


def assert_same_outputs(workdir: Path, reference: Path) -> None:
    for name in OUTPUTS:
        assert (workdir / name).read_bytes() == (reference / name).read_bytes(), (workdir.name, name)
    assert (workdir / "report.md").read_text() == (reference / "report.md").read_text()
    assert not [p.name for p in workdir.iterdir() if ".tmp" in p.name]  # no temporaries left behind
    assert not [p.name for p in (workdir / "checkpoints" / "group0").iterdir() if "tmp" in p.name]


def test_kill_anywhere_and_resume_gives_identical_results(small_study, jax_cache, volume_cache, request, tmp_path):
    with ThreadPoolExecutor(1) as pool:  # the training chain runs beside the reference run, then beside the other
        training = pool.submit(
            run_chain,
            tmp_path / "training",
            small_study,
            TRAINING_CHAIN,
            jax_cache=jax_cache,
            pfq_cache=tmp_path / "own_cache",
        )
        reference = request.getfixturevalue("small_reference")
        outputs = tmp_path / "outputs"
        shutil.copytree(reference / "checkpoints", outputs / "checkpoints")
        shutil.copy(reference / "config.json", outputs)
        kills = run_chain(outputs, small_study, OUTPUT_CHAIN, jax_cache=jax_cache, pfq_cache=volume_cache)
        kills += training.result()
    assert kills >= 10
    assert_same_outputs(tmp_path / "training", reference)
    assert_same_outputs(outputs, reference)
    # the training chain's own preprocessing cache, filled across a kill, holds only complete entries
    # (a killed write leaves an orphaned `.tmp` file beside them, never a partial entry)
    entries = [p for p in (tmp_path / "own_cache").rglob("*.npy")]
    assert len(entries) == 48 and all(np.load(p).shape == (16, 32, 32, 3) for p in entries)


def test_a_finished_sweep_is_not_rerun_or_overwritten(small_reference, tmp_path, monkeypatch):
    """In process: a finished workdir returns its results without loading data, training or writing."""
    from pfq.train import trainer as trainer_module

    workdir = tmp_path / "done"
    shutil.copytree(small_reference, workdir)
    stamps = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir() if p.is_file()}
    config = small_sweep_config(Path(json.loads((workdir / "config.json").read_text())["data"]["manifest"]))

    def no_data(*args, **kwargs):
        raise AssertionError("a finished run must not load its data again")

    monkeypatch.setattr(trainer_module, "load_study_data", no_data)
    trainer = trainer_module.Trainer(config, workdir, progress=False)
    rows = trainer.run()
    # results.csv read back, typed like the trainer's own rows (json: NaN == NaN)
    assert json.dumps(rows) == json.dumps(read_results(workdir / "results.csv"))
    assert isinstance(rows[0]["seed"], int) and isinstance(rows[0]["test_hq_ratio"], float)
    assert trainer.compile_count == 0
    assert {p.name: p.stat().st_mtime_ns for p in workdir.iterdir() if p.is_file()} == stamps


# ----------------------------------------------------------------------------------------------
# Longer variants, by hand: PFQ_SLOW=1 pytest tests/test_faults.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_random_kills(small_study, jax_cache, volume_cache, small_reference, tmp_path):
    """SIGKILL after random delays (PFQ_FAULT_SEED) until a run completes; the results equal the reference."""
    rng = random.Random(int(os.environ.get("PFQ_FAULT_SEED", "0")))
    workdir, kills = tmp_path / "run", 0
    for attempt in range(60):
        proc = subprocess.Popen(
            train_command(workdir, small_study),
            env=cli_env(jax_cache, None, volume_cache),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(1.0, 3.0 + attempt))  # later attempts get longer, so one finishes
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
        break
    else:
        pytest.fail("no run completed")
    assert kills > 0
    for name in OUTPUTS:
        assert (workdir / name).read_bytes() == (small_reference / name).read_bytes(), name


TRAINING_POINTS = [
    "train_step:1",
    "train_step:2",
    "checkpoint_save:2",
    "checkpoint_async:2",
    "train_step:3",
    "checkpoint_save:4",
    "checkpoint_async:4",
    "train_step:5",
    "checkpoint_save:6",
    "checkpoint_async:6",
    "checkpoint_wait:1",
]
OUTPUT_POINTS = [
    "predict_batch:1",
    "predict_batch:3",
    "evaluate:1",
    "evaluate:3",
    "write:config.json:1",
    "write:predictions.csv:1",
    "write:results.csv:1",
    "write:run.json:1",
    "report:1",
    "write:heatmap_auc.png:1",
    "write:label_efficiency_auc.png:1",
    "write:mismatch_auc.png:1",
    "write:report.md:1",
]


@pytest.mark.slow
def test_every_kill_point_in_turn_over_two_lane_groups(small_study, jax_cache, volume_cache, tmp_path):
    """Scratch and pretrained lanes (two groups, trained one after the other): every training point
    is hit in group 0, then again in group 1 once group 0 is finished, then every output point."""
    import jax

    from pfq.convert.store import save_model_dir
    from pfq.model import ModelSpec, init_variables

    spec = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=2)
    save_model_dir(tmp_path / "pretrained", spec, init_variables(spec, jax.random.key(7)), {})
    extra = (f"--config.sweep.inits=('scratch','{tmp_path / 'pretrained'}')",)
    caches = dict(jax_cache=jax_cache, pfq_cache=volume_cache)
    assert run_train(tmp_path / "reference", small_study, *extra, **caches).returncode == 0
    workdir = tmp_path / "run"
    for fault in TRAINING_POINTS + TRAINING_POINTS + OUTPUT_POINTS:
        proc = run_train(workdir, small_study, *extra, fault=fault, **caches)
        assert proc.returncode == KILLED, (fault, proc.stderr[-3000:])
    assert run_train(workdir, small_study, *extra, **caches).returncode == 0
    for name in OUTPUTS:
        assert (workdir / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert len(read_rows(workdir / "results.csv")) == 12  # 4 lanes x 3 test ratios


# ----------------------------------------------------------------------------------------------
# In process: diverging lanes, a full disk under existing outputs.
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def compiled_programs(jax_cache, volume_cache, monkeypatch):
    """Use the session's compilation cache in this process too (the subprocess runs filled it), and
    its preprocessing cache."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(jax_cache), 0.0, 0), strict=True):
        jax.config.update(name, value)
    cc.reset_cache()
    monkeypatch.setenv("PFQ_CACHE", str(volume_cache))
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


def poison(monkeypatch, choose) -> list:
    """Make `choose(data)`'s cases NaN after loading (the loader itself refuses NaN voxels)."""
    from pfq.train import trainer as trainer_module

    real, chosen = trainer_module.load_study_data, []

    def load(*args, **kwargs):
        data = real(*args, **kwargs)
        volumes = np.stack([np.asarray(data.source[i]) for i in range(len(data.source))])
        chosen[:] = [int(i) for i in choose(data)]
        volumes[chosen] = np.nan
        data.source = volumes
        return data

    monkeypatch.setattr(trainer_module, "load_study_data", load)
    return chosen


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_diverging_lane_is_marked_and_the_others_finish(
    small_study, small_reference, tmp_path, monkeypatch, compiled_programs
):
    from pfq.data.pipeline import stream_case
    from pfq.train.__main__ import run_sweep
    from pfq.train.lanes import make_lanes

    config = small_sweep_config(small_study)
    hq_lane = make_lanes((1.0,), ("scratch",), (8,), (0,))[0]
    found = {}

    def one_hq_case(data):  # an HQ finetuning case: only the ratio-1 lane ever sees it
        from pfq.train.trainer import lane_training_set

        lane_set = lane_training_set(hq_lane, data, 2)
        position = next(p for p in range(10**4) if stream_case(lane_set, data.labels, 0, p, False) == lane_set[-1])
        found["step"] = position // int(config.optim.batch_size)
        found["case"] = data.case_ids[lane_set[-1]]
        return [lane_set[-1]]

    poison(monkeypatch, one_hq_case)
    assert run_sweep(config, tmp_path / "w", progress=False) == 0
    rows, ref = read_rows(tmp_path / "w" / "results.csv"), read_rows(small_reference / "results.csv")
    assert found["step"] < int(config.optim.steps)
    for row, ref_row in zip(rows, ref, strict=True):
        if float(row["finetune_hq_ratio"]) == 1.0 and row["init"] == "percentile-lr":
            # The reference regression is not fitted on a NaN case either, and says which one.
            assert row["status"] == f"not fitted: non-finite intensities in 1 case(s): {found['case']}"
            assert row["auc"] == "nan"
        elif float(row["finetune_hq_ratio"]) == 1.0:
            assert row["status"] == f"diverged at step {found['step']}: non-finite loss"
            assert row["auc"] == "nan"
        else:  # the healthy lane is untouched by its neighbour: the very same numbers as the reference
            assert row == ref_row


def test_when_every_lane_diverges_the_sweep_stops_after_saving(
    small_study, tmp_path, monkeypatch, compiled_programs, capsys, caplog
):
    from pfq.train.__main__ import run_sweep

    poison(monkeypatch, lambda data: data.train_pool)
    workdir = tmp_path / "w"
    assert run_sweep(small_sweep_config(small_study), workdir, progress=False) == 1
    error = capsys.readouterr().err
    assert "every lane diverged: r0-scratch-n8-s0 at step 0 (non-finite loss); r1-scratch-n8-s0 at step 0" in error
    assert "Traceback" not in error and "checkpoints" in error
    assert committed_steps(workdir) == [2]  # stopped at the first check, state saved
    assert not (workdir / "results.csv").exists() and not (workdir / "run.json").exists()
    caplog.clear()
    assert run_sweep(small_sweep_config(small_study), workdir, progress=False) == 1  # a rerun does not train again
    assert "every lane had diverged by step 2; not training further" in caplog.text


def test_a_full_disk_leaves_the_earlier_results_intact(
    small_study, small_reference, tmp_path, capsys, compiled_programs
):
    from pfq.train.__main__ import run_sweep

    workdir = tmp_path / "w"
    shutil.copytree(small_reference, workdir)
    (workdir / "run.json").unlink()  # not finished: outputs are computed and written again
    before = (workdir / "results.csv").read_bytes()
    faults.configure("write:results.csv:1:enospc")
    try:
        assert run_sweep(small_sweep_config(small_study), workdir, progress=False) == 1
    finally:
        faults.configure(None)
    error = capsys.readouterr().err
    assert "No space left on device" in error and "intact" in error
    assert (workdir / "results.csv").read_bytes() == before
    assert not [p.name for p in workdir.iterdir() if ".tmp" in p.name]
    assert committed_steps(workdir) == [4, 6]


def test_damaged_checkpoints_fall_back_with_a_named_warning(tmp_path, caplog):
    """GroupCheckpointer on a small state: each kind of damage is named, set aside, and an older
    checkpoint restored; saving at the set-aside steps works again afterwards."""
    import jax.numpy as jnp

    from pfq.train.checkpoint import GroupCheckpointer

    def state(step):
        return {"w": jnp.full((64, 64), float(step)), "step": jnp.asarray(step, jnp.int32)}

    folder = tmp_path / "group0"
    ckpt = GroupCheckpointer(folder, keep=4)
    for step in (1, 2, 3, 4):
        ckpt.save(step, state(step), {"step": step, "data_iterator": {"next_index": step}})
    ckpt.wait()
    for f in (folder / "4" / "state").rglob("*"):  # truncate step 4's data files
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    shutil.rmtree(folder / "3" / "meta")  # step 3 lacks an item
    (folder / "2" / "meta" / "metadata").write_text(json.dumps({"step": 7, "data_iterator": {}}))  # wrong step

    step, restored, meta = ckpt.restore(state(0))
    assert step == 1 and float(restored["w"][0, 0]) == 1.0 and meta["data_iterator"] == {"next_index": 1}
    log = caplog.text
    assert f"{folder / '4'} is unreadable" in log
    assert f"{folder / '3'} is unreadable (item 'meta' is missing" in log
    assert f"{folder / '2'} is unreadable (item 'meta' does not describe step 2" in log
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "group0.unreadable").iterdir()) == ["2", "3", "4"]
    for step in (2, 3, 4):  # the set-aside steps can be written again
        ckpt.save(step, state(step), {"step": step, "data_iterator": {"next_index": step}})
    ckpt.wait()
    assert ckpt.restore(state(0))[0] == 4
    ckpt.close()


def test_checkpoint_write_errors_name_the_folder(tmp_path, monkeypatch):
    """(A real OS error inside Orbax's background write is in the kill chain: `small_file_limit`.)"""
    import errno

    import jax.numpy as jnp

    from pfq.train.checkpoint import CheckpointWriteError, GroupCheckpointer

    ckpt = GroupCheckpointer(tmp_path / "group0")
    ckpt.save(1, {"w": jnp.ones(4)}, {"step": 1, "data_iterator": {}})
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="could not write a checkpoint in .*group0 .*No space left"):
        ckpt.save(2, {"w": jnp.ones(4)}, {"step": 2, "data_iterator": {}})
    ckpt.close()
    assert GroupCheckpointer(tmp_path / "group0").restore({"w": jnp.zeros(4)})[0] == 1
