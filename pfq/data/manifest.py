"""CSV manifests: one row per case, image paths relative to the manifest's folder.

Columns: `t2w`, `highb` (aliases `hbv`, `dwi`), `adc`; optional `case_id`, `split`, `center`,
`quality` and label columns named by the task. `quality` is `hq`/`lq` (also `high`/`low`) or a
numeric PI-QUAL score read on a configurable scale (`QUALITY_SCALES`) with a threshold at or above
which a case is HQ. Every problem names the CSV line, case and column; all of them are collected
before `ManifestError` is raised, so a user fixes a manifest in one pass. Format: `docs/data.md`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pfq.safe_open import UnsafeFileError, open_regular

IMAGE_COLUMNS: tuple[str, ...] = ("t2w", "highb", "adc")
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {"t2w": ("t2w",), "highb": ("highb", "hbv", "dwi"), "adc": ("adc",)}
QUALITY_WORDS = {"hq": "hq", "high": "hq", "lq": "lq", "low": "lq"}


@dataclass(frozen=True)
class QualityScale:
    """A numeric image-quality score: integers in [low, high]; scores >= threshold are HQ."""

    name: str
    low: int
    high: int
    default_threshold: float
    description: str


QUALITY_SCALES: dict[str, QualityScale] = {
    s.name: s
    for s in [
        # v1 (2020): 1-5; >=4 means all three sequences are independently diagnostic.
        QualityScale("piqual_v1", 1, 5, 4.0, "PI-QUAL v1, 1-5"),
        # v2 (2024): 1 inadequate, 2 acceptable, 3 optimal; 3 is the analogue of v1 >=4.
        QualityScale("piqual_v2", 1, 3, 3.0, "PI-QUAL v2, 1-3"),
    ]
}


@dataclass(frozen=True)
class QualityRule:
    """How a `quality` cell becomes 'hq' or 'lq'."""

    scale: QualityScale
    threshold: float

    def classify(self, raw: str) -> str:
        text = raw.strip().lower()
        if not text:
            raise ValueError("missing quality value (expected hq/lq or a PI-QUAL score)")
        if text in QUALITY_WORDS:
            return QUALITY_WORDS[text]
        try:
            score = float(text)
        except ValueError:
            raise ValueError(
                f"unknown quality value {raw!r}: expected hq/lq or a {self.scale.description} score"
            ) from None
        if not np.isfinite(score) or score != int(score) or not self.scale.low <= score <= self.scale.high:
            raise ValueError(
                f"quality score {raw!r} is not an integer in [{self.scale.low}, {self.scale.high}] "
                f"({self.scale.description})"
            )
        return "hq" if score >= self.threshold else "lq"


def quality_rule(scale: str = "piqual_v1", threshold: float | None = None) -> QualityRule:
    """The rule for a named scale; `threshold` None takes the scale's default."""
    if scale not in QUALITY_SCALES:
        raise ValueError(f"unknown quality scale {scale!r}; choose from {sorted(QUALITY_SCALES)}")
    s = QUALITY_SCALES[scale]
    t = s.default_threshold if threshold is None else float(threshold)
    if not s.low < t <= s.high:  # a threshold at `low` or above `high` makes every score one class
        raise ValueError(f"quality threshold {threshold} is outside ({s.low}, {s.high}] for scale {scale}")
    return QualityRule(s, t)


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


def _identity_columns() -> dict[str, str]:
    return {role: role for role in IMAGE_COLUMNS}


@dataclass(frozen=True)
class CaseRecord:
    line: int  # CSV line number (the header is line 1)
    case_id: str
    images: dict[str, Path]  # t2w / highb / adc -> absolute path
    quality: str | None  # 'hq' | 'lq' | None when the manifest has no quality column
    raw: dict[str, str] = field(default_factory=dict)  # every column as written
    columns: dict[str, str] = field(default_factory=_identity_columns)  # role -> the manifest's column name

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


