"""Report figures: heatmaps over finetune x test HQ ratio, label efficiency (metric vs train size) and
the quality-mismatch effect, each written atomically as a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pfq import stats
from pfq.io import atomic_path
from pfq.report.tables import _g, _inits, _num, _values, grid, init_label
from pfq.stats import REFERENCE_INIT, group, summarize


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)


def _label(metric: str) -> str:
    """How a metric column is named on a figure."""
    return {"auc": "AUC", "f1": "F1"}.get(metric, metric.replace("_", " "))


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
    pretrained = stats.pretrained_inits(rows) if REFERENCE_INIT in inits else []
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
    diffs = {
        (size, init): panels[(size, init)][0] - panels[(size, REFERENCE_INIT)][0]
        for size in sizes
        for init in pretrained
    }
    span = max([float(np.nanmax(np.abs(d))) for d in diffs.values() if np.isfinite(d).any()] + [1e-3])
    diff_norm = Normalize(-span, span)

    fig, axes = plt.subplots(
        len(sizes),
        len(columns),
        squeeze=False,
        figsize=(
            1.0 + 0.95 * len(tts) * len(columns) + 0.6 * len(columns),
            0.9 + 0.75 * len(fts) * len(sizes) + 0.5 * len(sizes),
        ),
        layout="constrained",
    )
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
                texts = {
                    (i, j): f"{mean[i, j]:.3f}" + (f"\n±{std[i, j]:.3f}" if math.isfinite(std[i, j]) else "")
                    for i in range(len(fts))
                    for j in range(len(tts))
                }
                im = ax.imshow(mean, cmap=cmap, norm=norm, origin="lower", aspect="auto")
                _annotate(ax, mean, texts, cmap, norm)
                title = init_label(init, inits)
            if r == 0:
                ax.set_title(title, fontsize=10)
            ax.set_xticks(range(len(tts)), [_g(t) for t in tts])
            ax.set_yticks(range(len(fts)), [_g(f) for f in fts])
            if r == len(sizes) - 1:
                ax.set_xlabel("test HQ ratio")
            if c == 0:  # one row per train size, named where the row starts (titles stay short)
                ax.set_ylabel(f"train size {size:g}\nfinetune HQ ratio" if len(sizes) > 1 else "finetune HQ ratio")
            if r == 0 and (c == len(inits) - 1 or is_diff and c == len(columns) - 1):
                fig.colorbar(
                    im,
                    ax=axes[:, c].tolist(),
                    fraction=0.05,
                    pad=0.01,
                    shrink=0.9,
                    label=f"{_label(metric)} difference" if is_diff else f"mean {_label(metric)}",
                )
    size_note = "" if len(sizes) > 1 else f", train size {sizes[0]:g}"
    fig.suptitle(f"{_label(metric)}: mean ± std over seeds{size_note}", fontsize=11)
    _save(fig, path)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _line_style(i: int) -> str:
    return ["-", "--", ":", "-."][i % 4]


def _marker(i: int) -> str:
    return ["o", "s", "^", "D"][i % 4]


def plot_label_efficiency(rows: list[dict], path: Path, metric: str = "auc") -> None:
    """Metric vs train size, one panel per test HQ ratio; colour: finetune HQ ratio; line style and
    marker: init; error bars: std over seeds. With a single train size there is no curve to draw:
    the points stand side by side and the title says so."""
    import matplotlib.pyplot as plt

    inits, sizes = _inits(rows), _values(rows, "train_size")
    fts, tts = _values(rows, "finetune_hq_ratio"), _values(rows, "test_hq_ratio")
    colors = plt.get_cmap("plasma")(np.linspace(0.05, 0.85, max(len(fts), 2)))
    fig, axes = plt.subplots(
        1, len(tts), squeeze=False, sharey=True, figsize=(1.8 + 3.0 * len(tts), 3.4), layout="constrained"
    )
    # log2 offsets that keep error bars apart: per init along curves; with a single train size (no
    # curves) every (finetune ratio, init) gets its own place beside the others
    if len(sizes) > 1:
        jitter = {(fi, k): (k - (len(inits) - 1) / 2) * 0.03 for fi in range(len(fts)) for k in range(len(inits))}
    else:
        n = len(fts) * len(inits)
        jitter = {
            (fi, k): (fi * len(inits) + k - (n - 1) / 2) * min(0.08, 0.8 / n)
            for fi in range(len(fts))
            for k in range(len(inits))
        }
    plotted = False
    for j, t in enumerate(tts):
        ax = axes[0, j]
        for fi, f in enumerate(fts):
            for k, init in enumerate(inits):
                cells = group(
                    [
                        r
                        for r in rows
                        if str(r["init"]) == init
                        and _num(r, "finetune_hq_ratio") == f
                        and _num(r, "test_hq_ratio") == t
                    ],
                    ("train_size",),
                )
                xs, ms, ss = [], [], []
                for (size,), cell in cells.items():
                    s = summarize(stats.seed_means(cell, metric).values())
                    if s.n:
                        xs.append(size * 2 ** jitter[(fi, k)])
                        ms.append(s.mean)
                        ss.append(s.std if math.isfinite(s.std) else 0.0)
                if xs:
                    ax.errorbar(
                        xs, ms, yerr=ss, color=colors[fi], ls=_line_style(k), marker=_marker(k), ms=4, capsize=2
                    )
                    plotted = True
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [_g(s) for s in sizes])
        ax.minorticks_off()
        if len(sizes) == 1:
            ax.set_xlim(sizes[0] / 1.6, sizes[0] * 1.6)
        ax.set_xlabel("train size (labelled cases)")
        ax.set_title(f"test HQ ratio {t:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(_label(metric))
    if plotted:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[fi], marker="o", ms=4) for fi in range(len(fts))] + [
            Line2D([], [], color="0.2", ls=_line_style(k), marker=_marker(k), ms=4) for k in range(len(inits))
        ]
        labels = [f"finetune HQ {f:g}" for f in fts] + [init_label(init, inits) for init in inits]
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    else:
        _no_data(axes[0, 0])
    title = f"Label efficiency: {_label(metric)} vs train size (mean ± std over seeds)"
    if len(sizes) == 1:
        title += f"\nonly one train size ({sizes[0]:g}) in this sweep: no curves; sweep several for label efficiency"
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def plot_mismatch(rows: list[dict], path: Path, metric: str = "auc") -> None:
    """Metric vs |finetune HQ ratio − test HQ ratio|, one panel per train size; colour: init."""
    import matplotlib.pyplot as plt

    inits, sizes = _inits(rows), _values(rows, "train_size")
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, len(sizes), squeeze=False, sharey=True, figsize=(1.6 + 3.2 * len(sizes), 3.8), layout="constrained"
    )
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
                ax.errorbar(
                    np.array(levels) + 0.008 * (k - (len(inits) - 1) / 2),
                    ms,
                    yerr=ss,
                    color=colors(k),
                    marker=_marker(k),
                    ms=4,
                    capsize=2,
                    label=init_label(e["init"], inits),
                )
        ax.set_xticks(levels_all, [_g(lv) for lv in levels_all])
        ax.set_xlabel("|finetune HQ ratio − test HQ ratio|")
        ax.set_title(f"train size {size:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"{_label(metric)}, mean over the cells\nat that mismatch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if labels:  # below the panels: beside them it collides with the title on narrow figures
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8, frameon=False)
    else:
        _no_data(axes[0, 0])
    fig.suptitle(f"Quality mismatch: {_label(metric)} (mean ± std over seeds)", fontsize=11)
    _save(fig, path)
