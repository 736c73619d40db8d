"""Torch-free, code-free reader of PyTorch's zip checkpoint format (`torch.save` since torch 1.6).

The archive holds `<prefix>/data.pkl` (a protocol-2 pickle) and one raw member per storage,
`<prefix>/data/<key>`. The pickle is read with an Unpickler whose `find_class` admits only the
globals a weights file needs, each mapped to a local, inert stand-in; nothing is imported from torch
or executed on the file's behalf, and any other global is refused by name. Tensors come back as
`TensorRef`s: validated views (dtype, shape, strides, offset) whose bytes are read only on
`.numpy()`, so optimizer state that a conversion ignores is never read.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from pfq.convert.errors import ConvertError, UnsafeCheckpointError
from pfq.safe_open import open_regular

MAX_PICKLE_BYTES = 512 << 20  # data.pkl of a weights file is a few hundred KiB
MAX_DEFLATE_RATIO = 1000  # refuse zip bombs among compressed members
# Tensors are strided views of storages, so a few bytes of pickle can declare a view (stride 0, or
# many views of one storage) far larger than the file. All the tensors read from one file may
# together take at most this multiple of its size, plus a floor for tiny files.
MAX_READ_FACTOR, MIN_READ_BUDGET = 4, 64 << 20
_LOCAL_HEADER = 30  # fixed part of a zip local file header
_KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
MAX_INT_BITS = 64  # every integer a weights file holds (sizes, strides, epochs) fits in 64 bits

# Legacy (non-zip) torch.save output starts with a protocol-2 pickle of this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

RESAVE_HINT = (
    "re-save it with a torch >= 1.6 you trust, e.g. "
    "`sd = torch.load(path, map_location='cpu', weights_only=True); torch.save(sd, 'new.pth')`"
)


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.FloatStorage` & co. (dtype None: `torch.UntypedStorage`, raw bytes)."""

    name: str
    dtype: np.dtype | None


@dataclass(frozen=True)
class _TorchDtype:
    """Stand-in for a `torch.<dtype>` object, as `_rebuild_tensor_v3` receives it."""

    name: str
    dtype: np.dtype


_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
# dtypes that newer torch writes as UntypedStorage + `_rebuild_tensor_v3(..., dtype)`
_V3_DTYPES: dict[str, Any] = {
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "bool": np.bool_,
}


