"""The torch-free reader: exact tensors from real torch files, and refusal of hostile or broken ones."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pfq.convert import ConvertError, UnsafeCheckpointError, torch_zip
from pfq.convert.reader import read_source


def write_zip(
    path: Path,
    pickle_bytes: bytes,
    storages: dict[str, bytes] | None = None,
    extra: dict[str, bytes] | None = None,
    prefix: str = "archive",
) -> Path:
    """A torch-layout zip with a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        z.writestr(f"{prefix}/byteorder", b"little")
        for key, data in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
        z.writestr(f"{prefix}/version", b"3\n")
    return path


def test_reads_real_torch_files_exactly(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    sd = OrderedDict(
        w=torch.randn(5, 3),
        view=base.permute(2, 0, 1)[1:, :, ::2],
        scalar=torch.tensor(7, dtype=torch.int64),
        bf16=torch.randn(4).to(torch.bfloat16),
        half=torch.randn(3).half(),
        flag=torch.tensor([True, False]),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2, 2)),
        u16=torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16),
    )  # a _rebuild_tensor_v3 dtype
    path = tmp_path / "real.pth"
    torch.save(
        {"model": sd, "args": argparse.Namespace(lr=0.1, name="x", sizes=(1, 2)), "blob": b"\x00\xff", "epoch": 3}, path
    )
    tree = torch_zip.load(path)
    assert tree["epoch"] == 3 and tree["blob"] == b"\x00\xff"
    assert tree["args"].as_dict() == {"lr": 0.1, "name": "x", "sizes": (1, 2)}
    for k, v in sd.items():
        got = tree["model"][k].numpy()
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        assert got.shape == tuple(v.shape) and got.flags.c_contiguous, k
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=k)


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_views_with_strides_and_offsets(tmp_path_factory, shape, data):
    t = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    t = t.permute(data.draw(st.permutations(range(len(shape)))))
    start = data.draw(st.integers(0, t.shape[0] - 1))
    t = t[start:]
    path = tmp_path_factory.mktemp("views") / "v.pth"
    torch.save({"t": t}, path)
    np.testing.assert_array_equal(torch_zip.load(path)["t"].numpy(), t.numpy())


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}".encode()
    tensor_args = b"((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI1\ntQI0\n(I1\nt(I1\ntI00\n"
    return {
        "os.system": b"cos\nsystem\n(V" + cmd + b"\ntR.",
        "posix.system": pickle.dumps(_Evil(marker), protocol=2),
        "builtins.eval": b"cbuiltins\neval\n(V__import__('os').system('" + cmd + b"')\ntR.",
        "builtins.exec": b"cbuiltins\nexec\n(V__import__('os').system('" + cmd + b"')\ntR.",
        # protocol 4 STACK_GLOBAL
        "subprocess.Popen": b"\x80\x04\x8c\nsubprocess\x8c\x05Popen\x93(V" + cmd + b"\nI1\ntR.",
        # an allowed call whose argument is built by a nested REDUCE of a forbidden global
        "nested:os.system": b"ccollections\nOrderedDict\n((Vk\ncos\nsystem\n(V" + cmd + b"\ntRttR.",
        "nested:_rebuild_tensor_v2": b"ctorch._utils\n_rebuild_tensor_v2\n"
        + tensor_args
        + b"cbuiltins\ngetattr\n(ccollections\nOrderedDict\nVfromkeys\ntR)RtR.",
    }


@pytest.mark.parametrize(
    "case",
    [
        "os.system",
        "posix.system",
        "builtins.eval",
        "builtins.exec",
        "subprocess.Popen",
        "nested:os.system",
        "nested:_rebuild_tensor_v2",
    ],
)
def test_hostile_pickles_are_refused_without_running(tmp_path, case):
    marker = tmp_path / "pwned"
    payload = _hostile_pickles(marker)[case]
    path = write_zip(tmp_path / "evil.pth", payload, {"0": b"\x00" * 4})
    expected = {"nested:os.system": "os.system", "nested:_rebuild_tensor_v2": "builtins.getattr"}.get(case, case)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing global {expected}"):
        read_source(path)
    assert not marker.exists()
    # the same payloads as a bare (legacy-looking) pickle are never unpickled at all
    (tmp_path / "bare.pkl").write_bytes(payload)
    with pytest.raises(ConvertError):
        read_source(tmp_path / "bare.pkl")
    assert not marker.exists()


def test_hostile_payload_really_would_run(tmp_path):
    """Guard for the test above: plain pickle does execute the payload."""
    marker = tmp_path / "pwned"
    pickle.loads(_hostile_pickles(marker)["os.system"])
    assert marker.exists()


def test_namespace_is_inert_data(tmp_path):
    payload = b"cargparse\nNamespace\n)\x81}(Vlr\nF0.5\nub."
    tree = torch_zip.load(write_zip(tmp_path / "ns.pth", payload))
    assert isinstance(tree, torch_zip.InertNamespace) and tree.as_dict() == {"lr": 0.5}


def test_legacy_format_gets_a_resave_hint(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ConvertError, match="legacy .*re-save"):
        read_source(path)


def test_truncated_zip(tmp_path):
    path = tmp_path / "full.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="truncated"):
        read_source(tmp_path / "cut.pth")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConvertError, match="neither"):
        read_source(tmp_path / "junk.bin")


def test_path_traversal_member_names(tmp_path):
    for name in ("../evil", "/abs/evil", "archive/../../evil"):
        path = write_zip(tmp_path / "trav.pth", b"}.", extra={name: b"x"})
        with pytest.raises(UnsafeCheckpointError, match="path traversal"):
            read_source(path)


def _tensor_pickle(numel: int, size: int, offset: int = 0) -> bytes:
    return (
        b"}(Vt\nctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\n"
        + f"I{numel}\ntQI{offset}\n(I{size}\nt(I1\ntI00\nccollections\nOrderedDict\n)RtRu.".encode()
    )


def test_absurd_sizes_are_refused(tmp_path):
    good = write_zip(tmp_path / "ok.pth", _tensor_pickle(4, 4), {"0": np.arange(4, dtype="<f4").tobytes()})
    np.testing.assert_array_equal(read_source(good).tree["t"].numpy(), np.arange(4, dtype=np.float32))
    huge = write_zip(tmp_path / "huge.pth", _tensor_pickle(10**12, 4), {"0": b"\x00" * 16})
    with pytest.raises(UnsafeCheckpointError, match="declares 4000000000000 bytes"):
        read_source(huge)
    past_end = write_zip(tmp_path / "past.pth", _tensor_pickle(4, 4, offset=2), {"0": b"\x00" * 16})
    with pytest.raises(UnsafeCheckpointError, match="reads past"):
        read_source(past_end)
    missing = write_zip(tmp_path / "missing.pth", _tensor_pickle(4, 4))
    with pytest.raises(ConvertError, match="no zip member"):
        read_source(missing)


def test_cyclic_pickle_terminates(tmp_path):
    path = write_zip(tmp_path / "cycle.pth", b"(lp0\ng0\na.")  # a list that contains itself
    tree = torch_zip.load(path)
    assert tree[0] is tree
    with pytest.raises(ConvertError, match="not a dict"):
        from pfq.convert.formats import to_dense

        to_dense(tree)
