"""Report: summary tables and figures from `results.csv` alone (`python -m pfq.report WORKDIR`)."""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def read_results(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def grid(rows: list[dict], metric: str, init: str | None = None):
    """(finetune ratios, test ratios, mean, std, n) over seeds for one initialisation."""
    cells: dict[tuple[float, float], list[float]] = defaultdict(list)
    for row in rows:
        if init is not None and row["init"] != init:
            continue
        cells[(_num(row["finetune_hq_ratio"]), _num(row["test_hq_ratio"]))].append(_num(row.get(metric)))
    fts = sorted({k[0] for k in cells})
    tts = sorted({k[1] for k in cells})
    mean = np.full((len(fts), len(tts)), np.nan)
    std = np.full_like(mean, np.nan)
    count = np.zeros_like(mean, dtype=int)
    for (f, t), values in cells.items():
        v = np.array([x for x in values if not math.isnan(x)])
        i, j = fts.index(f), tts.index(t)
        count[i, j] = len(v)
        if len(v):
            mean[i, j] = v.mean()
            std[i, j] = v.std(ddof=1) if len(v) > 1 else 0.0
    return fts, tts, mean, std, count


def summary_table(rows: list[dict], metric: str = "auc") -> str:
    """Plain-text table of mean ± std over seeds: finetune HQ ratio (rows) x test HQ ratio (columns)."""
    out = []
    for init in sorted({r["init"] for r in rows}):
        fts, tts, mean, std, count = grid(rows, metric, init)
        out.append(f"{metric.upper()} (mean ± std over seeds), init={init}; rows: finetune HQ ratio, "
                   f"columns: test HQ ratio")
        out.append("finetune\\test " + "".join(f"{t:>16g}" for t in tts))
        for i, f in enumerate(fts):
            out.append(f"{f:>13g} " + "".join(f"{mean[i, j]:>9.3f} ± {std[i, j]:.3f}" for j in range(len(tts))))
    return "\n".join(out)


def plot_heatmap(rows: list[dict], path: Path, metric: str = "auc") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = sorted({r["init"] for r in rows})
    fig, axes = plt.subplots(1, len(inits), figsize=(4.6 * len(inits), 4), squeeze=False)
    for ax, init in zip(axes[0], inits, strict=True):
        fts, tts, mean, std, _ = grid(rows, metric, init)
        im = ax.imshow(mean, cmap="viridis", origin="lower", vmin=np.nanmin(mean), vmax=np.nanmax(mean))
        ax.set_xticks(range(len(tts)), [f"{t:g}" for t in tts])
        ax.set_yticks(range(len(fts)), [f"{f:g}" for f in fts])
        ax.set_xlabel("test HQ ratio")
        ax.set_ylabel("finetune HQ ratio")
        ax.set_title(f"mean {metric.upper()} ({'scratch' if init == 'scratch' else Path(init).name})")
        for i in range(len(fts)):
            for j in range(len(tts)):
                ax.text(j, i, f"{mean[i, j]:.3f}\n±{std[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(workdir: Path, metric: str = "auc") -> str:
    workdir = Path(workdir)
    rows = read_results(workdir / "results.csv")
    plot_heatmap(rows, workdir / f"heatmap_{metric}.png", metric)
    return summary_table(rows, metric)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfq.report", description=__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--metric", default="auc")
    args = parser.parse_args(argv)
    if not (args.workdir / "results.csv").is_file():
        print(f"error: {args.workdir / 'results.csv'} not found", file=sys.stderr)
        return 2
    print(write_report(args.workdir, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
