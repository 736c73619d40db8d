"""CSV manifests: one row per case, image paths relative to the manifest's folder.

Columns: `t2w`, `highb` (aliases `hbv`, `dwi`), `adc`; optional `case_id`, `split`, `center`,
`quality` (`hq`/`lq`, or a numeric PI-QUAL score compared with a threshold) and label columns named
by the task. Errors name the CSV line, case and column.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_COLUMNS: tuple[str, ...] = ("t2w", "highb", "adc")
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {"t2w": ("t2w",), "highb": ("highb", "hbv", "dwi"),
                                              "adc": ("adc",)}
QUALITY_WORDS = {"hq": "hq", "high": "hq", "lq": "lq", "low": "lq"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as possible."""

    message: str
    line: int | None = None
    case_id: str | None = None
    column: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.case_id is not None:
            where.append(f"case {self.case_id!r}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        if self.file is not None:
            where.append(f"file {self.file}")
        return (", ".join(where) + ": " if where else "") + self.message


class ManifestError(ValueError):
    """Raised with every problem found, each naming its line, case, column and file."""

    def __init__(self, manifest: Path | str, problems: Sequence[Problem]):
        self.manifest = Path(manifest)
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{manifest}: {len(self.problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class CaseRecord:
    line: int  # CSV line number (the header is line 1)
    case_id: str
    images: dict[str, Path]  # t2w / highb / adc -> absolute path
    quality: str | None  # 'hq' | 'lq' | None when the manifest has no quality column
    raw: dict[str, str] = field(default_factory=dict)  # every column as written

    @property
    def split(self) -> str | None:
        return self.raw.get("split") or None


@dataclass(frozen=True)
class Manifest:
    path: Path
    cases: list[CaseRecord]

    def __len__(self) -> int:
        return len(self.cases)

    def is_hq(self) -> np.ndarray:
        return np.array([c.quality == "hq" for c in self.cases], dtype=bool)


def parse_quality(raw: str, threshold: float) -> str:
    """'hq'/'lq' (or high/low) as written, else a numeric PI-QUAL score: >= threshold is HQ."""
    text = raw.strip().lower()
    if text in QUALITY_WORDS:
        return QUALITY_WORDS[text]
    try:
        score = float(text)
    except ValueError:
        raise ValueError(f"quality {raw!r} is neither hq/lq nor a numeric PI-QUAL score") from None
    if not np.isfinite(score):
        raise ValueError(f"quality {raw!r} is not finite")
    return "hq" if score >= threshold else "lq"


def _resolve_columns(header: Sequence[str], path: Path) -> dict[str, str]:
    """Map each image role to the manifest's column name, accepting aliases."""
    present = {h.strip(): h for h in header}
    resolved, problems = {}, []
    for role in IMAGE_COLUMNS:
        found = [a for a in COLUMN_ALIASES[role] if a in present]
        if not found:
            names = " / ".join(COLUMN_ALIASES[role])
            problems.append(Problem(f"missing required column ({names})", line=1, column=role))
        elif len(found) > 1:
            problems.append(Problem(f"several columns name the same image: {found}", line=1, column=role))
        else:
            resolved[role] = present[found[0]]
    if problems:
        raise ManifestError(path, problems)
    return resolved


def read_manifest(path: str | Path, *, quality_threshold: float = 4.0,
                  require_quality: bool = True, label_column: str | None = None) -> Manifest:
    """Parse a manifest, collecting every structural problem before raising `ManifestError`.

    This checks the CSV itself (columns, ids, quality values, label presence); `pfq.data.validate`
    additionally opens every image.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [Problem("manifest file not found", file=str(path))])
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig strips a BOM; csv handles CRLF
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    if not header:
        raise ManifestError(path, [Problem("empty manifest (no header)", line=1)])
    columns = _resolve_columns(header, path)
    if not rows:
        raise ManifestError(path, [Problem("manifest has a header but no cases", line=2)])
    has_quality = "quality" in header
    problems: list[Problem] = []
    if require_quality and not has_quality:
        problems.append(Problem("missing required column (quality: hq/lq or a PI-QUAL score)", line=1,
                                column="quality"))
    if label_column is not None and label_column not in header:
        problems.append(Problem(f"missing label column for the task ({label_column})", line=1,
                                column=label_column))
    if problems:
        raise ManifestError(path, problems)

    cases: list[CaseRecord] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        line = index + 2
        raw = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        case_id = raw.get("case_id") or f"row{line}"
        if case_id in seen:
            problems.append(Problem(f"duplicate case_id (first on line {seen[case_id]})", line=line,
                                    case_id=case_id, column="case_id"))
        seen.setdefault(case_id, line)
        images = {}
        for role, column in columns.items():
            value = raw.get(column.strip(), "")
            if not value:
                problems.append(Problem("empty image path", line=line, case_id=case_id, column=column))
                continue
            images[role] = (path.parent / value).resolve()
        quality = None
        if has_quality:
            try:
                quality = parse_quality(raw.get("quality", ""), quality_threshold)
            except ValueError as e:
                problems.append(Problem(str(e), line=line, case_id=case_id, column="quality"))
        if label_column is not None and not raw.get(label_column, ""):
            problems.append(Problem("empty label", line=line, case_id=case_id, column=label_column))
        cases.append(CaseRecord(line=line, case_id=case_id, images=images, quality=quality, raw=raw))
    if problems:
        raise ManifestError(path, problems)
    return Manifest(path=path, cases=cases)


def task_labels(manifest: Manifest, task) -> np.ndarray:
    """Class index per case for a `pfq.tasks.Task`, raising `ManifestError` naming every bad row."""
    labels, problems = [], []
    for case in manifest.cases:
        try:
            labels.append(task.to_class(case.raw.get(task.column, "")))
        except ValueError as e:
            problems.append(Problem(f"invalid label for task {task.name}: {e}", line=case.line,
                                    case_id=case.case_id, column=task.column))
            labels.append(-1)
    if problems:
        raise ManifestError(manifest.path, problems)
    return np.asarray(labels, dtype=np.int32)
