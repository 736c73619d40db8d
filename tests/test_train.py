"""End to end: `python -m pfq.train` on the smoke config, on 1, 2 and 4 (fake CPU) devices and as two
processes joined by jax.distributed on loopback."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from studykit import run_train

# One forward pass agrees to ~1e-6 across device layouts (measured); over the smoke run's AdamW steps,
# whose first updates are ~lr * sign(gradient), summation-order noise grows to ~1e-3 in probabilities.
# A real layout bug (like the XLA one PatchConv avoids) moved probabilities by 0.04.
PROB_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def train(cache, jax_cache):
    """`python -m pfq.train` on the smoke config and its phantoms, sharing the session's compiled programs;
    asserts exit status 0 unless `check=False`."""

    def run(
        workdir: Path,
        *args: str,
        devices: int = 1,
        check: bool = True,
        background: bool = False,
        env_extra: dict | None = None,
    ):
        proc = run_train(
            workdir,
            None,
            *args,
            sweep=(),
            jax_cache=jax_cache,
            pfq_cache=cache,
            devices=devices,
            background=background,
            env_extra=env_extra,
        )
        if check and not background:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    return run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probabilities(workdir: Path) -> dict:
    return {(r["lane"], r["case_id"]): float(r["prob_1"]) for r in read_csv(workdir / "predictions.csv")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    proc = train(workdir)
    assert "finetune\\test" in proc.stdout  # the printed summary table
    return workdir


def test_smoke_run_writes_every_row_and_the_report(reference):
    every = read_csv(reference / "results.csv")
    rows = [r for r in every if r["init"] == "scratch"]
    cells = {(float(r["finetune_hq_ratio"]), float(r["test_hq_ratio"]), int(r["seed"])) for r in rows}
    assert cells == {(f, t, s) for f in (0.0, 0.5, 1.0) for t in (0.0, 0.5, 1.0) for s in (0, 1)}
    assert len(rows) == 18
    # The reference baseline: one row per scratch row, fitted to the same finetuning set.
    reference_rows = [r for r in every if r["init"] == "percentile-lr"]
    assert len(every) == 36 and len(reference_rows) == 18
    key = ("finetune_hq_ratio", "train_size", "seed", "test_hq_ratio", "finetune_hq_count", "n_test")
    assert sorted(tuple(r[k] for k in key) for r in reference_rows) == sorted(tuple(r[k] for k in key) for r in rows)
    assert {r["lane"].split("-n")[0] for r in read_csv(reference / "predictions.csv")} >= {"r1-percentile-lr"}
    assert "percentile-lr" in (reference / "report.md").read_text()
    for row in every:
        assert row["status"] == "ok"
        assert 0.0 <= float(row["auc"]) <= 1.0
        assert float(row["auc_ci_low"]) <= float(row["auc"]) <= float(row["auc_ci_high"])
        assert int(row["finetune_hq_count"]) == round(float(row["finetune_hq_ratio"]) * int(row["train_size"]))
    for name in ("predictions.csv", "report.md", "heatmap_auc.png", "config.json"):
        assert (reference / name).is_file(), name
    run = json.loads((reference / "run.json").read_text())
    # One compiled step program per distinct lane shape: the smoke sweep has one lane group.
    assert run["complete"] and run["compile_count"] == run["lane_groups"] == 1


def test_rerun_of_a_finished_sweep_does_not_retrain(reference, train):
    before = (reference / "results.csv").read_bytes()
    proc = train(reference)
    assert "0 compiled step program(s)" in proc.stdout
    assert (reference / "results.csv").read_bytes() == before


@pytest.mark.parametrize("devices", [2, 4])
def test_fake_devices_agree_with_one(reference, train, cache, tmp_path, devices):
    train(tmp_path, "--config.export_models=True", devices=devices)
    ref, got = probabilities(reference), probabilities(tmp_path)
    assert ref.keys() == got.keys()
    assert max(abs(ref[k] - got[k]) for k in ref) < PROB_TOLERANCE
    for a, b in zip(read_csv(reference / "results.csv"), read_csv(tmp_path / "results.csv"), strict=True):
        assert abs(float(a["auc"]) - float(b["auc"])) < 1e-3
    check_exported_model(tmp_path)
    if devices == 2:
        check_predict_manifest_matches_the_sweep(tmp_path, cache)


def check_predict_manifest_matches_the_sweep(workdir: Path, cache: Path) -> None:
    """`pfq.predict --manifest` on an exported lane preprocesses as training did (the input size is
    read from the model directory) and gives the sweep's own test-pool probabilities."""
    from pfq import predict

    lane = next(r["lane"] for r in read_csv(workdir / "predictions.csv") if r["init"] == "scratch")
    want = {case: p for (name, case), p in probabilities(workdir).items() if name == lane}
    (manifest,) = (cache / "phantoms").glob("*/manifest.csv")
    out = workdir / "predicted.csv"
    assert (
        predict.main(
            [
                "--checkpoint",
                str(workdir / "models" / lane),
                "--manifest",
                str(manifest),
                "--output",
                str(out),
                "--cache-dir",
                str(cache / "volumes"),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["case_id"] for r in rows] == [c["case_id"] for c in read_csv(manifest)]
    assert {r["quality"] for r in rows} == {"hq", "lq"} and {r["label"] for r in rows} == {"0", "1"}
    got = {r["case_id"]: float(r["prob_1"]) for r in rows}
    assert want and max(abs(got[c] - p) for c, p in want.items()) < 1e-4
    for r in rows:
        assert abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-5
        assert int(r["predicted"]) == int(float(r["prob_1"]) > float(r["prob_0"]))


def check_exported_model(workdir: Path) -> None:
    """Every finished CNN lane (not the reference regression) is exported in the converter's format,
    loads, and is its own model."""
    import jax

    from pfq.convert.store import load_model_dir
    from pfq.model import apply
    from pfq.stats import BASELINE_INIT

    lanes = sorted({r["lane"] for r in read_csv(workdir / "predictions.csv") if r["init"] != BASELINE_INIT})
    assert sorted(p.name for p in (workdir / "models").iterdir()) == lanes
    x = jax.random.normal(jax.random.key(0), (2, 16, 32, 32, 3))
    logits = []
    for lane in lanes[:2]:
        spec, variables, meta = load_model_dir(workdir / "models" / lane)
        assert meta["task"] == "pirads_ge4" and spec.num_classes == 2
        logits.append(np.asarray(apply(spec, variables, x)[0]))
    assert np.isfinite(logits[0]).all() and not np.allclose(logits[0], logits[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(train, workdir: Path, *extra: str, env_extra: dict | None = None, returncode: int = 0) -> str:
    """Both processes' output, once both have finished with `returncode`."""
    args = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num_processes", "2", *extra]
    worker = train(workdir, *args, "--process_id", "1", background=True, env_extra=env_extra)
    main = train(workdir, *args, "--process_id", "0", check=False, env_extra=env_extra)
    out, _ = worker.communicate(timeout=300)
    assert main.returncode == returncode, main.stdout[-2000:] + main.stderr[-2000:]
    assert worker.returncode == returncode, out[-3000:]
    return f"{main.stdout}{main.stderr}\n--- process 1 ---\n{out}"


def test_two_processes_on_loopback_match_one(reference, train, tmp_path):
    output = run_two_processes(train, tmp_path)
    # Each process loads only the lanes its device holds (6 lanes on a 2 x 1 mesh).
    head, worker = output.split("--- process 1 ---")
    assert "loads lanes 0:3, slots 0:2" in head and "loads lanes 3:6, slots 0:2" in worker
    ref, got = probabilities(reference), probabilities(tmp_path)
    assert max(abs(ref[k] - got[k]) for k in ref) < PROB_TOLERANCE
    ref_rows, got_rows = read_csv(reference / "results.csv"), read_csv(tmp_path / "results.csv")
    assert [r["seed"] for r in got_rows] == [r["seed"] for r in ref_rows]
    assert np.allclose([float(r["auc"]) for r in got_rows], [float(r["auc"]) for r in ref_rows], atol=1e-3)


def test_two_processes_splitting_every_batch_match_one(reference, train, tmp_path):
    """3 lanes do not split over 2 processes, so each process loads one slot of every lane's batch;
    a lane's results do not depend on the other lanes, so they match the reference's seed-0 lanes."""
    output = run_two_processes(train, tmp_path, "--config.sweep.seeds=(0,)")
    head, worker = output.split("--- process 1 ---")
    assert "loads lanes 0:3, slots 0:1" in head and "loads lanes 0:3, slots 1:2" in worker
    ref, got = probabilities(reference), probabilities(tmp_path)
    assert {lane for lane, _ in got} == {lane for lane, _ in ref if lane.endswith("-s0")}
    assert max(abs(ref[k] - got[k]) for k in got) < PROB_TOLERANCE


def test_a_second_run_in_a_busy_workdir_stops_and_changes_nothing(reference, train):
    """While a run holds the workdir, another one (here even with --overwrite) stops with exit
    status 2 naming the holder, and every file stays as it was."""
    from pfq.train.workdir import exclusive

    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    with exclusive(reference):
        proc = train(reference, "--overwrite", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is in use by another run (process {os.getpid()} on" in proc.stderr
    assert {p for p in reference.rglob("*") if p.is_file()} == before.keys()
    assert all(p.read_bytes() == data for p, data in before.items() if p.name != ".lock")


@pytest.mark.slow
def test_two_processes_killed_together_resume_to_the_same_results(train, tmp_path):
    """Both processes SIGKILLed after step 8 of 9 (the step-3 checkpoint is committed by then, since
    Orbax finishes one save before it starts the next at step 6), then rerun: each restores its own
    data iterator and loads its own block again, and the outputs equal those of an uninterrupted
    two-process run byte for byte."""
    steps = ["--config.optim.steps=9", "--config.checkpoint.every_steps=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_two_processes(train, full, *steps)
    output = run_two_processes(train, cut, *steps, env_extra={"PFQ_FAULT_POINT": "train_step:8"}, returncode=-9)
    assert output.count("pfq.faults: kill at train_step:8") == 2
    assert not (cut / "results.csv").exists()
    output = run_two_processes(train, cut, *steps)
    assert output.count("resumed from step 6") == 2 or output.count("resumed from step 3") == 2, output[-3000:]
    for name in ("results.csv", "predictions.csv"):
        assert (cut / name).read_bytes() == (full / name).read_bytes(), name
