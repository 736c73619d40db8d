"""Metric functions against hand-computed cases; the vectorised bootstrap path against scikit-learn;
the bootstrap CIs' definition and calibration; the trainer's results rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from pfq import evaluate as ev
from pfq.results import ID_COLUMNS

# ----------------------------------------------------------------------------------------------
# Binary, by hand.
# ----------------------------------------------------------------------------------------------
# 5 negatives 0.1 0.2 0.3 0.55 0.7; 5 positives 0.25 0.6 0.65 0.8 0.9. From the top, the ROC points
# (tp, fp) are (1,0) (2,0) (2,1) (3,1) (4,1) (4,2) (4,3) (5,3) (5,4) (5,5).
Y10 = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
P10 = np.array([0.1, 0.2, 0.3, 0.55, 0.7, 0.25, 0.6, 0.65, 0.8, 0.9])
HAND10 = {
    "auc": 20 / 25,  # negatives below each positive: 2 + 4 + 4 + 5 + 5
    "accuracy": 7 / 10,  # > 0.5: tp 4 (0.6 0.65 0.8 0.9), fp 2 (0.55 0.7), tn 3, fn 1
    "f1": 8 / 11,  # 2tp / (2tp + fp + fn)
    "sensitivity": 4 / 5,
    "specificity": 3 / 5,
    "spec_at_sens80": 4 / 5,  # tp >= 4 first at (4,1)
    "spec_at_sens90": 2 / 5,  # tp = 5 first at (5,3)
    "sens_at_spec80": 4 / 5,  # fp <= 1: up to (4,1)
    "sens_at_spec90": 2 / 5,  # fp = 0: up to (2,0)
}


def test_binary_metrics_hand_computed():
    got = ev.binary_metrics(Y10, P10)
    assert list(got) == ev.metric_names(2)
    assert got == pytest.approx(HAND10)


def test_binary_metrics_ties_and_threshold():
    # A positive and a negative tied at exactly 0.5. AUC: positive 0.5 scores 1/2 (tie) + 1 (vs 0.2),
    # positive 0.8 scores 2 -> 3.5 / 4. Called positive only when p > 0.5, so the tied pair is negative:
    # tp 1, fn 1, tn 2, fp 0. The ROC points are (0,0) (1,0) (2,1) (2,2): the tie is one point, so
    # specificity 1 reaches sensitivity 1/2 only, and sensitivity 1 costs specificity 1/2.
    got = ev.binary_metrics(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.8]))
    assert got == pytest.approx(
        {
            "auc": 0.875,
            "accuracy": 0.75,
            "f1": 2 / 3,
            "sensitivity": 0.5,
            "specificity": 1.0,
            "spec_at_sens80": 0.5,
            "sens_at_spec80": 0.5,
            "spec_at_sens90": 0.5,
            "sens_at_spec90": 0.5,
        }
    )


def test_binary_metrics_one_class_is_nan_not_an_error():
    got = ev.binary_metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]))
    assert math.isnan(got["auc"]) and math.isnan(got["specificity"]) and math.isnan(got["spec_at_sens80"])
    assert got["sensitivity"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------
# Multi-class, by hand.
# ----------------------------------------------------------------------------------------------
Y4 = np.array([0, 1, 2, 2])
P4 = np.array(
    [
        [0.7, 0.2, 0.1],  # predicted 0 (right)
        [0.1, 0.3, 0.6],  # predicted 2 (wrong)
        [0.2, 0.2, 0.6],  # predicted 2 (right)
        [0.1, 0.5, 0.4],
    ]
)  # predicted 1 (wrong)


def test_multiclass_metrics_hand_computed():
    got = ev.multiclass_metrics(Y4, P4)
    assert list(got) == ev.metric_names(3)
    assert got["accuracy"] == pytest.approx(0.5)
    # F1 per class: 0 -> 1; 1 -> 0 (tp 0); 2 -> 2*1 / (2 + 1 + 1) = 0.5; macro 0.5.
    assert got["macro_f1"] == pytest.approx(0.5)
    # QWK, weights (i-j)^2. Observed disagreement: (1->2) + (2->1) = 2. Expected: true and predicted
    # counts are both [1, 1, 2]: sum_ij (i-j)^2 t_i p_j / n = (1 + 8 + 1 + 2 + 8 + 2) / 4 = 5.5.
    assert got["kappa_quadratic"] == pytest.approx(1 - 2 / 5.5)
    # Unweighted kappa (upstream's "qwk"): observed agreement 2/4; chance agreement (1 + 1 + 4) / 16.
    assert got["kappa_unweighted"] == pytest.approx((0.5 - 6 / 16) / (1 - 6 / 16))
    # One-vs-rest AUC: class 0 -> 1; class 1: 0.3 beats 0.2, 0.2, loses to 0.5 -> 2/3; class 2:
    # 0.6 beats 0.1, ties 0.6 (1.5); 0.4 beats 0.1 (1) -> 2.5/4. Macro: (1 + 2/3 + 0.625) / 3.
    assert got["auc"] == pytest.approx((1 + 2 / 3 + 0.625) / 3)


def test_multiclass_auc_equals_sklearn_ovr_and_skips_absent_classes():
    rng = np.random.default_rng(1)
    y = np.arange(60) % 6
    probs = rng.dirichlet(np.ones(6), 60)
    got = ev.multiclass_metrics(y, probs)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert got["kappa_quadratic"] == pytest.approx(skm.cohen_kappa_score(y, probs.argmax(1), weights="quadratic"))
    assert got["kappa_unweighted"] == pytest.approx(skm.cohen_kappa_score(y, probs.argmax(1)))
    # Class 5 neither present nor predicted: left out of macro F1 (as upstream) and of the AUC.
    y2 = np.array([0, 0, 1, 1])
    p2 = np.array(
        [[0.6, 0.3, 0.1, 0, 0, 0], [0.3, 0.6, 0.1, 0, 0, 0], [0.2, 0.7, 0.1, 0, 0, 0], [0.1, 0.8, 0.1, 0, 0, 0]]
    )
    got2 = ev.multiclass_metrics(y2, p2)
    assert got2["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # class 0: 2/(2+0+1); class 1: 4/(4+1+0)
    assert got2["auc"] == pytest.approx(1.0)


def _upstream_style_kappa(y: np.ndarray, pred: np.ndarray) -> float:
    """Upstream's reported "qwk": weights 1 off the diagonal, over the rating range seen in y and pred."""
    low, high = min(y.min(), pred.min()), max(y.max(), pred.max())
    k = high - low + 1
    observed = np.zeros((k, k))
    np.add.at(observed, (y - low, pred - low), 1.0 / len(y))
    expected = np.outer(np.bincount(y - low, minlength=k), np.bincount(pred - low, minlength=k)) / len(y) ** 2
    off = 1.0 - np.eye(k)
    return 1.0 - (off * observed).sum() / (off * expected).sum()


