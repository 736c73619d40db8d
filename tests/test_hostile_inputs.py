"""Hostile and careless image files and manifests, checked in process through `validate_manifest`
(the same `read_volume` that training's cache runs, so what validation refuses, training refuses):
devices, FIFOs, symlink loops, NUL bytes, headers that lie about their data, memory bombs. Each must
come back as a problem naming the line, case, column and file, within seconds (an alarm turns a hang
into a failure), and the bombs must not allocate what their headers claim (`tracemalloc` peak).
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from studykit import read_rows, write_manifest, write_study

from pfq.data.validate import validate_manifest
from pfq.tasks import get_task

SHAPE = (8, 8, 8)
CASE = 1  # the case every edit breaks: line 3, case 'c001'


class Hang(BaseException):
    """Not an OSError (a TimeoutError would be caught by the code under test as a read error)."""


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the old reader blocked forever on a FIFO or /dev/zero)."""

    def expire(*_):
        raise Hang(f"no answer within {seconds} s: the reader hangs")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("hostile"), cases=3, shape=SHAPE)


@pytest.fixture
def study(pristine, tmp_path) -> Path:
    root = tmp_path / "study"
    root.mkdir()
    (root / "images").mkdir()
    for p in (pristine.parent / "images").iterdir():
        (root / "images" / p.name).write_bytes(p.read_bytes())
    (root / "manifest.csv").write_bytes(pristine.read_bytes())
    return root / "manifest.csv"


# ----------------------------------------------------------------------------------------------
# Raw NIfTI-1 header surgery (offsets from the NIfTI-1 standard).
# ----------------------------------------------------------------------------------------------
FIELDS = {
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "magic": (344, "4s"),
}


def nifti_bytes(data: np.ndarray | None = None, **fields) -> bytes:
    """An uncompressed single-file NIfTI-1 of `data` with raw header fields overwritten."""
    data = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32) if data is None else data
    raw = bytearray(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])).to_bytes())
    for name, value in fields.items():
        offset, fmt = FIELDS[name]
        values = value if isinstance(value, (tuple, list)) else (value,)
        struct.pack_into("<" + fmt, raw, offset, *values)
    return bytes(raw)


def image_path(manifest: Path, role: str = "adc") -> Path:
    return manifest.parent / "images" / f"c{CASE:03d}_{role}.nii.gz"


def point_row_at(manifest: Path, target: str, role: str = "adc") -> None:
    rows = read_rows(manifest)
    rows[CASE][role] = target
    write_manifest(manifest, rows)


def write_image(make: Callable[[], bytes], name: str = "bad.nii", compress: bool = False, role: str = "adc"):
    def edit(manifest: Path) -> str:
        path = manifest.parent / "images" / name
        data = make()
        path.write_bytes(gzip.compress(data) if compress else data)
        point_row_at(manifest, f"images/{name}", role)
        return name

    return edit


def special(kind: str):
    """A path that is not a regular file: a device, a FIFO, a symlink to one, a loop, a folder."""

    def edit(manifest: Path) -> str:
        images = manifest.parent / "images"
        if kind == "dev_zero":
            point_row_at(manifest, "/dev/zero")
            return "/dev/zero"
        if kind == "fifo":
            os.mkfifo(images / "pipe.nii")
            point_row_at(manifest, "images/pipe.nii")
            return "pipe.nii"
        if kind == "link_dev_zero":
            (images / "zero.nii").symlink_to("/dev/zero")
            point_row_at(manifest, "images/zero.nii")
            return "zero.nii"
        if kind == "link_fifo":
            os.mkfifo(images / "p")
            (images / "pl.nii").symlink_to(images / "p")
            point_row_at(manifest, "images/pl.nii")
            return "pl.nii"
        if kind == "loop":
            (images / "a.nii").symlink_to(images / "b.nii")
            (images / "b.nii").symlink_to(images / "a.nii")
            point_row_at(manifest, "images/a.nii")
            return "a.nii"
        if kind == "folder":
            (images / "dir.nii").mkdir()
            point_row_at(manifest, "images/dir.nii")
            return "dir.nii"
        raise AssertionError(kind)

    return edit


def nul_in_path(manifest: Path) -> str:
    text = manifest.read_text().replace(f"images/c{CASE:03d}_adc.nii.gz", "images/c001_adc.nii\x00.gz")
    manifest.write_text(text)
    return "adc"


