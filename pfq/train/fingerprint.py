"""The data a run trains on, fingerprinted, so that a resume cannot mix two datasets in one result.

`config.json` pins the config, not the data: the manifest it names can be edited between a kill and
the rerun, or a relative path can resolve to other files when the rerun starts elsewhere. The
fingerprint (`WORKDIR/data.json`) records, per case: the resolved path and content sha256 of each
image (the preprocessing cache already keeps these hashes, keyed by path, size, mtime, ctime and
inode, so a rerun re-hashes only changed files), the task label, the quality grade and whether the
case is in the finetuning or the test pool; plus the preprocessing settings. A resume whose data
differ in any of these is refused, naming the cases and fields that changed. A path that changed
with the same content is not a difference (the results would be the same).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pfq.data.cache import VolumeCache, default_cache_root
from pfq.data.preprocess import PreprocessConfig
from pfq.io import atomic_write_text
from pfq.train.workdir import WorkdirError

FINGERPRINT_FILE = "data.json"
FORMAT = 1
SHOWN = 12  # differences listed in the error


def data_fingerprint(data, data_config) -> dict:
    """The fingerprint of a `StudyData` loaded with the run config's `data` section."""
    preprocess = PreprocessConfig.from_config(data_config)
    cache = VolumeCache(data_config.get("cache_dir") or default_cache_root(), preprocess)
    test = set(np.asarray(data.test_pool).tolist())
    cases = {}
    for i, case in enumerate(data.manifest.cases):
        cases[case.case_id] = {
            "line": case.line,
            "files": {
                role: {"path": str(path), "sha256": cache.content_hash(path)}
                for role, path in sorted(case.images.items())
            },
            "label": int(data.labels[i]),
            "quality": case.quality,
            "pool": "test" if i in test else "train",
        }
    return {
        "format": FORMAT,
        "manifest": str(Path(data.manifest.path).resolve()),
        "preprocess": preprocess.key(),
        "cases": cases,
    }


def differences(old: dict, new: dict) -> list[str]:
    """What changed from `old` to `new`, one line per case and field."""
    out = []
    if old.get("preprocess") != new.get("preprocess"):
        out.append(f"preprocessing {old.get('preprocess')} -> {new.get('preprocess')}")
    before, after = old.get("cases", {}), new.get("cases", {})
    removed, added = [c for c in before if c not in after], [c for c in after if c not in before]
    if removed:
        out.append(f"{len(removed)} case(s) no longer in the manifest: {', '.join(map(repr, removed[:5]))}")
    if added:
        out.append(f"{len(added)} case(s) new in the manifest: {', '.join(map(repr, added[:5]))}")
    for case_id, was in before.items():
        now = after.get(case_id)
        if now is None:
            continue
        where = f"case {case_id!r} (line {now.get('line')})"
        for field in ("label", "quality", "pool"):
            if was.get(field) != now.get(field):
                out.append(f"{where}: {field} {was.get(field)!r} -> {now.get(field)!r}")
        for role in sorted(set(was.get("files", {})) | set(now.get("files", {}))):
            a, b = was.get("files", {}).get(role, {}), now.get("files", {}).get(role, {})
            if a.get("sha256") != b.get("sha256"):
                moved = f" ({a.get('path')} -> {b.get('path')})" if a.get("path") != b.get("path") else ""
                out.append(f"{where}: column {role!r}: the image content changed{moved}")
    return out


def check(workdir: Path, fingerprint: dict) -> None:
    """Refuse to resume in `workdir` on data other than the data its run started on."""
    workdir = Path(workdir)
    recorded = workdir / FINGERPRINT_FILE
    if not (workdir / "config.json").exists() or not recorded.exists():
        return  # a fresh workdir, or one from before fingerprints: nothing to compare with
    try:
        old = json.loads(recorded.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{recorded} is unreadable ({e}); use another --workdir, or --overwrite to discard the run"
        ) from None
    changed = differences(old, fingerprint)
    if changed:
        more = f"; and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        raise WorkdirError(
            f"{workdir} holds a run on other data than this manifest's "
            f"({fingerprint['manifest']}): {'; '.join(changed[:SHOWN])}{more}. Resuming would mix "
            "two datasets in one result: restore the data, or use another --workdir, or "
            "--overwrite to start over"
        )


def record(workdir: Path, fingerprint: dict) -> None:
    atomic_write_text(Path(workdir) / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1, sort_keys=True))
