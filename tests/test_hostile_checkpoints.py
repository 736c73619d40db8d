"""Hostile checkpoints through the converter's command line (`tools/convert_weights.py`, whose main
is `pfq.convert.cli.main`): pickles that try to run code, storages and views that declare absurd
sizes, broken or bomb-like zips, member names that climb out of the archive. Every one is refused
with exit status 2 and a message naming what was refused; nothing is executed (a marker file that
each payload would create stays absent), and nothing is written anywhere: not the destination, not
a temporary, not a file a member name points at.

The reader's own unit tests are in tests/test_torch_zip.py; this corpus adds the end-to-end path and
the payloads those do not cover.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from studykit import REPO, snapshot

from pfq.convert.cli import main as convert_main

TENSOR_ARGS = b"((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI1\ntQI0\n(I1\nt(I1\ntI00\n"


def torch_zip(
    path: Path,
    pickle_bytes: bytes,
    storages: dict[str, bytes] | None = None,
    extra: dict[str, bytes] | None = None,
    compress: dict[str, bool] | None = None,
) -> Path:
    """A torch-layout zip (`archive/data.pkl`, `archive/data/<key>`) around a hand-made pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            method = zipfile.ZIP_DEFLATED if (compress or {}).get(key) else zipfile.ZIP_STORED
            z.writestr(zipfile.ZipInfo(f"archive/data/{key}"), data, compress_type=method)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
        z.writestr("archive/version", b"3\n")
    return path


def tensor_pickle(numel: int, size: tuple, stride: tuple, offset: int = 0, key: str = "0") -> bytes:
    """{"model": {"encoder.norm.weight": <FloatStorage[numel] viewed as size/stride>}}."""
    tup = lambda xs: b"(" + b"".join(f"I{x}\n".encode() for x in xs) + b"t"
    return (
        b"}(Vmodel\n}(Vencoder.norm.weight\nctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\n"
        + b"FloatStorage\nV"
        + key.encode()
        + b"\nVcpu\n"
        + f"I{numel}\ntQI{offset}\n".encode()
        + tup(size)
        + tup(stride)
        + b"I00\nccollections\nOrderedDict\n)RtRuu."
    )


def many_views(count: int) -> bytes:
    """A state dict of `count` keys, each a full view of one 1 MiB storage (tied weights gone wild)."""
    numel = 1 << 18
    entries = b"".join(
        f"Vk{i}\n".encode()
        + b"ctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\n"
        + f"V0\nVcpu\nI{numel}\ntQI0\n(I{numel}\nt(I1\ntI00\nccollections\nOrderedDict\n)Rt".encode()
        + b"R"
        for i in range(count)
    )
    return b"}(Vmodel\n}(" + entries + b"uu."


class Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return os.system, (self.cmd,)


def payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (data.pkl bytes, a fragment of the expected error). Each would create `marker`."""
    cmd = f"touch {marker}".encode()
    py = b"__import__('os').system('" + cmd + b"')"
    return {
        "GLOBAL os.system": (b"cos\nsystem\n(V" + cmd + b"\ntR.", "refusing global os.system"),
        "pickled __reduce__ (posix.system)": (pickle.dumps(Evil(cmd.decode()), protocol=2), "refusing global posix"),
        "builtins.eval": (b"cbuiltins\neval\n(V" + py + b"\ntR.", "refusing global builtins.eval"),
        "builtins.exec": (b"cbuiltins\nexec\n(V" + py + b"\ntR.", "refusing global builtins.exec"),
        "STACK_GLOBAL subprocess.Popen": (
            b"\x80\x04\x8c\nsubprocess\x8c\x05Popen\x93(V" + cmd + b"\nI1\ntR.",
            "refusing global subprocess.Popen",
        ),
        "INST opcode os.system": (b"(V" + cmd + b"\nios\nsystem\n.", "refusing global os.system"),
        "nested REDUCE in an allowed call": (
            b"ccollections\nOrderedDict\n((Vk\ncos\nsystem\n(V" + cmd + b"\ntRttR.",
            "refusing global os.system",
        ),
        "getattr on an allowed class": (
            b"ctorch._utils\n_rebuild_tensor_v2\n"
            + TENSOR_ARGS
            + b"cbuiltins\ngetattr\n(ccollections\nOrderedDict\nVfromkeys\ntR)RtR.",
            "refusing global builtins.getattr",
        ),
        "builtins.__import__": (b"cbuiltins\n__import__\n(Vos\ntR.", "refusing global builtins.__import__"),
        "importlib.import_module": (b"cimportlib\nimport_module\n(Vos\ntR.", "refusing global importlib"),
        "torch.load of nested bytes": (
            b"ctorch.storage\n_load_from_bytes\n(C\x00\ntR.",
            "refusing global torch.storage._load_from_bytes",
        ),
        "numpy reconstruct": (
            b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntC\x01b\ntR.",
            "refusing global numpy",
        ),
        "copyreg reconstructor": (
            b"ccopyreg\n_reconstructor\n(cos\n_wrap_close\ncbuiltins\nobject\nNtR.",
            "refusing global copyreg._reconstructor",
        ),
        "a class smuggled in as data": (
            b"cargparse\nNamespace\n)\x81}(Vx\nccollections\nOrderedDict\nub.",
            "unexpected type object",
        ),
        "storage key with path traversal": (tensor_pickle(1, (1,), (1,), key="../../../etc/passwd"), "bad storage key"),
        "storage declaring 4 TB": (tensor_pickle(10**12, (4,), (1,)), "declares 4000000000000 bytes"),
        "negative size": (tensor_pickle(4, (-4,), (1,)), "must be a non-negative int"),
        "view reading past its storage": (tensor_pickle(4, (4,), (1,), offset=2), "reads past"),
        "64 GiB stride-0 view of one float": (
            tensor_pickle(1, (1 << 17, 1 << 17), (0, 0)),
            "17179869184 elements) is a view of storage",
        ),
        "many views of one storage": (many_views(200), "over the"),
    }


PAYLOAD_NAMES = list(payloads(Path("/x")))


def refused(tmp_path: Path, src: Path, fragment: str, capsys) -> None:
    """Convert `src`; it must fail with `fragment` in the message, create nothing, run nothing."""
    before = snapshot(tmp_path)
    dest = tmp_path / "out" / "model"
    status = convert_main([str(src), str(dest)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "pwned").exists()
    assert snapshot(tmp_path) == before  # no destination, no temporaries, nothing beside the source


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_hostile_pickle_is_refused(name, tmp_path, capsys):
    data, fragment = payloads(tmp_path / "pwned")[name]
    floats = {
        "getattr on an allowed class": 1,
        "64 GiB stride-0 view of one float": 1,
        "many views of one storage": 1 << 18,
    }.get(name, 4)
    src = torch_zip(tmp_path / "evil.pth", data, {"0": np.zeros(floats, "<f4").tobytes()})
    refused(tmp_path, src, fragment, capsys)


def test_the_payloads_are_live(tmp_path):
    """Guard: plain pickle really runs them (so the refusals above are not vacuous)."""
    for name in ("GLOBAL os.system", "builtins.exec", "INST opcode os.system", "nested REDUCE in an allowed call"):
        marker = tmp_path / f"pwned-{len(name)}"
        try:
            pickle.loads(payloads(marker)[name][0])
        except Exception:
            pass
        assert marker.exists(), name


ZIP_CASES = {
    "member '../escaped'": ({"../escaped": b"x"}, "path traversal"),
    "member '/abs/escaped'": ({"/abs/escaped": b"x"}, "path traversal"),
    "member 'archive/../../escaped'": ({"archive/../../escaped": b"x"}, "path traversal"),
    "member with a drive letter": ({"C:escaped": b"x"}, "path traversal"),
    "member outside the archive folder": ({"other/notes.txt": b"x"}, "outside"),
}


@pytest.mark.parametrize("name", list(ZIP_CASES))
def test_zip_member_names_are_refused(name, tmp_path, capsys):
    extra, fragment = ZIP_CASES[name]
    src = torch_zip(tmp_path / "trav.pth", b"}.", extra=extra)
    refused(tmp_path, src, fragment, capsys)
    assert not (tmp_path.parent / "escaped").exists() and not Path("/abs/escaped").exists()


def test_zip_bomb_truncation_and_duplicates_are_refused(tmp_path, capsys):
    bomb = torch_zip(
        tmp_path / "bomb.pth", tensor_pickle(1 << 24, (1 << 24,), (1,)), {"0": bytes(1 << 26)}, compress={"0": True}
    )
    refused(tmp_path, bomb, "would expand", capsys)
    bomb.unlink()
    good = torch_zip(tmp_path / "good.pth", tensor_pickle(4, (4,), (1,)), {"0": bytes(16)})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:-40])
    good.unlink()
    refused(tmp_path, cut, "truncated", capsys)
    cut.unlink()
    with zipfile.ZipFile(tmp_path / "dup.pth", "w") as z:
        z.writestr("archive/data.pkl", b"}.")
        z.writestr("archive/data.pkl", b"cos\nsystem\n(Vtouch x\ntR.")
    refused(tmp_path, tmp_path / "dup.pth", "duplicate", capsys)


def test_legacy_pickle_and_bad_safetensors_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    legacy = tmp_path / "old.pth"  # torch's pre-1.6 magic number, then a payload
    magic = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."
    legacy.write_bytes(magic + payloads(marker)["GLOBAL os.system"][0])
    refused(tmp_path, legacy, "legacy", capsys)
    legacy.unlink()
    header = b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'
    short = tmp_path / "short.safetensors"  # declares 4 MB of data, holds 8 bytes
    short.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    refused(tmp_path, short, "safetensors", capsys)


def test_tools_convert_weights_end_to_end(tmp_path):
    """The real script in a subprocess: exit 2, the refusal named, no marker, no output."""
    marker = tmp_path / "pwned"
    src = torch_zip(tmp_path / "evil.pth", payloads(marker)["GLOBAL os.system"][0])
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_weights.py"), str(src), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refusing global os.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "model").exists()
