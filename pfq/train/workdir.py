"""The run folder: what a finished, an interrupted and a foreign run look like.

`config.json` records the run's config; a restart with a config that would change the results is
refused rather than mixed with the old checkpoints. `run.json` with `"complete": true` marks a
finished sweep, which is not retrained or overwritten unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Fields that change how a run executes, never its numbers.
OPERATIONAL_FIELDS = {("log_every",), ("eval_batch_size",), ("data", "workers"), ("checkpoint", "every_steps"),
                      ("checkpoint", "keep")}
OUTPUTS = ("results.csv", "predictions.csv", "run.json", "report.md", "config.json")


class WorkdirError(RuntimeError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _strip(config: dict, prefix: tuple = ()) -> dict:
    return {k: _strip(v, prefix + (k,)) if isinstance(v, dict) else v
            for k, v in config.items() if prefix + (k,) not in OPERATIONAL_FIELDS}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def prepare(workdir: Path, config_json: str, overwrite: bool) -> bool:
    """Create or check the workdir; True when it already holds this run's finished results."""
    workdir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        for name in OUTPUTS:
            (workdir / name).unlink(missing_ok=True)
    new = json.loads(config_json)
    recorded = workdir / "config.json"
    if recorded.exists():
        changed = differences(_strip(json.loads(recorded.read_text())), _strip(new))
        if changed:
            raise WorkdirError(f"{workdir} holds a run with a different config ({'; '.join(changed[:8])}); "
                               f"use another --workdir, or --overwrite to discard it")
    atomic_write_text(recorded, json.dumps(new, indent=2, sort_keys=True))
    status = workdir / "run.json"
    if status.exists() and (workdir / "results.csv").exists():
        return bool(json.loads(status.read_text()).get("complete"))
    return False
