"""Errors raised by the converter; the CLI turns them into a message and a non-zero exit."""

from __future__ import annotations


class ConvertError(Exception):
    """A checkpoint could not be read or mapped. `problems` lists each offending key or item;
    the message shows the first SHOWN of them (a wrong size can mismatch every key)."""

    SHOWN = 40

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        lines = [f"  - {p}" for p in self.problems[: self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN} more ({len(self.problems)} in all)")
        return head + "\n" + "\n".join(lines)


class UnsafeCheckpointError(ConvertError):
    """The file asks for something a weights file never needs (a foreign global, a bad member name)."""
