"""Atomic writes: a reader sees a file's old content or its new content, never part of either.

Every writer puts its bytes into a temporary sibling, flushes them to disk and renames it over the
destination (a rename within one folder is atomic on POSIX filesystems). Temporary names are unique
per writer, `.NAME.PID.XXXXXXXX.tmp[SUFFIX]`, so processes writing the same file at once (the hosts of
one run, or two runs sharing a cache) never rename each other's temporaries; the files they write
are then identical, and the last rename wins. A write that fails removes its temporary; one that a
kill interrupts leaves it behind, and `stale_temporaries` finds it by that name.

This module is the bottom layer: it imports nothing from pfq but the fault-injection hook.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pfq.faults import maybe_fail

_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp(\.[^/]*)?")


def temporary_sibling(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name next to `path`; `suffix` keeps an extension that a writer needs
    (e.g. `.nii.gz`, from which nibabel picks the format)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def is_temporary(path: str | os.PathLike) -> bool:
    return _TEMPORARY.fullmatch(Path(path).name) is not None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(
    path: str | os.PathLike, *, suffix: str = "", fault: str | None = None, durable: bool = True
) -> Iterator[Path]:
    """Yield a temporary path for a writer that wants a file name (savefig, nibabel, safetensors);
    when the block ends without error the file is flushed to disk (unless not `durable`) and renamed
    over `path`, otherwise it is removed. `fault` names the fault-injection point between writing and
    renaming (default `write:<file name>`). `durable=False` is for files that are cheap to regenerate
    and written by the thousand (phantom images): a flush costs ~5 ms per file on a virtual disk."""
    path = Path(path)
    tmp = temporary_sibling(path, suffix)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        maybe_fail(fault or f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_with(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], *, fault: str | None = None
) -> None:
    """`write(file)` into a temporary sibling opened for binary writing, then rename it over `path`."""
    with atomic_path(path, fault=fault) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fault: str | None = None) -> None:
    atomic_write_with(path, lambda f: f.write(data), fault=fault)


def atomic_write_text(path: str | os.PathLike, text: str, *, fault: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fault=fault)


@contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `dest`; when the block ends without error it replaces `dest`
    (only with `overwrite` if `dest` exists), otherwise it is removed."""
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if dest.exists():
            old = temporary_sibling(dest, ".old")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def stale_temporaries(
    root: str | os.PathLike, pattern: str = "*", *, older_than_s: float | None = None, now: float | None = None
) -> list[Path]:
    """Temporaries under `root` matching the glob `pattern` (relative folders allowed, e.g. `*/*/*`):
    leftovers of killed writers. Where other processes may be writing (a shared cache) pass
    `older_than_s`, an age that no live write reaches; None takes every one (a locked workdir)."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(Path(root).glob(pattern)):
        if not is_temporary(path):
            continue
        try:
            if older_than_s is None or now - path.lstat().st_mtime > older_than_s:
                found.append(path)
        except OSError:  # removed meanwhile
            continue
    return found


def remove(paths: list[Path]) -> None:
    """Remove files and folders (temporaries); ones already gone are skipped."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
