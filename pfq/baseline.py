"""The reference row: a logistic regression on per-channel intensity percentiles of the same inputs.

A CNN that cannot beat this has not learnt more than "how dark is the darkest ADC": the report shows it
next to every initialisation so a reader can tell a learnt signal from a weak model. It is fitted on each
lane's own finetuning set (the cases a CNN lane of the same finetune ratio, budget and seed trains on)
and scored on the same test subsets, so its rows are comparable cell for cell and pair by seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pfq.stats import BASELINE_INIT  # noqa: F401  (the `init` value of its rows in results.csv)

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def percentile_features(volumes: np.ndarray) -> np.ndarray:
    """(N, D, H, W, C) preprocessed volumes -> (N, len(PERCENTILES) * C): each channel's intensity
    percentiles over the whole volume (no segmentation needed; the low ADC percentiles carry lesions)."""
    flat = np.asarray(volumes, np.float32).reshape(len(volumes), -1, volumes.shape[-1])
    q = np.percentile(flat, PERCENTILES, axis=1)  # (P, N, C)
    return q.transpose(1, 0, 2).reshape(len(volumes), -1)


def pool_features(source, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """Features of the given cases, read one volume at a time (a real-size volume is 38 MB)."""
    return {int(i): percentile_features(np.asarray(source[int(i)])[None])[0] for i in indices}


def fit_status(features: dict[int, np.ndarray], train: np.ndarray, test: np.ndarray, case_ids: Sequence[str]) -> str:
    """'ok', or why this lane's reference cannot be fitted, naming the cases (its rows then get NaN
    metrics, as a diverged CNN lane's do, instead of failing the whole sweep)."""
    bad = [int(i) for i in np.concatenate([train, test]) if not np.all(np.isfinite(features[int(i)]))]
    if not bad:
        return "ok"
    shown = ", ".join(case_ids[i] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    return f"not fitted: non-finite intensities in {len(bad)} case(s): {shown}"


def fit_predict(
    features: dict[int, np.ndarray], labels: np.ndarray, train: np.ndarray, test: np.ndarray, num_classes: int
) -> np.ndarray:
    """Standardised L2 logistic regression (C = 1, lbfgs: deterministic) fitted on `train`, class
    probabilities (len(test), num_classes) for `test`. A training set holding one class only gives that
    class probability 1 (there is nothing to fit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = np.stack([features[int(i)] for i in train])
    x_test = np.stack([features[int(i)] for i in test])
    y = labels[train]
    probs = np.zeros((len(test), num_classes), np.float32)
    present = np.unique(y)
    if len(present) == 1:
        probs[:, int(present[0])] = 1.0
        return probs
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    clf.fit(x_train, y)
    probs[:, clf.classes_.astype(int)] = clf.predict_proba(x_test)
    return probs
