"""The run folder: what a finished, an interrupted and a foreign run look like.

`config.json` records the run's config; a restart with a config that would change the results is
refused rather than mixed with the old checkpoints. `run.json` with `"complete": true` marks a
finished sweep, which is not retrained or overwritten unless asked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pfq import io as pfq_io

# Fields that change how a run executes, never its numbers.
OPERATIONAL_FIELDS = {
    ("log_every",),
    ("eval_batch_size",),
    ("export_models",),
    ("data", "workers"),
    ("checkpoint", "every_steps"),
    ("checkpoint", "keep"),
    ("data", "cache_dir"),
    ("data", "prepare_workers"),
}
OUTPUTS = ("results.csv", "predictions.csv", "run.json", "report.md", "config.json", "data.json")
# What else a run writes, removed by --overwrite so that nothing of the previous run stays beside
# the new results: the report's figures (one set per metric and task) and exported models.
STALE_PATTERNS = ("heatmap_*.png", "label_efficiency_*.png", "mismatch_*.png")
STALE_FOLDERS = ("checkpoints", "models")
LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class WorkdirError(RuntimeError):
    pass


@contextmanager
def exclusive(workdir: Path) -> Iterator[None]:
    """Hold `WORKDIR/.lock` while a run writes there: a second run in the same workdir stops with
    `WorkdirError` naming the holder, instead of interleaving two runs' checkpoints and outputs.
    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a
    stale lock never blocks a resume. On a filesystem without locks it warns and goes on."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirError(
                f"{workdir} is in use by another run ({holder}); wait for it to end, or use another --workdir"
            ) from None
        except OSError as e:  # e.g. ENOLCK on a network mount without a lock manager
            log.warning("could not lock %s (%s); make sure no other run uses this workdir", workdir, e)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(workdir: Path) -> None:
    """Temporary files of output writes that a kill interrupted (the caller holds the workdir)."""
    pfq_io.remove([p for p in pfq_io.stale_temporaries(workdir) if p.is_file()])


def _strip(config: dict, prefix: tuple = ()) -> dict:
    return {
        k: _strip(v, prefix + (k,)) if isinstance(v, dict) else v
        for k, v in config.items()
        if prefix + (k,) not in OPERATIONAL_FIELDS
    }


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def inspect(workdir: Path, config_json: str, overwrite: bool) -> bool:
    """`prepare`'s checks without writing anything: raises `WorkdirError` for a foreign config, True
    when the workdir already holds this run's finished results (never with `overwrite`)."""
    workdir = Path(workdir)
    if overwrite or not (workdir / "config.json").exists():
        return False
    _check_recorded(workdir, json.loads(config_json))
    return _finished(workdir)


def _check_recorded(workdir: Path, new: dict) -> None:
    recorded = workdir / "config.json"
    try:
        old = json.loads(recorded.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{recorded} is unreadable ({e}); use another --workdir, or --overwrite to discard the run"
        ) from None
    changed = differences(_strip(old), _strip(new))
    if changed:
        raise WorkdirError(
            f"{workdir} holds a run with a different config ({'; '.join(changed[:8])}); "
            f"use another --workdir, or --overwrite to discard it"
        )


def _finished(workdir: Path) -> bool:
    status = workdir / "run.json"
    if not (status.exists() and (workdir / "results.csv").exists()):
        return False
    try:
        return bool(json.loads(status.read_text()).get("complete"))
    except ValueError:
        return False


def discard(workdir: Path) -> None:
    """Remove a previous run's checkpoints, outputs and figures (what `--overwrite` replaces)."""
    for name in STALE_FOLDERS:
        shutil.rmtree(workdir / name, ignore_errors=True)
    for name in OUTPUTS:
        (workdir / name).unlink(missing_ok=True)
    for pattern in STALE_PATTERNS:
        for path in workdir.glob(pattern):
            path.unlink(missing_ok=True)


def prepare(workdir: Path, config_json: str, overwrite: bool, write: bool = True) -> bool:
    """Create or check the workdir; True when it already holds this run's finished results.
    Only the writer process (`write`) changes files; the others just read."""
    workdir = Path(workdir)
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(workdir)
    if overwrite and write:
        discard(workdir)
    new = json.loads(config_json)
    recorded = workdir / "config.json"
    if recorded.exists():
        _check_recorded(workdir, new)
    if write:
        pfq_io.atomic_write_text(recorded, json.dumps(new, indent=2, sort_keys=True))
    return _finished(workdir)