class InertNamespace:
    """Stand-in for `argparse.Namespace`: keeps the attributes as data, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafeCheckpointError("argparse.Namespace state is not a dict of str keys")
        self.__dict__.update(state)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


class _Archive:
    """The zip file, its validated member table, and reads of storage members."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        try:
            self.zf = zipfile.ZipFile(open_regular(path))
        except zipfile.BadZipFile as e:
            raise ConvertError(f"{path}: not a readable zip archive ({e}); the file may be truncated") from e
        except UnicodeDecodeError as e:  # a member flagged UTF-8 whose name is not
            raise UnsafeCheckpointError(
                f"{path}: a zip member name is flagged UTF-8 but is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: not a readable zip archive ({e})") from None
        self.members = {}
        for info in self.zf.infolist():
            _check_member_name(info.filename)
            if info.flag_bits & 0x1:
                raise UnsafeCheckpointError(
                    f"{path}: zip member {info.filename!r} is encrypted; a weights file never is"
                )
            if info.compress_type not in _READABLE_METHODS:
                raise ConvertError(
                    f"{path}: zip member {info.filename!r} uses compression method "
                    f"{info.compress_type}; torch writes stored (0) or deflated (8) members only"
                )
            if info.filename in self.members:
                raise UnsafeCheckpointError(f"{path}: duplicate zip member {info.filename!r}")
            end = info.header_offset + _LOCAL_HEADER + len(info.filename.encode()) + info.compress_size
            if end > self.size:
                raise ConvertError(
                    f"{path}: zip member {info.filename!r} extends past the end of the file; the file is truncated"
                )
            self.members[info.filename] = info
        pickles = [n for n in self.members if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise ConvertError(
                f"{path}: a torch zip checkpoint has exactly one '<name>/data.pkl', found {pickles or 'none'}"
            )
        self.prefix = pickles[0].split("/")[0]
        strays = [n for n in self.members if n.split("/")[0] != self.prefix]
        if strays:
            raise UnsafeCheckpointError(f"{path}: zip members outside '{self.prefix}/'", strays)
        order = self.members.get(f"{self.prefix}/byteorder")
        if order is not None and order.file_size > 16:
            raise UnsafeCheckpointError(f"{path}: byteorder record of {order.file_size} bytes")
        self.big_endian = order is not None and bytes(self._read(order, order.file_size)).strip() == b"big"
        self.read_limit = MAX_READ_FACTOR * self.size + MIN_READ_BUDGET
        self.read_total = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count bytes about to be materialised from this file; refuse past `read_limit`."""
        if self.read_total + nbytes > self.read_limit:
            raise UnsafeCheckpointError(
                f"{self.path}: {what} would bring the tensors read from this {self.size}-byte "
                f"file to {self.read_total + nbytes} bytes, over the {self.read_limit}-byte "
                "limit; a weights file's tensors are no larger than the file"
            )
        self.read_total += nbytes

    def read_pickle(self) -> bytes:
        info = self.members[f"{self.prefix}/data.pkl"]
        if info.file_size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpointError(
                f"{self.path}: data.pkl declares {info.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte limit"
            )
        return self._read(info, info.file_size)

    def storage_member(self, key: str, nbytes: int) -> zipfile.ZipInfo:
        name = f"{self.prefix}/data/{key}"
        info = self.members.get(name)
        if info is None:
            raise ConvertError(f"{self.path}: storage {key!r} has no zip member {name!r}")
        if info.file_size != nbytes:
            raise UnsafeCheckpointError(
                f"{self.path}: storage {key!r} declares {nbytes} bytes but its member holds {info.file_size}"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise UnsafeCheckpointError(f"{self.path}: stored member {name!r} has inconsistent sizes")
        elif info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
            raise UnsafeCheckpointError(
                f"{self.path}: member {name!r} would expand {info.compress_size} bytes to {info.file_size}"
            )
        return info

    def _read(self, info: zipfile.ZipInfo, nbytes: int) -> bytes | bytearray:
        buf = bytearray(nbytes)
        try:
            with self.zf.open(info) as f:
                got = f.readinto(buf)
                if got != nbytes or f.read(1):  # reading to EOF also makes zipfile check the CRC
                    raise ConvertError(f"{self.path}: member {info.filename!r} is truncated or too long")
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ConvertError(f"{self.path}: cannot read member {info.filename!r}: {e}") from e
        return buf

    def read_storage(self, info: zipfile.ZipInfo, dtype: np.dtype) -> np.ndarray:
        arr = np.frombuffer(self._read(info, info.file_size), dtype=dtype)
        if self.big_endian and dtype.itemsize > 1:
            uint = np.dtype(f"u{dtype.itemsize}")
            arr = arr.view(uint).byteswap().view(dtype)
        return arr


def _check_member_name(name: str) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or ":" in parts[0]
        or any(p in ("..", ".") for p in parts)
    ):
        raise UnsafeCheckpointError(f"refusing zip member name {name!r} (absolute or path traversal)")


@dataclass
class _Storage:
    archive: _Archive
    key: str
    dtype: np.dtype
    numel: int
    info: zipfile.ZipInfo
    _data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._data is None:
            self._data = self.archive.read_storage(self.info, self.dtype)
        return self._data


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the archive: a strided view of a storage, read on demand."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype

    def numpy(self) -> np.ndarray:
        """A fresh C-contiguous array with the tensor's values."""
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)
        self.storage.archive.charge(
            math.prod(self.shape) * self.dtype.itemsize,
            f"a tensor of shape {self.shape} from storage {self.storage.key!r}",
        )
        flat = self.storage.array()
        if flat.dtype != self.dtype:  # _rebuild_tensor_v3 reinterprets an untyped (byte) storage
            flat = flat.view(self.dtype)
        strides = tuple(s * self.dtype.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(flat[self.offset :], self.shape, strides, writeable=False)
        return np.array(view, copy=True, order="C")


def _as_int(x: Any, what: str) -> int:
    if type(x) is int and x.bit_length() > MAX_INT_BITS:  # also keeps later messages printable
        raise UnsafeCheckpointError(f"tensor {what} is an integer of {x.bit_length()} bits, over {MAX_INT_BITS}")
    if type(x) is not int or x < 0:
        raise UnsafeCheckpointError(f"tensor {what} must be a non-negative int, got {x!r:.80}")
    return x


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise UnsafeCheckpointError(f"tensor size/stride must be equal-length tuples: {size!r:.80}, {stride!r:.80}")
    offset = _as_int(offset, "offset")
    size = tuple(_as_int(s, "size") for s in size)
    stride = tuple(_as_int(s, "stride") for s in stride)
    numel = storage.numel * storage.dtype.itemsize // dtype.itemsize
    if math.prod(size) * dtype.itemsize > storage.archive.read_limit:
        raise UnsafeCheckpointError(
            f"tensor of size {size} ({math.prod(size)} elements) is a view of storage "
            f"{storage.key!r} ({numel} elements) larger than the whole file allows"
        )
    if math.prod(size) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= numel:
            raise UnsafeCheckpointError(
                f"tensor of size {size} stride {stride} offset {offset} reads past "
                f"storage {storage.key!r} ({numel} elements)"
            )
    return TensorRef(storage, offset, size, stride, dtype)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return _tensor_ref(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
) -> TensorRef:
    if not isinstance(dtype, _TorchDtype):
        raise UnsafeCheckpointError(f"_rebuild_tensor_v3 needs a torch dtype, got {type(dtype).__name__}")
    if isinstance(storage, _Storage) and storage.numel * storage.dtype.itemsize % dtype.dtype.itemsize:
        raise UnsafeCheckpointError(f"storage {storage.key!r} is not a whole number of {dtype.name}")
    return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise UnsafeCheckpointError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _codecs_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    # protocol 2 pickles bytes objects as _codecs.encode(str, 'latin1')
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode is admitted only for latin1 text")
    return obj.encode("latin1")


def _allowed_globals() -> dict[str, Any]:
    table: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "argparse.Namespace": InertNamespace,
        "_codecs.encode": _codecs_encode,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch.UntypedStorage": _StorageType("UntypedStorage", None),
        "torch.storage.UntypedStorage": _StorageType("UntypedStorage", None),
    }
    for name, dt in _STORAGE_DTYPES.items():
        table[f"torch.{name}"] = _StorageType(name, np.dtype(dt))
    for name, dt in _V3_DTYPES.items():
        table[f"torch.{name}"] = _TorchDtype(name, np.dtype(dt))
    return table


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.archive = archive
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get(f"{module}.{name}")
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.archive.path}: refusing global {module}.{name}: a weights "
                "file never needs it, and loading it could run code"
            )
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.archive.path}: unsupported persistent id {pid!r:.200}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise UnsafeCheckpointError(f"{self.archive.path}: persistent id names no storage type")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise UnsafeCheckpointError(f"{self.archive.path}: bad storage key {key!r:.100}")
        numel = _as_int(numel, "storage size")
        dtype = stype.dtype if stype.dtype is not None else np.dtype(np.uint8)
        cached = self.storages.get(key)
        if cached is not None:
            if cached.dtype != dtype or cached.numel != numel:
                raise UnsafeCheckpointError(
                    f"{self.archive.path}: storage {key!r} declared twice with different types or sizes"
                )
            return cached
        info = self.archive.storage_member(key, numel * dtype.itemsize)
        storage = _Storage(self.archive, key, dtype, numel, info)
        self.storages[key] = storage
        return storage


