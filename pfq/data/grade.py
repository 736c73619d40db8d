"""HQ/LQ grades from image-quality metrics (`pfq.data.iqm`), for manifests without quality scores.

Two ways, chosen by what the manifest holds:

- supervised (some rows carry a quality label, at least `MIN_LABELLED` with both grades present): an
  L2 logistic regression (scikit-learn) on every IQM, each transformed (log for the positive,
  ratio-like ones), median-imputed and robustly standardised (median / IQR of the labelled cases).
  `quality_score` is P(HQ); cases with P(HQ) >= `threshold` (0.5) are HQ. Its out-of-fold AUC
  (stratified 5-fold cross-validation on the labelled cases) is reported.
- unsupervised (no usable labels): a badness composite, the mean of sign-fixed robust z-scores
  (median / IQR over all cases) of the IQMs whose direction is known a priori (`UNSUPERVISED_SIGNS`:
  lower SNR and edge alignment, higher FWHM, ghosting, bias field, bright tail, ADC clipping and
  high-b floor are worse; measures that noise moves the other way are left out). Threshold rule:
  a two-component Gaussian mixture on the composite (deterministic initialisation); the component
  with the higher mean is LQ, and a case is LQ when its posterior for that component is >= 0.5.
  `quality_score` = the posterior of the better component. With `lq_fraction` the rule is
  instead: the `lq_fraction` worst cases are LQ (use it when the LQ share is known; a mixture
  splits unimodal data arbitrarily).

Labels always win: a labelled row keeps its label; its `quality_score` is still the model's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from pfq.data.iqm import iqm_names

MIN_LABELLED = 10  # fewer labelled cases (or a single grade): the unsupervised rule is used
LOG_SUFFIXES = ("_snr", "_fwhm_inplane", "_fwhm_slice", "_tail")  # positive ratios: log makes them additive
# +1: a higher value means worse quality. Left out: EFC (its direction depends on the artefact) and
# high-b INU and ADC FWHM, which noise, the commonest degradation, moves against their nominal
# direction (the Rician floor flattens the high-b image; noise roughens ADC) in the phantom sweep.
UNSUPERVISED_SIGNS = {
    **{f"{c}_snr": -1.0 for c in ("t2w", "highb", "adc")},
    "t2w_fwhm_inplane": 1.0,
    "highb_fwhm_inplane": 1.0,
    **{f"{c}_ghost": 1.0 for c in ("t2w", "highb", "adc")},
    "t2w_inu": 1.0,
    "t2w_tail": 1.0,
    "highb_tail": 1.0,
    "adc_clip_frac": 1.0,
    "highb_floor_frac": 1.0,
    "t2_adc_ngf": -1.0,
}


@dataclass
class Grading:
    quality: list[str]  # 'hq' | 'lq' per case (labels where present)
    score: np.ndarray  # higher = better quality (P(HQ) for the supervised grader)
    source: list[str]  # 'label' | 'iqm' per case
    method: str  # 'logistic' | 'mixture' | 'quantile'
    n_labelled: int = 0
    cv_auc: float | None = None  # out-of-fold AUC on the labelled cases (supervised only)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "method": self.method,
            "n_labelled": self.n_labelled,
            "cv_auc": self.cv_auc,
            "n_hq": sum(q == "hq" for q in self.quality),
            "n": len(self.quality),
            "n_from_iqm": sum(s == "iqm" for s in self.source),
            "notes": list(self.notes),
        }


def feature_matrix(rows: list[dict[str, float]]) -> np.ndarray:
    """(cases, IQMs) with the log transform applied; NaN where a measure is undefined."""
    names = iqm_names()
    x = np.array([[float(r[n]) for n in names] for r in rows], dtype=np.float64)
    for j, n in enumerate(names):
        if n.endswith(LOG_SUFFIXES):
            with np.errstate(divide="ignore", invalid="ignore"):
                x[:, j] = np.where(x[:, j] > 0, np.log(np.abs(x[:, j])), np.nan)
    x[~np.isfinite(x)] = np.nan
    return x


def _model(c: float = 1.0):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import RobustScaler

    return make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        RobustScaler(),
        LogisticRegression(C=c, max_iter=2000),
    )


def cv_auc(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold AUC of the grader on labelled cases (``y`` 1 = HQ), stratified k-fold."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    k = int(min(folds, np.bincount(y, minlength=2).min()))
    if k < 2:
        raise ValueError("cross-validation needs at least two cases of each grade")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prob = cross_val_predict(_model(), x, y, cv=splitter, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, prob))


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """P(HQ) for ``x`` from a grader fitted on (``x_train``, ``y_train``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _model().fit(x_train, y_train).predict_proba(x)[:, 1]


def badness(x: np.ndarray) -> np.ndarray:
    """The unsupervised composite: mean of sign-fixed robust z-scores (higher = worse)."""
    names = iqm_names()
    cols = [names.index(n) for n in UNSUPERVISED_SIGNS]
    signs = np.array(list(UNSUPERVISED_SIGNS.values()))
    sub = x[:, cols]
    med = np.nanmedian(sub, axis=0)
    q1, q3 = np.nanpercentile(sub, [25, 75], axis=0)
    scale = np.where(q3 - q1 > 0, (q3 - q1) / 1.349, 1.0)
    z = (sub - med) / scale * signs
    z = np.clip(z, -10.0, 10.0)  # one wild measure must not decide a case alone
    return np.nanmean(np.where(np.isfinite(z), z, np.nan), axis=1)


def unsupervised(x: np.ndarray, lq_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(is_hq, score) from the composite: a two-component mixture, or the worst ``lq_fraction`` LQ."""
    b = badness(x)
    b = np.where(np.isfinite(b), b, np.nanmedian(b))
    if lq_fraction is not None:
        if not 0.0 <= lq_fraction <= 1.0:
            raise ValueError(f"lq_fraction must be in [0, 1], got {lq_fraction}")
        n_lq = round(lq_fraction * len(b))
        order = np.argsort(-b, kind="stable")
        is_hq = np.ones(len(b), bool)
        is_hq[order[:n_lq]] = False
        ranks = np.empty(len(b))
        ranks[np.argsort(b, kind="stable")] = np.arange(len(b))
        return is_hq, 1.0 - ranks / max(len(b) - 1, 1), "quantile"
    from sklearn.mixture import GaussianMixture

    if len(b) < 4 or np.ptp(b) == 0:
        return np.ones(len(b), bool), np.full(len(b), 0.5), "mixture"
    lo, hi = np.percentile(b, [25, 75])
    gm = GaussianMixture(2, means_init=[[lo], [hi]], random_state=0).fit(b[:, None])
    post = gm.predict_proba(b[:, None])
    worse = int(np.argmax(gm.means_[:, 0]))
    p_good = post[:, 1 - worse]
    return p_good > 0.5, p_good, "mixture"


def grade(
    rows: list[dict[str, float]], labels: list[str | None], *, threshold: float = 0.5, lq_fraction: float | None = None
) -> Grading:
    """Grades for every case from its IQMs (``rows``) and the labels that exist (None elsewhere)."""
    x = feature_matrix(rows)
    labelled = np.array([q in ("hq", "lq") for q in labels])
    y = np.array([q == "hq" for q in labels], dtype=np.int64)
    notes = []
    n_lab = int(labelled.sum())
    classes = set(y[labelled].tolist())
    if n_lab >= MIN_LABELLED and len(classes) == 2:
        score = fit_predict(x[labelled], y[labelled], x)
        auc = cv_auc(x[labelled], y[labelled])
        is_hq, method = score >= threshold, "logistic"
    else:
        if n_lab:
            notes.append(
                f"{n_lab} labelled case(s) with grades {sorted(classes)}: too few to fit a grader "
                f"(needs {MIN_LABELLED} with both grades); used the unsupervised rule"
            )
        is_hq, score, method = unsupervised(x, lq_fraction)
        auc = None
    quality = [q if lab else ("hq" if h else "lq") for q, lab, h in zip(labels, labelled, is_hq, strict=True)]
    source = ["label" if lab else "iqm" for lab in labelled]
    return Grading(quality, np.asarray(score, dtype=np.float64), source, method, n_lab, auc, notes)
