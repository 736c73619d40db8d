"""Bounded, seeded fuzzing of everything a user hands pfq: manifests, NIfTI headers and gzip
streams, torch zip checkpoints, pfq model directories and the metadata of training checkpoints.

Each mutant must end one of two ways: accepted (a valid variation), or refused with the module's own
error naming where (a manifest problem with its line/column/file, a `VolumeError` with its file, a
`ConvertError` naming the file), never another exception, a hang (an alarm fails the test), or a
memory spike (`tracemalloc`). Everything runs in process; a few mutants go through the sweep entry
point against a workdir holding a finished run, with `--overwrite`: exit status 2 and every earlier
file unchanged. `PFQ_FUZZ_SEED` picks another seed, `PFQ_FUZZ_SCALE` multiplies the counts.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from studykit import small_sweep_config, snapshot, write_study
from test_hostile_checkpoints import tensor_pickle, torch_zip
from test_hostile_inputs import SHAPE, deadline, nifti_bytes

SEED = int(os.environ.get("PFQ_FUZZ_SEED", "20261202"))
SCALE = float(os.environ.get("PFQ_FUZZ_SCALE", "1"))
MEMORY_LIMIT = 64 << 20


def count(n: int) -> int:
    return max(1, int(n * SCALE))


def mutate(
    data: bytes, rng: np.random.Generator, *, region: tuple[int, int] | None = None, alphabet: bytes | None = None
) -> bytes:
    """1-4 random edits: flip a byte, overwrite with an interesting value, delete, insert, duplicate."""
    out = bytearray(data)
    lo, hi = region or (0, len(out))
    for _ in range(int(rng.integers(1, 5))):
        if hi <= lo or not out:
            break
        at = int(rng.integers(lo, min(hi, len(out))))
        kind = int(rng.integers(0, 6))
        if kind == 0:
            out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            value = [b"\x00", b"\xff", b"\x7f", b"\x80"][int(rng.integers(0, 4))]
            out[at : at + 1] = value
        elif kind == 2:  # an interesting 4-byte value (int32/float32 fields)
            word = [
                struct.pack("<f", np.nan),
                struct.pack("<f", np.inf),
                struct.pack("<f", -1.0),
                struct.pack("<i", 2**31 - 1),
                struct.pack("<i", -1),
                struct.pack("<f", 1e38),
                b"\x00\x00\x00\x00",
            ][int(rng.integers(0, 7))]
            out[at : at + 4] = word
        elif kind == 3:
            del out[at : at + int(rng.integers(1, 16))]
        elif kind == 4:
            pool = alphabet or bytes(range(256))
            out[at:at] = bytes(pool[int(i)] for i in rng.integers(0, len(pool), int(rng.integers(1, 8))))
        else:
            size = int(rng.integers(1, 64))
            out[at:at] = out[at : at + size]
    return bytes(out)


def bounded(call: Callable[[], object], seconds: int = 20) -> tuple[object, int]:
    """(result of `call`, peak bytes it allocated); fails on a hang."""
    tracemalloc.start()
    try:
        with deadline(seconds):
            result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------------------------
# Manifests.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("fuzz"), cases=3, shape=SHAPE)


CSV_ALPHABET = b',"\n\r\x00 ;\t\xef\xbb\xbf/.\\-0123456789hqlcaditwbgsplr\xc3\xa9\xff'


def rewritten(original: bytes, rng: np.random.Generator) -> bytes:
    """The same table written differently: column order, quoting, line ends, a BOM, padding."""
    import csv

    rows = list(csv.reader(io.StringIO(original.decode())))
    order = rng.permutation(len(rows[0]))
    pad = " " if rng.random() < 0.5 else ""
    out = io.StringIO()
    writer = csv.writer(
        out,
        quoting=csv.QUOTE_ALL if rng.random() < 0.5 else csv.QUOTE_MINIMAL,
        lineterminator="\r\n" if rng.random() < 0.5 else "\n",
    )
    for row in rows:
        writer.writerow([pad + row[j] + pad for j in order])
    bom = "\ufeff" if rng.random() < 0.5 else ""
    return (bom + out.getvalue()).encode()


def parsed(report) -> list:
    return [
        (c.case_id, c.quality, dict(c.images), int(label))
        for c, label in zip(report.manifest.cases, report.labels, strict=True)
    ]


def test_fuzzed_manifests_are_accepted_or_located(study, tmp_path):
    """A third of the mutants are the same table written differently: they must read as the
    original; the rest are byte edits: accepted, or every problem located."""
    from pfq.data.validate import validate_manifest
    from pfq.tasks import get_task

    rng = np.random.default_rng([SEED, 1])
    original = study.read_bytes()
    task = get_task("pirads_ge4")
    shutil.copytree(study.parent / "images", tmp_path / "images")
    (tmp_path / "reference.csv").write_bytes(original)
    reference = parsed(validate_manifest(tmp_path / "reference.csv", task=task))
    tally = {"same table, same cases": 0, "accepted": 0, "refused": 0}
    for i in range(count(120)):
        mutant = tmp_path / f"m{i}.csv"
        same = i % 3 == 0
        mutant.write_bytes(rewritten(original, rng) if same else mutate(original, rng, alphabet=CSV_ALPHABET))
        report, peak = bounded(lambda m=mutant: validate_manifest(m, task=task))
        assert peak < MEMORY_LIMIT, (i, peak)
        if same:
            assert report.ok and parsed(report) == reference, (i, mutant.read_bytes(), report.problems)
            tally["same table, same cases"] += 1
            continue
        for problem in report.problems:
            assert problem.line is not None or problem.column is not None or problem.file is not None, (
                i,
                mutant.read_bytes(),
                str(problem),
            )
        tally["refused" if report.problems else "accepted"] += 1
    print(tally)
    assert tally["refused"] > 0


# ----------------------------------------------------------------------------------------------
# NIfTI headers and gzip streams.
# ----------------------------------------------------------------------------------------------
def test_fuzzed_nifti_files_load_or_are_refused_naming_the_file(tmp_path):
    from pfq.data.preprocess import VolumeError, read_volume

    rng = np.random.default_rng([SEED, 2])
    plain = nifti_bytes()
    tally = {"accepted": 0, "refused": 0}
    for i in range(count(400)):
        kind = i % 4
        if kind == 0:  # the header only
            data, name = mutate(plain, rng, region=(0, 352)), "h.nii"
        elif kind == 1:  # header and data, compressed afterwards
            data, name = gzip.compress(mutate(plain, rng), mtime=0), "g.nii.gz"
        elif kind == 2:  # the gzip stream itself
            data, name = mutate(gzip.compress(plain, mtime=0), rng), "s.nii.gz"
        else:  # anywhere in the file
            data, name = mutate(plain, rng), "a.nii"
        path = tmp_path / f"{i}_{name}"
        path.write_bytes(data)
        try:
            volume, peak = bounded(lambda p=path: read_volume(p))
            assert np.isfinite(volume.data).all() and volume.data.ndim == 3
            tally["accepted"] += 1
        except VolumeError as e:
            assert str(path) in str(e) and e.reason, e
            tally["refused"] += 1
            peak = 0
        assert peak < MEMORY_LIMIT, (i, peak)
        path.unlink()
    print(tally)
    assert tally["refused"] > 0 and tally["accepted"] > 0


# ----------------------------------------------------------------------------------------------
# Weights files and model directories.
# ----------------------------------------------------------------------------------------------
def test_fuzzed_torch_checkpoints_convert_or_are_refused(tmp_path):
    from pfq.convert.errors import ConvertError
    from pfq.convert.reader import read_source

    rng = np.random.default_rng([SEED, 3])
    good = torch_zip(tmp_path / "good.pth", tensor_pickle(4, (4,), (1,)), {"0": np.arange(4, dtype="<f4").tobytes()})
    original = good.read_bytes()
    pickle_at = original.find(b"archive/data.pkl") + len("archive/data.pkl")
    tally = {"read": 0, "refused": 0}
    for i in range(count(250)):
        region = (pickle_at, pickle_at + 200) if i % 2 else None  # half aimed at the pickle
        path = tmp_path / f"{i}.pth"
        path.write_bytes(mutate(original, rng, region=region))
        try:
            _, peak = bounded(lambda p=path: read_source(p))
            tally["read"] += 1
        except ConvertError as e:
            assert str(path) in str(e), e
            tally["refused"] += 1
            peak = 0
        assert peak < MEMORY_LIMIT, (i, peak)
        path.unlink()
    print(tally)
    assert tally["refused"] > 0


def test_fuzzed_model_metadata_loads_or_is_refused(tmp_path):
    import jax

    from pfq.convert.errors import ConvertError
    from pfq.convert.store import load_model_dir, save_model_dir
    from pfq.model import ModelSpec, abstract_variables

    spec = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=2)
    variables = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract_variables(spec))
    model = save_model_dir(tmp_path / "model", spec, variables, {"source": "fuzz"})
    original = (model / "pfq_model.json").read_bytes()
    rng = np.random.default_rng([SEED, 4])
    alphabet = b'{}[]",:0123456789-.eE nultrfasdepthimcx\x00\xff'
    tally = {"loaded": 0, "refused": 0}
    for _ in range(count(60)):
        (model / "pfq_model.json").write_bytes(mutate(original, rng, alphabet=alphabet))
        try:
            bounded(lambda: load_model_dir(model))
            tally["loaded"] += 1
        except ConvertError as e:
            assert "model" in str(e), e
            tally["refused"] += 1
    print(tally)
    assert tally["refused"] > 0


# ----------------------------------------------------------------------------------------------
# Metadata of training checkpoints.
# ----------------------------------------------------------------------------------------------
def test_fuzzed_checkpoint_metadata_falls_back_or_resumes(tmp_path):
    import grain

    from pfq.data.pipeline import to_iterator
    from pfq.train.checkpoint import GroupCheckpointer
    from pfq.train.loop import adopt_iterator_state

    rng = np.random.default_rng([SEED, 5])
    directory = tmp_path / "group0"
    state = {"w": np.zeros(2, np.float32)}
    ckpt = GroupCheckpointer(directory, keep=3, asynchronous=False)
    for step in (2, 4):
        ckpt.save(step, {"w": state["w"] + step}, {"data_iterator": {"next_index": step}, "step": step})
    ckpt.close()
    pristine = tmp_path / "pristine"
    shutil.copytree(directory, pristine)
    original = (directory / "4" / "meta" / "metadata").read_bytes()
    outcomes = {2: 0, 4: 0}
    for _ in range(count(25)):
        shutil.rmtree(directory)
        shutil.rmtree(tmp_path / "group0.unreadable", ignore_errors=True)
        shutil.copytree(pristine, directory)
        (directory / "4" / "meta" / "metadata").write_bytes(mutate(original, rng, alphabet=b'{}":,0123456789-nxte '))
        iterator = to_iterator(grain.MapDataset.range(10))
        ckpt = GroupCheckpointer(directory, keep=3, asynchronous=False)
        adopt = lambda meta, it=iterator: adopt_iterator_state(it, meta)
        restored, _ = bounded(lambda c=ckpt, a=adopt: c.restore(state, adopt_meta=a))
        ckpt.close()
        step, restored_state, _ = restored
        assert step in (2, 4) and float(restored_state["w"][0]) == step
        assert int(next(iterator)) == step  # the data resumes where the adopted checkpoint says
        outcomes[step] += 1
    print(outcomes)


# ----------------------------------------------------------------------------------------------
# Through the sweep entry point: a finished workdir must not change.
# ----------------------------------------------------------------------------------------------
def test_fuzzed_manifests_through_the_sweep_leave_a_finished_workdir_unchanged(
    small_study, volume_cache, tmp_path, monkeypatch, capsys
):
    """Mutants that validation refuses, run with --overwrite over a finished run's workdir (a valid
    mutant would train for minutes; the in-process test above covers those)."""
    from pfq.data.validate import validate_manifest
    from pfq.tasks import get_task
    from pfq.train.__main__ import run_sweep

    monkeypatch.setenv("PFQ_CACHE", str(volume_cache))
    root = tmp_path / "study"
    shutil.copytree(small_study.parent, root)
    original = (root / "manifest.csv").read_bytes()
    workdir = tmp_path / "work"
    (workdir / "checkpoints" / "group0" / "6").mkdir(parents=True)
    (workdir / "checkpoints" / "group0" / "6" / "state").write_bytes(b"\x00earlier")
    for name in ("results.csv", "predictions.csv", "report.md", "heatmap_auc.png"):
        (workdir / name).write_text(f"earlier {name}\n")
    (workdir / "run.json").write_text(json.dumps({"complete": True}))
    before = snapshot(workdir)
    rng = np.random.default_rng([SEED, 6])
    task = get_task("pirads_ge4")
    runs = 0
    for _ in range(count(200)):
        if runs == count(6):
            break
        (root / "manifest.csv").write_bytes(mutate(original, rng, alphabet=CSV_ALPHABET))
        if validate_manifest(root / "manifest.csv", task=task, check_images=False).ok:
            continue
        config = small_sweep_config(root / "manifest.csv")
        with deadline(120):
            status = run_sweep(config, workdir, progress=False, overwrite=True)
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("error: ") and "Traceback" not in err, err
        assert "line" in err or "column" in err or "manifest" in err, err
        assert snapshot(workdir) == before
        runs += 1
    assert runs == count(6)


def test_a_hostile_nifti_header_through_the_command_line(small_study, volume_cache, tmp_path):
    """One real `python -m pfq.train` on a study with a header fuzzed into a lie: exit 2, no
    traceback, nothing created."""
    from studykit import run_train

    root = tmp_path / "study"
    shutil.copytree(small_study.parent, root)
    target = root / "images" / "c004_adc.nii.gz"
    head = bytearray(gzip.decompress(target.read_bytes()))
    struct.pack_into("<8h", head, 40, 3, 1024, 1024, 1024, 1, 1, 1, 1)  # claims 1 GiB of voxels
    target.write_bytes(gzip.compress(bytes(head[:352])))
    workdir = tmp_path / "work"
    proc = run_train(workdir, root / "manifest.csv", pfq_cache=volume_cache, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "case 'c004'" in proc.stderr and "over the cap" in proc.stderr
    assert not workdir.exists()
