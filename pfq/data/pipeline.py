"""Grain pipelines: lane-stacked training batches and plain evaluation batches.

Training: element `s` of the dataset is step `s` of every lane at once, `{"image": (L, B, D, H, W, C),
"label": (L, B)}`. Lane `l` reads its own finetuning set in its own seeded order (a fresh permutation
per epoch, or inverse-frequency sampling) with its own augmentation draws, all derived from
(lane seed, stream position), so a lane's data does not depend on which other lanes share the step,
and the iterator state is just the next step index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grain
import numpy as np


class VolumeSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...  # (D, H, W, C) float32


class InMemoryVolumes:
    """A stacked array of preprocessed volumes."""

    def __init__(self, volumes: np.ndarray):
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.volumes[index]


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    flip_w: bool = True  # left-right flip: the W axis is the patient's left-right
    intensity_scale: float = 0.1  # per-channel gain 1 + U(-a, a)
    intensity_shift: float = 0.1  # per-channel offset U(-a, a) (inputs are z-normalised)
    noise_std: float = 0.03


def augment(volume: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    if not config.enabled:
        return volume
    out = volume
    if config.flip_w and rng.random() < 0.5:
        out = out[:, :, ::-1]
    channels = out.shape[-1]
    gain = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale, channels)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift, channels)
    out = out * gain.astype(np.float32) + shift.astype(np.float32)
    if config.noise_std > 0:
        out = out + rng.normal(0.0, config.noise_std, out.shape).astype(np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


def stream_case(lane_set: np.ndarray, labels: np.ndarray, seed: int, position: int, balance: bool) -> int:
    """Pool index of a lane's `position`-th training example."""
    n = len(lane_set)
    if balance:
        set_labels = labels[lane_set]
        freq = np.bincount(set_labels)[set_labels].astype(np.float64)
        weights = (1.0 / freq) / (1.0 / freq).sum()
        return int(lane_set[np.random.default_rng([seed, position, 0xBA1]).choice(n, p=weights)])
    epoch, offset = divmod(position, n)
    order = np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)
    return int(lane_set[order[offset]])


class LaneStep(grain.transforms.Map):
    """step index -> lane-stacked batch."""

    def __init__(self, source: VolumeSource, labels: np.ndarray, lane_sets: Sequence[np.ndarray],
                 lane_seeds: Sequence[int], batch_size: int, augment_config: AugmentConfig,
                 balance: bool = False):
        self.source, self.labels = source, np.asarray(labels)
        self.lane_sets = [np.asarray(s) for s in lane_sets]
        self.lane_seeds = list(lane_seeds)
        self.batch_size, self.augment_config, self.balance = batch_size, augment_config, balance

    def map(self, step: int) -> dict[str, np.ndarray]:
        images, labels = [], []
        for lane_set, seed in zip(self.lane_sets, self.lane_seeds, strict=True):
            for b in range(self.batch_size):
                position = int(step) * self.batch_size + b
                case = stream_case(lane_set, self.labels, seed, position, self.balance)
                rng = np.random.default_rng([seed, position, 0xA06])
                images.append(augment(self.source[case], rng, self.augment_config))
                labels.append(self.labels[case])
        lanes = len(self.lane_sets)
        image = np.stack(images).reshape((lanes, self.batch_size) + images[0].shape)
        return {"image": image, "label": np.asarray(labels, np.int32).reshape(lanes, self.batch_size)}


def train_dataset(source: VolumeSource, labels: np.ndarray, lane_sets: Sequence[np.ndarray],
                  lane_seeds: Sequence[int], *, batch_size: int, num_steps: int,
                  augment_config: AugmentConfig, balance: bool = False) -> grain.MapDataset:
    return grain.MapDataset.range(num_steps).map(
        LaneStep(source, labels, lane_sets, lane_seeds, batch_size, augment_config, balance))


def to_iterator(dataset: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 2, workers: int = 0):
    """A checkpointable iterator; `workers > 0` moves loading into worker processes."""
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


class EvalBatch(grain.transforms.Map):
    """batch index -> {"image": (B, ...), "index": (B,)}; the last batch is padded by repetition."""

    def __init__(self, source: VolumeSource, indices: np.ndarray, batch_size: int):
        self.source, self.indices, self.batch_size = source, np.asarray(indices), batch_size

    def map(self, batch: int) -> dict[str, np.ndarray]:
        chunk = self.indices[batch * self.batch_size:(batch + 1) * self.batch_size]
        valid = len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - valid)])
        return {"image": np.stack([self.source[int(i)] for i in chunk]), "index": chunk,
                "valid": np.arange(self.batch_size) < valid}


def eval_dataset(source: VolumeSource, indices: np.ndarray, batch_size: int) -> grain.MapDataset:
    n_batches = -(-len(indices) // batch_size)
    return grain.MapDataset.range(n_batches).map(EvalBatch(source, indices, batch_size))
