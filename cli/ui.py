"""Terminal output: rich progress on stderr, result tables on stdout, one-line errors with exit codes."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ballad_cache.heads.metrics import METRICS
from ballad_cache.progress import Report

from .flags import as_flags

err = Console(stderr=True, markup=False)  # paths, class names and messages are data, never markup
out = Console(markup=False)
F = TypeVar("F", bound=Callable[..., Any])
DEBUG = {"on": os.environ.get("BALLAD_DEBUG") == "1"}


class RichProgress:
    """The library's Progress interface rendered as a rich bar on stderr (plain lines when not a terminal)."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: Any = None
        self._last_line = 0.0
        self._desc = ""
        self._done = 0
        self._total: int | None = None

    def start(self, description: str, total: int | None) -> None:
        """Begin a task of `total` units (None: unknown), closing the previous one."""
        self._close()
        self._desc, self._done, self._total = description, 0, total
        if err.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=err,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(escape(description), total=total, info="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Count `n` units done; `fields` are shown beside the bar (a line every 5 s when not a terminal)."""
        self._done += n
        info = "  ".join(f"{k}={v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=escape(info))
        elif time.monotonic() - self._last_line > 5 or self._done == self._total:
            self._last_line = time.monotonic()
            err.print(f"{self._desc}: {self._done}/{self._total or '?'} {info}", highlight=False)

    def log(self, message: str) -> None:
        """One line on stderr, as text, the settings it names written as flags."""
        err.print(as_flags(message), highlight=False)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()


def quiet_libraries() -> None:
    """Silence open_clip's and transformers' chatter unless --debug."""
    level = logging.INFO if DEBUG["on"] else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def handle_errors(fn: F) -> F:
    """Turn BalladError into one red line (the settings it names written as flags) and exit 1, bad option values into
    exit 2, Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ballad_cache.errors import BalladError

        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except BalladError as exc:
            if DEBUG["on"]:
                raise
            err.print(Text.assemble(("error:", "red"), " ", as_flags(str(exc))), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print(
                Text.assemble(("interrupted", "yellow"), ": finished files are kept; rerun the command to continue")
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def report_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> Report:
    """Headline accuracies, one row per head or run ("-" where a group has no class)."""
    cells = [[name, *(f"{v[c]:.2f}" if v.get(c) == v.get(c) else "-" for c in METRICS)] for name, v in rows]
    return Report(title, ["", *METRICS], cells)


def print_report(report: Report, console: Console | None = None) -> None:
    """A report as a rich table and its lines (on standard output, or `console`); every cell and line printed as
    data, never as markup."""
    console = console or out
    table = Table(title=Text(report.title))
    for i, col in enumerate(report.columns):
        table.add_column(col, justify="left" if i == 0 or col == "name" else "right")
    for row in report.rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    for line in report.lines:  # never wrapped: a line may be a command to copy, or a path to grep
        console.print(line, highlight=False, soft_wrap=True)
