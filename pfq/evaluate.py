"""Evaluation without waste: every lane predicts every test-pool case once; each test HQ ratio is then
a fixed-size, label-stratified subset of those predictions (several draws), scored with scikit-learn.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

from pfq.data.stratify import StratificationError, stratified_indices

OPERATING_POINTS = (0.8, 0.9)


def _spec_at_sens(y: np.ndarray, score: np.ndarray, target: float) -> float:
    fpr, tpr, _ = skm.roc_curve(y, score)
    ok = tpr >= target
    return float(1.0 - fpr[ok].min()) if ok.any() else float("nan")


def _sens_at_spec(y: np.ndarray, score: np.ndarray, target: float) -> float:
    fpr, tpr, _ = skm.roc_curve(y, score)
    ok = (1.0 - fpr) >= target
    return float(tpr[ok].max()) if ok.any() else float("nan")


def binary_metrics(y: np.ndarray, p_pos: np.ndarray) -> dict[str, float]:
    """y in {0, 1}; p_pos the positive-class probability."""
    y = np.asarray(y)
    pred = (p_pos >= 0.5).astype(int)
    both = len(np.unique(y)) == 2
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    out = {
        "auc": float(skm.roc_auc_score(y, p_pos)) if both else float("nan"),
        "accuracy": float((pred == y).mean()),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "sensitivity": tp / pos if pos else float("nan"),
        "specificity": tn / neg if neg else float("nan"),
    }
    for t in OPERATING_POINTS:
        out[f"spec_at_sens{int(t * 100)}"] = _spec_at_sens(y, p_pos, t) if both else float("nan")
        out[f"sens_at_spec{int(t * 100)}"] = _sens_at_spec(y, p_pos, t) if both else float("nan")
    return out


def multiclass_metrics(y: np.ndarray, probs: np.ndarray, task_name: str = "") -> dict[str, float]:
    num_classes = probs.shape[1]
    pred = probs.argmax(1)
    out = {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(skm.f1_score(y, pred, average="macro", labels=np.arange(num_classes), zero_division=0)),
        "qwk": float(skm.cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(num_classes))),
    }
    present = np.unique(y)
    if len(present) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
            out["auc"] = float(skm.roc_auc_score(y, p, multi_class="ovr", labels=present)
                               if len(present) > 2 else skm.roc_auc_score(y == present[1], p[:, 1]))
    else:
        out["auc"] = float("nan")
    if task_name == "pirads_4class":  # upstream also reports the binarised PI-RADS >=3 and >=4
        for cut, name in ((1, "ge3"), (2, "ge4")):
            yb = (y >= cut).astype(int)
            pb = probs[:, cut:].sum(1)
            out[f"auc_{name}"] = float(skm.roc_auc_score(yb, pb)) if len(np.unique(yb)) == 2 else float("nan")
            out[f"f1_{name}"] = float(skm.f1_score(yb, (pb >= 0.5).astype(int), zero_division=0))
    return out


def score(y: np.ndarray, probs: np.ndarray, task_name: str = "") -> dict[str, float]:
    if probs.shape[1] == 2:
        return binary_metrics(y, probs[:, 1])
    return multiclass_metrics(y, probs, task_name)


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


def test_subsets(is_hq: np.ndarray, labels: np.ndarray, ratios, size: int, draws: int, seed: int,
                 num_classes: int) -> dict[tuple[float, int], np.ndarray]:
    """(ratio, draw) -> test-pool indices. Draws share nothing with finetuning sets (own salt)."""
    return {(float(r), d): stratified_indices(is_hq, labels, size, r, seed + d, num_classes=num_classes, salt=0x7E57)
            for r in ratios for d in range(draws)}
