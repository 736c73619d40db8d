"""Hostile and careless weights files, model directories and prediction inputs, through every
entry point that reads them: the converter (`tools/convert_weights.py`, also `--to-torch`),
`pfq.predict`, and a sweep's `sweep.inits` (`pfq.train.trainer.load_init`, which the sweep runs in
its preflight and reports with exit status 2). Each must end in a clear error (exit 2 at a command
line) naming the file, within seconds, with no traceback and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from studykit import snapshot
from test_hostile_checkpoints import tensor_pickle, torch_zip
from test_hostile_inputs import deadline

from pfq import predict
from pfq.convert.cli import main as convert_main
from pfq.convert.errors import ConvertError
from pfq.model import ModelSpec, abstract_variables

SPEC = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=2)


# ----------------------------------------------------------------------------------------------
# Weights files (the converter's input).
# ----------------------------------------------------------------------------------------------
def _patch_zip(path: Path, name: str, *, flags: int = 0, method: int | None = None, new_name: bytes | None = None):
    """Rewrite a member's local and central headers in place (same name length)."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    for sig, flag_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        start = 0
        while (at := data.find(sig, start)) >= 0:
            start = at + 4
            n = struct.unpack_from("<H", data, at + (26 if sig == b"PK\x03\x04" else 28))[0]
            if bytes(data[at + name_at : at + name_at + n]) != raw:
                continue
            struct.pack_into("<H", data, at + flag_at, struct.unpack_from("<H", data, at + flag_at)[0] | flags)
            if method is not None:
                struct.pack_into("<H", data, at + method_at, method)
            if new_name is not None:
                data[at + name_at : at + name_at + n] = new_name
    path.write_bytes(bytes(data))
    return path


def weights(kind: str) -> Callable[[Path], tuple[Path, str]]:
    def make(tmp: Path) -> tuple[Path, str]:
        src = tmp / "w.pth"
        good = tensor_pickle(4, (4,), (1,))
        if kind == "encrypted":
            torch_zip(src, good, {"0": bytes(16)})
            return _patch_zip(src, "archive/data.pkl", flags=0x1), "encrypted"
        if kind == "deflate64":
            torch_zip(src, good, {"0": bytes(16)})
            return _patch_zip(src, "archive/data/0", method=9), "compression method 9"
        if kind == "bzip2":
            torch_zip(src, good, {"0": bytes(16)})
            return _patch_zip(src, "archive/data/0", method=12), "compression method 12"
        if kind == "bad utf-8 name":
            torch_zip(src, good, {"0": bytes(16)}, extra={"archive/Xx": b"x"})
            return _patch_zip(src, "archive/Xx", flags=0x800, new_name=b"archive/\xff\xfe"), "UTF-8"
        if kind == "huge LONG4 epoch":
            digits = b"\x7f" * (1 << 20)  # an 8-Mbit positive integer
            pkl = b"\x80\x02" + good[:-2] + b"Vepoch\n\x8b" + struct.pack("<i", len(digits)) + digits + b"u."
            return torch_zip(src, pkl, {"0": bytes(16)}), "integer"
        if kind == "huge LONG4 storage size":
            pkl = good.replace(b"I4\ntQ", b"\x8b" + struct.pack("<i", 1 << 16) + b"\x7f" * (1 << 16) + b"tQ")
            return torch_zip(src, pkl, {"0": bytes(16)}), "integer"
        if kind == "all-NaN weights":
            return nan_safetensors(src.with_suffix(".safetensors")), "non-finite"
        if kind == "FIFO":
            os.mkfifo(src)
            return src, "FIFO"
        if kind == "/dev/zero":
            src.symlink_to("/dev/zero")
            return src, "character device"
        raise AssertionError(kind)

    return make


def nan_safetensors(path: Path) -> Path:
    """A complete ProFound-Conv encoder state dict (of SPEC's size) whose every value is NaN."""
    from safetensors.numpy import save_file

    from pfq.convert.layout import export_state

    variables = jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype), abstract_variables(SPEC))
    save_file(export_state(SPEC, variables, True), str(path))
    return path


WEIGHTS = [
    "encrypted",
    "deflate64",
    "bzip2",
    "bad utf-8 name",
    "huge LONG4 epoch",
    "huge LONG4 storage size",
    "all-NaN weights",
    "FIFO",
    "/dev/zero",
]


