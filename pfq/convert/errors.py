"""Errors raised by the converter; the CLI turns them into a message and a non-zero exit."""

from __future__ import annotations


class ConvertError(Exception):
    """A checkpoint could not be read or mapped. `problems` lists each offending key or item."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class UnsafeCheckpointError(ConvertError):
    """The file asks for something a weights file never needs (a foreign global, a bad member name)."""
