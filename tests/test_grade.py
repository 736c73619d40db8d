"""The HQ/LQ grader and the `python -m pfq.data iqm / grade` commands, on synthetic measures and a
tiny phantom set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pfq.data import grade as gr
from pfq.data import phantoms as ph
from pfq.data.__main__ import main
from pfq.data.iqm import HEADER_NAMES, iqm_names
from pfq.data.manifest import read_manifest
from pfq.data.phantom_set import write_phantom_set


def synthetic_rows(n: int, seed: int = 0) -> tuple[list[dict[str, float]], list[str]]:
    """IQM rows where LQ cases are noisier, blurrier and more ghosted, with overlap."""
    rng = np.random.default_rng(seed)
    truth = ["hq" if i % 2 == 0 else "lq" for i in range(n)]
    rows = []
    for q in truth:
        bad = 1.0 if q == "lq" else 0.0
        row = {name: float(rng.normal(1.0, 0.1)) for name in iqm_names()}
        for c in ("t2w", "highb", "adc"):
            row[f"{c}_snr"] = float(np.exp(rng.normal(3.0 - 0.8 * bad, 0.4)))
            row[f"{c}_fwhm_inplane"] = float(np.exp(rng.normal(1.0 + 0.3 * bad, 0.15)))
            row[f"{c}_ghost"] = float(rng.normal(0.5 * bad, 0.3))
        row["highb_floor_frac"] = float(np.clip(rng.normal(0.1 + 0.2 * bad, 0.08), 0, 1))
        rows.append(row)
    return rows, truth


def test_supervised_grader_reports_cv_auc_and_labels_win():
    rows, truth = synthetic_rows(80)
    labels = [q if i < 40 else None for i, q in enumerate(truth)]
    result = gr.grade(rows, labels)
    assert result.method == "logistic" and result.n_labelled == 40
    assert result.cv_auc is not None and result.cv_auc > 0.9
    assert result.quality[:40] == truth[:40] and result.source == ["label"] * 40 + ["iqm"] * 40
    agreement = np.mean([a == b for a, b in zip(result.quality[40:], truth[40:], strict=True)])
    assert agreement > 0.8
    hq = np.array(truth) == "hq"
    assert result.score[hq].mean() > result.score[~hq].mean()  # higher is better
    assert gr.grade(rows, labels).score.tolist() == result.score.tolist()  # deterministic


def test_unsupervised_grader_separates_without_labels():
    rows, truth = synthetic_rows(80, seed=1)
    result = gr.grade(rows, [None] * 80)
    assert result.method == "mixture" and result.cv_auc is None and set(result.source) == {"iqm"}
    assert np.mean([a == b for a, b in zip(result.quality, truth, strict=True)]) > 0.8
    fixed = gr.grade(rows, [None] * 80, lq_fraction=0.25)
    assert fixed.method == "quantile" and fixed.quality.count("lq") == 20
    worst = np.argsort(gr.badness(gr.feature_matrix(rows)))[-20:]
    assert all(fixed.quality[i] == "lq" for i in worst)


def test_too_few_labels_fall_back_to_the_unsupervised_rule_with_a_note():
    rows, truth = synthetic_rows(40, seed=2)
    labels = [q if i < 4 else None for i, q in enumerate(truth)]
    result = gr.grade(rows, labels)
    assert result.method == "mixture" and result.notes and result.quality[:4] == truth[:4]


def test_undefined_measures_are_imputed():
    rows, truth = synthetic_rows(40, seed=3)
    rows[0]["t2w_fwhm_inplane"] = float("nan")
    rows[1]["adc_snr"] = float("nan")
    assert np.isfinite(gr.grade(rows, truth).score).all()
    assert np.isfinite(gr.grade(rows, [None] * 40).score).all()


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_set(out, 12, shape=(16, 32, 32), spacing=(4.0, 2.0, 2.0), lesion_scale=1.6, progress=False)


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _without_quality(manifest: Path, out: Path, keep: int = 0) -> Path:
    """The manifest with quality blank except on the first ``keep`` rows (no column when keep is 0)."""
    header, rows = _rows(manifest)
    if keep == 0:
        header = [h for h in header if h != "quality"]
    for i, row in enumerate(rows):
        if keep == 0:
            row.pop("quality")
        elif i >= keep:
            row["quality"] = ""
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_phantom_manifest_carries_per_artefact_severities(phantom_set):
    header, rows = _rows(phantom_set)
    assert tuple(header) == ph.MANIFEST_COLUMNS
    manifest = read_manifest(phantom_set)  # extra columns are kept as written
    for case, row in zip(manifest.cases, rows, strict=True):
        values = {case.raw[c] for c in ph.SEVERITY_COLUMNS}
        assert len(values) == 1  # the default set: one knob drives every artefact
        lo, hi = (0.0, 0.15) if row["quality"] == "hq" else (0.5, 1.0)
        assert lo <= float(values.pop()) <= hi


def test_iqm_command_writes_one_row_per_case(phantom_set, tmp_path, capsys):
    out = tmp_path / "iqm.csv"
    assert main(["iqm", str(phantom_set), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    header, rows = _rows(out)
    assert header == ["case_id", "line", *iqm_names(), *HEADER_NAMES, "error"]
    assert [r["case_id"] for r in rows] == [c.case_id for c in read_manifest(phantom_set).cases]
    assert all(r["error"] == "" and r["t2w_snr"] for r in rows)
    assert len(list((tmp_path / "cache" / "iqm").glob("*/*.json"))) == 12  # cached per case


def test_grade_command_on_a_manifest_without_quality(phantom_set, tmp_path, capsys):
    source = _without_quality(phantom_set, phantom_set.parent / "noquality.csv")
    out = tmp_path / "sub" / "graded.csv"
    out.parent.mkdir()
    assert main(["grade", str(source), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    in_header, in_rows = _rows(source)
    header, rows = _rows(out)
    assert header == in_header + ["quality", "quality_score", "quality_source"]
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in in_rows]
    assert {r["quality_source"] for r in rows} == {"iqm"} and {r["quality"] for r in rows} <= {"hq", "lq"}
    graded = read_manifest(out)  # the output is a manifest: its image paths still resolve
    assert all(path.is_file() for case in graded.cases for path in case.images.values())
    truth = [r["quality"] for r in _rows(phantom_set)[1]]
    agreement = np.mean([r["quality"] == t for r, t in zip(rows, truth, strict=True)])
    assert agreement >= 0.75, agreement


def test_grade_command_keeps_labels_and_fits_on_them(phantom_set, tmp_path, capsys):
    source = _without_quality(phantom_set, phantom_set.parent / "partial.csv", keep=10)
    out = tmp_path / "graded.csv"
    assert main(["grade", str(source), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    _, rows = _rows(out)
    _, truth = _rows(phantom_set)
    assert [r["quality_source"] for r in rows] == ["label"] * 10 + ["iqm"] * 2
    assert [r["quality"] for r in rows[:10]] == [t["quality"] for t in truth[:10]]
    assert "cross-validated AUC" in capsys.readouterr().out


def test_grade_command_names_a_bad_row_and_writes_nothing(phantom_set, tmp_path, capsys):
    header, rows = _rows(phantom_set)
    rows[3]["adc"] = "images/missing.nii.gz"
    bad = phantom_set.parent / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "graded.csv"
    assert main(["grade", str(bad), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 2
    printed = capsys.readouterr().out
    assert "line 5" in printed and "phantom_00003" in printed and "'adc'" in printed and "missing.nii.gz" in printed
    assert not out.exists()
    assert (
        main(["iqm", str(bad), "--out", str(tmp_path / "iqm.csv"), "--cache", str(tmp_path / "cache"), "--no-progress"])
        == 2
    )
    _, iqm_rows = _rows(tmp_path / "iqm.csv")
    assert len(iqm_rows) == 12 and "file not found" in iqm_rows[3]["error"] and iqm_rows[3]["t2w_snr"] == ""


def test_study_takes_grades_from_image_quality_when_configured(phantom_set, tmp_path):
    from pfq.config import base_config, validate_config
    from pfq.data.manifest import ManifestError
    from pfq.data.study import load_study_data
    from pfq.tasks import get_task

    cfg = base_config()
    cfg.data.manifest = str(_without_quality(phantom_set, phantom_set.parent / "noquality_study.csv"))
    cfg.data.cache_dir = str(tmp_path / "cache")
    task = get_task(cfg.task)
    with pytest.raises(ManifestError, match="quality"):
        load_study_data(cfg, task, progress=False)  # quality_from = "label" needs the column
    cfg.data.quality_from = "iqm"
    validate_config(cfg)
    data = load_study_data(cfg, task, progress=False)
    assert data.grading is not None and data.grading.summary()["n_from_iqm"] == 12
    assert data.is_hq.tolist() == [q == "hq" for q in data.grading.quality]
    cfg.data.quality_from = "reader"
    with pytest.raises(ValueError, match="quality_from"):
        validate_config(cfg)


def test_worker_processes_give_the_same_measures(phantom_set, tmp_path):
    from pfq.data.iqm import manifest_iqms

    cases = read_manifest(phantom_set).cases[:3]
    serial, _ = manifest_iqms(cases, tmp_path / "a", progress=False)
    parallel, _ = manifest_iqms(cases, tmp_path / "b", workers=2, progress=False)
    assert json.dumps(serial) == json.dumps(parallel)
