"""The progress interface long-running library functions report to; the CLI renders it with rich."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Progress(Protocol):
    """Receives progress from the library: one task at a time, advanced in units of the task's total."""

    def start(self, description: str, total: int | None) -> None:
        """Begin a task of `total` units (None when unknown)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Advance the current task by `n` units; `fields` are shown beside it (loss, lr, images/s)."""

    def log(self, message: str) -> None:
        """A line for the user (stderr)."""


class NullProgress:
    """Progress that shows nothing; the default for library callers and tests."""

    def start(self, description: str, total: int | None) -> None:
        """Ignore."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Ignore."""

    def log(self, message: str) -> None:
        """Ignore."""


@dataclass
class Report:
    """A table and a few lines of text, for a front end to render (the CLI prints it with rich)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    lines: list[str] = field(default_factory=list)
