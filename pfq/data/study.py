"""The study's data in one place: the manifest (user's, or the built-in phantoms), task labels,
quality flags, preprocessed volumes, and the fixed split into a finetuning pool and a test pool."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pfq.data.manifest import Manifest, ManifestError, Problem, read_manifest, task_labels
from pfq.data.pipeline import InMemoryVolumes, VolumeSource
from pfq.data.preprocess import PreprocessConfig, load_case
from pfq.data.stratify import split_pool
from pfq.tasks import Task


@dataclass
class StudyData:
    manifest: Manifest
    labels: np.ndarray  # class index per case
    is_hq: np.ndarray  # bool per case
    source: VolumeSource  # preprocessed (D, H, W, 3) volumes, indexed like the manifest
    train_pool: np.ndarray  # manifest indices available for finetuning sets
    test_pool: np.ndarray  # manifest indices every lane is evaluated on

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.manifest.cases]


def cache_root() -> Path:
    return Path(os.environ.get("PFQ_CACHE", Path.home() / ".cache" / "pfq"))


def phantom_manifest(phantoms, progress: bool = True) -> Path:
    """Generate (or reuse) the built-in phantom set described by config `phantoms`."""
    from pfq.data.phantoms import write_phantom_set

    params = {"cases": int(phantoms.cases), "seed": int(phantoms.seed), "shape": list(phantoms.shape),
              "spacing": list(phantoms.spacing), "hq_fraction": float(phantoms.hq_fraction)}
    if phantoms.get("dir"):
        out = Path(phantoms.dir)
    else:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        out = cache_root() / "phantoms" / digest
    return write_phantom_set(out, params["cases"], seed=params["seed"], shape=tuple(params["shape"]),
                             spacing=tuple(params["spacing"]), hq_fraction=params["hq_fraction"],
                             progress=progress)


def split_by_column(manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """Use the manifest's `split` column (train/test) when it has one."""
    splits = [c.split for c in manifest.cases]
    if not any(splits):
        return None
    problems = [Problem(f"split must be 'train' or 'test', got {c.split!r}", line=c.line, case_id=c.case_id,
                        column="split") for c in manifest.cases if c.split not in ("train", "test")]
    if problems:
        raise ManifestError(manifest.path, problems)
    splits_arr = np.array(splits)
    return np.flatnonzero(splits_arr == "train"), np.flatnonzero(splits_arr == "test")


def load_study_data(config, task: Task, progress: bool = True) -> StudyData:
    """`config` is the run config's `data` and `phantoms` sections' parent."""
    data = config.data
    path = Path(data.manifest) if data.manifest else phantom_manifest(config.phantoms, progress)
    manifest = read_manifest(path, quality_threshold=data.quality_threshold, label_column=task.column)
    labels = task_labels(manifest, task)
    is_hq = manifest.is_hq()
    pools = split_by_column(manifest) or split_pool(is_hq, labels, data.test_fraction, data.split_seed)
    preprocess = PreprocessConfig(input_size=tuple(data.input_size))
    volumes = np.stack([load_case(c, preprocess) for c in tqdm(
        manifest.cases, desc="loading volumes", disable=not progress, leave=False)])
    return StudyData(manifest, labels, is_hq, InMemoryVolumes(volumes), *pools)
