"""Statistics over seeds on results rows: mean ± std, the paired pretrained-vs-scratch test, and the
finetune/test quality mismatch effect. Pure functions of result rows: the trainer's, or results.csv
read back by `pfq.results.read_results` (typed values, never strings to parse).

Seeds are the unit of replication: a lane's seed fixes its finetuning set, data order and head
initialisation, and every initialisation is run with the same seeds, so lanes that differ only in
initialisation and share a seed are paired (same finetuning cases, same test subsets).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

REFERENCE_INIT = "scratch"
BASELINE_INIT = "percentile-lr"  # the reference logistic regression's rows (pfq.baseline); never "pretrained"
CELL_KEYS = ("task", "finetune_hq_ratio", "train_size", "test_hq_ratio")  # a grid cell, over seeds


def key_of(row: dict, keys: Sequence[str]) -> tuple:
    """A hashable, sortable key; numbers become rounded floats so that an int seed or train size and
    a ratio computed in floating point group with the same values read back from results.csv."""
    return tuple(round(float(v), 9) if isinstance(v := row.get(k), numbers.Real) else str(v) for k in keys)


def group(rows: Iterable[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        out[key_of(row, keys)].append(row)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Summary:
    """Mean ± sample std (ddof=1) of the finite values; n of n_total were finite."""

    mean: float
    std: float
    n: int
    n_total: int

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        text = f"{self.mean:.{digits}f}"
        if self.n > 1:
            text += f" ± {self.std:.{digits}f}"
        if self.n < self.n_total:
            text += f" (n={self.n}/{self.n_total})"
        return text


def summarize(values: Iterable[float]) -> Summary:
    values = np.array(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    n = len(finite)
    return Summary(
        float(finite.mean()) if n else math.nan, float(finite.std(ddof=1)) if n > 1 else math.nan, n, len(values)
    )


def seed_means(rows: Iterable[dict], metric: str) -> dict[int, float]:
    """Per seed, the mean of the metric over that seed's rows with a finite value (NaN if none)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        by_seed[int(row["seed"])].append(float(row.get(metric, math.nan)))
    out = {}
    for seed, values in sorted(by_seed.items()):
        finite = [v for v in values if math.isfinite(v)]
        out[seed] = float(np.mean(finite)) if finite else math.nan
    return out