@pytest.mark.parametrize("kind", WEIGHTS)
def test_hostile_weights_file_is_refused_by_the_converter(kind, tmp_path, capsys):
    src, fragment = weights(kind)(tmp_path)
    before = snapshot(tmp_path) if kind not in ("FIFO", "/dev/zero") else None
    with deadline(30):
        status = convert_main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    print(err)
    assert status == 2, err
    assert "Traceback" not in err and fragment in err and src.name in err, err
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# pfq model directories, read by --to-torch, pfq.predict and sweep.inits.
# ----------------------------------------------------------------------------------------------
def model_dir(root: Path, fill: float = 0.5) -> Path:
    from pfq.convert.store import save_model_dir

    variables = jax.tree.map(lambda a: np.full(a.shape, fill, a.dtype), abstract_variables(SPEC))
    return save_model_dir(root / "model", SPEC, variables, {"source": "test"})


def edit_meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        meta = json.loads((path / "pfq_model.json").read_text())
        (path / "pfq_model.json").write_text(json.dumps(change(meta)))

    return edit


def write_meta(data: bytes) -> Callable[[Path], None]:
    return lambda path: (path / "pfq_model.json").write_bytes(data)


def without(key: str) -> Callable[[dict], dict]:
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def meta_fifo(path: Path) -> None:
    (path / "pfq_model.json").unlink()
    os.mkfifo(path / "pfq_model.json")


def no_variables(path: Path) -> None:
    shutil.rmtree(path / "variables")


def damaged_variables(path: Path) -> None:
    for p in (path / "variables").rglob("*"):
        if p.is_file() and p.stat().st_size > 100:
            p.write_bytes(p.read_bytes()[:50])


MODEL_DIRS: dict[str, tuple[Callable[[Path], None], str]] = {
    "pfq_model.json not JSON": (write_meta(b"{oops"), "not valid JSON"),
    "pfq_model.json not UTF-8": (write_meta(b"\xff\xfe{}"), "not valid JSON"),
    "pfq_model.json a list": (edit_meta(lambda meta: [meta]), "a JSON list"),
    "pfq_model.json without depths": (edit_meta(without("depths")), "'depths'"),
    "pfq_model.json without dims": (edit_meta(without("dims")), "'dims'"),
    "depths a string": (edit_meta(lambda m: dict(m, depths="1111")), "'depths'"),
    "dims with a negative width": (edit_meta(lambda m: dict(m, dims=[8, -16, 24, 32])), "'dims'"),
    "num_classes a word": (edit_meta(lambda m: dict(m, num_classes="two")), "'num_classes'"),
    "in_chans zero": (edit_meta(lambda m: dict(m, in_chans=0)), "'in_chans'"),
    "pfq_model.json a FIFO": (meta_fifo, "FIFO"),
    "no variables/": (no_variables, "variables"),
    "damaged variables/": (damaged_variables, "variables"),
    "all-NaN weights": (
        lambda path: shutil.copytree(model_dir(path.parent / "nan", np.nan), path, dirs_exist_ok=True),
        "non-finite",
    ),
}


def _check(status_or_error, err: str, fragment: str, name: str) -> None:
    print(err)
    assert status_or_error == 2, err
    assert "Traceback" not in err and fragment in err and name in err, err


@pytest.mark.parametrize("entry", ["--to-torch", "pfq.predict", "sweep.inits"])
@pytest.mark.parametrize("name", list(MODEL_DIRS))
def test_damaged_model_directory_is_a_clear_error(name, entry, tmp_path, capsys):
    from pfq.train.trainer import load_init

    edit, fragment = MODEL_DIRS[name]
    path = model_dir(tmp_path)
    edit(path)
    out = tmp_path / "out"
    with deadline(30):
        if entry == "--to-torch":
            status = convert_main(["--to-torch", str(path), str(out / "w.safetensors")])
            err = capsys.readouterr().err
        elif entry == "pfq.predict":
            np.save(tmp_path / "x.npy", np.ones((1, 3, 32, 32, 32), np.float32))
            status = predict.main(
                ["--checkpoint", str(path), "--array", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]
            )
            err = capsys.readouterr().err
        else:
            try:
                load_init(str(path), SPEC)
                status, err = 0, "accepted"
            except ConvertError as e:  # what the sweep reports with exit status 2
                status, err = 2, str(e)
    _check(status, err, fragment, "model")
    assert not out.exists() and not (tmp_path / "y.npy").exists()


# ----------------------------------------------------------------------------------------------
# pfq.predict's own inputs and outputs.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    return model_dir(tmp_path_factory.mktemp("predict_model"))


def _predict(model: Path, x: Path, out: Path, *extra: str) -> int:
    return predict.main(["--checkpoint", str(model), "--array", str(x), "--output", str(out), *extra])


