"""Report: summary tables and figures from `results.csv` alone.

    python -m pfq.report WORKDIR [--metric auc]

Writes WORKDIR/report.md and PNG figures next to it (heatmaps over finetune HQ ratio x test HQ ratio,
label-efficiency curves, the mismatch effect), each atomically. Runs at the end of every sweep and can
be rerun at any time: nothing but results.csv is read.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pfq import stats
from pfq.faults import maybe_fail
from pfq.io import atomic_path, atomic_write_text
from pfq.stats import REFERENCE_INIT, Summary, as_float, group, summarize

# Columns that are not metrics (the rest that are numeric are, CI bounds aside).
ID_COLUMNS = ("task", "init", "finetune_hq_ratio", "finetune_hq_count", "train_size", "seed", "test_hq_ratio",
              "n_test", "n_draws", "n_resamples", "status")


# ----------------------------------------------------------------------------------------------
# Reading results.
# ----------------------------------------------------------------------------------------------
def read_results(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric_columns(rows: list[dict]) -> list[str]:
    columns = list(rows[0]) if rows else []
    return [c for c in columns if c not in ID_COLUMNS and not c.endswith(("_ci_low", "_ci_high"))]


def init_label(init: str, inits: Sequence[str] = ()) -> str:
    """'scratch', or a checkpoint directory's name (its full path if two share a name)."""
    if init == REFERENCE_INIT:
        return init
    name = Path(str(init).rstrip("/")).name or str(init)
    clash = [i for i in inits if i != init and Path(str(i).rstrip("/")).name == name]
    return str(init) if clash else name


def _inits(rows: list[dict]) -> list[str]:
    """Pretrained initialisations first, scratch last."""
    inits = sorted({str(r["init"]) for r in rows})
    return [i for i in inits if i != REFERENCE_INIT] + [i for i in inits if i == REFERENCE_INIT]


def _num(row: dict, key: str) -> float:
    return round(as_float(row[key]), 9)  # as stats.key_of, so values from a CSV and the trainer agree


def _values(rows: list[dict], key: str) -> list[float]:
    return sorted({_num(r, key) for r in rows})


def _select(rows: list[dict], init: str | None = None, train_size: float | None = None) -> list[dict]:
    return [r for r in rows if (init is None or str(r["init"]) == init)
            and (train_size is None or _num(r, "train_size") == train_size)]


def _g(x: float) -> str:
    return f"{x:g}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------
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
        low = as_float(cell_rows[0].get(f"{metric}_ci_low"))
        high = as_float(cell_rows[0].get(f"{metric}_ci_high"))
        if math.isfinite(low) and math.isfinite(high):
            return f"{summary.mean:.3f} [{low:.3f}, {high:.3f}]"
    return summary.format()


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(line) + " |" for line in body])


