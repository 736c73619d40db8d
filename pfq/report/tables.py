"""Report tables: the finetune x test HQ ratio grid, summaries over seeds, paired tests and the
mismatch effect, as Markdown (report.md) and plain text (the end-of-run summary)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pfq import stats
from pfq.stats import BASELINE_INIT, REFERENCE_INIT, Summary, group, summarize


def init_label(init: str, inits: Sequence[str] = ()) -> str:
    """'scratch', or a checkpoint directory's name (its full path if two share a name)."""
    if init in (REFERENCE_INIT, BASELINE_INIT):
        return init
    name = Path(str(init).rstrip("/")).name or str(init)
    clash = [i for i in inits if i != init and Path(str(i).rstrip("/")).name == name]
    return str(init) if clash else name


def _inits(rows: list[dict]) -> list[str]:
    """Pretrained initialisations first, then scratch, then the reference baseline."""
    present = {str(r["init"]) for r in rows}
    return stats.pretrained_inits(rows) + [i for i in (REFERENCE_INIT, BASELINE_INIT) if i in present]


def _num(row: dict, key: str) -> float:
    return round(float(row[key]), 9)  # as stats.key_of, so ratios computed and read back agree


def _values(rows: list[dict], key: str) -> list[float]:
    return sorted({_num(r, key) for r in rows})


def _select(rows: list[dict], init: str | None = None, train_size: float | None = None) -> list[dict]:
    return [
        r
        for r in rows
        if (init is None or str(r["init"]) == init) and (train_size is None or _num(r, "train_size") == train_size)
    ]


def _g(x: float) -> str:
    return f"{x:g}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def grid(rows: list[dict], metric: str, init: str | None = None, train_size: float | None = None):
    """(finetune ratios, test ratios, mean, std, {(i, j): (Summary over seeds, rows)}) for one init and
    train size; mean and std are (finetune, test) arrays, NaN where no seed has a finite value."""
    sel = _select(rows, init, train_size)
    fts, tts = _values(sel, "finetune_hq_ratio"), _values(sel, "test_hq_ratio")
    mean, std = np.full((len(fts), len(tts)), np.nan), np.full((len(fts), len(tts)), np.nan)
    cells = {}
    for (f, t), cell in group(sel, ("finetune_hq_ratio", "test_hq_ratio")).items():
        i, j = fts.index(f), tts.index(t)
        cells[(i, j)] = (summarize(stats.seed_means(cell, metric).values()), cell)
        mean[i, j], std[i, j] = cells[(i, j)][0].mean, cells[(i, j)][0].std
    return fts, tts, mean, std, cells


def _cell_text(summary: Summary, cell_rows: list[dict], metric: str) -> str:
    """mean ± std over seeds; with a single seed, the value and its bootstrap CI from results.csv."""
    if summary.n == 1 and summary.n_total == 1 and cell_rows:
        low = float(cell_rows[0].get(f"{metric}_ci_low", math.nan))
        high = float(cell_rows[0].get(f"{metric}_ci_high", math.nan))
        if math.isfinite(low) and math.isfinite(high):
            return f"{summary.mean:.3f} [{low:.3f}, {high:.3f}]"
    return summary.format()


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(line) + " |" for line in body
    ]


def grid_table(rows: list[dict], metric: str, init: str, train_size: float) -> list[str]:
    fts, tts, _, _, cells = grid(rows, metric, init, train_size)
    body = [
        [_g(f)] + [_cell_text(*cells[(i, j)], metric) if (i, j) in cells else "" for j in range(len(tts))]
        for i, f in enumerate(fts)
    ]
    return _md_table(["finetune \\ test HQ ratio"] + [_g(t) for t in tts], body)


def summary_table(rows: list[dict], metric: str = "auc") -> str:
    """Plain text: mean ± std over seeds, finetune HQ ratio (rows) x test HQ ratio (columns), per
    initialisation and train size."""
    out = []
    inits = _inits(rows)
    corner = "finetune\\test"
    for init in inits:
        for size in _values(_select(rows, init), "train_size"):
            fts, tts, _, _, cells = grid(rows, metric, init, size)
            out.append(
                f"{metric.upper()} (mean ± std over seeds), init={init_label(init, inits)}, "
                f"train size={size:g}; rows: finetune HQ ratio, columns: test HQ ratio"
            )
            out.append(f"{corner:>13} " + "".join(f"{t:>22g}" for t in tts))
            for i, f in enumerate(fts):
                out.append(
                    f"{f:>13g} "
                    + "".join(f"{(cells[(i, j)][0].format() if (i, j) in cells else ''):>22}" for j in range(len(tts)))
                )
    return "\n".join(out)


