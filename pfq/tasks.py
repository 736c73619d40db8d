"""Classification tasks: which manifest column a task reads and how a raw value becomes a class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class LabelError(ValueError):
    """A label value that the task cannot use."""


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise LabelError(f"not a number: {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise LabelError(f"not a finite number: {raw!r}")
    return value


def _integer_in(raw: str, low: int, high: int) -> int:
    value = _number(raw)
    if value != int(value) or not low <= value <= high:
        raise LabelError(f"{raw!r} is not an integer in [{low}, {high}]")
    return int(value)


def _yes_no(raw: str) -> int:
    text = str(raw).strip().lower()
    if text in {"yes", "1", "true", "1.0"}:
        return 1
    if text in {"no", "0", "false", "0.0"}:
        return 0
    raise LabelError(f"{raw!r} is not YES/NO or 1/0")


def _gleason_score(raw: str) -> int:
    """A Gleason score: the sum (2-10) or 'primary+secondary' with each pattern 1-5."""
    parts = str(raw).split("+")
    if len(parts) == 2:
        return sum(_integer_in(p.strip(), 1, 5) for p in parts)
    return _integer_in(raw, 2, 10)


# What the known label columns can hold, whichever task (if any) reads them: `validate` checks every
# non-empty cell of these columns always; a task's own mapping (`Task.to_class`) may accept less.
LABEL_DOMAINS: dict[str, tuple[Callable[[str], int], str]] = {
    "pirads": (lambda r: _integer_in(r, 1, 5), "PI-RADS 1-5"),
    "isup": (lambda r: _integer_in(r, 0, 5), "ISUP grade group 0-5 (0: no cancer)"),
    "gleason": (_gleason_score, "Gleason score: the sum 2-10 or 'primary+secondary'"),
    "case_csPCa": (_yes_no, "YES/NO or 1/0"),
}


@dataclass(frozen=True)
class Task:
    name: str
    column: str
    num_classes: int
    to_class: Callable[[str], int]
    description: str

    @property
    def binary(self) -> bool:
        return self.num_classes == 2


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("pirads_ge4", "pirads", 2, lambda r: int(_integer_in(r, 1, 5) >= 4), "PI-RADS >=4 vs <4"),
        Task("pirads_ge3", "pirads", 2, lambda r: int(_integer_in(r, 1, 5) >= 3), "PI-RADS >=3 vs <3"),
        # Upstream's 4-class risk task: class = PI-RADS - 2, so PI-RADS 1 is not a valid label.
        Task("pirads_4class", "pirads", 4, lambda r: _integer_in(r, 2, 5) - 2, "PI-RADS 2/3/4/5"),
        Task("isup", "isup", 6, lambda r: _integer_in(r, 0, 5), "ISUP grade group 0-5"),
        Task("cspca", "isup", 2, lambda r: int(_integer_in(r, 0, 5) >= 2), "csPCa: ISUP >=2"),
        Task("case_cspca", "case_csPCa", 2, _yes_no, "csPCa from a PI-CAI style YES/NO column"),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]
