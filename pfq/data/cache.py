"""A preprocessing cache: each case is decoded and preprocessed once, then read as a memory-mapped
`.npy` by every later run, so a sweep never re-decodes NIfTI.

Layout under the cache root:
  volumes/<kk>/<key>.npy    (D, H, W, 3) float32, key = sha256(preprocessing config + the three
                            files' content hashes): a changed file or config is a new entry
  hashes/<kk>/<stat>.txt    content sha256 of a file, keyed by (path, size, mtime, ctime, inode):
                            the fast path that spares re-hashing unchanged files

Every write goes to a temporary file in the same folder and is renamed into place, so a killed run
or concurrent runs leave complete entries or none. An entry is written only after the case passed
every check in `pfq.data.preprocess`, so a cached case is a validated case.

An entry's mtime is its last use: `ensure` and `CachedVolumes` reads (every 10 min) refresh it, so `prune`
(behind `python -m pfq.data cache --prune`) removes the least recently used entries first, and
never those used within `keep_recent_hours`, which protects the entries a running sweep reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pfq import io as pfq_io
from pfq.data.manifest import IMAGE_COLUMNS, CaseRecord, Problem
from pfq.data.preprocess import CaseError, PreprocessConfig, load_case
from pfq.safe_open import UnsafeFileError, open_regular

HASH_CHUNK = 1 << 22


def default_cache_root() -> Path:
    """`$PFQ_CACHE/volumes`, else `~/.cache/pfq/volumes`."""
    return Path(os.environ.get("PFQ_CACHE", Path.home() / ".cache" / "pfq")) / "volumes"


def _write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pfq_io.atomic_write_with(path, write, fault="cache_write")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:  # never a FIFO or /dev/zero, which would block or never end
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class VolumeCache:
    """Preprocessed cases under `root`, for one `PreprocessConfig`."""

    def __init__(self, root: Path | str, config: PreprocessConfig):
        self.root, self.config = Path(root), config
        self._config_json = json.dumps(config.key(), sort_keys=True)

    def content_hash(self, path: Path) -> str:
        """sha256 of a file's bytes, remembered per (path, size, mtime, ctime, inode)."""
        st = os.stat(path)
        stat_key = hashlib.sha256(
            f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}".encode()
        ).hexdigest()
        record = self.root / "hashes" / stat_key[:2] / f"{stat_key}.txt"
        try:
            text = record.read_text().strip()
            if len(text) == 64:
                return text
        except OSError:
            pass
        digest = file_sha256(path)
        _write(record, lambda f: f.write(digest.encode()))
        return digest

    def key(self, case: CaseRecord) -> str:
        files = {role: self.content_hash(case.images[role]) for role in IMAGE_COLUMNS}
        text = json.dumps({"config": self._config_json, "files": files}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def entry(self, key: str) -> Path:
        return self.root / "volumes" / key[:2] / f"{key}.npy"

    def _usable(self, path: Path) -> bool:
        """An entry that opens as the expected array (anything else is rebuilt)."""
        try:
            array = open_volume(path)
        except (OSError, ValueError):
            return False
        return array.dtype == np.float32 and array.shape == tuple(self.config.input_size) + (len(IMAGE_COLUMNS),)

    def lookup(self, case: CaseRecord) -> Path | None:
        """The case's entry if it is cached, else None (also None when a file is missing)."""
        try:
            path = self.entry(self.key(case))
        except (OSError, KeyError, UnsafeFileError):
            return None
        return path if path.exists() and self._usable(path) else None

    def ensure(self, case: CaseRecord) -> Path:
        """The case's entry, preprocessing and writing it if needed. Raises `CaseError`."""
        try:
            key = self.key(case)
        except (OSError, KeyError, UnsafeFileError):
            key = None  # a file is missing or unreadable: load_case names it
        if key is not None:
            path = self.entry(key)
            if path.exists() and self._usable(path):
                _mark_used(path)
                return path
        array = load_case(case, self.config)
        if key is None:  # the files became readable while loading: hash them now
            key = self.key(case)
            path = self.entry(key)
        _write(path, lambda f: np.save(f, array, allow_pickle=False))
        return path

    def prepare(
        self, cases: Sequence[CaseRecord], *, workers: int = 0, progress: bool = True, desc: str = "preprocessing"
    ) -> tuple[list[Path | None], list[Problem]]:
        """Ensure every case is cached: (entry per case, None where it failed; every problem)."""
        paths: list[Path | None] = [None] * len(cases)
        problems: list[Problem] = []
        bar = tqdm(total=len(cases), desc=desc, unit="case", disable=not progress, leave=False, dynamic_ncols=True)
        if workers > 0 and len(cases) > 1:
            # spawn: safe in a process that already runs JAX threads (fork is not).
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                results = pool.map(_ensure_one, [(self.root, self.config, c) for c in cases], chunksize=1)
                for i, (path, case_problems) in enumerate(results):
                    paths[i] = path
                    problems += case_problems
                    bar.update()
        else:
            for i, case in enumerate(cases):
                paths[i], case_problems = _ensure_one((self.root, self.config, case))
                problems += case_problems
                bar.update()
        bar.close()
        return paths, problems


def _mark_used(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves its entries
        pass


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes on disk
    last_used: float  # mtime, seconds since the epoch
    shape: tuple[int, ...] | None  # None if the header does not read as a .npy


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    try:
        return open_volume(path).shape
    except (OSError, ValueError):
        return None


def cache_entries(root: Path | str) -> list[CacheEntry]:
    """Every preprocessed volume under a cache root."""
    entries = []
    for path in (Path(root) / "volumes").glob("*/*.npy"):
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            continue
        entries.append(CacheEntry(path, st.st_size, st.st_mtime, _npy_shape(path)))
    return entries


def stale_temporaries(root: Path | str, *, older_than_s: float = 3600.0, now: float | None = None) -> list[Path]:
    """Temporary files that killed writers left behind (a live writer's are younger than an hour)."""
    return pfq_io.stale_temporaries(root, "*/*/*", older_than_s=older_than_s, now=now)


def select_for_pruning(
    entries: Sequence[CacheEntry],
    *,
    now: float,
    older_than_days: float | None = None,
    max_bytes: int | None = None,
    keep_recent_hours: float = 24.0,
) -> list[CacheEntry]:
    """Least recently used first: every entry unused for `older_than_days`, then more until the
    rest fits in `max_bytes`; entries used within `keep_recent_hours` are never selected."""
    protected_after = now - keep_recent_hours * 3600.0
    candidates = [e for e in sorted(entries, key=lambda e: (e.last_used, str(e.path))) if e.last_used < protected_after]
    chosen = [e for e in candidates if older_than_days is not None and e.last_used < now - older_than_days * 86400.0]
    if max_bytes is not None:
        remaining = sum(e.size for e in entries) - sum(e.size for e in chosen)
        for e in candidates[len(chosen) :]:
            if remaining <= max_bytes:
                break
            chosen.append(e)
            remaining -= e.size
    return chosen


# CPython 3.11's AST constructor keeps its recursion depth in shared state, so `np.load`'s header
# parse (`ast.literal_eval`) can fail with "SystemError: AST constructor recursion depth mismatch"
# when Grain's reader threads open volumes concurrently (seen in a default run on a loaded host).
# Opening is cheap (the header and an mmap); reading the voxels stays concurrent.
_OPEN_LOCK = threading.Lock()


def open_volume(path: Path | str) -> np.ndarray:
    """Memory-maps one cached `.npy`, with the header parse serialised across threads."""
    with _OPEN_LOCK:
        return np.load(path, mmap_mode="r")


def _ensure_one(args: tuple[Path, PreprocessConfig, CaseRecord]) -> tuple[Path | None, list[Problem]]:
    root, config, case = args
    try:
        return VolumeCache(root, config).ensure(case), []
    except CaseError as e:
        return None, e.problems


class CachedVolumes:
    """A `VolumeSource` over cache entries: each access memory-maps one `.npy`, so datasets larger
    than RAM work and worker processes receive only paths when the source is pickled."""

    TOUCH_EVERY_S = 600.0  # last-use marks: far finer than prune's hours, and off the per-step path

    def __init__(self, paths: Sequence[Path | str]):
        self.paths = [str(p) for p in paths]
        self._touched: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.paths[index]
        now = time.monotonic()
        if now - self._touched.get(index, -self.TOUCH_EVERY_S) >= self.TOUCH_EVERY_S:
            _mark_used(Path(path))  # so that `prune` keeps what a long sweep still reads
            self._touched[index] = now
        return open_volume(path)
