"""Every bad input is a named error: a corpus of broken manifests, volumes, configs and initial
checkpoints, each run through the sweep entry point (`pfq.train.__main__.run_sweep`, what the CLI
calls) against a workdir holding earlier outputs, with `--overwrite`: the run must exit with status
2, print one clean error naming the row / case / column / file / config key, and leave every earlier
output and checkpoint byte for byte as it was. Inputs that are merely unusual (a BOM, CRLF line
ends, spaces and non-ASCII characters in paths) must work and give the reference's results.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from studykit import (
    REPO,
    cli_env,
    read_rows,
    run_train,
    save_nifti,
    small_sweep_config,
    snapshot,
    train_command,
    write_manifest,
)

SHAPE_IJK = (32, 32, 16)  # the studykit volumes as nibabel stores them


# ----------------------------------------------------------------------------------------------
# Edits of a copy of the small study. Each returns config overrides ({"sweep.train_sizes": (20,)}).
# ----------------------------------------------------------------------------------------------
def edit_rows(change: Callable[[list[dict]], list[dict]], header_drop: str | None = None):
    def edit(root: Path) -> dict:
        rows = change(read_rows(root / "manifest.csv"))
        header = [h for h in rows[0] if h != header_drop]
        write_manifest(root / "manifest.csv", rows, header=header)
        return {}

    return edit


def set_cell(index: int, column: str, value: str):
    def change(rows):
        rows[index][column] = value
        return rows

    return edit_rows(change)


def replace_image(case: int, role: str, make: Callable[[Path], None]):
    def edit(root: Path) -> dict:
        make(root / "images" / f"c{case:03d}_{role}.nii.gz")
        return {}

    return edit


def noise(shape=SHAPE_IJK) -> np.ndarray:
    return np.random.default_rng(1).normal(100, 10, shape).astype(np.float32)


def with_voxel(value: float) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        data = noise()
        data[3, 4, 5] = value
        save_nifti(path, data)

    return make


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def without_affine(shape) -> Callable[[Path], None]:
    """A volume whose header has qform/sform codes 0 (no usable affine)."""

    def make(path: Path) -> None:
        image = nib.Nifti1Image(noise(shape), np.eye(4))
        image.header.set_qform(None, code=0)
        image.header.set_sform(None, code=0)
        nib.save(nib.Nifti1Image(noise(shape), None, image.header), str(path))

    return make


def not_nifti(root: Path) -> dict:
    (root / "images" / "c009_highb.nii").write_text("this is a radiology report, not an image\n")
    return set_cell(9, "highb", "images/c009_highb.nii")(root)


def overrides(**values) -> Callable[[Path], dict]:
    return lambda root: {k.replace("__", "."): v for k, v in values.items()}


def model_dir(root: Path, dims=(8, 16, 24, 32), claimed_classes: int | None = None) -> Path:
    """A converted pfq model directory (optionally with metadata claiming another class count)."""
    import jax

    from pfq.convert.store import save_model_dir
    from pfq.model import ModelSpec, abstract_variables

    spec = ModelSpec(depths=(1, 1, 1, 1), dims=dims, num_classes=2)
    variables = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract_variables(spec))  # no compile
    path = save_model_dir(root / "pretrained", spec, variables, {"source": "test"})
    if claimed_classes is not None:
        meta = json.loads((path / "pfq_model.json").read_text())
        meta["num_classes"] = claimed_classes
        (path / "pfq_model.json").write_text(json.dumps(meta))
    return path


def init_from(**kwargs) -> Callable[[Path], dict]:
    return lambda root: {"sweep.inits": ("scratch", str(model_dir(root, **kwargs)))}


def symlink_loop(root: Path) -> dict:
    (root / "images" / "loop_a.nii").symlink_to(root / "images" / "loop_b.nii")
    (root / "images" / "loop_b.nii").symlink_to(root / "images" / "loop_a.nii")
    return set_cell(6, "t2w", "images/loop_a.nii")(root)


def second_adc_column(root: Path) -> dict:
    lines = (root / "manifest.csv").read_text().splitlines()
    lines = [lines[0] + ",adc"] + [line + ",images/c000_adc.nii.gz" for line in lines[1:]]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return {}


def manifest_fifo(root: Path) -> dict:
    import os

    (root / "manifest.csv").unlink()
    os.mkfifo(root / "manifest.csv")
    return {}


def init_damaged(damage: Callable[[Path], None]) -> Callable[[Path], dict]:
    def edit(root: Path) -> dict:
        path = model_dir(root)
        damage(path)
        return {"sweep.inits": ("scratch", str(path))}

    return edit


@dataclass
class Bad:
    edit: Callable[[Path], dict]
    expect: tuple[str, ...]  # every one must appear in the error
    overwrite: bool = True
    workdir_config: dict = field(default_factory=dict)  # a recorded config.json (else a sentinel)


def empty_file(root: Path) -> dict:
    (root / "manifest.csv").write_text("")
    return {}


def header_only(root: Path) -> dict:
    (root / "manifest.csv").write_text("case_id,pirads,isup,quality,t2w,highb,adc\n")
    return {}


CORPUS: dict[str, Bad] = {
    # files
    "missing file": Bad(
        replace_image(5, "adc", lambda p: p.unlink()),
        ("line 7", "case 'c005'", "column 'adc'", "c005_adc.nii.gz", "file not found"),
    ),
    "truncated .nii.gz": Bad(
        replace_image(7, "t2w", truncated), ("line 9", "case 'c007'", "column 't2w'", "c007_t2w.nii.gz")
    ),
    "not NIfTI, .nii name": Bad(not_nifti, ("case 'c009'", "column 'highb'", "c009_highb.nii", "not a readable NIfTI")),
    "4-D volume": Bad(
        replace_image(11, "highb", lambda p: save_nifti(p, noise(SHAPE_IJK + (2,)))),
        ("case 'c011'", "c011_highb.nii.gz", "expected a 3-D volume", "4-D"),
    ),
    "2-D volume": Bad(
        replace_image(12, "t2w", lambda p: save_nifti(p, noise((32, 32)))), ("case 'c012'", "c012_t2w.nii.gz", "2-D")
    ),
    "all-zero volume": Bad(
        replace_image(14, "adc", lambda p: save_nifti(p, np.zeros(SHAPE_IJK, np.float32))),
        ("case 'c014'", "c014_adc.nii.gz", "all voxels are zero"),
    ),
    "NaN voxel": Bad(replace_image(15, "t2w", with_voxel(np.nan)), ("case 'c015'", "c015_t2w.nii.gz", "NaN/Inf")),
    "Inf voxel": Bad(replace_image(16, "highb", with_voxel(np.inf)), ("case 'c016'", "c016_highb.nii.gz", "NaN/Inf")),
    "mismatched grids, no usable affines": Bad(
        replace_image(17, "adc", without_affine((16, 16, 8))),
        ("case 'c017'", "column 'adc'", "c017_adc.nii.gz", "differs from T2w's", "no usable affine"),
    ),
    "absurd spacing": Bad(
        replace_image(18, "t2w", lambda p: save_nifti(p, noise(), spacing=(1000, 1000, 2000))),
        ("case 'c018'", "c018_t2w.nii.gz", "absurd voxel spacing"),
    ),
    "microscopic spacing": Bad(
        replace_image(19, "highb", lambda p: save_nifti(p, noise(), spacing=(1e-4,) * 3)),
        ("case 'c019'", "c019_highb.nii.gz", "absurd voxel spacing"),
    ),
    # manifest rows and columns
    "label out of range": Bad(set_cell(3, "pirads", "7"), ("line 5", "case 'c003'", "column 'pirads'", "'7'")),
    "non-numeric label": Bad(set_cell(4, "pirads", "four"), ("line 6", "case 'c004'", "column 'pirads'", "'four'")),
    "missing quality": Bad(set_cell(6, "quality", ""), ("line 8", "case 'c006'", "column 'quality'")),
    "unknown quality": Bad(
        set_cell(8, "quality", "medium"), ("line 10", "case 'c008'", "column 'quality'", "'medium'")
    ),
    "duplicate case_id": Bad(
        set_cell(10, "case_id", "c002"), ("line 12", "case 'c002'", "column 'case_id'", "duplicate")
    ),
    "empty manifest": Bad(empty_file, ("manifest.csv", "empty")),
    "header only": Bad(header_only, ("manifest.csv", "no cases")),
    "missing required column": Bad(edit_rows(lambda rows: rows, header_drop="adc"), ("line 1", "column 'adc'")),
    "missing label column": Bad(edit_rows(lambda rows: rows, header_drop="pirads"), ("line 1", "column 'pirads'")),
    "bad split value": Bad(
        edit_rows(
            lambda rows: [
                dict(r, split="validation" if i == 20 else "train" if i % 2 else "test") for i, r in enumerate(rows)
            ]
        ),
        ("line 22", "case 'c020'", "column 'split'", "'validation'"),
    ),
    "manifest not found": Bad(overrides(data__manifest="/nonexistent/manifest.csv"), ("/nonexistent/manifest.csv",)),
    # config
    "more HQ cases than the pool holds": Bad(
        overrides(sweep__train_sizes=(16,), sweep__finetune_hq_ratios=(1.0,)),
        ("config.sweep.train_sizes", "r1-scratch-n16-s0", "/ hq: need 8"),
    ),
    "test subsets larger than the pool": Bad(overrides(sweep__test_size=40), ("config.sweep.test_size",)),
    "finetune ratio above 1": Bad(
        overrides(sweep__finetune_hq_ratios=(0.5, 1.5)),
        ("config.sweep.finetune_hq_ratios", "1.5", "expected each value in [0, 1]"),
    ),
    "test ratio below 0": Bad(overrides(sweep__test_hq_ratios=(-0.25, 0.5)), ("config.sweep.test_hq_ratios", "-0.25")),
    "unknown task": Bad(overrides(task="gleason9"), ("invalid config", "gleason9")),
    "unknown model size": Bad(
        overrides(model__size="gigantic", model__depths=(), model__dims=()),
        ("invalid config", "config.model.size = 'gigantic'"),
    ),
    # initial checkpoints
    "checkpoint of another model size": Bad(
        init_from(dims=(16, 32, 48, 64)),
        ("config.sweep.inits", "pretrained", "dims=(16, 32, 48, 64)", "(8, 16, 24, 32)"),
    ),
    "checkpoint of another class count": Bad(
        init_from(claimed_classes=3), ("config.sweep.inits", "pretrained", "head")
    ),
    "not a model directory": Bad(
        lambda root: {"sweep.inits": (str(root / "images"),)},
        ("config.sweep.inits", "images", "not a pfq model directory"),
    ),
    # hostile files and manifests on the training path (the in-process corpus is tests/test_hostile_inputs.py)
    "image is /dev/zero": Bad(
        set_cell(5, "adc", "/dev/zero"), ("line 7", "case 'c005'", "column 'adc'", "character device")
    ),
    "image is a symlink loop": Bad(symlink_loop, ("line 8", "case 'c006'", "column 't2w'", "symlink loop")),
    "complex64 image": Bad(
        replace_image(13, "highb", lambda p: save_nifti(p, noise().astype(np.complex64))),
        ("case 'c013'", "column 'highb'", "complex"),
    ),
    "two adc columns": Bad(second_adc_column, ("line 1", "column 'adc'", "2 times")),
    "manifest is a FIFO": Bad(manifest_fifo, ("manifest.csv", "FIFO")),
    "every row split train": Bad(
        edit_rows(lambda rows: [dict(r, split="train") for r in rows]),
        ("column 'split'", "every row says 'train'", "test pool would be empty"),
    ),
    "every row split test": Bad(
        edit_rows(lambda rows: [dict(r, split="test") for r in rows]),
        ("column 'split'", "every row says 'test'", "finetuning pool would be empty"),
    ),
    # configs that cannot build a model (found by tracing it before --overwrite discards anything)
    "input too small for the model": Bad(overrides(data__input_size=(8, 8, 8)), ("input_size",)),
    "unknown model dtype": Bad(overrides(model__dtype="float17"), ("float17",)),
    # damaged initial checkpoints
    "init without variables/": Bad(
        init_damaged(lambda path: shutil.rmtree(path / "variables")), ("config.sweep.inits", "no variables/ folder")
    ),
    "init pfq_model.json a list": Bad(
        init_damaged(lambda path: (path / "pfq_model.json").write_text("[1, 2]")),
        ("config.sweep.inits", "pfq_model.json", "JSON list"),
    ),
    # the workdir
    "workdir of another run": Bad(
        lambda root: {},
        ("holds a run with a different config", "sweep.seeds"),
        overwrite=False,
        workdir_config={"sweep": {"seeds": [0, 1, 2]}},
    ),
}


def earlier_outputs(workdir: Path, config_json: dict) -> None:
    """What a previous run left: outputs, a checkpoint, and the record of its config."""
    (workdir / "checkpoints" / "group0" / "6").mkdir(parents=True)
    (workdir / "checkpoints" / "group0" / "6" / "state").write_bytes(b"\x00earlier checkpoint")
    for name in ("results.csv", "predictions.csv", "report.md", "heatmap_auc.png"):
        (workdir / name).write_text(f"earlier {name}\n")
    (workdir / "run.json").write_text(json.dumps({"complete": True}))
    (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))


@pytest.fixture
def study_copy(small_study, tmp_path) -> Path:
    root = tmp_path / "study"
    shutil.copytree(small_study.parent, root)
    return root


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_is_a_named_error_and_earlier_outputs_survive(
    name, study_copy, volume_cache, tmp_path, monkeypatch, capsys
):
    from pfq.train.__main__ import run_sweep

    bad = CORPUS[name]
    monkeypatch.setenv("PFQ_CACHE", str(volume_cache))
    config = small_sweep_config(study_copy / "manifest.csv")
    for key, value in bad.edit(study_copy).items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    recorded = json.loads(config.to_json())
    for section, values in bad.workdir_config.items():
        recorded[section].update(values)
    workdir = tmp_path / "work"
    earlier_outputs(workdir, recorded)
    before = snapshot(workdir)

    status = run_sweep(config, workdir, progress=False, overwrite=bad.overwrite)
    err = capsys.readouterr().err
    print(f"--- {name}\n{err}")
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in bad.expect:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert snapshot(workdir) == before, "earlier outputs changed"
    assert len(CORPUS) >= 40


def test_cli_prints_one_clean_error_and_exits_2(study_copy, jax_cache, volume_cache, tmp_path):
    """The real command line: exit status 2, the named problem, no traceback, nothing written."""
    set_cell(3, "pirads", "7")(study_copy)
    workdir = tmp_path / "work"
    import subprocess

    proc = subprocess.run(
        train_command(workdir, study_copy / "manifest.csv"),
        env=cli_env(jax_cache, pfq_cache=volume_cache),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "line 5, case 'c003', column 'pirads'" in proc.stderr
    assert not workdir.exists()


def test_bom_crlf_spaces_and_non_ascii_paths_work(small_study, small_reference, jax_cache, volume_cache, tmp_path):
    """A manifest saved by a spreadsheet on Windows (BOM, CRLF) in a folder whose name and image
    paths have spaces and non-ASCII characters: the run works and gives the reference's results."""
    root = tmp_path / "Prostata MRT – Übersicht"
    shutil.copytree(small_study.parent / "images", root / "bilder ü ø")
    rows = read_rows(small_study)
    for row in rows:
        for role in ("t2w", "highb", "adc"):
            row[role] = row[role].replace("images/", "bilder ü ø/")
    manifest = write_manifest(root / "fälle 2024.csv", rows, encoding="utf-8-sig", lineterminator="\r\n")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in manifest.read_bytes()
    workdir = tmp_path / "résultats run"
    proc = run_train(workdir, manifest, jax_cache=jax_cache, pfq_cache=volume_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.csv", "predictions.csv"):
        assert (workdir / name).read_bytes() == (small_reference / name).read_bytes(), name


def test_workdir_that_is_a_file_is_exit_2_before_anything(study_copy, volume_cache, tmp_path, monkeypatch, capsys):
    """Not the 'rerun to resume' status 1 of an interrupted run: a bad argument, named."""
    from pfq.train.__main__ import run_sweep

    monkeypatch.setenv("PFQ_CACHE", str(volume_cache))
    config = small_sweep_config(study_copy / "manifest.csv")
    (tmp_path / "a_file").write_text("mine\n")
    for workdir in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        assert run_sweep(config, workdir, progress=False, overwrite=True) == 2
        err = capsys.readouterr().err
        assert "not a folder" in err and "a_file" in err and "rerun" not in err, err
    assert (tmp_path / "a_file").read_text() == "mine\n"


def test_overwrite_leaves_nothing_of_the_previous_run(tmp_path):
    """`--overwrite` removes every output of the previous run (figures of any metric, exported
    models, checkpoints moved aside) and nothing that pfq did not write."""
    from pfq.train.workdir import prepare

    workdir = tmp_path / "work"
    earlier_outputs(workdir, {"seed": 1})
    for name in (
        "heatmap_kappa.png",
        "mismatch_auc_isup.png",
        "label_efficiency_auc.png",
        "data.json",
        "models/r0-scratch-n20-s0/pfq_model.json",
        "checkpoints/group0.unreadable/4-x/meta",
        "notes.txt",
    ):
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text("earlier\n")
    assert prepare(workdir, json.dumps({"seed": 2}), overwrite=True) is False
    left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert left == ["config.json", "notes.txt"], left
