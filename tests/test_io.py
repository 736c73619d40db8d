"""Atomic writes: unique temporaries per writer, nothing half-written, leftovers found by name and age."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pfq import faults
from pfq import io as pfq_io


def test_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "out.txt"
    pfq_io.atomic_write_text(path, "old")
    pfq_io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    with pfq_io.atomic_path(tmp_path / "img.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".tmp.nii.gz") and pfq_io.is_temporary(tmp)
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "out.txt"]


def test_temporary_names_are_unique_per_writer(tmp_path):
    names = {pfq_io.temporary_sibling(tmp_path / "f.csv") for _ in range(100)}
    assert len(names) == 100
    assert all(p.name.startswith(f".f.csv.{os.getpid()}.") for p in names)


def test_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    path, errors = tmp_path / "shared.bin", []
    data = os.urandom(1 << 16)

    def write():
        try:
            for _ in range(20):
                pfq_io.atomic_write_bytes(path, data)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and path.read_bytes() == data and os.listdir(tmp_path) == ["shared.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old")
    faults.configure("write:results.csv:1:enospc")
    try:
        with pytest.raises(OSError):
            pfq_io.atomic_write_text(path, "new")
    finally:
        faults.configure(None)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.csv"]
    with pytest.raises(RuntimeError), pfq_io.atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.csv"]


def test_atomic_dir_replaces_only_when_asked(tmp_path):
    dest = tmp_path / "model"
    with pfq_io.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with pfq_io.atomic_dir(dest):
            pass
    with pytest.raises(RuntimeError), pfq_io.atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert os.listdir(dest) == ["a"]
    with pfq_io.atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert os.listdir(dest) == ["b"] and os.listdir(tmp_path) == ["model"]


def test_stale_temporaries_by_name_and_age(tmp_path):
    (tmp_path / "sub").mkdir()
    old = pfq_io.temporary_sibling(tmp_path / "sub" / "x.npy")
    young = pfq_io.temporary_sibling(tmp_path / "sub" / "y.npy")
    for p in (old, young, tmp_path / "sub" / ".hidden.tmp", tmp_path / "sub" / "x.npy"):
        p.write_bytes(b"")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert pfq_io.stale_temporaries(tmp_path, "*/*") == sorted([old, young])
    assert pfq_io.stale_temporaries(tmp_path, "*/*", older_than_s=3600) == [old]
    pfq_io.remove([old])
    assert not old.exists() and young.exists()
