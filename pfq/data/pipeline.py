"""Grain pipelines: lane-stacked training batches and plain evaluation batches.

Training: element `s` of the dataset is step `s` of every lane at once, `{"image": (L, B, D, H, W, C),
"label": (L, B)}`. Lane `l` reads its own finetuning set in its own seeded order (a fresh permutation
per epoch, or inverse-frequency sampling) with its own augmentation draws, all derived from
(lane seed, stream position), so a lane's data does not depend on which other lanes share the step,
worker processes return what the main process would, and the iterator state is just the next step.

Options: exact per-batch HQ/LQ composition (`exact_quality`), inverse-frequency class balancing
(`balance`), and per-host loading (`box`: the (lanes, slots) block of the global batch whose shards
this host's devices hold; each host reads and augments only that block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grain
import numpy as np
from scipy import ndimage

from pfq.data.augment_upstream import augment_upstream

# Tags that keep the seeded random streams of different purposes apart.
_ORDER, _BALANCE, _AUGMENT, _SLOTS = 0xDA7A, 0xBA1, 0xA06, 0x5107
_QUALITY_TAG = {True: 0x4A, False: 0x1A}


class VolumeSource(Protocol):
    """Preprocessed cases by index: the cache's `CachedVolumes`, or simply a stacked (N, D, H, W, C) array."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...  # (D, H, W, C) float32


# ----------------------------------------------------------------------------------------------
# Augmentation: a random map drawn from the lane's (seed, position) stream.
# ----------------------------------------------------------------------------------------------
AUGMENT_PRESETS = ("pfq", "upstream")  # upstream: upstream ProFound's transforms (pfq.data.augment_upstream)


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    preset: str = "pfq"  # "upstream" ignores the fields below
    flip_w: bool = True  # left-right flip: the W axis is the patient's left-right
    intensity_scale: float = 0.1  # per-channel gain 1 + U(-a, a)
    intensity_shift: float = 0.1  # per-channel offset U(-a, a) (inputs are z-normalised)
    noise_std: float = 0.03
    rotate_deg: float = 0.0  # in-plane (H, W) rotation U(-a, a) degrees; 0: off
    zoom: float = 0.0  # in-plane zoom 1 + U(-a, a); 0: off

    def __post_init__(self) -> None:
        if self.preset not in AUGMENT_PRESETS:
            raise ValueError(f"augment_preset must be one of {AUGMENT_PRESETS}, got {self.preset!r}")

    @classmethod
    def from_config(cls, data) -> AugmentConfig:
        """From a run config's `data` section."""
        return cls(
            enabled=bool(data.augment),
            preset=str(data.augment_preset),
            rotate_deg=float(data.augment_rotate_deg),
            zoom=float(data.augment_zoom),
        )


def rotate_zoom(volume: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    """Rotate (D, H, W, C) about its in-plane centre by `degrees` and zoom by `scale`; trilinear,
    zero outside. Every channel moves identically."""
    theta = np.deg2rad(degrees)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / scale
    matrix = np.eye(4)
    matrix[1:3, 1:3] = rot  # output (h, w) -> input (h, w); D and C untouched
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0
    offset = centre - matrix @ centre
    return ndimage.affine_transform(
        volume, matrix, offset=offset, order=1, mode="constant", cval=0.0, prefilter=False, output=np.float32
    )


def augment(volume: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    if not config.enabled:
        return volume
    if config.preset == "upstream":
        return augment_upstream(volume, rng)
    channels = volume.shape[-1]
    flip = config.flip_w and rng.random() < 0.5
    gain = (1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale, channels)).astype(np.float32)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift, channels).astype(np.float32)
    geometric = config.rotate_deg > 0 or config.zoom > 0
    if geometric:  # drawn only when on, so the default stream is unchanged by the option
        degrees = rng.uniform(-config.rotate_deg, config.rotate_deg)
        scale = 1.0 + rng.uniform(-config.zoom, config.zoom)
    out = volume[:, :, ::-1] if flip else volume
    if geometric:
        out = rotate_zoom(np.ascontiguousarray(out, dtype=np.float32), degrees, scale)
    out = out * gain + shift
    if config.noise_std > 0:  # the dominant cost at real size (~0.1 s per 3x64x224x224 volume)
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(config.noise_std)
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Lane streams: which case fills each slot of each step, from (lane seed, position) alone.
# ----------------------------------------------------------------------------------------------
def _inverse_frequency(labels: np.ndarray) -> np.ndarray:
    freq = np.bincount(labels)[labels].astype(np.float64)
    return 1.0 / freq


