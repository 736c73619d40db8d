"""`python -m pfq.predict --manifest`: every case preprocessed as in training, a table in manifest
order, and bad rows reported by line and file before anything is written."""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import numpy as np
import pytest

from pfq import evaluate, predict
from pfq.convert.store import save_model_dir
from pfq.data.manifest import read_manifest
from pfq.data.preprocess import PreprocessConfig, load_case
from pfq.model import ModelSpec, apply, features, init_variables
from tests.niftigen import write_study

SPEC = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=4)
SIZE = ("16", "16", "16")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    manifest = write_study(root / "study", n=5)
    variables = init_variables(SPEC, jax.random.key(3))
    model = save_model_dir(root / "model", SPEC, variables, {"source_format": "test", "task": "pirads_4class"})
    return manifest, model


def _run(study, tmp_path, *extra: str) -> int:
    manifest, model = study
    return predict.main(
        [
            "--checkpoint",
            str(model),
            "--manifest",
            str(manifest),
            "--input-size",
            *SIZE,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
            "--batch-size",
            "2",
            *extra,
        ]
    )


def _expected(manifest: Path, model: Path, want_features: bool = False) -> np.ndarray:
    """Each case through the preprocessing and the model, independently of the predict loop."""
    from pfq.convert.store import load_model_dir

    spec, variables, _ = load_model_dir(model)
    config = PreprocessConfig(input_size=tuple(int(n) for n in SIZE))
    x = np.stack([load_case(c, config) for c in read_manifest(manifest).cases])
    return np.asarray(features(spec, variables, x) if want_features else apply(spec, variables, x)[0])


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_manifest_predictions_in_manifest_order(study, tmp_path):
    out = tmp_path / "pred.csv"
    assert _run(study, tmp_path, "--output", str(out)) == 0
    rows = _table(out)
    assert [r["case_id"] for r in rows] == [f"c{i:03d}" for i in range(5)]
    assert [r["quality"] for r in rows] == ["hq", "lq", "hq", "lq", "hq"]
    assert [r["label"] for r in rows] == ["0", "0", "1", "1", "2"]  # pirads 2,2,3,3,4 -> 4-class
    logits = _expected(*study)
    probs = np.array([[float(r[f"prob_{k}"]) for k in range(4)] for r in rows])
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(logits, axis=1)), atol=1e-5)
    assert [int(r["predicted"]) for r in rows] == np.argmax(logits, axis=1).tolist()
    assert len(set(np.round(probs[:, 0], 6))) > 1  # the cases differ
    # Labelled cases are scored with the sweep's metrics, overall and per quality grade.
    metrics = {r["cases"]: r for r in _table(tmp_path / "pred_metrics.csv")}
    assert [(k, int(r["n"])) for k, r in metrics.items()] == [("all", 5), ("hq", 3), ("lq", 2)]
    y = np.array([0, 0, 1, 1, 2])
    want = evaluate.score(y, np.asarray(jax.nn.softmax(logits.astype(np.float64), axis=1)), "pirads_4class")
    assert float(metrics["all"]["auc"]) == pytest.approx(want["auc"], abs=1e-5)
    assert float(metrics["all"]["accuracy"]) == pytest.approx(want["accuracy"])


def test_task_must_fit_the_model(study, tmp_path, capsys):
    assert _run(study, tmp_path, "--output", str(tmp_path / "p.csv"), "--task", "pirads_ge4") == 2
    assert "--task pirads_ge4 has 2 classes; this model has 4" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_manifest_features_as_npy(study, tmp_path):
    out = tmp_path / "feats.npy"
    assert _run(study, tmp_path, "--output", str(out), "--features") == 0
    np.testing.assert_allclose(np.load(out), _expected(*study, want_features=True), atol=1e-5)


def test_bad_rows_are_named_and_nothing_is_written(study, tmp_path, capsys):
    manifest, model = study
    broken = manifest.with_name("broken.csv")
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace("c001_adc.nii.gz", "missing_adc.nii.gz")
    broken.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pred.csv"
    out.write_text("earlier results\n")
    assert _run((broken, model), tmp_path, "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "c001" in err and "missing_adc.nii.gz" in err
    assert out.read_text() == "earlier results\n"
