"""Every validation error class: each bad input yields a problem naming its line, case, column and
file, the CLI prints one line per problem and exits non-zero, and training refuses the manifest."""

from __future__ import annotations

import numpy as np
import pytest
from niftigen import ras_affine, smooth_volume, write_case, write_manifest, write_nifti, write_study

from pfq.config import base_config
from pfq.data.__main__ import main
from pfq.data.manifest import ManifestError
from pfq.data.study import load_study_data
from pfq.data.validate import validate_manifest
from pfq.tasks import get_task

SHAPE = (12, 10, 6)
TASK = get_task("pirads_ge4")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    return folder, write_case(folder, "ok", shape=SHAPE)


def row(base, **changes) -> dict:
    folder, cells = base
    out = {"case_id": "a", **{k: str(folder / v) for k, v in cells.items()}, "pirads": "4", "quality": "hq"}
    out.update(changes)
    return out


def bad_image(tmp_path, name, data, affine=None, **kwargs) -> str:
    return str(write_nifti(tmp_path / name, data, ras_affine() if affine is None else affine, **kwargs))


def truncated(tmp_path) -> str:
    path = bad_image(tmp_path, "t.nii.gz", smooth_volume(SHAPE))
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    return path


def not_nifti(tmp_path) -> str:
    (tmp_path / "fake.nii").write_text("this is not an image\n" * 40)
    return str(tmp_path / "fake.nii")


def nan_volume(value):
    data = smooth_volume(SHAPE)
    data[3, 4, 2] = value
    return data


# (id, rows built from (tmp_path, base), expected (line, column, message fragment)); rows default to one case.
IMAGE_CASES = [
    ("missing-file", lambda t, b: [row(b, adc=str(t / "absent.nii.gz"))], (2, "adc", "file not found")),
    ("truncated-gz", lambda t, b: [row(b, t2w=truncated(t))], (2, "t2w", "truncated or corrupt|not a readable")),
    ("not-nifti", lambda t, b: [row(b, highb=not_nifti(t))], (2, "highb", "not a readable NIfTI")),
    ("4d", lambda t, b: [row(b, adc=bad_image(t, "4d.nii", smooth_volume(SHAPE + (2,))))], (2, "adc", "3-D")),
    ("2d", lambda t, b: [row(b, adc=bad_image(t, "2d.nii", smooth_volume(SHAPE[:2])))], (2, "adc", "3-D")),
    (
        "all-zero",
        lambda t, b: [row(b, t2w=bad_image(t, "z.nii", np.zeros(SHAPE, np.float32)))],
        (2, "t2w", "all voxels are zero"),
    ),
    ("nan", lambda t, b: [row(b, adc=bad_image(t, "n.nii", nan_volume(np.nan)))], (2, "adc", "NaN/Inf")),
    ("inf", lambda t, b: [row(b, adc=bad_image(t, "i.nii", nan_volume(np.inf)))], (2, "adc", "NaN/Inf")),
    (
        "grid-no-affine",
        lambda t, b: [
            row(b, adc=bad_image(t, "g.nii", smooth_volume((6, 5, 6)), codes=(0, 0), pixdim=(1.0, 1.2, 3.0)))
        ],
        (2, "adc", "no usable affine"),
    ),
    (
        "no-overlap",
        lambda t, b: [
            row(
                b,
                adc=bad_image(
                    t, "o.nii", smooth_volume((6, 5, 6)), ras_affine((1.0, 1.2, 3.0), origin=(500.0, 0.0, 0.0))
                ),
            )
        ],
        (2, "adc", "does not overlap"),
    ),
    (
        "absurd-spacing",
        lambda t, b: [row(b, highb=bad_image(t, "s.nii", smooth_volume(SHAPE), ras_affine((0.5, 0.6, 300.0))))],
        (2, "highb", "absurd voxel spacing"),
    ),
    (
        "zero-spacing",
        lambda t, b: [row(b, highb=bad_image(t, "s0.nii", smooth_volume(SHAPE), codes=(0, 0), pixdim=(0.5, 0.0, 3.0)))],
        (2, "highb", "absurd voxel"),
    ),
]
CSV_CASES = [
    ("label-out-of-range", lambda t, b: [row(b, pirads="7")], (2, "pirads", "not an integer in")),
    ("label-non-numeric", lambda t, b: [row(b, pirads="high")], (2, "pirads", "not a number")),
    ("label-empty", lambda t, b: [row(b, pirads="")], (2, "pirads", "empty label")),
    ("quality-missing", lambda t, b: [row(b, quality="")], (2, "quality", "missing quality value")),
    ("quality-unknown", lambda t, b: [row(b, quality="medium")], (2, "quality", "unknown quality value")),
    ("quality-off-scale", lambda t, b: [row(b, quality="6")], (2, "quality", r"not an integer in \[1, 5\]")),
    ("duplicate-id", lambda t, b: [row(b), row(b)], (3, "case_id", "duplicate case_id")),
    ("empty-path", lambda t, b: [row(b, adc="")], (2, "adc", "empty image path")),
    ("bad-split", lambda t, b: [row(b, split="validation")], (2, "split", "split must be")),
]


