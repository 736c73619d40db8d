"""Report: summary tables (`tables`) and figures (`figures`) from `results.csv` alone; `cli` writes
them (`python -m pfq.report WORKDIR`, also run at the end of every sweep)."""

from pfq.report.cli import main, write_report
from pfq.report.figures import plot_heatmaps, plot_label_efficiency, plot_mismatch
from pfq.report.tables import grid, grid_table, init_label, report_markdown, summary_table, text_summary
from pfq.results import ID_COLUMNS, metric_columns, read_results

__all__ = [
    "ID_COLUMNS",
    "grid",
    "grid_table",
    "init_label",
    "main",
    "metric_columns",
    "plot_heatmaps",
    "plot_label_efficiency",
    "plot_mismatch",
    "read_results",
    "report_markdown",
    "summary_table",
    "text_summary",
    "write_report",
]