def test_unweighted_kappa_is_upstreams_qwk_and_differs_from_quadratic():
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(20):
        y = rng.integers(0, 4, 40)
        probs = rng.dirichlet(np.ones(4), 40)
        got = ev.multiclass_metrics(y, probs)
        assert got["kappa_unweighted"] == pytest.approx(_upstream_style_kappa(y, probs.argmax(1)), abs=1e-12)
        gaps.append(abs(got["kappa_quadratic"] - got["kappa_unweighted"]))
    assert max(gaps) > 0.05  # the two kappas are not interchangeable on random predictions


def test_pirads_4class_binarised_hand_computed():
    y = np.array([0, 1, 2, 3])  # PI-RADS 2, 3, 4, 5
    probs = np.array([[0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.3, 0.1], [0.1, 0.5, 0.2, 0.2], [0.1, 0.1, 0.3, 0.5]])
    got = ev.score(y, probs, "pirads_4class")
    assert list(got) == ev.metric_names(4, "pirads_4class")
    # >= 3: labels 0 1 1 1, P(>=3) 0.4 0.7 0.9 0.9 -> separable, all called right.
    assert got["auc_ge3"] == pytest.approx(1.0) and got["f1_ge3"] == pytest.approx(1.0)
    # >= 4: labels 0 0 1 1, P(>=4) 0.2 0.4 0.4 0.8: 0.4 beats 0.2, ties 0.4 (1.5), 0.8 beats both -> 3.5/4;
    # only 0.8 > 0.5 is called: tp 1, fn 1 -> F1 2/3.
    assert got["auc_ge4"] == pytest.approx(0.875) and got["f1_ge4"] == pytest.approx(2 / 3)
    assert "auc_ge3" not in ev.score(y, probs, "isup_like")


# ----------------------------------------------------------------------------------------------
# The weighted (bootstrap) path equals scikit-learn on the explicitly resampled set.
# ----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, ""), (4, "pirads_4class"), (6, "isup")]), st.booleans())
def test_weighted_score_equals_point_metrics_on_resample(seed, task, coarse):
    num_classes, name = task
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 25))
    y = rng.integers(0, num_classes, m)
    probs = rng.dirichlet(np.ones(num_classes), m)
    if coarse:  # many ties, and probabilities at exactly 0.5
        probs = np.round(probs * 4) / 4 + 1e-12
        probs /= probs.sum(1, keepdims=True)
    draws = rng.integers(0, m, size=(4, int(rng.integers(2, 30))))
    weights = np.stack([np.bincount(d, minlength=m) for d in draws])
    batch = ev.weighted_score(y, probs, weights, name)
    for b, d in enumerate(draws):
        expected = ev.score(y[d], probs[d], name)
        for key, value in expected.items():
            if math.isnan(value):
                assert math.isnan(batch[key][b]), key
            else:
                assert batch[key][b] == pytest.approx(value, abs=1e-9), key