def _draw(members: np.ndarray, weights: np.ndarray | None, key: Sequence[int], position: int) -> int:
    """The `position`-th draw of a stream over `members`: epoch permutations, or weighted sampling."""
    n = len(members)
    if weights is not None:
        return int(members[np.random.default_rng([*key, position, _BALANCE]).choice(n, p=weights / weights.sum())])
    epoch, offset = divmod(position, n)
    return int(members[np.random.default_rng([*key, epoch, _ORDER]).permutation(n)[offset]])


def stream_case(lane_set: np.ndarray, labels: np.ndarray, seed: int, position: int, balance: bool) -> int:
    """Pool index of a lane's `position`-th training example (no quality constraint)."""
    weights = _inverse_frequency(np.asarray(labels)[lane_set]) if balance else None
    return _draw(np.asarray(lane_set), weights, [seed], position)


def cumulative_hq(steps: int, batch_size: int, n_hq: int, n: int) -> int:
    """HQ slots in the first `steps` batches: round-half-up(steps * B * n_hq / n), in integers."""
    return (2 * steps * batch_size * n_hq + n) // (2 * n)


class LaneStream:
    """One lane's cases per step. With `exact_quality`, batch `s` holds HQ cases in the lane set's
    share to the nearest case, cumulatively exact (every batch has floor or ceil of B*share, and the
    first s batches together hold round(s*B*share)); HQ and LQ cases come from separate seeded
    streams and are shuffled into the batch's slots."""

    def __init__(
        self,
        lane_set: np.ndarray,
        labels: np.ndarray,
        seed: int,
        batch_size: int,
        *,
        balance: bool = False,
        is_hq: np.ndarray | None = None,
        exact_quality: bool = False,
    ):
        self.lane_set = np.asarray(lane_set, dtype=np.int64)
        if len(self.lane_set) == 0:
            raise ValueError(f"lane with seed {seed} has an empty finetuning set")
        self.seed, self.batch_size, self.exact = int(seed), int(batch_size), bool(exact_quality)
        labels = np.asarray(labels)
        weights = _inverse_frequency(labels[self.lane_set]) if balance else None
        self.weights = weights
        if self.exact:
            if is_hq is None:
                raise ValueError("exact_quality needs the per-case is_hq flags")
            hq = np.asarray(is_hq, dtype=bool)[self.lane_set]
            self.members = {q: self.lane_set[hq == q] for q in (True, False)}
            self.member_weights = {q: None if weights is None else weights[hq == q] for q in (True, False)}

    def batch(self, step: int) -> np.ndarray:
        """Pool indices of the lane's `batch_size` examples at `step`, in slot order."""
        start = int(step) * self.batch_size
        if not self.exact:
            return np.array(
                [_draw(self.lane_set, self.weights, [self.seed], start + b) for b in range(self.batch_size)],
                dtype=np.int64,
            )
        n_hq, n = len(self.members[True]), len(self.lane_set)
        before = cumulative_hq(step, self.batch_size, n_hq, n)
        k = cumulative_hq(step + 1, self.batch_size, n_hq, n) - before
        starts = {True: before, False: start - before}
        counts = {True: k, False: self.batch_size - k}
        cases = [
            _draw(self.members[q], self.member_weights[q], [self.seed, _QUALITY_TAG[q]], starts[q] + j)
            for q in (True, False)
            for j in range(counts[q])
        ]
        slots = np.random.default_rng([self.seed, int(step), _SLOTS]).permutation(self.batch_size)
        return np.asarray(cases, dtype=np.int64)[slots]