_INERT_LEAVES = (str, bytes, bytearray, int, float, bool, complex, type(None), TensorRef)


def _check_tree(obj: Any) -> None:
    """Everything the pickle built must be plain data; refuse stray stand-ins or unknown objects."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if type(x) is int and x.bit_length() > MAX_INT_BITS:
            raise UnsafeCheckpointError(
                f"checkpoint holds an integer of {x.bit_length()} bits; a weights file's integers fit in {MAX_INT_BITS}"
            )
        if isinstance(x, _INERT_LEAVES) or id(x) in seen:  # the memo can make shared or cyclic refs
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, InertNamespace):
            stack.extend(x.__dict__.values())
        else:
            raise UnsafeCheckpointError(f"checkpoint holds an unexpected {type(x).__name__} object")


def is_legacy_torch(head: bytes) -> bool:
    """True for torch's pre-1.6 serialization (a pickle stream) or the even older tar format."""
    return head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar"


def load(path: str | Path) -> Any:
    """Read a torch zip checkpoint into plain Python data with `TensorRef` leaves."""
    path = Path(path)
    with open_regular(path) as f:
        head = f.read(512)
    if is_legacy_torch(head):
        raise ConvertError(
            f"{path}: legacy (pre-zip) torch serialization is not read, as it cannot be parsed safely; {RESAVE_HINT}"
        )
    archive = _Archive(path)
    data = archive.read_pickle()
    try:
        obj = _RestrictedUnpickler(bytes(data), archive).load()
        _check_tree(obj)
    except ConvertError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e.args[0] if e.args else e}", e.problems) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
    ) as e:
        raise ConvertError(f"{path}: malformed checkpoint pickle: {type(e).__name__}: {str(e)[:300]}") from e
    return obj