def test_weighted_binary_hand_case_with_identity_weights():
    got = ev.weighted_score(Y10, np.stack([1 - P10, P10], 1), np.ones((1, 10)))
    assert {k: float(v[0]) for k, v in got.items()} == pytest.approx(HAND10)


# ----------------------------------------------------------------------------------------------
# Bootstrap.
# ----------------------------------------------------------------------------------------------
def _pool(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(int)
    is_hq = rng.random(n) < 0.5
    return labels, is_hq, rng


def test_bootstrap_weights_keep_strata_and_sharing():
    labels, is_hq, rng = _pool(60)
    d1, d2 = np.sort(rng.choice(60, 20, replace=False)), np.sort(rng.choice(60, 20, replace=False))
    members, (w1, w2, w3) = ev.bootstrap_weights(labels, is_hq, [d1, d2, d1], 50, seed=[3, 1])
    assert set(members) == set(d1) | set(d2)
    assert (w1.sum(1) == 20).all()
    for w, d in ((w1, d1), (w2, d2)):  # every resample keeps the draw's label x quality counts
        for lab in (0, 1):
            for q in (True, False):
                in_stratum = (labels[members] == lab) & (is_hq[members] == q)
                assert (w[:, in_stratum].sum(1) == ((labels[d] == lab) & (is_hq[d] == q)).sum()).all()
    np.testing.assert_array_equal(w1, w3)  # the same cases land in the same places in every draw
    again = ev.bootstrap_weights(labels, is_hq, [d1, d2, d1], 50, seed=[3, 1])[1][0]
    np.testing.assert_array_equal(w1, again)
    assert not np.array_equal(w1, ev.bootstrap_weights(labels, is_hq, [d1], 50, seed=[4, 1])[1][0])


def _delong_se(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return math.sqrt(psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg))


def test_bootstrap_ci_width_matches_delong():
    # One draw: the CI is a stratified bootstrap of that test set; its width matches the analytic
    # (DeLong) standard error. Several overlapping draws: the average covers more cases, so its CI is
    # narrower, but never narrower than for the whole pool (the draws cannot know more than the pool).
    labels, is_hq, rng = _pool(240, seed=5)
    p_pos = 1 / (1 + np.exp(-(1.2 * labels + rng.normal(0, 1, 240))))
    probs = np.stack([1 - p_pos, p_pos], 1)[None]
    ratio_draws = [ev.test_subsets(is_hq, labels, [0.5], 120, 6, seed=0, num_classes=2)[(0.5, d)] for d in range(6)]
    one = ev.score_subsets(labels, is_hq, probs, ratio_draws[:1], resamples=2000, seed=0)[0]
    six = ev.score_subsets(labels, is_hq, probs, ratio_draws, resamples=2000, seed=0)[0]
    width_one = one["auc_ci_high"] - one["auc_ci_low"]
    width_six = six["auc_ci_high"] - six["auc_ci_low"]
    d0 = ratio_draws[0]
    assert width_one == pytest.approx(2 * 1.96 * _delong_se(labels[d0], p_pos[d0]), rel=0.2)
    assert 2 * 1.96 * _delong_se(labels, p_pos) * 0.85 < width_six < width_one
    for row in (one, six):
        assert row["auc_ci_low"] < row["auc"] < row["auc_ci_high"]


def test_score_subsets_point_lanes_and_validity():
    labels, is_hq, rng = _pool(90, seed=2)
    probs = rng.dirichlet(np.ones(2), (3, 90))
    probs[2, 5] = np.nan
    draws = [ev.test_subsets(is_hq, labels, [0.3], 30, 3, seed=9, num_classes=2)[(0.3, d)] for d in range(3)]
    rows = ev.score_subsets(
        labels, is_hq, probs, draws, resamples=100, seed=[1, 2], valid=np.array([True, False, True])
    )
    names = ev.metric_names(2)
    assert list(rows[0]) == [f"{n}{s}" for n in names for s in ("", "_ci_low", "_ci_high")]
    # The point value is the mean over draws of the scikit-learn metrics.
    assert rows[0]["auc"] == pytest.approx(np.mean([skm.roc_auc_score(labels[d], probs[0, d, 1]) for d in draws]))
    assert all(math.isnan(v) for v in rows[1].values())  # diverged lane
    assert all(math.isnan(v) for v in rows[2].values())  # non-finite predictions
    # A lane's numbers do not depend on which lanes are scored beside it.
    alone = ev.score_subsets(labels, is_hq, probs[:1], draws, resamples=100, seed=[1, 2])[0]
    assert alone == rows[0]
    # Without resamples: points only, CI columns NaN.
    bare = ev.score_subsets(labels, is_hq, probs[:1], draws, resamples=0)[0]
    assert bare["auc"] == rows[0]["auc"] and math.isnan(bare["auc_ci_low"])


def test_perfect_classifier_has_degenerate_ci():
    labels, is_hq, _ = _pool(30)
    probs = np.stack([1.0 - labels, labels], 1)[None].astype(float) * 0.8 + 0.1
    (row,) = ev.score_subsets(labels, is_hq, probs, [np.arange(30)], resamples=200, seed=0)
    assert row["auc"] == row["auc_ci_low"] == row["auc_ci_high"] == 1.0


# ----------------------------------------------------------------------------------------------
# The trainer's rows.
# ----------------------------------------------------------------------------------------------
def test_lane_rows_columns_and_status():
    from pfq.train.lanes import Lane
    from pfq.train.trainer import lane_status

    labels, is_hq, rng = _pool(80, seed=4)
    sweep = SimpleNamespace(test_hq_ratios=(0.0, 1.0), test_size=0, test_draws=2, test_seed=0, bootstrap_resamples=50)
    lanes = [Lane(0, 0.5, "scratch", 16, 0), Lane(1, 0.5, "scratch", 16, 1)]
    hq, lq = np.flatnonzero(is_hq)[:8], np.flatnonzero(~is_hq)[:8]
    lane_set = np.sort(np.concatenate([hq, lq]))  # 8 HQ of 16: the realised count the row reports
    status = lane_status(SimpleNamespace(diverged_step=np.array([-1, 7]), diverged_reason=np.array([0, 0])))
    data = SimpleNamespace(
        labels=np.concatenate([labels, [0] * 10]), is_hq=np.concatenate([is_hq, [True] * 10]), test_pool=np.arange(80)
    )
    plan = ev.scoring_plan(data.is_hq[data.test_pool], data.labels[data.test_pool], sweep, 2)
    assert plan.size == ev.max_test_size(is_hq, labels, (0.0, 1.0), 2) and len(plan.subsets) == 4
    probs = rng.dirichlet(np.ones(2), (2, 80)).astype(np.float32)
    rows = ev.lane_rows(lanes, [lane_set, lane_set], status, probs, data, plan, "pirads_ge4")
    assert len(rows) == 4
    # results.csv's identifying columns, in the documented order, first; the status last
    assert list(rows[0])[:10] == list(ID_COLUMNS[:-1]) and ID_COLUMNS[-1] == "status"
    assert list(rows[0])[:3] == ["task", "init", "finetune_hq_ratio"]
    assert list(rows[0])[-1] == "status"
    assert {"auc", "auc_ci_low", "auc_ci_high", "sens_at_spec90_ci_high"} <= set(rows[0])
    assert rows[0]["status"] == "ok" and rows[0]["finetune_hq_count"] == 8
    assert rows[0]["auc_ci_low"] <= rows[0]["auc"] <= rows[0]["auc_ci_high"]
    assert rows[2]["status"] == "diverged at step 7: non-finite loss" and math.isnan(rows[2]["auc"])
    assert [r["test_hq_ratio"] for r in rows] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("n, batch_size", [(7, 3), (6, 3), (2, 5), (0, 4)])
def test_predict_runs_fixed_size_batches_in_order(n, batch_size):
    """One prediction path: every batch has `batch_size` cases (zero-padded at the end), outputs come
    back in the order asked for, along the batch axis the forward function names."""
    volumes = np.arange(10, dtype=np.float32)[:, None, None, None, None] * np.ones((10, 2, 2, 2, 1), np.float32)
    order = np.arange(10)[::-1][:n]
    seen = []

    def forward(x):  # (lanes=2, batch, classes=1): lane l returns value * (l + 1)
        seen.append(x.shape[0])
        values = x.reshape(x.shape[0], -1)[:, 0]
        return np.stack([values, 2 * values])[:, :, None]

    out = ev.predict(forward, volumes, order, batch_size, batch_axis=1)
    assert set(seen) <= {batch_size}
    if n == 0:
        assert out.shape == (0, 0)
        return
    assert out.shape == (2, n, 1)
    np.testing.assert_array_equal(out[0, :, 0], order.astype(np.float32))
    np.testing.assert_array_equal(out[1, :, 0], 2 * order.astype(np.float32))