Box = tuple[slice, slice]  # (lanes, batch slots) of the global (L, B, ...) batch


class LaneStep(grain.transforms.Map):
    """step index -> lane-stacked batch: this host's block (`box`) of every lane's batch."""

    def __init__(
        self,
        source: VolumeSource,
        labels: np.ndarray,
        streams: Sequence[LaneStream],
        augment_config: AugmentConfig,
        box: Box | None = None,
    ):
        self.source, self.labels, self.streams = source, np.asarray(labels), list(streams)
        self.augment_config = augment_config
        lanes, slots = box or (slice(None), slice(None))
        self.lanes = range(*lanes.indices(len(self.streams)))
        self.slots = range(*slots.indices(self.streams[0].batch_size))
        if not self.lanes or not self.slots or self.lanes.step != 1 or self.slots.step != 1:
            raise ValueError(
                f"box {box} selects no contiguous block of {len(self.streams)} lanes x "
                f"{self.streams[0].batch_size} slots"
            )

    def map(self, step: int) -> dict[str, np.ndarray]:
        images, labels = [], []
        for lane in self.lanes:
            stream = self.streams[lane]
            cases = stream.batch(int(step))
            for b in self.slots:
                case = int(cases[b])
                rng = np.random.default_rng([stream.seed, int(step) * stream.batch_size + b, _AUGMENT])
                images.append(augment(self.source[case], rng, self.augment_config))
                labels.append(self.labels[case])
        shape = (len(self.lanes), len(self.slots))
        image = np.stack(images).reshape(shape + images[0].shape)
        return {"image": image, "label": np.asarray(labels, np.int32).reshape(shape)}


def train_dataset(
    source: VolumeSource,
    labels: np.ndarray,
    lane_sets: Sequence[np.ndarray],
    lane_seeds: Sequence[int],
    *,
    batch_size: int,
    num_steps: int,
    augment_config: AugmentConfig,
    balance: bool = False,
    is_hq: np.ndarray | None = None,
    exact_quality: bool = False,
    box: Box | None = None,
) -> grain.MapDataset:
    """Lane-stacked training batches, (L, batch_size, ...), or this host's `box` of them."""
    streams = [
        LaneStream(s, labels, seed, batch_size, balance=balance, is_hq=is_hq, exact_quality=exact_quality)
        for s, seed in zip(lane_sets, lane_seeds, strict=True)
    ]
    return grain.MapDataset.range(num_steps).map(LaneStep(source, labels, streams, augment_config, box))


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app nobody has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def to_iterator(
    dataset: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 2, workers: int = 0, worker_buffer: int = 1
):
    """A checkpointable iterator (`get_state`/`set_state`); `workers > 0` moves loading into worker
    processes, which return exactly what the main process would."""
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer))
    return iter(it)


class EvalBatch(grain.transforms.Map):
    """batch index -> {"image": (B, ...), "count": cases in it}; the last batch is zero-padded."""

    def __init__(self, source: VolumeSource, indices: np.ndarray, batch_size: int):
        self.source, self.indices, self.batch_size = source, np.asarray(indices), batch_size

    def map(self, batch: int) -> dict[str, np.ndarray]:
        chunk = self.indices[batch * self.batch_size : (batch + 1) * self.batch_size]
        image = np.stack([np.asarray(self.source[int(i)], dtype=np.float32) for i in chunk])
        if len(chunk) < self.batch_size:
            image = np.concatenate([image, np.zeros((self.batch_size - len(chunk), *image.shape[1:]), np.float32)])
        return {"image": image, "count": np.int64(len(chunk))}


def eval_dataset(source: VolumeSource, indices: np.ndarray, batch_size: int) -> grain.MapDataset:
    """source[indices] in order, as fixed-size batches (`EvalBatch`)."""
    n_batches = -(-len(indices) // batch_size)
    return grain.MapDataset.range(n_batches).map(EvalBatch(source, indices, batch_size))