def duplicate_column(second: str):
    def edit(manifest: Path) -> str:
        lines = manifest.read_text().splitlines()
        lines[0] += f",{second}"
        lines[1:] = [line + ",images/c000_adc.nii.gz" for line in lines[1:]]
        manifest.write_text("\n".join(lines) + "\n")
        return "adc"

    return edit


def claims_many_voxels(dims, datatype=2, bitpix=8, payload=b"") -> Callable[[], bytes]:
    """A header claiming `dims` voxels followed by `payload` (the bomb's compressed zeros)."""

    def make() -> bytes:
        head = bytearray(nifti_bytes()[:352])
        struct.pack_into("<8h", head, 40, len(dims), *dims, *([1] * (7 - len(dims))))
        struct.pack_into("<hh", head, 70, datatype, bitpix)
        return bytes(head) + payload

    return make


def two_file_header() -> bytes:
    return nifti_bytes(magic=b"ni1\x00")


# name -> (edit(manifest) -> the file/column fragment, expected fragments of the problem)
CORPUS: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "/dev/zero": (special("dev_zero"), ("character device", "not a regular file")),
    "FIFO": (special("fifo"), ("FIFO",)),
    "symlink to /dev/zero": (special("link_dev_zero"), ("character device",)),
    "symlink to a FIFO": (special("link_fifo"), ("FIFO",)),
    "symlink loop": (special("loop"), ("symlink loop",)),
    "a folder": (special("folder"), ("directory",)),
    "NUL byte in the path": (nul_in_path, ("control character",)),
    "two adc columns": (duplicate_column("adc"), ("line 1", "'adc' 2 times")),
    "adc and ' adc' columns": (duplicate_column(" adc"), ("line 1", "'adc' 2 times")),
    "complex64 voxels": (
        write_image(lambda: nib.Nifti1Image(np.ones(SHAPE, np.complex64), np.eye(4)).to_bytes()),
        ("complex",),
    ),
    "RGB24 voxels": (write_image(lambda: nifti_bytes(datatype=128, bitpix=24)), ("unsupported voxel type",)),
    "unknown datatype code": (write_image(lambda: nifti_bytes(datatype=999)), ("datatype code 999",)),
    "scl_slope inf": (write_image(lambda: nifti_bytes(scl_slope=np.inf)), ("scl_slope is inf",)),
    "scl_slope -inf, .nii.gz": (
        write_image(lambda: nifti_bytes(scl_slope=-np.inf), "bad.nii.gz", True),
        ("scl_slope is -inf",),
    ),
    "scl_inter inf": (write_image(lambda: nifti_bytes(scl_slope=1.0, scl_inter=np.inf)), ("scl_inter is inf",)),
    "qform-only, pixdim 0": (
        write_image(lambda: nifti_bytes(pixdim=(1, 0, 0, 0, 1, 1, 1, 1), qform_code=1, sform_code=0)),
        ("qform-only", "pixdim"),
    ),
    "qform-only, pixdim NaN": (
        write_image(lambda: nifti_bytes(pixdim=(1, 1, np.nan, 2, 1, 1, 1, 1), qform_code=1, sform_code=0)),
        ("qform-only",),
    ),
    "vox_offset past the end, .nii": (
        write_image(lambda: nifti_bytes(vox_offset=1e6)),
        ("vox_offset 1000000 is past the end",),
    ),
    "vox_offset past the end, .nii.gz": (
        write_image(lambda: nifti_bytes(vox_offset=1e6), "bad.nii.gz", True),
        ("vox_offset 1000000 is past the end",),
    ),
    "vox_offset inside the header": (write_image(lambda: nifti_bytes(vox_offset=100.0)), ("inside",)),
    "vox_offset NaN": (write_image(lambda: nifti_bytes(vox_offset=np.nan)), ("vox_offset nan",)),
    "zero dimension": (write_image(lambda: nifti_bytes(dim=(3, 8, 0, 8, 1, 1, 1, 1))), ("not all positive",)),
    "two-file (ni1) header": (write_image(two_file_header), ("two-file",)),
    "truncated .nii by 4 bytes": (write_image(lambda: nifti_bytes()[:-4]), ("truncated",)),
    "empty .nii.gz": (write_image(lambda: b"", "bad.nii.gz"), ("not a readable NIfTI",)),
    "gzip magic, then garbage": (
        write_image(lambda: b"\x1f\x8b\x08\x00" + b"\xff" * 200, "bad.nii.gz"),
        ("not a readable NIfTI",),
    ),
    "76-byte .nii.gz claiming 1 GiB": (
        write_image(claims_many_voxels((1024, 1024, 1024)), "big.nii.gz", True),
        ("over the cap",),
    ),
    "gzip bomb: 2 GiB of zeros behind a 1 GiB header": (
        write_image(claims_many_voxels((1024, 1024, 512), 16, 32, payload=bytes(64 << 20)), "bomb.nii.gz", True),
        ("over the cap",),
    ),
    "header within the cap, data missing (.nii.gz)": (
        write_image(claims_many_voxels((512, 512, 256), 16, 32), "short.nii.gz", True),
        ("truncated",),
    ),
}