@pytest.mark.parametrize(
    "build, expected", [c[1:] for c in IMAGE_CASES + CSV_CASES], ids=[c[0] for c in IMAGE_CASES + CSV_CASES]
)
def test_each_bad_row_is_named(tmp_path, base, build, expected):
    rows = build(tmp_path, base)
    columns = ["case_id", "t2w", "highb", "adc", "pirads", "quality"] + (["split"] if "split" in rows[0] else [])
    report = validate_manifest(write_manifest(tmp_path / "m.csv", rows, columns), task=TASK)
    line, column, fragment = expected
    assert len(report.problems) == 1, report.problems
    [p] = report.problems
    assert (p.line, p.column, p.case_id) == (line, column, "a")
    assert __import__("re").search(fragment, p.message), p.message
    if column in ("t2w", "highb", "adc") and fragment != "empty image path":
        assert p.file == rows[0][column]


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"", "empty manifest"),
        (b"case_id,t2w,highb,adc,pirads,quality\n", "no cases"),
        (b"case_id,t2w,highb,pirads,quality\na,x,y,4,hq\n", "missing required column (adc)"),
        (b"case_id,t2w,highb,adc,quality\na,x,y,z,hq\n", "missing label column"),
        (b"case_id,t2w,highb,adc,pirads\na,x,y,z,4\n", "missing required column (quality"),
        (b"case_id,t2w,hbv,dwi,adc,pirads,quality\n", "several columns name the same image"),
        (b"case_id,t2w,highb,adc,pirads,quality\na,x,y,z,4,hq,extra\n", "more field(s) than the header"),
        (b"case_id,t2w,highb,adc,pirads,quality\n\xff\xfe,x,y,z,4,hq\n", "not UTF-8"),
    ],
)
def test_manifest_structure_errors(tmp_path, text, fragment):
    path = tmp_path / "m.csv"
    path.write_bytes(text)
    report = validate_manifest(path, task=TASK, check_images=False)
    assert any(fragment in p.message for p in report.problems), report.problems


def test_missing_manifest(tmp_path):
    [p] = validate_manifest(tmp_path / "none.csv").problems
    assert "manifest file not found" in p.message


def test_bom_crlf_spaces_unicode_and_aliases_validate(tmp_path):
    folder = tmp_path / "dossier données" / "patiënt 1"
    cells = write_case(folder, "cas é", shape=SHAPE)
    rows = [
        {
            "case_id": "é1",
            "t2w": f"dossier données/patiënt 1/{cells['t2w']}",
            "dwi": f"dossier données/patiënt 1/{cells['highb']}",
            "adc": f"dossier données/patiënt 1/{cells['adc']}",
            "pirads": "5",
            "quality": "3",
        }
    ]
    path = write_manifest(tmp_path / "m.csv", rows, newline="\r\n", bom=True)
    report = validate_manifest(path, task=TASK, quality_scale="piqual_v2", quality_threshold=2)
    assert report.ok, report.problems
    assert report.manifest.cases[0].quality == "hq" and report.manifest.cases[0].columns["highb"] == "dwi"
    assert list(report.labels) == [1]


@pytest.mark.parametrize(
    "scale, threshold, score, quality",
    [
        ("piqual_v1", None, "4", "hq"),
        ("piqual_v1", None, "3", "lq"),
        ("piqual_v1", 5, "4", "lq"),
        ("piqual_v2", None, "2", "lq"),
        ("piqual_v2", None, "3", "hq"),
        ("piqual_v2", 2, "2", "hq"),
    ],
)
def test_quality_scales(tmp_path, base, scale, threshold, score, quality):
    path = write_manifest(tmp_path / "m.csv", [row(base, quality=score)])
    report = validate_manifest(path, quality_scale=scale, quality_threshold=threshold, check_images=False)
    assert report.ok and report.manifest.cases[0].quality == quality


