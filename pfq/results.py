"""results.csv read back: one reader that parses every cell once into the type the trainer wrote.

Rows come back as dicts shaped like the trainer's own rows (text, int and float values), so the
statistics and the report take either without converting strings. Metric cells that are empty or
`nan` (a diverged lane) become NaN.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

# Columns that are not metrics (every other column is a metric or one of its CI bounds).
ID_COLUMNS = (
    "task",
    "init",
    "finetune_hq_ratio",
    "finetune_hq_count",
    "train_size",
    "seed",
    "test_hq_ratio",
    "n_test",
    "n_draws",
    "n_resamples",
    "status",
)
TEXT_COLUMNS = ("task", "init", "status")
INT_COLUMNS = ("finetune_hq_count", "train_size", "seed", "n_test", "n_draws", "n_resamples")
REQUIRED_COLUMNS = ("task", "init", "finetune_hq_ratio", "train_size", "seed", "test_hq_ratio")


class ResultsError(ValueError):
    pass


def _int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def _float(text: str) -> float:
    return float(text) if text.strip() else math.nan


def parse_row(row: dict[str, str]) -> dict:
    """Typed values of one CSV row: text columns as str, counts as int, everything else float."""
    out = {}
    for key, text in row.items():
        if key in TEXT_COLUMNS:
            out[key] = text
        elif key in INT_COLUMNS:
            out[key] = _int(text)
        else:
            out[key] = _float(text)
    return out


def read_results(path: str | os.PathLike) -> list[dict]:
    """Every row of a results.csv, typed; `ResultsError` names the file, line and column of a bad cell."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            if None in row or None in row.values():
                raise ResultsError(f"{path} line {reader.line_num}: expected {len(reader.fieldnames)} cells")
            try:
                rows.append(parse_row(row))
            except ValueError:
                bad = next(k for k in row if _bad_cell(k, row[k]))
                raise ResultsError(
                    f"{path} line {reader.line_num}, column {bad}: {row[bad]!r} is not a "
                    f"{'whole number' if bad in INT_COLUMNS else 'number'}"
                ) from None
    return rows


def _bad_cell(key: str, text: str) -> bool:
    try:
        parse_row({key: text})
    except ValueError:
        return True
    return False


def metric_columns(rows: list[dict]) -> list[str]:
    columns = list(rows[0]) if rows else []
    return [c for c in columns if c not in ID_COLUMNS and not c.endswith(("_ci_low", "_ci_high"))]
