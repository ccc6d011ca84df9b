"""What every ``riskbridge`` command shares: consoles, the one-line failure, progress bars and the ``--config`` file.

:mod:`riskbridge.cli` and :mod:`riskbridge.dev.cli` both import it, so neither imports the other at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from riskbridge.settings import Settings, SettingsError, load_settings

__all__ = ["UNWRAPPED_WIDTH", "CliState", "cli_settings", "console", "count_progress", "err_console", "fail"]

# Off a terminal (a pipe, a log file, a test runner) rich would hard-wrap at 80 columns, breaking paths and
# messages at places that depend on their length; there, lines are written whole and tables take their own width.
UNWRAPPED_WIDTH = 10_000


class _Console(Console):
    """A rich Console that never wraps when its output is not a terminal (unless COLUMNS says otherwise)."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size; off a terminal, a width no line reaches."""
        size = super().size
        if self.is_terminal or os.environ.get("COLUMNS"):
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(soft_wrap=True)
err_console = _Console(stderr=True, soft_wrap=True)


class CliState:
    """The command line's global options, set by the ``riskbridge`` callback before any command runs."""

    config: Path | None = None


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit (status 2) for the caller to raise."""
    # escape(): messages quote settings sections such as "[identity]", which rich would take for markup and drop.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def cli_settings() -> Settings:
    """The settings from ``--config`` (or the default places); a settings error ends the command with :func:`fail`."""
    try:
        return load_settings(CliState.config)
    except SettingsError as exc:
        raise fail(str(exc)) from None


@contextmanager
def count_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(stage, done, total)`` callback that shows one bar per stage."""
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report
