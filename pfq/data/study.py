"""The study's data in one place: the manifest (user's, or the built-in phantoms), task labels,
quality flags, preprocessed volumes, and the fixed split into a finetuning pool and a test pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfq.data.cache import CachedVolumes, VolumeCache, default_cache_root
from pfq.data.grade import Grading, grade
from pfq.data.iqm import manifest_iqms
from pfq.data.manifest import Manifest, ManifestError, Problem
from pfq.data.phantom_set import phantom_manifest
from pfq.data.pipeline import VolumeSource
from pfq.data.preprocess import PreprocessConfig
from pfq.data.stratify import split_pool
from pfq.data.validate import split_problems, validate_manifest
from pfq.tasks import Task


@dataclass
class StudyData:
    manifest: Manifest
    labels: np.ndarray  # class index per case
    is_hq: np.ndarray  # bool per case
    source: VolumeSource  # preprocessed (D, H, W, 3) volumes, indexed like the manifest
    train_pool: np.ndarray  # manifest indices available for finetuning sets
    test_pool: np.ndarray  # manifest indices every lane is evaluated on
    grading: Grading | None = None  # set when grades came from image quality (data.quality_from = "iqm")

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.manifest.cases]


def split_by_column(manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """Use the manifest's `split` column (train/test) when it has one."""
    splits = [c.split for c in manifest.cases]
    if not any(splits):
        return None
    problems = split_problems(manifest)
    if problems:
        raise ManifestError(manifest.path, problems)
    splits_arr = np.array(splits)
    train, test = np.flatnonzero(splits_arr == "train"), np.flatnonzero(splits_arr == "test")
    for pool, name, missing in ((train, "finetuning", "train"), (test, "test", "test")):
        if len(pool) == 0:
            only = "test" if missing == "train" else "train"
            raise ManifestError(
                manifest.path,
                [
                    Problem(
                        f"every row says {only!r}, so the {name} pool would be empty; "
                        f"mark some rows {missing!r} or drop the column",
                        column="split",
                    )
                ],
            )
    return train, test


def load_study_data(config, task: Task, progress: bool = True) -> StudyData:
    """The study's data from a run config (its `data` and `phantoms` sections).

    Checks the whole manifest first (structure, labels, split, and every image, via the cache) and
    raises `ManifestError` listing every problem rather than training on a bad manifest. Volumes are
    preprocessed once into the cache (`data.cache_dir`) and served memory-mapped from there.
    """
    data = config.data
    path = Path(data.manifest) if data.manifest else phantom_manifest(config.phantoms, progress)
    from_iqm = data.quality_from == "iqm"
    report = validate_manifest(
        path,
        task=task,
        quality_scale=data.quality_scale,
        quality_threshold=data.quality_threshold,
        check_images=False,
        require_quality=not from_iqm,
    )
    if report.manifest is None:
        raise ManifestError(path, report.problems)
    manifest, problems = report.manifest, list(report.problems)
    cache = VolumeCache(data.cache_dir or default_cache_root(), PreprocessConfig.from_config(data))
    cases = [c for c in manifest.cases if len(c.images) == 3]
    paths, image_problems = cache.prepare(
        cases, workers=int(data.prepare_workers), progress=progress, desc="preprocessing (cached)"
    )
    problems += image_problems
    if problems:
        problems.sort(key=lambda p: p.line if p.line is not None else 0)
        raise ManifestError(path, problems)
    labels, is_hq, grading = report.labels, manifest.is_hq(), None
    if from_iqm:
        root = data.cache_dir or default_cache_root()
        rows, iqm_problems = manifest_iqms(manifest.cases, root, workers=int(data.prepare_workers), progress=progress)
        if iqm_problems:
            raise ManifestError(path, iqm_problems)
        grading = grade(rows, [c.quality for c in manifest.cases])
        is_hq = np.array([q == "hq" for q in grading.quality], dtype=bool)
    pools = split_by_column(manifest) or split_pool(is_hq, labels, data.test_fraction, data.split_seed)
    return StudyData(manifest, labels, is_hq, CachedVolumes(paths), *pools, grading=grading)