# ----------------------------------------------------------------------------------------------
# Paired test across seeds.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Paired:
    """a - b over paired seeds: n pairs, mean and sample std of the differences, the means of a and b
    over the same pairs, the paired t-test and the Wilcoxon signed-rank p-values (two-sided)."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    std_diff: float
    t_p: float
    wilcoxon_p: float

    @property
    def ci95(self) -> tuple[float, float]:
        """Student-t 95% confidence interval of the mean difference over seeds (NaN with < 2 pairs)."""
        if self.n < 2 or not math.isfinite(self.std_diff):
            return (math.nan, math.nan)
        half = float(sps.t.ppf(0.975, self.n - 1)) * self.std_diff / math.sqrt(self.n)
        return (self.mean_diff - half, self.mean_diff + half)

    @property
    def resolved(self) -> bool:
        """The 95% interval excludes zero: the difference is larger than the seed-to-seed noise."""
        low, high = self.ci95
        return bool(low > 0 or high < 0)


def paired_test(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired comparison of a and b (same order = same seed); pairs with a NaN are dropped. p-values are
    NaN when undefined: fewer than 2 pairs, or differences without spread (t-test) or all zero (Wilcoxon)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    t_p = w_p = math.nan
    if n > 1 and std > 1e-12 * max(1.0, float(np.abs(d).max())):
        t_p = float(sps.ttest_1samp(d, 0.0).pvalue)
    if n > 1 and np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                w_p = float(sps.wilcoxon(d).pvalue)
            except ValueError:
                w_p = math.nan
    return Paired(n, float(a.mean()), float(b.mean()), float(d.mean()), std, t_p, w_p)


def paired_by_seed(a: dict[int, float], b: dict[int, float]) -> Paired:
    seeds = sorted(set(a) & set(b))
    return paired_test([a[s] for s in seeds], [b[s] for s in seeds])


def paired_comparisons(
    rows: list[dict], metric: str, reference: str = REFERENCE_INIT, keys: Sequence[str] = CELL_KEYS
) -> list[dict]:
    """For every initialisation other than `reference` and every cell `keys`: the paired test across
    seeds of init minus reference. Empty when either side is missing."""
    out = []
    inits = sorted({str(r["init"]) for r in rows} - {reference, BASELINE_INIT})
    for init in inits:
        for key, cell in group([r for r in rows if str(r["init"]) in (init, reference)], keys).items():
            a = seed_means([r for r in cell if str(r["init"]) == init], metric)
            b = seed_means([r for r in cell if str(r["init"]) == reference], metric)
            if a and b:
                out.append({"init": init, **dict(zip(keys, key, strict=True)), "result": paired_by_seed(a, b)})
    return out


def pooled_comparisons(
    rows: list[dict], metric: str, reference: str = REFERENCE_INIT, by: Sequence[str] = ("task", "train_size")
) -> list[dict]:
    """The headline test: per `by` group, each seed's difference init - reference is averaged over the
    cells (finetune ratio x test ratio) where both are finite, then tested across seeds."""
    out = []
    inits = sorted({str(r["init"]) for r in rows} - {reference, BASELINE_INIT})
    cell_keys = [k for k in CELL_KEYS if k not in by]
    for init in inits:
        for key, part in group([r for r in rows if str(r["init"]) in (init, reference)], by).items():
            diffs: dict[int, list[tuple[float, float]]] = defaultdict(list)
            for cell in group(part, cell_keys).values():
                a = seed_means([r for r in cell if str(r["init"]) == init], metric)
                b = seed_means([r for r in cell if str(r["init"]) == reference], metric)
                for seed in set(a) & set(b):
                    if math.isfinite(a[seed]) and math.isfinite(b[seed]):
                        diffs[seed].append((a[seed], b[seed]))
            if not diffs:
                continue
            seeds = sorted(diffs)
            a_mean = [float(np.mean([p[0] for p in diffs[s]])) for s in seeds]
            b_mean = [float(np.mean([p[1] for p in diffs[s]])) for s in seeds]
            out.append({"init": init, **dict(zip(by, key, strict=True)), "result": paired_test(a_mean, b_mean)})
    return out


def pretrained_inits(rows: Iterable[dict]) -> list[str]:
    """The initialisations that are neither scratch nor the reference baseline, sorted."""
    return sorted({str(r["init"]) for r in rows} - {REFERENCE_INIT, BASELINE_INIT})


def quality_contrasts(rows: list[dict], metric: str, by: Sequence[str] = ("task", "init", "train_size")) -> list[dict]:
    """The study's quality contrast, per `by` group: on the highest test HQ ratio, lanes finetuned at the
    highest finetune HQ ratio minus those at the lowest, paired by seed (same budget, same test subsets)."""
    out = []
    for key, part in group(rows, by).items():
        finetune = sorted({round(float(r["finetune_hq_ratio"]), 9) for r in part})
        test_hq = max(round(float(r["test_hq_ratio"]), 9) for r in part)
        if len(finetune) < 2:
            continue
        on_test = [r for r in part if round(float(r["test_hq_ratio"]), 9) == test_hq]
        hi, lo = (
            seed_means([r for r in on_test if round(float(r["finetune_hq_ratio"]), 9) == f], metric)
            for f in (finetune[-1], finetune[0])
        )
        out.append(
            {
                **dict(zip(by, key, strict=True)),
                "high": finetune[-1],
                "low": finetune[0],
                "test_hq_ratio": test_hq,
                "result": paired_by_seed(hi, lo),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# Finetune / test quality mismatch.
# ----------------------------------------------------------------------------------------------
def mismatch(row: dict) -> float:
    return round(abs(float(row["finetune_hq_ratio"]) - float(row["test_hq_ratio"])), 9)


def mismatch_effect(rows: list[dict], metric: str, by: Sequence[str] = ("task", "init", "train_size")) -> list[dict]:
    """Per `by` group: the metric at each |finetune ratio - test ratio| (per seed, the mean over cells at
    that mismatch; then mean ± std over seeds), and the least-squares slope of the metric on the mismatch
    (per seed over its finite cells; then mean ± std over seeds; NaN with fewer than 2 distinct mismatches)."""
    out = []
    for key, part in group(rows, by).items():
        levels = sorted({mismatch(r) for r in part})
        at = {
            level: summarize(seed_means([r for r in part if mismatch(r) == level], metric).values()) for level in levels
        }
        slopes = []
        for seed_rows in group(part, ("seed",)).values():
            x = np.array([mismatch(r) for r in seed_rows])
            y = np.array([float(r.get(metric, math.nan)) for r in seed_rows])
            ok = np.isfinite(y)
            if len(np.unique(x[ok])) >= 2:
                slopes.append(float(np.polyfit(x[ok], y[ok], 1)[0]))
            else:
                slopes.append(math.nan)
        out.append({**dict(zip(by, key, strict=True)), "levels": at, "slope": summarize(slopes)})
    return out
