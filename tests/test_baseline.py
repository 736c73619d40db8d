"""The reference baseline (intensity-percentile logistic regression) and the report's headline contrasts."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps
from sklearn.metrics import roc_auc_score
from test_report import synthetic_rows

from pfq import baseline, stats
from pfq.report.tables import headline_contrasts, report_markdown


def test_percentile_features_are_each_channels_percentiles():
    rng = np.random.default_rng(0)
    volumes = rng.normal(size=(3, 4, 5, 6, 3)).astype(np.float32)
    feats = baseline.percentile_features(volumes)
    assert feats.shape == (3, len(baseline.PERCENTILES) * 3)
    for n in range(3):
        for c in range(3):
            want = np.percentile(volumes[n, ..., c], baseline.PERCENTILES)
            np.testing.assert_allclose(feats[n].reshape(len(baseline.PERCENTILES), 3)[:, c], want, rtol=1e-6)


def _cases(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Volumes whose class is a dark spot in channel 2 (as a lesion in ADC), at random places."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    volumes = rng.normal(size=(n, 4, 8, 8, 3)).astype(np.float32)
    for i in np.flatnonzero(labels):
        d, h, w = rng.integers(0, 3), rng.integers(0, 6), rng.integers(0, 6)
        volumes[i, d : d + 2, h : h + 3, w : w + 3, 2] -= 4.0
    return volumes, labels


def test_the_regression_finds_a_signal_in_the_low_percentiles_and_is_deterministic():
    volumes, labels = _cases(200, 0)
    feats = dict(enumerate(baseline.percentile_features(volumes)))
    train, test = np.arange(100), np.arange(100, 200)
    probs = baseline.fit_predict(feats, labels, train, test, 2)
    assert probs.shape == (100, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert roc_auc_score(labels[test], probs[:, 1]) > 0.95
    np.testing.assert_array_equal(probs, baseline.fit_predict(feats, labels, train, test, 2))
    # Labels shuffled: nothing to learn, the AUC falls to chance.
    shuffled = np.random.default_rng(1).permutation(labels)
    noise = baseline.fit_predict(feats, shuffled, train, test, 2)
    assert abs(roc_auc_score(shuffled[test], noise[:, 1]) - 0.5) < 0.15


def test_a_one_class_training_set_predicts_that_class():
    volumes, _ = _cases(10, 0)
    feats = dict(enumerate(baseline.percentile_features(volumes)))
    labels = np.full(10, 2)
    probs = baseline.fit_predict(feats, labels, np.arange(5), np.arange(5, 10), 4)
    np.testing.assert_array_equal(probs, np.tile([0, 0, 1, 0], (5, 1)))


def test_a_case_with_non_finite_intensities_is_named_and_the_lane_is_not_fitted():
    volumes, _ = _cases(6, 0)
    volumes[4, 0, 0, 0, 1] = np.nan
    volumes[5, ..., 0] = np.inf  # (one stray infinite voxel would not move a percentile)
    feats = dict(enumerate(baseline.percentile_features(volumes)))
    ids = [f"case{i}" for i in range(6)]
    assert baseline.fit_status(feats, np.arange(3), np.array([3]), ids) == "ok"
    status = baseline.fit_status(feats, np.arange(4), np.array([4, 5]), ids)
    assert status == "not fitted: non-finite intensities in 2 case(s): case4, case5"


def test_the_confidence_interval_is_students_t_and_resolved_means_it_excludes_zero():
    d = np.array([0.05, 0.07, 0.02, 0.09])
    r = stats.paired_test(d, np.zeros(4))
    low, high = sps.t.interval(0.95, 3, loc=d.mean(), scale=sps.sem(d))
    np.testing.assert_allclose(r.ci95, (low, high), rtol=1e-9)
    assert r.resolved
    assert not stats.paired_test([0.05, -0.04, 0.02], [0, 0, 0]).resolved
    assert all(math.isnan(v) for v in stats.paired_test([0.1], [0.0]).ci95)


def _with_baseline(rows: list[dict]) -> list[dict]:
    ref = [dict(r, init=stats.BASELINE_INIT, auc=r["auc"] - 0.1) for r in rows if r["init"] == "scratch"]
    return rows + ref


def test_the_baseline_is_never_taken_for_a_pretrained_init():
    rows = _with_baseline(synthetic_rows(inits=("scratch",)))
    assert stats.pretrained_inits(rows) == []
    assert stats.pooled_comparisons(rows, "auc") == [] and stats.paired_comparisons(rows, "auc") == []
    (vs_baseline,) = stats.pooled_comparisons(
        [r for r in rows if r["train_size"] == 16], "auc", reference=stats.BASELINE_INIT
    )
    assert vs_baseline["init"] == "scratch"
    np.testing.assert_allclose(vs_baseline["result"].mean_diff, 0.1, atol=1e-9)


def test_quality_contrast_is_hq_minus_lq_finetuned_on_the_hq_test():
    rows = synthetic_rows(inits=("scratch",), sizes=(16,))
    (item,) = stats.quality_contrasts(rows, "auc")
    assert (item["high"], item["low"], item["test_hq_ratio"]) == (1.0, 0.0, 1.0)
    by = {(r["finetune_hq_ratio"], r["test_hq_ratio"], r["seed"]): r["auc"] for r in rows}
    want = np.mean([by[(1.0, 1.0, s)] - by[(0.0, 1.0, s)] for s in (0, 1, 2)])
    np.testing.assert_allclose(item["result"].mean_diff, want, atol=1e-12)
    assert item["result"].resolved  # synthetic_rows: mismatch costs 0.15 AUC against 0.02 noise


def test_the_report_lists_each_headline_contrast_with_its_interval():
    rows = _with_baseline(synthetic_rows())
    contrasts = {(c["contrast"], c["init"], c["train_size"]) for c in headline_contrasts(rows, "auc")}
    assert ("finetune HQ 1 − 0, on test HQ 1", "scratch", 16) in contrasts
    assert ("finetune HQ 1 − 0, on test HQ 1", "profound_conv_tiny", 64) in contrasts
    assert ("profound_conv_tiny − scratch, pooled over the grid", "profound_conv_tiny", 16) in contrasts
    assert ("scratch − percentile-lr, pooled over the grid", "scratch", 16) in contrasts
    assert not any(c[1] == stats.BASELINE_INIT for c in contrasts)
    md = report_markdown(rows, "auc", {})
    section = md.split("## Headline contrasts")[1].split("## Overview")[0]
    assert "95% CI" in section and "| yes |" in section
