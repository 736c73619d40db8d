"""Manifest validation: every row checked before anything trains.

Checks: the CSV's structure (columns, unique case ids, quality values on the configured scale, the
`split` column), the known label columns' domains (PI-RADS 1-5, ISUP 0-5, Gleason scores, YES/NO
csPCa; always, task or not), labels valid for the task, and every image: exists, readable NIfTI, 3-D, finite,
not all zero, sane voxel spacing, and high-b/ADC on T2w's grid or resamplable onto it. Image checks
are the same functions preprocessing runs (`pfq.data.preprocess`), so a manifest that validates
preprocesses, and training (which goes through the cache) refuses the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pfq.data.manifest import Manifest, Problem, domain_problems, label_problems, parse_manifest
from pfq.data.preprocess import CaseError, grid_problems, read_case


@dataclass
class Report:
    manifest: Manifest | None
    problems: list[Problem]
    labels: np.ndarray | None = None  # class per case (-1 where invalid); None without a task

    @property
    def ok(self) -> bool:
        return not self.problems


def split_problems(manifest: Manifest) -> list[Problem]:
    """A `split` column, where present, must say train or test on every row."""
    if not any(c.split for c in manifest.cases):
        return []
    return [
        Problem(f"split must be 'train' or 'test', got {c.split!r}", line=c.line, case_id=c.case_id, column="split")
        for c in manifest.cases
        if c.split not in ("train", "test")
    ]


def case_problems(case) -> list[Problem]:
    """Every image problem of one case (all three files, then their grids)."""
    try:
        volumes = read_case(case)
    except CaseError as e:
        return e.problems
    return grid_problems(case, volumes)


def image_problems(cases: Sequence, *, workers: int = 0, progress: bool = False) -> list[Problem]:
    bar = tqdm(total=len(cases), desc="checking images", unit="case", disable=not progress, leave=False)
    problems: list[Problem] = []
    if workers > 0 and len(cases) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for found in pool.map(case_problems, cases, chunksize=1):
                problems += found
                bar.update()
    else:
        for case in cases:
            problems += case_problems(case)
            bar.update()
    bar.close()
    return problems


def validate_manifest(
    path: Path | str,
    *,
    task=None,
    quality_scale: str = "piqual_v1",
    quality_threshold: float | None = None,
    require_quality: bool = True,
    check_images: bool = True,
    workers: int = 0,
    progress: bool = False,
) -> Report:
    """Every problem of a manifest, in line order. `task` is a `pfq.tasks.Task` (or None: the known
    label columns' domains are still checked)."""
    manifest, problems = parse_manifest(
        path,
        quality_threshold=quality_threshold,
        quality_scale=quality_scale,
        require_quality=require_quality,
        label_column=task.column if task is not None else None,
    )
    if manifest is None:
        return Report(None, problems)
    labels, found = None, []
    if task is not None:
        labels, found = label_problems(manifest, task)
        problems += found
    problems += domain_problems(manifest, skip=tuple((p.line, p.column) for p in found))
    problems += split_problems(manifest)
    if check_images:
        checkable = [c for c in manifest.cases if len(c.images) == 3]  # rows without paths are reported above
        problems += image_problems(checkable, workers=workers, progress=progress)
    problems.sort(key=lambda p: p.line if p.line is not None else 0)
    return Report(manifest, problems, labels)
