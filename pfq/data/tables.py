"""CSV outputs of the quality tools: written atomically, graded manifests that keep the input intact."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from pfq.data.manifest import COLUMN_ALIASES
from pfq.io import atomic_write_text

GRADE_COLUMNS = ("quality", "quality_score", "quality_source")


def write_csv_atomic(path: Path | str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def graded_manifest_rows(manifest: Path, out: Path, grading) -> tuple[list[str], list[dict]]:
    """The manifest's rows with the grades added (or filled into its `quality` column, keeping labels).

    Every input column and the row order are kept; relative image paths are rewritten relative to
    ``out``'s folder so that they still name the same files."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    if len(rows) != len(grading.quality):
        raise ValueError(f"{manifest}: {len(rows)} rows but {len(grading.quality)} grades")
    image_columns = {a for aliases in COLUMN_ALIASES.values() for a in aliases} & {h.strip() for h in header}
    src, dst = Path(manifest).resolve().parent, Path(out).resolve().parent
    for row, q, score, source in zip(rows, grading.quality, grading.score, grading.source, strict=True):
        for column in header:
            value = (row.get(column) or "").strip()
            if column.strip() in image_columns and value and not os.path.isabs(value) and src != dst:
                row[column] = os.path.relpath(src / value, dst)
        if source == "iqm":
            row["quality"] = q  # labelled rows keep their value as written
        row["quality_score"] = f"{float(score):.4f}"
        row["quality_source"] = source
    columns = header + [c for c in GRADE_COLUMNS if c not in header]
    return columns, rows