PREDICT_CASES = {
    "an .npz for --array": (
        lambda t: np.savez(t / "x.npz", x=np.ones((1, 3, 32, 32, 32), np.float32)) or "x.npz",
        "out.npy",
        ".npz",
    ),
    "an object-array .npy": (
        lambda t: np.save(t / "o.npy", np.array([{"a": 1}], object), allow_pickle=True) or "o.npy",
        "out.npy",
        "o.npy",
    ),
    "all-NaN input": (
        lambda t: np.save(t / "n.npy", np.full((2, 3, 32, 32, 32), np.nan, np.float32)) or "n.npy",
        "out.npy",
        "NaN",
    ),
    "one NaN voxel in case 1": (
        lambda t: (
            np.save(
                t / "v.npy",
                np.where(
                    np.arange(2)[:, None, None, None, None] == 1, np.nan, np.ones((2, 3, 32, 32, 32), np.float32)
                ).astype(np.float32),
            )
            or "v.npy"
        ),
        "out.npy",
        "case 1",
    ),
    "output in a missing folder": (
        lambda t: np.save(t / "g.npy", np.ones((1, 3, 32, 32, 32), np.float32)) or "g.npy",
        "missing/out.npy",
        "missing",
    ),
    "output is a folder": (
        lambda t: (np.save(t / "g.npy", np.ones((1, 3, 32, 32, 32), np.float32)), (t / "outdir").mkdir()) and "g.npy",
        "outdir",
        "outdir",
    ),
    "--array a FIFO": (lambda t: os.mkfifo(t / "f.npy") or "f.npy", "out.npy", "FIFO"),
}


@pytest.mark.parametrize("name", list(PREDICT_CASES))
def test_bad_predict_input_is_exit_2_before_writing(name, good_model, tmp_path, capsys):
    make, out_name, fragment = PREDICT_CASES[name]
    x = tmp_path / make(tmp_path)
    before = snapshot(tmp_path) if "FIFO" not in name else None
    with deadline(60):
        status = _predict(good_model, x, tmp_path / out_name)
    err = capsys.readouterr().err
    print(err)
    assert status == 2 and "Traceback" not in err and fragment in err, err
    if before is not None:
        assert snapshot(tmp_path) == before


def test_predict_on_zero_cases_writes_zero_rows_of_every_class(good_model, tmp_path):
    np.save(tmp_path / "e.npy", np.ones((0, 3, 32, 32, 32), np.float32))
    assert _predict(good_model, tmp_path / "e.npy", tmp_path / "y.npy") == 0
    assert np.load(tmp_path / "y.npy").shape == (0, SPEC.num_classes)
    assert _predict(good_model, tmp_path / "e.npy", tmp_path / "f.npy", "--features") == 0
    assert np.load(tmp_path / "f.npy").shape == (0, SPEC.dims[-1])


def test_finite_weights_and_inputs_still_convert_and_predict(good_model, tmp_path):
    """The checks refuse only what is broken: a healthy directory exports and predicts."""
    assert convert_main(["--to-torch", str(good_model), str(tmp_path / "w.safetensors")]) == 0
    np.save(tmp_path / "x.npy", np.ones((3, 3, 32, 32, 32), np.float32))
    assert _predict(good_model, tmp_path / "x.npy", tmp_path / "y.npy") == 0
    assert np.load(tmp_path / "y.npy").shape == (3, 2)


def test_nul_bytes_in_paths_are_clear_errors(good_model, tmp_path, capsys):
    """A NUL byte cannot be in a file name; every entry point says so instead of a ValueError traceback."""
    from pfq.train.__main__ import workdir_problem
    from pfq.train.trainer import load_init

    np.save(tmp_path / "x.npy", np.ones((1, 3, 32, 32, 32), np.float32))
    assert convert_main([str(tmp_path / "w\x00.pth"), str(tmp_path / "out")]) == 2
    assert convert_main(["--to-torch", str(good_model) + "\x00", str(tmp_path / "o.safetensors")]) == 2
    assert _predict(good_model, tmp_path / "x\x00.npy", tmp_path / "y.npy") == 2
    assert _predict(good_model, tmp_path / "x.npy", tmp_path / "y\x00.npy") == 2
    err = capsys.readouterr().err
    assert err.count("NUL byte") == 4 and "Traceback" not in err, err
    with pytest.raises(ConvertError, match="NUL byte"):
        load_init(str(good_model) + "\x00", SPEC)
    assert "NUL byte" in workdir_problem(tmp_path / "run\x00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
