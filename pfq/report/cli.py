"""Report: summary tables and figures from `results.csv` alone.

    python -m pfq.report WORKDIR [--metric auc]

Writes WORKDIR/report.md and PNG figures next to it (heatmaps over finetune HQ ratio x test HQ ratio,
label-efficiency curves, the mismatch effect), each atomically. Runs at the end of every sweep and can
be rerun at any time: nothing but results.csv is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pfq.faults import maybe_fail
from pfq.io import atomic_write_text
from pfq.report.figures import plot_heatmaps, plot_label_efficiency, plot_mismatch
from pfq.report.tables import report_markdown, text_summary
from pfq.results import metric_columns, read_results


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
        raise ValueError(
            f"metric {metric!r} is not a column of results.csv; choose from {', '.join(metric_columns(all_rows))}"
        )
    tasks = sorted({r["task"] for r in all_rows})
    sections, summaries = [], []
    for task in tasks:
        rows = [r for r in all_rows if r["task"] == task]
        suffix = f"_{task}" if len(tasks) > 1 else ""
        figures = {
            f"heatmap_{metric}{suffix}.png": f"{metric} heatmaps",
            f"label_efficiency_{metric}{suffix}.png": f"{metric} vs train size",
            f"mismatch_{metric}{suffix}.png": f"{metric} vs quality mismatch",
        }
        names = list(figures)
        plot_heatmaps(rows, workdir / names[0], metric)
        plot_label_efficiency(rows, workdir / names[1], metric)
        plot_mismatch(rows, workdir / names[2], metric)
        sections.append(report_markdown(rows, metric, figures, title=task))
        summaries.append(text_summary(rows, metric, task))
    atomic_write_text(workdir / "report.md", "\n".join(sections))
    return "\n\n".join(summaries) + f"\n\nreport: {workdir / 'report.md'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pfq.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