def grid_table(rows: list[dict], metric: str, init: str, train_size: float) -> list[str]:
    fts, tts, _, _, cells = grid(rows, metric, init, train_size)
    body = [[_g(f)] + [_cell_text(*cells[(i, j)], metric) if (i, j) in cells else "" for j in range(len(tts))]
            for i, f in enumerate(fts)]
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
            out.append(f"{metric.upper()} (mean ± std over seeds), init={init_label(init, inits)}, "
                       f"train size={size:g}; rows: finetune HQ ratio, columns: test HQ ratio")
            out.append(f"{corner:>13} " + "".join(f"{t:>22g}" for t in tts))
            for i, f in enumerate(fts):
                out.append(f"{f:>13g} " + "".join(f"{(cells[(i, j)][0].format() if (i, j) in cells else ''):>22}"
                                                  for j in range(len(tts))))
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
        return ["Needs `scratch` and at least one pretrained initialisation with the same seeds; not in this "
                "sweep."]
    out = [f"Difference in {metric} (pretrained − scratch), paired by seed (same finetuning set and test "
           "subsets). p: two-sided paired t-test and Wilcoxon signed-rank test across seeds, unadjusted for "
           "multiple comparisons; with 5 seeds the Wilcoxon test cannot go below p = 0.0625.", "",
           "**Pooled over finetune and test HQ ratios** (per seed, the mean difference over the grid):", ""]
    body = []
    for item in pooled:
        r = item["result"]
        body.append([init_label(item["init"], inits), _g(item["train_size"]), str(r.n), f"{r.mean_a:.3f}",
                     f"{r.mean_b:.3f}", _signed(r.mean_diff, r.std_diff), _p(r.t_p), _p(r.wilcoxon_p)])
    out += _md_table(["init", "train size", "seeds", "pretrained", "scratch", "difference", "t-test p",
                      "Wilcoxon p"], body)
    out += ["", "**Per cell:**", ""]
    body = []
    for item in stats.paired_comparisons(rows, metric):
        r = item["result"]
        body.append([init_label(item["init"], inits), _g(item["train_size"]), _g(item["finetune_hq_ratio"]),
                     _g(item["test_hq_ratio"]), str(r.n), _signed(r.mean_diff, r.std_diff), _p(r.t_p),
                     _p(r.wilcoxon_p)])
    out += _md_table(["init", "train size", "finetune HQ", "test HQ", "seeds", "difference", "t-test p",
                      "Wilcoxon p"], body)
    return out


def _signed(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else "")


def _mismatch_table(rows: list[dict], metric: str, inits: list[str]) -> list[str]:
    effects = stats.mismatch_effect(rows, metric)
    levels = sorted({lv for e in effects for lv in e["levels"]})
    body = []
    for e in sorted(effects, key=lambda e: (inits.index(e["init"]), e["train_size"])):
        body.append([init_label(e["init"], inits), _g(e["train_size"])]
                    + [e["levels"][lv].format() if lv in e["levels"] else "" for lv in levels]
                    + [e["slope"].format()])
    return (["Metric by Δ = |finetune HQ ratio − test HQ ratio| (per seed, the mean over cells at that mismatch; "
             "mean ± std over seeds), and the slope of a per-seed least-squares line (metric change per unit "
             "of mismatch; negative: mismatch hurts).", ""]
            + _md_table(["init", "train size"] + [f"Δ={_g(lv)}" for lv in levels] + ["slope"], body))


def _diverged(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if str(r.get("status", "ok")) != "ok"]
    lanes = group(bad, ("init", "finetune_hq_ratio", "train_size", "seed"))
    if not lanes:
        return ["None."]
    body = [[init_label(str(k[0])), _g(k[1]), _g(k[2]), _g(k[3]), str(v[0]["status"])] for k, v in lanes.items()]
    return (["Their metrics are NaN and left out of every mean, std and paired test.", ""]
            + _md_table(["init", "finetune HQ", "train size", "seed", "status"], body))


def report_markdown(rows: list[dict], metric: str, figures: dict[str, str], title: str = "") -> str:
    inits = _inits(rows)
    seeds = sorted({int(as_float(r["seed"])) for r in rows})
    first = rows[0]
    listed = {key: ", ".join(_g(v) for v in _values(rows, key)) for key in
              ("train_size", "finetune_hq_ratio", "test_hq_ratio")}
    lines = [f"# pfq report{': ' + title if title else ''}", "",
             f"Metric: **{metric}**. {len(rows)} rows of results.csv; inits: "
             f"{', '.join(init_label(i, inits) for i in inits)}; train sizes: {listed['train_size']}; finetune HQ "
             f"ratios: {listed['finetune_hq_ratio']}; test HQ ratios: {listed['test_hq_ratio']}; seeds: "
             f"{', '.join(map(str, seeds))}. Each row scores {first.get('n_test', '?')} test cases, averaged over "
             f"{first.get('n_draws', '?')} label-stratified subset draws.", "",
             "Cells: mean ± sample std over seeds (`(n=k/m)` when only k of m seeds have a finite value); with a "
             "single seed, the value and its bootstrap 95% CI over test cases.", "",
             "## Diverged lanes", ""] + _diverged(rows)
    lines += ["", "## Overview", "", f"{metric} per initialisation and train size (per seed, the mean over the "
              "finetune × test HQ ratio grid's finite cells; mean ± std over seeds).", ""]
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


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)