def _overview(rows: list[dict], metric: str, inits: list[str]) -> list[str]:
    sizes = _values(rows, "train_size")
    body = []
    for init in inits:
        line = [init_label(init, inits)]
        for size in sizes:
            sel = [r for r in rows if str(r["init"]) == init and _num(r, "train_size") == size]
            line.append(summarize(stats.seed_means(sel, metric).values()).format() if sel else "")
        body.append(line)
    return _md_table(["init \\ train size"] + [_g(s) for s in sizes], body)


def _paired_tables(rows: list[dict], metric: str, inits: list[str]) -> list[str]:
    pooled = stats.pooled_comparisons(rows, metric)
    if not pooled:
        return ["Needs `scratch` and at least one pretrained initialisation with the same seeds; not in this sweep."]
    out = [
        f"Difference in {metric} (pretrained − scratch), paired by seed (same finetuning set and test "
        "subsets). p: two-sided paired t-test and Wilcoxon signed-rank test across seeds, unadjusted for "
        "multiple comparisons; with 5 seeds the Wilcoxon test cannot go below p = 0.0625.",
        "",
        "**Pooled over finetune and test HQ ratios** (per seed, the mean difference over the grid):",
        "",
    ]
    body = []
    for item in pooled:
        r = item["result"]
        body.append(
            [
                init_label(item["init"], inits),
                _g(item["train_size"]),
                str(r.n),
                f"{r.mean_a:.3f}",
                f"{r.mean_b:.3f}",
                _signed(r.mean_diff, r.std_diff),
                _p(r.t_p),
                _p(r.wilcoxon_p),
            ]
        )
    out += _md_table(
        ["init", "train size", "seeds", "pretrained", "scratch", "difference", "t-test p", "Wilcoxon p"], body
    )
    out += ["", "**Per cell:**", ""]
    body = []
    for item in stats.paired_comparisons(rows, metric):
        r = item["result"]
        body.append(
            [
                init_label(item["init"], inits),
                _g(item["train_size"]),
                _g(item["finetune_hq_ratio"]),
                _g(item["test_hq_ratio"]),
                str(r.n),
                _signed(r.mean_diff, r.std_diff),
                _p(r.t_p),
                _p(r.wilcoxon_p),
            ]
        )
    out += _md_table(
        ["init", "train size", "finetune HQ", "test HQ", "seeds", "difference", "t-test p", "Wilcoxon p"], body
    )
    return out


def _ci(r: stats.Paired) -> str:
    low, high = r.ci95
    return f"[{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "n/a"


def headline_contrasts(rows: list[dict], metric: str) -> list[dict]:
    """The contrasts a reader takes from a sweep, each paired by seed with a 95% CI: quality (HQ- minus
    LQ-finetuned on the HQ test) per init and budget; pretrained − scratch at the smallest budget; every
    model minus the intensity-percentile baseline (pooled over the grid) at the smallest budget."""
    inits = _inits(rows)
    out = []
    for item in stats.quality_contrasts([r for r in rows if str(r["init"]) != BASELINE_INIT], metric):
        out.append(
            {
                "contrast": (
                    f"finetune HQ {_g(item['high'])} − {_g(item['low'])}, on test HQ {_g(item['test_hq_ratio'])}"
                ),
                "init": init_label(item["init"], inits),
                "train_size": item["train_size"],
                "result": item["result"],
            }
        )
    sizes = _values(rows, "train_size")
    smallest = [r for r in rows if _num(r, "train_size") == sizes[0]] if sizes else []
    for item in stats.pooled_comparisons(smallest, metric):
        label = init_label(item["init"], inits)
        out.append(
            {
                "contrast": f"{label} − scratch, pooled over the grid",
                "init": label,
                "train_size": item["train_size"],
                "result": item["result"],
            }
        )
    for item in stats.pooled_comparisons(smallest, metric, reference=BASELINE_INIT):
        label = init_label(item["init"], inits)
        out.append(
            {
                "contrast": f"{label} − {BASELINE_INIT}, pooled over the grid",
                "init": label,
                "train_size": item["train_size"],
                "result": item["result"],
            }
        )
    return out


def _headline_table(rows: list[dict], metric: str) -> list[str]:
    items = headline_contrasts(rows, metric)
    if not items:
        return ["Needs at least two finetune HQ ratios or two initialisations; not in this sweep."]
    body = [
        [
            item["contrast"],
            item["init"],
            _g(item["train_size"]),
            str(item["result"].n),
            _signed(item["result"].mean_diff, item["result"].std_diff),
            _ci(item["result"]),
            "yes" if item["result"].resolved else "no",
        ]
        for item in items
    ]
    return [
        f"Differences in {metric}, paired by seed (same finetuning cases and test subsets): mean ± std over "
        "seeds and the Student-t 95% confidence interval of the mean. *Resolved*: the interval excludes 0, "
        "i.e. the contrast is larger than the seed-to-seed noise of this sweep. `percentile-lr` is a logistic "
        "regression on per-channel intensity percentiles fitted to the same finetuning sets (a reference a "
        "CNN should beat).",
        "",
    ] + _md_table(["contrast", "init", "train size", "seeds", "difference", "95% CI", "resolved"], body)


