"""A resume must train on the data its run started on. An interrupted workdir (its config, its data
fingerprint, a checkpoint) is rerun after the data changed: a label edited, a quality grade flipped,
an image replaced, a case dropped or added, the split moved. Each rerun is refused with exit status 2
naming the case and field, and the workdir is left byte for byte as it was. Unchanged data, and the
same data under another path, resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from studykit import read_rows, save_nifti, small_sweep_config, snapshot, write_manifest

from pfq.data.study import load_study_data
from pfq.tasks import get_task
from pfq.train import fingerprint
from pfq.train.workdir import WorkdirError


def edit_rows(change: Callable[[list[dict]], list[dict]]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        rows = change(read_rows(root / "manifest.csv"))
        write_manifest(root / "manifest.csv", rows, header=list(rows[0]))

    return edit


def set_cell(index: int, column: str, value: str) -> Callable[[Path], None]:
    def change(rows):
        rows[index][column] = value
        return rows

    return edit_rows(change)


def replace_image(root: Path) -> None:
    import numpy as np

    save_nifti(
        root / "images" / "c005_t2w.nii.gz", np.random.default_rng(9).normal(100, 10, (32, 32, 16)).astype(np.float32)
    )


CHANGES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "a label edited": (set_cell(3, "pirads", "5"), ("case 'c003'", "label 0 -> 1")),
    "a quality grade flipped": (set_cell(4, "quality", "lq"), ("case 'c004'", "quality 'hq' -> 'lq'")),
    "an image replaced": (replace_image, ("case 'c005'", "column 't2w'", "content changed")),
    "a case dropped": (edit_rows(lambda rows: rows[:-1]), ("no longer in the manifest", "'c047'")),
    "a case added": (edit_rows(lambda rows: rows + [dict(rows[0], case_id="c999")]), ("new in the manifest", "'c999'")),
    "cases swapped between pools": (
        edit_rows(lambda rows: [dict(r, split="test" if i < 24 else "train") for i, r in enumerate(rows)]),
        ("pool",),
    ),
}


@pytest.fixture
def interrupted(small_study, volume_cache, tmp_path, monkeypatch) -> tuple[Path, Path, object]:
    """(study copy, workdir of an interrupted run on it, its config)."""
    monkeypatch.setenv("PFQ_CACHE", str(volume_cache))
    root = tmp_path / "study"
    shutil.copytree(small_study.parent, root)
    config = small_sweep_config(root / "manifest.csv")
    data = load_study_data(config, get_task(config.task), progress=False)
    workdir = tmp_path / "work"
    (workdir / "checkpoints" / "group0" / "4").mkdir(parents=True)
    (workdir / "checkpoints" / "group0" / "4" / "state").write_bytes(b"\x00checkpoint at step 4")
    (workdir / "config.json").write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))
    fingerprint.record(workdir, fingerprint.data_fingerprint(data, config.data))
    return root, workdir, config


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_resume_on_changed_data_is_refused_naming_the_change(name, interrupted):
    root, workdir, config = interrupted
    change, expect = CHANGES[name]
    change(root)
    data = load_study_data(config, get_task(config.task), progress=False)
    with pytest.raises(WorkdirError, match="holds a run on other data") as caught:
        fingerprint.check(workdir, fingerprint.data_fingerprint(data, config.data))
    for fragment in expect:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"


def test_the_sweep_refuses_with_exit_2_and_touches_nothing(interrupted, capsys):
    """The same check through the sweep entry point: before anything in the workdir is written."""
    from pfq.train.__main__ import run_sweep

    root, workdir, config = interrupted
    set_cell(3, "pirads", "5")(root)
    before = snapshot(workdir)
    status = run_sweep(config, workdir, progress=False)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert "case 'c003'" in err and "label 0 -> 1" in err
    assert snapshot(workdir) == before


def test_the_same_data_resumes_even_from_another_folder(interrupted, tmp_path):
    """Unchanged data passes the check; so does a copy of it elsewhere (the same content)."""
    root, workdir, config = interrupted
    task = get_task(config.task)
    fingerprint.check(workdir, fingerprint.data_fingerprint(load_study_data(config, task, progress=False), config.data))
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    config.data.manifest = str(moved / "manifest.csv")
    fingerprint.check(workdir, fingerprint.data_fingerprint(load_study_data(config, task, progress=False), config.data))