def test_cli_prints_one_line_per_problem_and_exits_nonzero(tmp_path, base, capsys):
    rows = [row(base), row(base, case_id="b", pirads="x"), row(base, case_id="c", adc=str(tmp_path / "gone.nii"))]
    path = write_manifest(tmp_path / "m.csv", rows)
    assert main(["validate", str(path), "--task", "pirads_ge4", "--no-progress"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "line 3, case 'b', column 'pirads'" in lines[0]
    assert "line 4, case 'c', column 'adc', file " + str(tmp_path / "gone.nii") in lines[1]
    assert main(["validate", str(write_manifest(tmp_path / "ok.csv", [row(base)])), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("OK: 1 cases")


def test_training_refuses_a_bad_manifest_listing_every_problem(tmp_path, base):
    rows = [
        row(base),
        row(base, case_id="b", pirads="9"),
        row(base, case_id="c", t2w=bad_image(tmp_path, "z.nii", np.zeros(SHAPE, np.float32))),
    ]
    config = base_config()
    config.data.manifest = str(write_manifest(tmp_path / "m.csv", rows))
    config.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ManifestError) as info:
        load_study_data(config, TASK, progress=False)
    assert [(p.line, p.column) for p in info.value.problems] == [(3, "pirads"), (4, "t2w")]


def test_training_loads_a_valid_manifest_through_the_cache(tmp_path, monkeypatch):
    config = base_config()
    config.data.manifest = str(write_study(tmp_path / "study", n=8, shape=SHAPE))
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.input_size = (8, 12, 12)
    data = load_study_data(config, TASK, progress=False)
    assert len(data.source) == 8 and data.source[0].shape == (8, 12, 12, 3)
    assert isinstance(data.source[0], np.memmap)  # served from the cache, not decoded again
    assert sorted(np.concatenate([data.train_pool, data.test_pool]).tolist()) == list(range(8))

    def no_decoding(*args, **kwargs):
        raise AssertionError("NIfTI decoded again")

    monkeypatch.setattr("pfq.data.cache.load_case", no_decoding)
    again = load_study_data(config, TASK, progress=False)  # a second run of a sweep
    assert again.source.paths == data.source.paths


def test_phantom_set_validates_and_loads(tmp_path):
    phantoms = pytest.importorskip("pfq.data.phantom_set")
    manifest = phantoms.write_phantom_set(
        tmp_path / "ph", 8, seed=0, shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), hq_fraction=0.5, progress=False
    )
    report = validate_manifest(manifest, task=TASK)
    assert report.ok, report.problems
    config = base_config()
    config.data.manifest = str(manifest)
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.input_size = (16, 32, 32)
    data = load_study_data(config, TASK, progress=False)
    assert data.source[0].shape == (16, 32, 32, 3) and data.is_hq.sum() == 4


@pytest.mark.parametrize(
    "changes, column, fragment",
    [
        ({"pirads": "9"}, "pirads", "PI-RADS 1-5"),
        ({"pirads": "3.5"}, "pirads", "not an integer in"),
        ({"isup": "6"}, "isup", "ISUP grade group 0-5"),
        ({"gleason": "11"}, "gleason", "Gleason score"),
        ({"gleason": "3+6"}, "gleason", "Gleason score"),
        ({"case_csPCa": "maybe"}, "case_csPCa", "YES/NO"),
    ],
)
def test_known_label_columns_are_checked_without_a_task(tmp_path, base, changes, column, fragment, capsys):
    columns = ["case_id", "t2w", "highb", "adc", "pirads", "isup", "gleason", "case_csPCa", "quality"]
    good = {"pirads": "4", "isup": "", "gleason": "3+4", "case_csPCa": "YES"}  # empty cells are fine
    rows = [row(base, **good), row(base, case_id="b", **{**good, "gleason": "7", **changes})]
    path = write_manifest(tmp_path / "m.csv", rows, columns)
    [problem] = validate_manifest(path, check_images=False).problems
    assert (problem.line, problem.case_id, problem.column) == (3, "b", column)
    assert fragment in problem.message
    assert main(["validate", str(path), "--no-images", "--no-progress"]) == 1
    assert f"line 3, case 'b', column '{column}'" in capsys.readouterr().out


def test_a_tasks_column_is_reported_once_and_other_columns_still_checked(tmp_path, base):
    columns = ["case_id", "t2w", "highb", "adc", "pirads", "isup", "quality"]
    rows = [row(base, pirads="9", isup="2"), row(base, case_id="b", pirads="1", isup="7")]
    path = write_manifest(tmp_path / "m.csv", rows, columns)
    found = [(p.line, p.column, p.message) for p in validate_manifest(path, task=TASK, check_images=False).problems]
    assert [f[:2] for f in found] == [(2, "pirads"), (3, "isup")]
    assert "invalid label for task pirads_ge4" in found[0][2]
    # pirads_4class accepts PI-RADS 2-5 only: 1 is in the column's domain but not the task's.
    found = validate_manifest(path, task=get_task("pirads_4class"), check_images=False).problems
    assert [(p.line, p.column) for p in found] == [(2, "pirads"), (3, "pirads"), (3, "isup")]