def _annotate(ax, matrix: np.ndarray, texts: dict, cmap, norm) -> None:
    for (i, j), text in texts.items():
        value = matrix[i, j]
        if not math.isfinite(value):
            ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="0.3")
            continue
        r, g, b, _ = cmap(norm(value))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def plot_heatmaps(rows: list[dict], path: Path, metric: str = "auc") -> None:
    """Mean metric over finetune HQ ratio x test HQ ratio: one panel per init (columns) and train size
    (rows), on one colour scale; plus pretrained − scratch panels on a diverging scale when both exist."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    inits, sizes = _inits(rows), _values(rows, "train_size")
    pretrained = [i for i in inits if i != REFERENCE_INIT] if REFERENCE_INIT in inits else []
    columns = [(init, False) for init in inits] + [(init, True) for init in pretrained]
    fts, tts = _values(rows, "finetune_hq_ratio"), _values(rows, "test_hq_ratio")
    panels = {}
    for size in sizes:
        for init in inits:
            f_i, t_i, m, sd, _ = grid(rows, metric, init, size)
            mean, std = np.full((len(fts), len(tts)), np.nan), np.full((len(fts), len(tts)), np.nan)
            rows_at, cols_at = [fts.index(f) for f in f_i], [tts.index(t) for t in t_i]
            mean[np.ix_(rows_at, cols_at)], std[np.ix_(rows_at, cols_at)] = m, sd
            panels[(size, init)] = (mean, std)
    finite = np.concatenate([m[np.isfinite(m)] for m, _ in panels.values()] + [np.zeros(0)])
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    diff_cmap = plt.get_cmap("RdBu").with_extremes(bad="0.85")
    norm = Normalize(vmin, vmax)
    diffs = {(size, init): panels[(size, init)][0] - panels[(size, REFERENCE_INIT)][0]
             for size in sizes for init in pretrained}
    span = max([float(np.nanmax(np.abs(d))) for d in diffs.values() if np.isfinite(d).any()] + [1e-3])
    diff_norm = Normalize(-span, span)

    fig, axes = plt.subplots(len(sizes), len(columns), squeeze=False,
                             figsize=(1.0 + 0.95 * len(tts) * len(columns) + 0.6 * len(columns),
                                      0.9 + 0.75 * len(fts) * len(sizes) + 0.5 * len(sizes)), layout="constrained")
    for r, size in enumerate(sizes):
        for c, (init, is_diff) in enumerate(columns):
            ax = axes[r, c]
            if is_diff:
                matrix = diffs[(size, init)]
                texts = {(i, j): f"{matrix[i, j]:+.3f}" for i in range(len(fts)) for j in range(len(tts))}
                im = ax.imshow(matrix, cmap=diff_cmap, norm=diff_norm, origin="lower", aspect="auto")
                _annotate(ax, matrix, texts, diff_cmap, diff_norm)
                title = f"{init_label(init, inits)} − scratch"
            else:
                mean, std = panels[(size, init)]
                texts = {(i, j): f"{mean[i, j]:.3f}" + (f"\n±{std[i, j]:.3f}" if math.isfinite(std[i, j]) else "")
                         for i in range(len(fts)) for j in range(len(tts))}
                im = ax.imshow(mean, cmap=cmap, norm=norm, origin="lower", aspect="auto")
                _annotate(ax, mean, texts, cmap, norm)
                title = init_label(init, inits)
            ax.set_title(f"{title}, n={size:g}" if len(sizes) > 1 else title, fontsize=10)
            ax.set_xticks(range(len(tts)), [_g(t) for t in tts])
            ax.set_yticks(range(len(fts)), [_g(f) for f in fts])
            if r == len(sizes) - 1:
                ax.set_xlabel("test HQ ratio")
            if c == 0:
                ax.set_ylabel("finetune HQ ratio")
            if r == 0 and (c == len(inits) - 1 or is_diff and c == len(columns) - 1):
                fig.colorbar(im, ax=axes[:, c].tolist(), fraction=0.05, pad=0.01, shrink=0.9,
                             label=f"{metric} difference" if is_diff else f"mean {metric}")
    fig.suptitle(f"{metric} over seeds (mean ± std)", fontsize=11)
    _save(fig, path)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _line_style(i: int) -> str:
    return ["-", "--", ":", "-."][i % 4]


def plot_label_efficiency(rows: list[dict], path: Path, metric: str = "auc") -> None:
    """Metric vs train size, one panel per test HQ ratio; colour: finetune HQ ratio; line style: init;
    error bars: std over seeds."""
    import matplotlib.pyplot as plt

    inits, sizes = _inits(rows), _values(rows, "train_size")
    fts, tts = _values(rows, "finetune_hq_ratio"), _values(rows, "test_hq_ratio")
    colors = plt.get_cmap("plasma")(np.linspace(0.05, 0.85, max(len(fts), 2)))
    fig, axes = plt.subplots(1, len(tts), squeeze=False, sharey=True, figsize=(1.8 + 3.0 * len(tts), 3.4),
                             layout="constrained")
    jitter = {init: (k - (len(inits) - 1) / 2) * 0.03 for k, init in enumerate(inits)}  # log2 offsets
    plotted = False
    for j, t in enumerate(tts):
        ax = axes[0, j]
        for fi, f in enumerate(fts):
            for k, init in enumerate(inits):
                cells = group([r for r in rows if str(r["init"]) == init and _num(r, "finetune_hq_ratio") == f
                               and _num(r, "test_hq_ratio") == t], ("train_size",))
                xs, ms, ss = [], [], []
                for (size,), cell in cells.items():
                    s = summarize(stats.seed_means(cell, metric).values())
                    if s.n:
                        xs.append(size * 2 ** jitter[init])
                        ms.append(s.mean)
                        ss.append(s.std if math.isfinite(s.std) else 0.0)
                if xs:
                    ax.errorbar(xs, ms, yerr=ss, color=colors[fi], ls=_line_style(k), marker="o", ms=4, capsize=2)
                    plotted = True
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [_g(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("train size (labelled cases)")
        ax.set_title(f"test HQ ratio {t:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(metric)
    if plotted:
        from matplotlib.lines import Line2D

        handles = ([Line2D([], [], color=colors[fi], marker="o", ms=4) for fi in range(len(fts))]
                   + [Line2D([], [], color="0.2", ls=_line_style(k)) for k in range(len(inits))])
        labels = [f"finetune HQ {f:g}" for f in fts] + [init_label(init, inits) for init in inits]
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    else:
        _no_data(axes[0, 0])
    fig.suptitle(f"Label efficiency: {metric} vs train size (mean ± std over seeds)", fontsize=11)
    _save(fig, path)


def plot_mismatch(rows: list[dict], path: Path, metric: str = "auc") -> None:
    """Metric vs |finetune HQ ratio − test HQ ratio|, one panel per train size; colour: init."""
    import matplotlib.pyplot as plt

    inits, sizes = _inits(rows), _values(rows, "train_size")
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(sizes), squeeze=False, sharey=True, figsize=(1.2 + 3.2 * len(sizes), 3.4),
                             layout="constrained")
    effects = stats.mismatch_effect(rows, metric)
    levels_all = sorted({lv for e in effects for lv in e["levels"]})
    for c, size in enumerate(sizes):
        ax = axes[0, c]
        for e in (e for e in effects if e["train_size"] == size):
            levels = [lv for lv, s in e["levels"].items() if s.n]
            ms = [e["levels"][lv].mean for lv in levels]
            ss = [e["levels"][lv].std if math.isfinite(e["levels"][lv].std) else 0.0 for lv in levels]
            k = inits.index(e["init"])
            if levels:
                ax.errorbar(np.array(levels) + 0.008 * (k - (len(inits) - 1) / 2), ms, yerr=ss, color=colors(k),
                            marker="o", ms=4, capsize=2, label=init_label(e["init"], inits))
        ax.set_xticks(levels_all, [_g(lv) for lv in levels_all])
        ax.set_xlabel("|finetune HQ ratio − test HQ ratio|")
        ax.set_title(f"train size {size:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(metric)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    else:
        _no_data(axes[0, 0])
    fig.suptitle(f"Quality mismatch: {metric} (per seed, mean over cells at that mismatch; mean ± std over seeds)",
                 fontsize=10)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------
def write_report(workdir: Path, metric: str = "auc") -> str:
    """Write report.md and the figures from WORKDIR/results.csv; return a short text summary."""
    import matplotlib

    matplotlib.use("Agg")
    workdir = Path(workdir)
    maybe_fail("report")
    all_rows = read_results(workdir / "results.csv")
    if not all_rows:
        raise ValueError(f"{workdir / 'results.csv'} has no rows")
    if metric not in metric_columns(all_rows):
        raise ValueError(f"metric {metric!r} is not a column of results.csv; choose from "
                         f"{', '.join(metric_columns(all_rows))}")
    tasks = sorted({r["task"] for r in all_rows})
    sections, summaries = [], []
    for task in tasks:
        rows = [r for r in all_rows if r["task"] == task]
        suffix = f"_{task}" if len(tasks) > 1 else ""
        figures = {f"heatmap_{metric}{suffix}.png": f"{metric} heatmaps",
                   f"label_efficiency_{metric}{suffix}.png": f"{metric} vs train size",
                   f"mismatch_{metric}{suffix}.png": f"{metric} vs quality mismatch"}
        names = list(figures)
        plot_heatmaps(rows, workdir / names[0], metric)
        plot_label_efficiency(rows, workdir / names[1], metric)
        plot_mismatch(rows, workdir / names[2], metric)
        sections.append(report_markdown(rows, metric, figures, title=task))
        summaries.append(_text_summary(rows, metric, task))
    atomic_write_text(workdir / "report.md", "\n".join(sections))
    return "\n\n".join(summaries) + f"\n\nreport: {workdir / 'report.md'}"


def _text_summary(rows: list[dict], metric: str, task: str) -> str:
    inits = _inits(rows)
    out = [f"task {task}: {metric} per init and train size (mean ± std over seeds)"]
    for init in inits:
        for size in _values([r for r in rows if str(r["init"]) == init], "train_size"):
            sel = [r for r in rows if str(r["init"]) == init and _num(r, "train_size") == size]
            out.append(f"  {init_label(init, inits):<24} n={size:<6g} "
                       f"{summarize(stats.seed_means(sel, metric).values()).format()}")
    for item in stats.pooled_comparisons(rows, metric):
        r = item["result"]
        out.append(f"  {init_label(item['init'], inits)} − scratch, n={item['train_size']:g}: "
                   f"{_signed(r.mean_diff, r.std_diff)} over {r.n} seeds (t-test p {_p(r.t_p)}, "
                   f"Wilcoxon p {_p(r.wilcoxon_p)})")
    diverged = sum(str(r.get("status", "ok")) != "ok" for r in rows)
    if diverged:
        out.append(f"  {diverged} row(s) from diverged lanes (NaN metrics)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfq.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--metric", default="auc", help="a metric column of results.csv (default: auc)")
    args = parser.parse_args(argv)
    if not (args.workdir / "results.csv").is_file():
        print(f"error: {args.workdir / 'results.csv'} not found", file=sys.stderr)
        return 2
    try:
        print(write_report(args.workdir, args.metric))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
