"""Quality-stratified sets: exactly round(r*N) HQ cases, the rest LQ, with the same class balance at
every ratio, so that the HQ share is the only thing that varies between sets.

Class counts are fixed by N and the pool's class proportions (never by r); each class's HQ share is
the largest-remainder rounding of r times its count, constrained so the HQ total is exact. Within a
(label, quality) stratum, cases are taken in a seeded order, so sets of growing size are nested and
sets at different ratios share as many cases as they can.
"""

from __future__ import annotations

import numpy as np


class StratificationError(ValueError):
    """The pool cannot supply the request; names the stratum that is short."""


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
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
    if not 0.0 <= hq_ratio <= 1.0:
        raise StratificationError(f"HQ ratio {hq_ratio} is outside [0, 1]")
    return int(np.floor(hq_ratio * size + 0.5))  # round half up, unlike Python's banker's round


def stratum_counts(size: int, hq_ratio: float, class_weights: np.ndarray) -> np.ndarray:
    """(num_classes, 2) counts of [HQ, LQ] cases per class for a set of `size` at `hq_ratio`."""
    per_class = _largest_remainder(size, class_weights)
    n_hq = hq_count(size, hq_ratio)
    hq = _largest_remainder(n_hq, per_class.astype(np.float64))
    return np.stack([hq, per_class - hq], axis=1)


def stratified_indices(is_hq: np.ndarray, labels: np.ndarray, size: int, hq_ratio: float, seed: int,
                       *, num_classes: int | None = None, class_weights: np.ndarray | None = None,
                       salt: int = 0) -> np.ndarray:
    """Pool indices of a set of `size` cases with exactly round(hq_ratio*size) HQ cases.

    `class_weights` default to the pool's class frequencies. `salt` separates independent draws
    that share a seed (e.g. finetuning sets vs test subsets). Returned indices are sorted.
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
                shortages.append(f"label {label} / {quality}: need {want}, pool has {len(members)} "
                                 f"(short by {want - len(members)})")
                continue
            order = np.random.default_rng([seed, salt, label, column]).permutation(len(members))
            chosen.append(members[order[:want]])
    if shortages:
        raise StratificationError(f"pool cannot supply {size} cases at HQ ratio {hq_ratio}: "
                                  + "; ".join(shortages))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


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