def _resolve_columns(header: Sequence[str]) -> tuple[dict[str, str], list[Problem]]:
    """Map each image role to the manifest's column name, accepting aliases."""
    present = {h.strip() for h in header}
    resolved, problems = {}, []
    for name in sorted(present):  # csv.DictReader keeps only the last of two equal names
        positions = [i + 1 for i, h in enumerate(header) if h.strip() == name]
        if len(positions) > 1 and name:
            problems.append(
                Problem(
                    f"the header names column {name!r} {len(positions)} times (fields "
                    f"{', '.join(map(str, positions))})",
                    line=1,
                    column=name,
                )
            )
    for role in IMAGE_COLUMNS:
        found = [a for a in COLUMN_ALIASES[role] if a in present]
        if not found:
            names = " / ".join(COLUMN_ALIASES[role])
            problems.append(Problem(f"missing required column ({names})", line=1, column=role))
        elif len(found) > 1:
            problems.append(Problem(f"several columns name the same image: {found}", line=1, column=role))
        else:
            resolved[role] = found[0]
    return resolved, problems


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (CSV line number, row) pairs; a BOM and CRLF line ends are accepted."""
    with io.TextIOWrapper(open_regular(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h for h in (reader.fieldnames or [])]
        rows = []
        for row in reader:
            rows.append((reader.line_num, row))  # line_num: the record's last physical line
    return header, rows


def parse_manifest(
    path: str | Path,
    *,
    quality_threshold: float | None = None,
    quality_scale: str = "piqual_v1",
    require_quality: bool = True,
    label_column: str | None = None,
) -> tuple[Manifest | None, list[Problem]]:
    """Parse a manifest and collect every structural problem (columns, ids, paths, quality values;
    `label_column` is only checked for presence, `label_problems` checks its values). Returns
    (None, problems) when the file cannot be read as a table at all. Without `require_quality`,
    blank quality cells are allowed (quality None: to be graded from the images)."""
    path = Path(path)
    rule = quality_rule(quality_scale, quality_threshold)
    try:
        header, rows = _read_rows(path)
    except UnsafeFileError as e:
        reason = "manifest file not found" if e.reason == "file not found" else f"manifest is {e.reason}"
        return None, [Problem(reason, file=str(path))]
    except UnicodeDecodeError as e:
        return None, [Problem(f"manifest is not UTF-8 text ({e.reason} at byte {e.start})", file=str(path))]
    except csv.Error as e:
        return None, [Problem(f"manifest is not valid CSV ({e})", file=str(path))]
    if not header or not any(h.strip() for h in header):
        return None, [Problem("empty manifest (no header)", line=1)]
    columns, problems = _resolve_columns(header)
    stripped = {h.strip() for h in header}
    has_quality = "quality" in stripped
    if require_quality and not has_quality:
        problems.append(
            Problem("missing required column (quality: hq/lq or a PI-QUAL score)", line=1, column="quality")
        )
    if label_column is not None and label_column not in stripped:
        problems.append(Problem(f"missing label column for the task ({label_column})", line=1, column=label_column))
    if problems:
        return None, problems
    if not rows:
        return None, [Problem("manifest has a header but no cases", line=2)]

    cases: list[CaseRecord] = []
    seen: dict[str, int] = {}
    has_ids = "case_id" in stripped
    for line, row in rows:
        extra = row.get(None)  # DictReader puts surplus fields under None
        raw = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        case_id = raw.get("case_id") or f"row{line}"
        if extra:
            problems.append(
                Problem(
                    f"{len(extra)} more field(s) than the header has columns (an unquoted comma?)",
                    line=line,
                    case_id=case_id,
                )
            )
        if has_ids and not raw.get("case_id"):
            problems.append(Problem("empty case_id", line=line, case_id=case_id, column="case_id"))
        elif case_id in seen:
            problems.append(
                Problem(
                    f"duplicate case_id (first on line {seen[case_id]})", line=line, case_id=case_id, column="case_id"
                )
            )
        seen.setdefault(case_id, line)
        images = {}
        for role, column in columns.items():
            value = raw.get(column, "")
            if not value:
                problems.append(Problem("empty image path", line=line, case_id=case_id, column=column))
                continue
            if any(ord(ch) < 32 for ch in value):  # a NUL would make the OS cut or refuse the path
                problems.append(
                    Problem(
                        f"image path {value!r} contains a control character", line=line, case_id=case_id, column=column
                    )
                )
                continue
            try:
                images[role] = (path.parent / value).resolve()
            except (RuntimeError, OSError) as e:  # pathlib raises RuntimeError for a symlink loop
                reason = "a symlink loop" if isinstance(e, RuntimeError) else e.strerror
                problems.append(
                    Problem(
                        f"image path cannot be resolved: {reason}",
                        line=line,
                        case_id=case_id,
                        column=column,
                        file=value,
                    )
                )
        quality = None
        if has_quality and (require_quality or raw.get("quality")):  # not required: blank cells are ungraded
            try:
                quality = rule.classify(raw.get("quality", ""))
            except ValueError as e:
                problems.append(Problem(str(e), line=line, case_id=case_id, column="quality"))
        cases.append(
            CaseRecord(line=line, case_id=case_id, images=images, quality=quality, raw=raw, columns=dict(columns))
        )
    return Manifest(path=path, cases=cases), problems


def read_manifest(
    path: str | Path,
    *,
    quality_threshold: float | None = None,
    quality_scale: str = "piqual_v1",
    require_quality: bool = True,
    label_column: str | None = None,
) -> Manifest:
    """Parse a manifest, raising `ManifestError` with every structural problem.

    This checks the CSV itself; `pfq.data.validate` additionally checks labels and opens every image.
    """
    manifest, problems = parse_manifest(
        path,
        quality_threshold=quality_threshold,
        quality_scale=quality_scale,
        require_quality=require_quality,
        label_column=label_column,
    )
    if problems or manifest is None:
        raise ManifestError(path, problems)
    return manifest


def label_problems(manifest: Manifest, task) -> tuple[np.ndarray, list[Problem]]:
    """Class index per case for a `pfq.tasks.Task` (-1 where invalid) and a problem per bad row."""
    labels, problems = [], []
    for case in manifest.cases:
        raw = case.raw.get(task.column, "")
        if not raw:
            problems.append(Problem("empty label", line=case.line, case_id=case.case_id, column=task.column))
            labels.append(-1)
            continue
        try:
            labels.append(task.to_class(raw))
        except ValueError as e:
            problems.append(
                Problem(
                    f"invalid label for task {task.name}: {e}", line=case.line, case_id=case.case_id, column=task.column
                )
            )
            labels.append(-1)
    return np.asarray(labels, dtype=np.int32), problems


def domain_problems(manifest: Manifest, skip: tuple[tuple[int, str], ...] = ()) -> list[Problem]:
    """A problem per non-empty cell of a known label column (`pfq.tasks.LABEL_DOMAINS`: pirads,
    isup, gleason, case_csPCa) outside its column's domain; empty cells are fine (not every case
    has every label). `skip`: (line, column) cells already reported."""
    from pfq.tasks import LABEL_DOMAINS

    problems = []
    for case in manifest.cases:
        for column, (check, domain) in LABEL_DOMAINS.items():
            raw = case.raw.get(column, "")
            if not raw or (case.line, column) in skip:
                continue
            try:
                check(raw)
            except ValueError as e:
                problems.append(
                    Problem(
                        f"invalid {column} value ({domain}): {e}", line=case.line, case_id=case.case_id, column=column
                    )
                )
    return problems
