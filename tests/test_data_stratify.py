"""Stratified sets as properties over pools, ratios and sizes (hypothesis)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pfq.data.stratify import (
    StratificationError,
    apportion,
    hq_count,
    is_nested,
    stratified_set,
    stratum_counts,
)

RATIOS = st.sampled_from([0.0, 0.1, 0.125, 0.25, 1 / 3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0])


@st.composite
def pools(draw):
    """A pool with 2-4 classes and an HQ flag per case; sizes chosen so that requests can fit."""
    classes = draw(st.integers(2, 4))
    per = draw(st.lists(st.integers(4, 30), min_size=classes, max_size=classes))
    labels = np.repeat(np.arange(classes), per)
    is_hq = np.asarray(draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels))))
    order = np.random.default_rng(draw(st.integers(0, 99))).permutation(len(labels))
    return labels[order], is_hq[order]


def round_half_up(r: float, n: int) -> int:
    x = Fraction(repr(r)) * n
    return int(x + Fraction(1, 2)) if x >= 0 else 0


@given(st.integers(0, 500), st.sampled_from([0.0, 0.05, 0.145, 0.25, 0.35, 0.5, 2 / 3, 0.875, 1.0]))
def test_hq_count_is_round_half_up_of_the_decimal(n, r):
    assert hq_count(n, r) == round_half_up(r, n)


def test_hq_count_examples():
    assert [hq_count(10, 0.25), hq_count(10, 0.35), hq_count(100, 0.145), hq_count(3, 0.5)] == [3, 4, 15, 2]
    with pytest.raises(StratificationError, match="outside"):
        hq_count(10, 1.5)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(0, 300))
def test_apportion_is_within_quota_and_house_monotone(weights, total):
    w = np.asarray(weights, float)
    assume(w.sum() > 0)
    a, b = apportion(total, w), apportion(total + 1, w)
    assert a.sum() == total and b.sum() == total + 1 and np.all(b >= a)
    assert np.all(np.abs(a - total * w / w.sum()) < 1)


@settings(max_examples=60, deadline=None)
@given(pools(), st.integers(1, 40), RATIOS, st.integers(0, 1000))
def test_sets_are_exact_balanced_and_deterministic(pool, size, r, seed):
    labels, is_hq = pool
    try:
        s = stratified_set(is_hq, labels, size, r, seed)
    except StratificationError as e:  # only when a stratum is genuinely short
        counts = stratum_counts(size, r, np.bincount(labels).astype(float))
        have = np.array(
            [[np.sum((labels == c) & is_hq), np.sum((labels == c) & ~is_hq)] for c in range(labels.max() + 1)]
        )
        assert np.any(counts > have) and "short by" in str(e)
        return
    chosen_labels, chosen_hq = labels[s.indices], is_hq[s.indices]
    assert len(s.indices) == size == len(np.unique(s.indices))
    assert chosen_hq.sum() == s.n_hq == round_half_up(r, size)  # exact HQ count
    assert s.n_lq == size - s.n_hq
    for c in range(labels.max() + 1):
        in_class = chosen_labels == c
        assert [np.sum(chosen_hq & in_class), np.sum(~chosen_hq & in_class)] == list(s.counts[c])
    # class totals do not depend on the ratio
    other = stratum_counts(size, 1.0 - r, np.bincount(labels).astype(float))
    np.testing.assert_array_equal(other.sum(1), s.class_counts)
    np.testing.assert_array_equal(stratified_set(is_hq, labels, size, r, seed).indices, s.indices)


@settings(max_examples=60, deadline=None)
@given(pools(), st.integers(1, 20), st.integers(1, 20), RATIOS, st.integers(0, 1000))
def test_nested_exactly_when_counts_allow(pool, small, extra, r, seed):
    labels, is_hq = pool
    large = small + extra
    weights = np.bincount(labels).astype(float)
    try:
        a = stratified_set(is_hq, labels, small, r, seed)
        b = stratified_set(is_hq, labels, large, r, seed)
    except StratificationError:
        return
    nested = set(a.indices) <= set(b.indices)
    assert nested == is_nested(small, large, r, weights)
    assert np.all(a.class_counts <= b.class_counts)  # class totals always nest
    if r in (0.0, 1.0):
        assert nested


def test_nesting_counterexample_is_documented():
    assert not is_nested(10, 11, 0.5, np.array([1.0, 1.0]))
    assert all(is_nested(n, 2 * n, r, np.array([1.0, 1.0])) for n in (10, 20, 40) for r in (0.25, 0.5, 0.75))


def test_short_stratum_is_named():
    labels = np.array([0] * 10 + [1] * 10)
    is_hq = np.array([True] * 2 + [False] * 8 + [True] * 5 + [False] * 5)
    with pytest.raises(StratificationError, match=r"label 0 / hq: need 4, pool has 2 \(short by 2\)"):
        stratified_set(is_hq, labels, 16, 0.5, seed=0)
