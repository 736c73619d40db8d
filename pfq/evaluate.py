"""Evaluation without waste: every lane predicts every test-pool case once; each test HQ ratio is then
a fixed-size, label-stratified subset of those predictions (several draws), scored with scikit-learn.

Prediction (`predict`) is the one path from volumes to model outputs, for the sweep's test pool and
for `pfq.predict`; `scoring_plan` fixes the test subsets once per sweep; `lane_rows` and
`prediction_rows` are the rows of results.csv and predictions.csv.

Point metrics come from scikit-learn (`score`). Bootstrap confidence intervals need the same metrics
on thousands of resampled test sets, so `batch_score` recomputes them with numpy, vectorised over
resamples; the tests check that the two agree.

Conventions (shared by both paths, as upstream ProFound): a case is called positive when its positive
probability is > 0.5 (the two-class argmax); the operating-point metrics take the best value on the
empirical ROC curve, e.g. `spec_at_sens80` = max specificity over thresholds with sensitivity >= 0.8.
Cohen's kappa comes twice, under names that say which: `kappa_unweighted` (what upstream's tables
call "qwk") and `kappa_quadratic` (quadratic weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm
from tqdm.auto import tqdm

from pfq.data.pipeline import VolumeSource, eval_dataset, to_iterator
from pfq.data.stratify import StratificationError, stratified_indices
from pfq.faults import maybe_fail

OPERATING_POINTS = (0.8, 0.9)
THRESHOLD = 0.5
BINARY_METRICS = ("auc", "accuracy", "f1", "sensitivity", "specificity") + tuple(
    f"{kind}{int(t * 100)}" for t in OPERATING_POINTS for kind in ("spec_at_sens", "sens_at_spec")
)
MULTICLASS_METRICS = ("auc", "accuracy", "kappa_unweighted", "kappa_quadratic", "macro_f1")
KAPPA_WEIGHTS = {"kappa_unweighted": None, "kappa_quadratic": "quadratic"}  # scikit-learn's `weights`
PIRADS_CUTS = ((1, "ge3"), (2, "ge4"))  # 4-class PI-RADS: class = PI-RADS - 2, so >=3 is class >= 1
NAN = float("nan")


def metric_names(num_classes: int, task_name: str = "") -> list[str]:
    """The metric keys `score` returns for a task, in column order."""
    if num_classes == 2:
        return list(BINARY_METRICS)
    names = list(MULTICLASS_METRICS)
    if task_name == "pirads_4class":
        names += [f"{m}_{suffix}" for _, suffix in PIRADS_CUTS for m in BINARY_METRICS]
    return names


# ----------------------------------------------------------------------------------------------
# Prediction: volumes -> model outputs, in fixed-size batches.
# ----------------------------------------------------------------------------------------------
def predict(
    forward: Callable[[np.ndarray], np.ndarray],
    source: VolumeSource,
    indices: Sequence[int],
    batch_size: int,
    *,
    batch_axis: int = 0,
    progress: bool = False,
    desc: str = "predicting",
) -> np.ndarray:
    """`forward` (a channels-last (B, D, H, W, C) batch -> host array whose axis `batch_axis` is B) on
    source[indices], in order. Every batch has `batch_size` cases, the last one zero-padded, so one
    compiled program serves all; padding never changes the other cases' outputs (in eval mode
    BatchNorm uses running statistics and GRN is per sample). Returns the outputs concatenated along
    `batch_axis`, or an empty (0, 0) array for no cases."""
    indices = np.asarray(indices, dtype=np.int64)
    outs = []
    with tqdm(total=len(indices), desc=desc, unit="case", disable=not progress, leave=False) as bar:
        for batch in to_iterator(eval_dataset(source, indices, batch_size)):
            n = int(batch["count"])
            out = np.asarray(forward(batch["image"]))
            outs.append(out[(slice(None),) * batch_axis + (slice(0, n),)])
            bar.update(n)
    return np.concatenate(outs, axis=batch_axis) if outs else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------------------------
# Point metrics (scikit-learn).
# ----------------------------------------------------------------------------------------------
def _operating_points(y: np.ndarray, p_pos: np.ndarray) -> dict[str, float]:
    fpr, tpr, _ = skm.roc_curve(y, p_pos, drop_intermediate=False)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    # Back to counts, so that e.g. 8/10 compares equal to 0.8 exactly (1 - 2/10 need not).
    sens = np.rint(tpr * pos) / pos
    spec = (neg - np.rint(fpr * neg)) / neg
    out = {}
    for t in OPERATING_POINTS:
        out[f"spec_at_sens{int(t * 100)}"] = float(spec[sens >= t].max())  # sens = 1 is always reachable
        out[f"sens_at_spec{int(t * 100)}"] = float(sens[spec >= t].max())  # spec = 1 is always reachable
    return out


def binary_metrics(y: np.ndarray, p_pos: np.ndarray) -> dict[str, float]:
    """y in {0, 1}; p_pos the positive-class probability."""
    y = np.asarray(y).astype(int)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    pred = (p_pos > THRESHOLD).astype(int)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    tp, tn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    out = {
        "auc": NAN,
        "accuracy": float((pred == y).mean()) if len(y) else NAN,
        "f1": float(skm.f1_score(y, pred, labels=[0, 1], zero_division=0)),
        "sensitivity": tp / pos if pos else NAN,
        "specificity": tn / neg if neg else NAN,
    }
    out.update({name: NAN for name in BINARY_METRICS[5:]})
    if pos and neg:
        out["auc"] = float(skm.roc_auc_score(y, p_pos))
        out.update(_operating_points(y, p_pos))
    return out


def multiclass_metrics(y: np.ndarray, probs: np.ndarray, task_name: str = "") -> dict[str, float]:
    """Accuracy, one-vs-rest macro AUC over the classes present in y, Cohen's kappa unweighted and
    quadratic-weighted, macro F1 over the classes present in y or the predictions (as scikit-learn's
    default, and upstream); for 4-class PI-RADS also the binary metrics of PI-RADS >= 3 and >= 4
    (summed class probabilities)."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    pred = probs.argmax(1)
    present = np.unique(y)
    out = {
        "auc": float(np.mean([skm.roc_auc_score(y == k, probs[:, k]) for k in present])) if len(present) > 1 else NAN,
        "accuracy": float((pred == y).mean()),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa of a constant rater: nan, said once in the CSV
        for name, weights in KAPPA_WEIGHTS.items():
            out[name] = float(skm.cohen_kappa_score(y, pred, weights=weights, labels=np.arange(num_classes)))
    out["macro_f1"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
    if task_name == "pirads_4class":
        for cut, suffix in PIRADS_CUTS:
            binary = binary_metrics((y >= cut).astype(int), probs[:, cut:].sum(1))
            out.update({f"{k}_{suffix}": v for k, v in binary.items()})
    return out


def score(y: np.ndarray, probs: np.ndarray, task_name: str = "") -> dict[str, float]:
    if probs.shape[1] == 2:
        return binary_metrics(y, probs[:, 1])
    return multiclass_metrics(y, probs, task_name)


# ----------------------------------------------------------------------------------------------
# The same metrics on many resampled test sets at once. A resample of a set of distinct cases is a
# row of case weights (how often each case was drawn), so every metric is a weighted count: one sort
# per score column serves all resamples, and the confusion counts are one matrix product.
# ----------------------------------------------------------------------------------------------
def _safe_div(num: np.ndarray, den: np.ndarray, fill: float = NAN) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    out = np.full(num.shape, fill)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _weighted_roc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted true / false positive counts (B, runs) at every threshold, from the highest score down;
    a threshold sits after the last case of each run of tied scores (ties share one ROC point)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    cut = np.append(sorted_scores[:-1] != sorted_scores[1:], True)
    hits = y[order].astype(weights.dtype)
    w = weights[:, order]
    tps = np.cumsum(w * hits, 1)[:, cut]
    fps = np.cumsum(w * (1 - hits), 1)[:, cut]
    return tps.astype(np.float64), fps.astype(np.float64)


def weighted_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per weight row: each positive counts the weight of negatives scored below it,
    plus half of those tied with it, as scikit-learn. NaN where a row has no positives or no negatives."""
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y != 1)
    neg_idx = neg_idx[np.argsort(scores[neg_idx], kind="stable")]
    neg_scores, pos_scores = scores[neg_idx], scores[pos_idx]
    below_neg = np.zeros((len(weights), len(neg_idx) + 1))
    np.cumsum(weights[:, neg_idx], axis=1, out=below_neg[:, 1:])  # weight of negatives at sorted rank < k
    lower = np.searchsorted(neg_scores, pos_scores, "left")
    upper = np.searchsorted(neg_scores, pos_scores, "right")
    wins = below_neg[:, lower]
    if (upper != lower).any():
        wins = wins + 0.5 * (below_neg[:, upper] - wins)
    pos_weight = weights[:, pos_idx].astype(np.float64)
    return _safe_div((pos_weight * wins).sum(1), pos_weight.sum(1) * below_neg[:, -1])


def weighted_binary_metrics(y: np.ndarray, p_pos: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """`binary_metrics` of every resampled set: y, p_pos (m,) over distinct cases, weights (B, m)."""
    y = np.asarray(y).astype(int)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    called = (p_pos > THRESHOLD).astype(weights.dtype)
    is_pos = (y == 1).astype(weights.dtype)
    total = weights.sum(1).astype(np.float64)
    pos = (weights @ is_pos).astype(np.float64)
    neg = total - pos
    tp = (weights @ (called * is_pos)).astype(np.float64)
    fp = (weights @ (called * (1 - is_pos))).astype(np.float64)
    tn = neg - fp
    out = {
        "accuracy": _safe_div(tp + tn, total),
        "f1": _safe_div(2 * tp, tp + fp + pos, fill=0.0),  # 2tp + fp + fn
        "sensitivity": _safe_div(tp, pos),
        "specificity": _safe_div(tn, neg),
    }
    out["auc"] = weighted_auc(y, p_pos, weights)
    tps, fps = _weighted_roc(y, p_pos, weights)
    defined = (pos > 0) & (neg > 0)
    sens, spec = _safe_div(tps, pos[:, None]), _safe_div(neg[:, None] - fps, neg[:, None])
    for t in OPERATING_POINTS:
        # The curve's own points; (0, 0) (a threshold above every score) adds sensitivity 0 at specificity 1.
        best_spec = np.where(sens >= t, spec, -np.inf).max(1)
        best_sens = np.maximum(np.where(spec >= t, sens, -np.inf).max(1), 0.0)
        out[f"spec_at_sens{int(t * 100)}"] = np.where(defined, best_spec, NAN)
        out[f"sens_at_spec{int(t * 100)}"] = np.where(defined, best_sens, NAN)
    return {name: out[name] for name in BINARY_METRICS}


def weighted_multiclass_metrics(
    y: np.ndarray, probs: np.ndarray, weights: np.ndarray, task_name: str = ""
) -> dict[str, np.ndarray]:
    """`multiclass_metrics` of every resampled set: y (m,), probs (m, C), weights (B, m)."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    pred = probs.argmax(1)
    cell = np.zeros((len(y), num_classes * num_classes), weights.dtype)
    cell[np.arange(len(y)), y * num_classes + pred] = 1
    confusion = (weights @ cell).astype(np.float64).reshape(-1, num_classes, num_classes)
    total = confusion.sum((1, 2))
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    true_count, pred_count = confusion.sum(2), confusion.sum(1)
    f1_den = true_count + pred_count  # 2tp + fp + fn; zero for a class neither present nor predicted
    used = f1_den > 0
    grid = np.arange(num_classes)
    disagreement = {
        "kappa_unweighted": (grid[:, None] != grid[None, :]).astype(np.float64),
        "kappa_quadratic": (grid[:, None] - grid[None, :]) ** 2.0,
    }
    chance = true_count[:, :, None] * pred_count[:, None, :]
    class_auc = np.stack([weighted_auc((y == k).astype(int), probs[:, k], weights) for k in range(num_classes)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-NaN rows: fewer than two classes present
        auc = np.nanmean(class_auc, axis=0)
    out = {
        "auc": auc,
        "accuracy": _safe_div(tp.sum(1), total),
    }
    for name, w in disagreement.items():  # kappa = 1 - observed / chance-expected weighted disagreement
        out[name] = 1.0 - _safe_div((confusion * w).sum((1, 2)), _safe_div((chance * w).sum((1, 2)), total))
    out["macro_f1"] = _safe_div(_safe_div(2 * tp, f1_den, 0.0).sum(1), used.sum(1))
    if task_name == "pirads_4class":
        for cut, suffix in PIRADS_CUTS:
            binary = weighted_binary_metrics((y >= cut).astype(int), probs[:, cut:].sum(1), weights)
            out.update({f"{k}_{suffix}": v for k, v in binary.items()})
    return out


def weighted_score(y: np.ndarray, probs: np.ndarray, weights: np.ndarray, task_name: str = "") -> dict[str, np.ndarray]:
    """`score` of each resampled test set: row b of weights (B, m) counts how often each of the m
    distinct cases (labels y, probabilities probs (m, C)) occurs in resample b."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float32))  # integer counts: exact below 2**24
    if probs.shape[1] == 2:
        return weighted_binary_metrics(y, probs[:, 1], weights)
    return weighted_multiclass_metrics(y, probs, weights, task_name)


# ----------------------------------------------------------------------------------------------
# Test subsets and their bootstrap.
# ----------------------------------------------------------------------------------------------
def max_test_size(is_hq: np.ndarray, labels: np.ndarray, ratios, num_classes: int) -> int:
    """The largest subset size every test ratio can be drawn at."""
    for size in range(len(labels), 0, -1):
        try:
            for r in ratios:
                stratified_indices(is_hq, labels, size, r, 0, num_classes=num_classes)
            return size
        except StratificationError:
            continue
    raise StratificationError("the test pool cannot supply any subset at the requested ratios")


def test_subsets(
    is_hq: np.ndarray, labels: np.ndarray, ratios, size: int, draws: int, seed: int, num_classes: int
) -> dict[tuple[float, int], np.ndarray]:
    """(ratio, draw) -> test-pool indices. Draws share nothing with finetuning sets (own salt)."""
    return {
        (float(r), d): stratified_indices(is_hq, labels, size, r, seed + d, num_classes=num_classes, salt=0x7E57)
        for r in ratios
        for d in range(draws)
    }


def bootstrap_weights(
    labels: np.ndarray, is_hq: np.ndarray, draws: Sequence[np.ndarray], resamples: int, seed: Sequence[int] | int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Stratified bootstrap of the cases behind all draws of one test ratio, as case weights.

    Returns the distinct member cases (m,) and, per draw, weights (resamples, m). Resample b sends
    every member case to one drawn with replacement from the members of its (label, quality) stratum,
    then counts where each draw's cases landed. One map serves all draws, so a case shared by two draws
    stays shared, and every resampled draw keeps its exact label and HQ counts.
    """
    labels, is_hq = np.asarray(labels), np.asarray(is_hq, dtype=bool)
    members = np.unique(np.concatenate([np.asarray(d) for d in draws]))
    m = len(members)
    local_map = np.broadcast_to(np.arange(m), (resamples, m)).copy()
    rng = np.random.default_rng(seed)
    for label in np.unique(labels[members]):
        for quality in (True, False):
            stratum = np.flatnonzero((labels[members] == label) & (is_hq[members] == quality))
            if len(stratum):
                local_map[:, stratum] = stratum[rng.integers(0, len(stratum), size=(resamples, len(stratum)))]
    offsets = (np.arange(resamples) * m)[:, None]
    weights = []
    for draw in draws:
        landed = local_map[:, np.searchsorted(members, draw)] + offsets
        weights.append(np.bincount(landed.ravel(), minlength=resamples * m).reshape(resamples, m).astype(np.float32))
    return members, weights


def score_subsets(
    labels: np.ndarray,
    is_hq: np.ndarray,
    probs: np.ndarray,
    draws: Sequence[np.ndarray],
    task_name: str = "",
    resamples: int = 1000,
    seed: Sequence[int] | int = 0,
    valid: np.ndarray | None = None,
    confidence: float = 0.95,
) -> list[dict[str, float]]:
    """Score every lane on the subset draws of one test ratio, with percentile bootstrap CIs.

    labels, is_hq: (pool,); probs: (lanes, pool, classes); draws: pool-index arrays of equal size.
    Returns per lane `{metric: mean over draws (scikit-learn), metric_ci_low, metric_ci_high}`. The CI
    is the percentile interval of the draw-averaged metric over `resamples` stratified bootstrap
    resamples of the cases behind the draws (`bootstrap_weights`; the same resamples for every lane, so
    lanes are compared on the same resampled test sets). Lanes with valid=False or non-finite
    probabilities get NaN throughout.
    """
    labels = np.asarray(labels).astype(int)
    num_lanes, _, num_classes = probs.shape
    names = metric_names(num_classes, task_name)
    valid = np.ones(num_lanes, bool) if valid is None else np.asarray(valid, bool)
    members, weights = bootstrap_weights(labels, is_hq, draws, resamples, seed) if resamples > 0 else (None, [])
    tail = 100 * (1 - confidence) / 2
    results = []
    for lane in range(num_lanes):
        row = {}
        for name in names:
            row.update({name: NAN, f"{name}_ci_low": NAN, f"{name}_ci_high": NAN})
        if not valid[lane] or not np.isfinite(probs[lane]).all():
            results.append(row)
            continue
        point = [score(labels[idx], probs[lane, idx], task_name) for idx in draws]
        for name in names:
            row[name] = float(np.mean([p[name] for p in point]))
        if weights:
            totals = {name: np.zeros(resamples) for name in names}
            for w in weights:
                for name, values in weighted_score(labels[members], probs[lane, members], w, task_name).items():
                    totals[name] += values
            for name in names:
                averaged = totals[name] / len(draws)
                if np.isfinite(averaged).any():
                    low, high = np.nanpercentile(averaged, [tail, 100 - tail])
                    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(low), float(high)
        results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# The sweep's tables: results.csv (one row per lane x test ratio) and predictions.csv.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoringPlan:
    """The test subsets every lane of a sweep is scored on, fixed once before training."""

    ratios: tuple[float, ...]
    size: int  # cases per subset
    draws: int  # subsets per ratio
    seed: int
    resamples: int  # bootstrap resamples for the CIs (0: none)
    subsets: dict[tuple[float, int], np.ndarray]  # (ratio, draw) -> test-pool positions


def scoring_plan(is_hq: np.ndarray, labels: np.ndarray, sweep, num_classes: int) -> ScoringPlan:
    """From a run config's `sweep` section and the test pool's quality flags and labels;
    `StratificationError` if the pool cannot supply the subsets."""
    ratios = tuple(float(r) for r in sweep.test_hq_ratios)
    size = int(sweep.test_size) or max_test_size(is_hq, labels, ratios, num_classes)
    subsets = test_subsets(is_hq, labels, ratios, size, int(sweep.test_draws), int(sweep.test_seed), num_classes)
    return ScoringPlan(
        ratios, size, int(sweep.test_draws), int(sweep.test_seed), int(sweep.bootstrap_resamples), subsets
    )


def lane_rows(
    lanes: Sequence,
    lane_sets: Sequence[np.ndarray],
    status: Sequence[str],
    probs: np.ndarray,
    data,
    plan: ScoringPlan,
    task_name: str,
) -> list[dict]:
    """One row per lane x test ratio: metrics averaged over the ratio's subset draws, with percentile
    bootstrap CIs of that average (`score_subsets`; docs/results.md). `probs` (lanes, test pool,
    classes); `data` has the study's `labels`, `is_hq` and `test_pool`; lanes whose `status` is not
    'ok' get NaN metrics."""
    pool_hq, pool_labels = data.is_hq[data.test_pool], data.labels[data.test_pool]
    healthy = np.array([s == "ok" for s in status])
    scored = {}  # ratio -> per-lane metrics; the bootstrap depends on the ratio, never on the lane group
    for ratio in plan.ratios:
        maybe_fail("evaluate")
        scored[ratio] = score_subsets(
            pool_labels,
            pool_hq,
            probs,
            [plan.subsets[(ratio, d)] for d in range(plan.draws)],
            task_name,
            resamples=plan.resamples,
            seed=[plan.seed, 0xB007, round(ratio * 1e6)],
            valid=healthy,
        )
    rows = []
    for li, lane in enumerate(lanes):
        for ratio in plan.ratios:
            row = {
                "task": task_name,
                "init": lane.init,
                "finetune_hq_ratio": lane.finetune_hq_ratio,
                "finetune_hq_count": int(data.is_hq[lane_sets[li]].sum()),  # realised, not requested
                "train_size": lane.train_size,
                "seed": lane.seed,
                "test_hq_ratio": ratio,
                "n_test": plan.size,
                "n_draws": plan.draws,
                "n_resamples": plan.resamples,
            }
            row.update(scored[ratio][li])
            row["status"] = status[li]
            rows.append(row)
    return rows


def prediction_rows(lanes: Sequence, probs: np.ndarray, data) -> list[dict]:
    """Every lane's class probabilities for every test-pool case (`data`: a `pfq.data.study.StudyData`)."""
    rows = []
    for li, lane in enumerate(lanes):
        for p, case in enumerate(data.test_pool):
            row = {
                "lane": lane.name,
                "init": lane.init,
                "finetune_hq_ratio": lane.finetune_hq_ratio,
                "train_size": lane.train_size,
                "seed": lane.seed,
                "case_id": data.case_ids[case],
                "quality": "hq" if data.is_hq[case] else "lq",
                "label": int(data.labels[case]),
            }
            row.update({f"prob_{c}": float(probs[li, p, c]) for c in range(probs.shape[-1])})
            rows.append(row)
    return rows
