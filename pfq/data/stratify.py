"""Quality-stratified sets: exactly round(r*N) HQ cases, the rest LQ, with the same class balance at
every ratio, so that the HQ share is the only thing that varies between sets.

Counts, for a set of size N at HQ ratio r:
- class totals: N apportioned over the class weights (the pool's class frequencies by default) by a
  sequential largest-deficit rule, which never takes a case away from a class as N grows; they do
  not depend on r;
- HQ total: round-half-up(r*N), computed in decimal so that 0.145 * 100 gives 15 as a person expects;
- HQ per class: the HQ total apportioned over the class totals (largest remainder), so every class
  holds HQ cases in the share r (to within one case) and quality is never confounded with label.
Cases of a (label, quality) stratum are taken as a prefix of one seeded order, so two sets drawn with
the same seed share every case their counts allow.

Nesting. The set of size N1 is a subset of the set of size N2 (same pool, ratio, seed) exactly when
every (label, quality) count at N1 is at most the count at N2 (`is_nested`). Class totals always
nest, and at r = 0 or 1 the sets always nest. For 0 < r < 1 the HQ split within a class can drop by
one case between sizes (for example r = 0.5, N = 10 -> 11 moves an HQ slot between the two classes);
no rule can avoid this in general: keeping class totals identical across ratios and nesting every
stratum at every N forces which class each added HQ case falls in, and that confounds quality with
label (at r = 0.5 with two classes, one class would get every HQ case). Common ladders (N doubling
with even per-class counts) nest.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import numpy as np


class StratificationError(ValueError):
    """The pool cannot supply the request; names the stratum that is short."""


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total`, proportional to `weights`, built one unit at a time: each unit goes
    to the entry furthest below its quota (ties: lower index). Growing `total` never lowers an entry
    (no Alabama paradox, unlike largest remainder)."""
    weights = np.asarray(weights, dtype=np.float64)
    out = np.zeros(len(weights), dtype=np.int64)
    if total <= 0 or weights.sum() <= 0:
        return out
    share = weights / weights.sum()
    for n in range(1, int(total) + 1):
        out[int(np.argmax(share * n - out))] += 1
    return out


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total`, proportional to `weights`, ties broken by lower index."""
    weights = np.asarray(weights, dtype=np.float64)
    if total == 0 or weights.sum() == 0:
        return np.zeros(len(weights), dtype=np.int64)
    raw = total * weights / weights.sum()
    base = np.floor(raw + 1e-9).astype(np.int64)
    order = np.argsort(-(raw - base), kind="stable")
    base[order[: total - base.sum()]] += 1
    return base


def hq_count(size: int, hq_ratio: float) -> int:
    """round-half-up(hq_ratio * size), with the ratio read as the decimal it prints as."""
    if not 0.0 <= float(hq_ratio) <= 1.0:
        raise StratificationError(f"HQ ratio {hq_ratio} is outside [0, 1]")
    return int((Decimal(repr(float(hq_ratio))) * int(size)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def stratum_counts(size: int, hq_ratio: float, class_weights: np.ndarray) -> np.ndarray:
    """(num_classes, 2) counts of [HQ, LQ] cases per class for a set of `size` at `hq_ratio`."""
    per_class = apportion(size, class_weights)
    hq = largest_remainder(hq_count(size, hq_ratio), per_class.astype(np.float64))
    return np.stack([hq, per_class - hq], axis=1)


def is_nested(small: int, large: int, hq_ratio: float, class_weights: np.ndarray) -> bool:
    """Whether the set of size `small` is a subset of the one of size `large` (same pool, ratio, seed)."""
    return bool(
        np.all(stratum_counts(small, hq_ratio, class_weights) <= stratum_counts(large, hq_ratio, class_weights))
    )


@dataclass(frozen=True)
class StratifiedSet:
    """A drawn set and what it realised."""

    indices: np.ndarray  # sorted pool indices
    counts: np.ndarray  # (num_classes, 2) [HQ, LQ] cases per class
    hq_ratio: float  # the ratio asked for

    @property
    def size(self) -> int:
        return int(self.counts.sum())

    @property
    def n_hq(self) -> int:
        return int(self.counts[:, 0].sum())

    @property
    def n_lq(self) -> int:
        return int(self.counts[:, 1].sum())

    @property
    def class_counts(self) -> np.ndarray:
        return self.counts.sum(axis=1)


def stratified_set(
    is_hq: np.ndarray,
    labels: np.ndarray,
    size: int,
    hq_ratio: float,
    seed: int,
    *,
    num_classes: int | None = None,
    class_weights: np.ndarray | None = None,
    salt: int = 0,
) -> StratifiedSet:
    """A set of `size` pool cases with exactly round-half-up(hq_ratio*size) HQ cases.

    `class_weights` default to the pool's class frequencies. `salt` separates independent draws
    that share a seed (e.g. finetuning sets vs test subsets).
    """
    is_hq = np.asarray(is_hq, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    if size < 0:
        raise StratificationError(f"set size {size} is negative")
    num_classes = int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)
    if class_weights is None:
        class_weights = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = stratum_counts(size, hq_ratio, np.asarray(class_weights))
    shortages, chosen = [], []
    for label in range(num_classes):
        for column, quality in enumerate(("hq", "lq")):
            want = int(counts[label, column])
            members = np.flatnonzero((labels == label) & (is_hq == (quality == "hq")))
            if want > len(members):
                shortages.append(
                    f"label {label} / {quality}: need {want}, pool has {len(members)} (short by {want - len(members)})"
                )
                continue
            order = np.random.default_rng([seed, salt, label, column]).permutation(len(members))
            chosen.append(members[order[:want]])
    if shortages:
        raise StratificationError(
            f"pool of {len(labels)} cases cannot supply {size} cases at HQ ratio {hq_ratio}: " + "; ".join(shortages)
        )
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return StratifiedSet(indices=indices, counts=counts, hq_ratio=float(hq_ratio))


def stratified_indices(*args, **kwargs) -> np.ndarray:
    """Sorted pool indices of `stratified_set(...)`, which takes the same arguments."""
    return stratified_set(*args, **kwargs).indices


def split_pool(is_hq: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) pool indices, stratified by (label, quality)."""
    train, test = [], []
    rng = np.random.default_rng([seed, 0x5E1])
    for label in np.unique(labels):
        for quality in (True, False):
            members = np.flatnonzero((labels == label) & (is_hq == quality))
            members = members[rng.permutation(len(members))]
            n_test = int(round(test_fraction * len(members)))
            test.append(members[:n_test])
            train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
