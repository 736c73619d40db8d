"""One way to open an input file that a user (or an attacker) named: regular files only, bounded reads.

Every image, checkpoint, model-directory file and array that pfq reads from a path a manifest, a
config or a command line gave goes through `open_regular`. It refuses, with a message naming the
file and the reason, anything that could hang or exhaust the process before the format's own
checks run:

- a path with a NUL byte (no file can have one; it would be cut short by the OS);
- a symlink loop, a missing file, a directory;
- anything that is not a regular file once symlinks are followed: `/dev/zero` and other devices
  (endless data), FIFOs and sockets (a read blocks forever). The file is opened non-blocking and
  checked with `fstat` on the open descriptor, so the check and the read see the same file.

`read_bounded` reads at most a given number of bytes in chunks, so memory grows with the bytes
that really arrive, never with a size that a header merely claims.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import BinaryIO

READ_CHUNK = 1 << 20


class UnsafeFileError(ValueError):
    """A path that cannot be read safely; `reason` says why, `path` names it."""

    def __init__(self, path: str | os.PathLike | bytes, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{_show(path)}: {reason}")


def _show(path) -> str:
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text.replace("\x00", "\\x00")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_path(path: str | os.PathLike) -> None:
    """Refuse a path with a NUL byte (before the OS silently truncates or rejects it)."""
    raw = os.fspath(path)
    if ("\x00" if isinstance(raw, str) else b"\x00") in raw:
        raise UnsafeFileError(path, "the path contains a NUL byte")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for binary reading if (after following symlinks) it is a regular file; raises
    `UnsafeFileError` naming the file otherwise. Never blocks on a FIFO."""
    check_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        reason = {
            errno.ENOENT: "file not found",
            errno.ELOOP: "a symlink loop (too many levels of symbolic links)",
            errno.EACCES: "permission denied",
            errno.ENOTDIR: "a parent of this path is not a folder",
            errno.ENAMETOOLONG: "the path is too long",
        }.get(e.errno, f"cannot open it ({e.strerror})")
        raise UnsafeFileError(path, reason) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFileError(path, f"{_kind(mode)}, not a regular file")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def regular_file_size(path: str | os.PathLike) -> int:
    """Size of a regular file (after `open_regular`'s checks)."""
    with open_regular(path) as f:
        return os.fstat(f.fileno()).st_size


def read_bounded(stream: BinaryIO, limit: int, chunk: int = READ_CHUNK) -> bytes:
    """Up to `limit` bytes from `stream`, read in chunks (memory follows the data, not `limit`)."""
    parts, got = [], 0
    while got < limit:
        block = stream.read(min(chunk, limit - got))
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """A regular file's bytes, refusing one larger than `limit` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise UnsafeFileError(path, f"{size} bytes, over the {limit}-byte limit for this kind of file")
        return read_bounded(f, limit)


def is_regular_readable(path: str | os.PathLike) -> bool:
    try:
        open_regular(path).close()
    except UnsafeFileError:
        return False
    return True