def _signed(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else "")


def _mismatch_table(rows: list[dict], metric: str, inits: list[str]) -> list[str]:
    effects = stats.mismatch_effect(rows, metric)
    levels = sorted({lv for e in effects for lv in e["levels"]})
    body = []
    for e in sorted(effects, key=lambda e: (inits.index(e["init"]), e["train_size"])):
        body.append(
            [init_label(e["init"], inits), _g(e["train_size"])]
            + [e["levels"][lv].format() if lv in e["levels"] else "" for lv in levels]
            + [e["slope"].format()]
        )
    return [
        "Metric by Δ = |finetune HQ ratio − test HQ ratio| (per seed, the mean over cells at that mismatch; "
        "mean ± std over seeds), and the slope of a per-seed least-squares line (metric change per unit "
        "of mismatch; negative: mismatch hurts).",
        "",
    ] + _md_table(["init", "train size"] + [f"Δ={_g(lv)}" for lv in levels] + ["slope"], body)


def _diverged(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if str(r.get("status", "ok")) != "ok"]
    lanes = group(bad, ("init", "finetune_hq_ratio", "train_size", "seed"))
    if not lanes:
        return ["None."]
    body = [[init_label(str(k[0])), _g(k[1]), _g(k[2]), _g(k[3]), str(v[0]["status"])] for k, v in lanes.items()]
    return ["Their metrics are NaN and left out of every mean, std and paired test.", ""] + _md_table(
        ["init", "finetune HQ", "train size", "seed", "status"], body
    )


def report_markdown(rows: list[dict], metric: str, figures: dict[str, str], title: str = "") -> str:
    inits = _inits(rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    first = rows[0]
    listed = {
        key: ", ".join(_g(v) for v in _values(rows, key))
        for key in ("train_size", "finetune_hq_ratio", "test_hq_ratio")
    }
    lines = [
        f"# pfq report{': ' + title if title else ''}",
        "",
        f"Metric: **{metric}**. {len(rows)} rows of results.csv; inits: "
        f"{', '.join(init_label(i, inits) for i in inits)}; train sizes: {listed['train_size']}; finetune HQ "
        f"ratios: {listed['finetune_hq_ratio']}; test HQ ratios: {listed['test_hq_ratio']}; seeds: "
        f"{', '.join(map(str, seeds))}. Each row scores {first.get('n_test', '?')} test cases, averaged over "
        f"{first.get('n_draws', '?')} label-stratified subset draws.",
        "",
        "Cells: mean ± sample std over seeds (`(n=k/m)` when only k of m seeds have a finite value); with a "
        "single seed, the value and its bootstrap 95% CI over test cases.",
        "",
        "## Diverged lanes",
        "",
    ] + _diverged(rows)
    lines += ["", "## Headline contrasts", ""] + _headline_table(rows, metric)
    lines += [
        "",
        "## Overview",
        "",
        f"{metric} per initialisation and train size (per seed, the mean over the "
        "finetune × test HQ ratio grid's finite cells; mean ± std over seeds).",
        "",
    ]
    lines += _overview(rows, metric, inits)
    lines += ["", "## Finetune HQ ratio × test HQ ratio", ""]
    for init in inits:
        for size in _values([r for r in rows if str(r["init"]) == init], "train_size"):
            lines += [f"### init {init_label(init, inits)}, train size {size:g}", ""]
            lines += grid_table(rows, metric, init, size) + [""]
    lines += ["## Pretrained vs scratch", ""] + _paired_tables(rows, metric, inits)
    lines += ["", "## Mismatch effect", ""] + _mismatch_table(rows, metric, inits)
    lines += ["", "## Figures", ""] + [f"![{caption}]({name})" for name, caption in figures.items()]
    return "\n".join(lines) + "\n"


def text_summary(rows: list[dict], metric: str, task: str) -> str:
    inits = _inits(rows)
    out = [f"task {task}: {metric} per init and train size (mean ± std over seeds)"]
    for init in inits:
        for size in _values([r for r in rows if str(r["init"]) == init], "train_size"):
            sel = [r for r in rows if str(r["init"]) == init and _num(r, "train_size") == size]
            out.append(
                f"  {init_label(init, inits):<24} n={size:<6g} "
                f"{summarize(stats.seed_means(sel, metric).values()).format()}"
            )
    for item in headline_contrasts(rows, metric):
        r = item["result"]
        out.append(
            f"  {item['contrast']} ({item['init']}, n={item['train_size']:g}): {_signed(r.mean_diff, r.std_diff)}, "
            f"95% CI {_ci(r)} over {r.n} seeds{'' if r.resolved else ' (not resolved)'}"
        )
    diverged = sum(str(r.get("status", "ok")) != "ok" for r in rows)
    if diverged:
        out.append(f"  {diverged} row(s) from diverged lanes (NaN metrics)")
    return "\n".join(out)
