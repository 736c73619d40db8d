"""The preprocessing cache: built once, read memory-mapped, keyed by file content and config,
written atomically, filled by worker processes identically."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from niftigen import ras_affine, smooth_volume, write_nifti, write_study

import pfq.data.preprocess as preprocess
from pfq.data.__main__ import main
from pfq.data.cache import CachedVolumes, VolumeCache
from pfq.data.manifest import read_manifest
from pfq.data.preprocess import PreprocessConfig, load_case

CONFIG = PreprocessConfig(input_size=(8, 12, 12))


@pytest.fixture()
def study(tmp_path):
    return read_manifest(write_study(tmp_path / "study", n=4, shape=(12, 10, 6)))


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded NIfTI although the case is cached")

    monkeypatch.setattr(preprocess, "load_case", fail)
    monkeypatch.setattr("pfq.data.cache.load_case", fail)


def test_entries_equal_direct_preprocessing_and_are_reused(tmp_path, study, monkeypatch):
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    paths, problems = cache.prepare(study.cases, progress=False)
    assert problems == []
    for case, path in zip(study.cases, paths, strict=True):
        np.testing.assert_array_equal(np.load(path), load_case(case, CONFIG))
    source = CachedVolumes(paths)
    assert isinstance(source[0], np.memmap) and source[0].shape == (8, 12, 12, 3)
    forbid_decoding(monkeypatch)
    again, _ = VolumeCache(tmp_path / "cache", CONFIG).prepare(study.cases, progress=False)
    assert again == paths
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temporaries


def test_touch_keeps_the_entry_and_a_content_change_replaces_it(tmp_path, study, monkeypatch):
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    case = study.cases[0]
    first = cache.ensure(case)
    os.utime(case.images["adc"], ns=(1, 1))  # new mtime, same bytes: re-hashed, same key
    with monkeypatch.context() as m:
        forbid_decoding(m)
        assert cache.ensure(case) == first
    write_nifti(case.images["adc"], smooth_volume((12, 10, 6), 99), ras_affine())
    changed = cache.ensure(case)
    assert changed != first and first.exists()
    assert not np.array_equal(np.load(changed)[..., 2], np.load(first)[..., 2])


def test_config_change_is_a_new_entry(tmp_path, study):
    a = VolumeCache(tmp_path / "cache", CONFIG).ensure(study.cases[0])
    b = VolumeCache(tmp_path / "cache", PreprocessConfig(input_size=(8, 12, 12), spacing=(3.0, 0.5, 0.5))).ensure(
        study.cases[0]
    )
    c = VolumeCache(tmp_path / "cache", PreprocessConfig(input_size=(8, 12, 10))).ensure(study.cases[0])
    assert len({a, b, c}) == 3


def test_corrupt_entry_is_rebuilt(tmp_path, study):
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    path = cache.ensure(study.cases[0])
    expected = np.load(path)
    path.write_bytes(path.read_bytes()[:100])
    assert cache.lookup(study.cases[0]) is None
    np.testing.assert_array_equal(np.load(cache.ensure(study.cases[0])), expected)


def test_prepare_cli_with_workers_matches_in_process(tmp_path, study, capsys):
    manifest = study.path
    assert (
        main(
            [
                "prepare",
                str(manifest),
                "--cache",
                str(tmp_path / "w"),
                "--workers",
                "2",
                "--input-size",
                "8",
                "12",
                "12",
                "--no-progress",
            ]
        )
        == 0
    )
    serial, _ = VolumeCache(tmp_path / "s", CONFIG).prepare(study.cases, progress=False)
    parallel, _ = VolumeCache(tmp_path / "w", CONFIG).prepare(study.cases, progress=False)
    for a, b in zip(serial, parallel, strict=True):
        assert a.name == b.name  # same key
        np.testing.assert_array_equal(np.load(a), np.load(b))
    assert "4/4 cases cached" in capsys.readouterr().err


def _age(path, hours: float) -> None:
    stamp = time.time() - hours * 3600
    os.utime(path, (stamp, stamp))


def test_a_cache_hit_marks_the_entry_used(tmp_path, study):
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    path = cache.ensure(study.cases[0])
    _age(path, 100)
    assert cache.ensure(study.cases[0]) == path
    assert time.time() - path.stat().st_mtime < 60


def test_prune_removes_least_recently_used_and_keeps_recent(tmp_path, study, capsys):
    root = tmp_path / "cache"
    paths, _ = VolumeCache(root, CONFIG).prepare(study.cases, progress=False)
    for path, hours in zip(paths, [24 * 40, 24 * 10, 30, 1], strict=True):  # c000 oldest .. c003 just used
        _age(path, hours)
    size = paths[0].stat().st_size
    stale = paths[0].with_name(".dead.123.abcd1234.tmp")
    stale.write_bytes(b"half")
    _age(stale, 2)
    cli = ["cache", "--cache", str(root), "--prune"]

    assert main(cli + ["--older-than", "30", "--dry-run"]) == 0
    assert "would remove 1 entries" in capsys.readouterr().out and all(p.exists() for p in paths)

    assert main(cli + ["--older-than", "30"]) == 0  # only the 40-day-old entry
    assert [p.exists() for p in paths] == [False, True, True, True] and not stale.exists()

    # Down to one entry's size: c001 (10 days) and c002 (30 h) go; c003, used an hour ago, stays.
    assert main(cli + ["--max-gb", str(size / 1e9)]) == 0
    assert [p.exists() for p in paths] == [False, False, False, True]
    capsys.readouterr()
    assert main(cli + ["--max-gb", "0"]) == 0
    assert paths[3].exists() and "still above" in capsys.readouterr().err
    assert main(cli + ["--max-gb", "0", "--keep-recent-hours", "0"]) == 0
    assert not paths[3].exists()
    # A pruned case is simply rebuilt.
    again, problems = VolumeCache(root, CONFIG).prepare(study.cases, progress=False)
    assert problems == [] and again == paths


def test_cache_report_and_argument_errors(tmp_path, study, capsys):
    root = tmp_path / "cache"
    VolumeCache(root, CONFIG).prepare(study.cases, progress=False)
    assert main(["cache", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert "4 entries" in out and "8x12x12x3: 4 entries" in out
    assert main(["cache", "--cache", str(root), "--prune"]) == 2
    assert "--older-than" in capsys.readouterr().err


def test_a_read_by_a_run_marks_the_entry_used(tmp_path, study):
    paths, _ = VolumeCache(tmp_path / "cache", CONFIG).prepare(study.cases, progress=False)
    _age(paths[1], 100)
    CachedVolumes(paths)[1]
    assert time.time() - paths[1].stat().st_mtime < 60


def test_concurrent_reads_never_parse_npy_headers_at_the_same_time(tmp_path, monkeypatch):
    """Grain reads volumes from several threads; numpy parses `.npy` headers with `ast`, whose CPython
    3.11 constructor is not thread-safe. Overlapping header parses are detected with a slow stand-in."""
    import threading

    try:  # numpy >= 2 keeps the implementation private
        import numpy.lib._format_impl as npy_format
    except ImportError:
        import numpy.lib.format as npy_format

    paths = []
    for i in range(4):
        path = tmp_path / f"v{i}.npy"
        np.save(path, np.full((2, 2, 2, 3), i, np.float32))
        paths.append(path)
    volumes = CachedVolumes(paths)
    real_read_header, inside, overlaps = npy_format._read_array_header, [0], []

    def slow_read_header(*args, **kwargs):
        inside[0] += 1
        if inside[0] > 1:
            overlaps.append(inside[0])
        time.sleep(0.002)  # widens the window in which a second thread could enter
        try:
            return real_read_header(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(npy_format, "_read_array_header", slow_read_header)
    threads = [threading.Thread(target=lambda: [volumes[i % 4] for i in range(30)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float(volumes[3][0, 0, 0, 0]) == 3.0
    assert not overlaps, f"{len(overlaps)} header parses overlapped"