def training_problems(manifest: Path, cache_root: Path) -> list:
    """What training's path finds: the manifest, then every case through the preprocessing cache
    (which hashes each file before it reads it)."""
    from pfq.data.cache import VolumeCache
    from pfq.data.manifest import parse_manifest
    from pfq.data.preprocess import PreprocessConfig

    parsed, problems = parse_manifest(manifest, label_column="pirads")
    if parsed is None:
        return problems
    cases = [c for c in parsed.cases if len(c.images) == 3]
    return problems + VolumeCache(cache_root, PreprocessConfig(input_size=SHAPE)).prepare(cases, progress=False)[1]


@pytest.mark.parametrize("path", ["validate", "training"])
@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_file_is_a_located_problem(name, path, study, tmp_path):
    edit, expect = CORPUS[name]
    where = edit(study)
    tracemalloc.start()
    try:
        with deadline(20):
            if path == "validate":
                problems = validate_manifest(study, task=get_task("pirads_ge4")).problems
            else:
                problems = training_problems(study, tmp_path / "cache")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = "\n".join(str(p) for p in problems)
    print(f"--- {name}\n{text}")
    assert problems, "accepted"
    if "line 1" not in expect:
        assert f"line {CASE + 2}" in text and f"case 'c{CASE:03d}'" in text, text
        assert where in text or "column 'adc'" in text, text
    for fragment in expect:
        assert fragment in text, f"{fragment!r} not in: {text}"
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated for a {name}"


def test_a_gzip_bomb_behind_a_small_header_is_read_only_as_far_as_the_header_says(tmp_path):
    """A valid small image followed by a gigabyte of compressed zeros: the reader stops at the
    header's size, so the file loads (its data is valid) without inflating the rest."""
    from pfq.data.preprocess import read_volume

    path = tmp_path / "tail.nii.gz"
    zeros = gzip.compress(b"\x00" * (64 << 20), compresslevel=1)
    path.write_bytes(gzip.compress(nifti_bytes()) + zeros * 16)  # concatenated gzip members: ~1 GiB inflated
    tracemalloc.start()
    try:
        with deadline(20):
            volume = read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert volume.shape == SHAPE
    assert peak < 16 << 20


def test_the_voxel_cap_is_configurable(study, monkeypatch):
    monkeypatch.setenv("PFQ_MAX_VOXELS", "100")
    report = validate_manifest(study, task=get_task("pirads_ge4"))
    assert report.problems and all("over the cap of 100" in p.message for p in report.problems)
    monkeypatch.setenv("PFQ_MAX_VOXELS", str(8**3))
    assert validate_manifest(study, task=get_task("pirads_ge4")).ok


def test_a_symlink_to_a_regular_file_and_nan_scaling_are_fine(study):
    """Not everything unusual is hostile: linked data sets and nibabel's own NaN 'no scaling'."""
    images = study.parent / "images"
    (images / "linked.nii.gz").symlink_to(images / f"c{CASE:03d}_adc.nii.gz")
    point_row_at(study, "images/linked.nii.gz")
    (images / "nan_slope.nii").write_bytes(nifti_bytes(scl_slope=np.nan, scl_inter=np.nan))
    point_row_at(study, "images/nan_slope.nii", role="highb")
    assert validate_manifest(study, task=get_task("pirads_ge4")).ok
