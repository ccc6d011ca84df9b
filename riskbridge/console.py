"""What every ``riskbridge`` command shares: consoles, the one-line failure, progress bars, the ``--config`` file
and the ``--format`` of what a command prints.

:mod:`riskbridge.cli` and :mod:`riskbridge.dev.cli` both import it, so neither imports the other at import time.

Commands that list things build plain rows (one mapping per row, keyed by :attr:`Column.key`) and hand them to
:func:`emit` with their :class:`Column` list: ``--format table`` (default) prints a rich table, ``json`` one JSON
document, ``tsv`` a header line and one tab-separated line per row. Identifier columns (UIDs, DSNs, URLs, AE
titles) are shown whole in every format, on a terminal or off it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

from riskbridge.errors import ConfigurationError
from riskbridge.records import configure_pseudonyms
from riskbridge.settings import Settings, load_settings

__all__ = [
    "UNWRAPPED_WIDTH",
    "CliState",
    "Column",
    "OutputFormat",
    "RowGroup",
    "cli_settings",
    "console",
    "count_progress",
    "emit",
    "emit_document",
    "emit_groups",
    "err_console",
    "fail",
    "format_option",
    "render_table",
]

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
    """The settings from ``--config`` (or the default places), with :func:`riskbridge.records.uid_hash` keyed by
    their pseudonym key; a settings error or an unreadable key ends the command with :func:`fail`."""
    try:
        settings = load_settings(CliState.config)
        configure_pseudonyms(settings)  # the command's logs, its worker processes' included, tag UIDs with one key
    except ConfigurationError as exc:  # SettingsError, or a pseudonym key file that cannot be read
        raise fail(str(exc)) from None
    return settings


@contextmanager
def count_progress(stderr: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(stage, done, total)`` callback that shows one bar per stage.

    ``stderr``: draw the bars there, so that stdout holds only a JSON or TSV document (``--format``).
    """
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console if stderr else console) as progress:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report


# --- --format: table, json, tsv ------------------------------------------------------------------------------


class OutputFormat(StrEnum):
    """What a listing command prints: a rich table, one JSON document, or tab-separated lines."""

    table = "table"
    json = "json"
    tsv = "tsv"


def format_option() -> Any:
    """The ``--format`` option of a listing command (default ``table``)."""
    return typer.Option(
        OutputFormat.table,
        "--format",
        help="table (default), json (one document on stdout) or tsv (a header line, then one line per row).",
        case_sensitive=False,
    )


@dataclass(frozen=True)
class Column:
    """One column of a command's output.

    ``key`` names it in JSON and in the TSV header, ``header`` in the table. ``identifier``: a UID, DSN, URL or
    ``AE@host:port``, shown whole in the table (never wrapped or ellipsized; the table grows wider than the
    terminal instead). ``spec``: a format spec for the table's cell (``".1f"``); JSON and TSV carry the value
    unformatted. ``style``: the table style of a cell, from its value (``OK`` green). ``in_table``: False for a
    value the table shows in its title (the study of a per-study table); JSON and TSV always have it.
    """

    key: str
    header: str
    identifier: bool = False
    spec: str = ""
    style: Callable[[Any], str | None] | None = None
    in_table: bool = True


@dataclass(frozen=True)
class RowGroup:
    """Rows that the table format shows as one table of their own (title, caption); JSON and TSV join them."""

    rows: Sequence[Mapping[str, Any]]
    title: str | None = None
    caption: str | None = None


def _plain(value: Any) -> Any:
    """A cell value as JSON has it: tuples as lists, dates as ISO 8601 text."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _text(value: Any, spec: str = "") -> str:
    """A cell value as text: empty for None, several values joined by ``/``, ``spec`` applied to numbers."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple | list):
        return "/".join(_text(item) for item in value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return str(value.value)
    if spec and isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def _write(text: str) -> None:
    """Write ``text`` to stdout as it is: no markup, no wrapping, tabs kept (rich would expand them)."""
    console.file.write(text if text.endswith("\n") else text + "\n")
    console.file.flush()


def render_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    title: str | None = None,
    caption: str | None = None,
) -> Table:
    """A rich table of ``rows``; cell text is never read as markup, identifier columns are never cut."""
    rows = list(rows)
    shown = [column for column in columns if column.in_table]
    cells = [[_text(row.get(column.key), column.spec).replace("\t", " ") for column in shown] for row in rows]
    table = Table(title=title, caption=caption)
    for index, column in enumerate(shown):
        # A column is never narrower than its longest word (an identifier column: its longest value), so rich wraps
        # text between words and never cuts a UID, a URL or a keyword that a finding quotes.
        texts = [line[index] for line in cells]
        if column.identifier:
            longest = max((len(text) for text in texts), default=0)
            table.add_column(column.header, no_wrap=True, overflow="fold", min_width=max(longest, len(column.header)))
        else:
            words = [word for text in [column.header, *texts] for word in text.split()]
            table.add_column(column.header, overflow="fold", min_width=max((len(word) for word in words), default=1))
    for row, line in zip(rows, cells, strict=True):
        styled = []
        for column, text in zip(shown, line, strict=True):
            style = column.style(row.get(column.key)) if column.style is not None else None
            styled.append(Text(text, style=style or ""))
        table.add_row(*styled)
    return table


def _print_table(table: Table) -> None:
    """Print a table at least as wide as its whole identifiers and its longest words need.

    rich fits a table to the terminal by narrowing every column, identifiers included (``1.2.826.0.1.3680…``); at
    its minimum width (each column as wide as its longest word, a UID being one word) nothing is cut, and a
    wider-than-terminal table runs past the edge (crop=False) rather than losing characters.
    """
    needed = Measurement.get(console, console.options.update_width(UNWRAPPED_WIDTH), table).minimum
    if needed <= console.width:
        console.print(table)
        return
    # print(width=) cannot exceed the console's width: render at the width needed, print the lines uncropped.
    console.print(Segments(console.render(table, console.options.update_width(needed))), crop=False)


def _tsv_field(value: Any) -> str:
    # A tab or line break inside a value would split its field or its line: they become spaces.
    return " ".join(_text(value).replace("\t", " ").splitlines())


def emit_groups(groups: Iterable[RowGroup], columns: Sequence[Column], fmt: OutputFormat) -> None:
    """Print groups of rows in ``fmt``: a table per group, or all rows as one JSON list or one TSV listing.

    A table is printed as soon as its group is produced (``groups`` may be a generator that raises part way);
    JSON and TSV are printed only once every group is in, so their document is never cut short.
    """
    if fmt == OutputFormat.table:
        for group in groups:
            _print_table(render_table(list(group.rows), columns, title=group.title, caption=group.caption))
        return
    rows = [row for group in groups for row in group.rows]
    if fmt == OutputFormat.json:
        document = [{column.key: _plain(row.get(column.key)) for column in columns} for row in rows]
        _write(json.dumps(document, indent=2, ensure_ascii=False))
        return
    lines = ["\t".join(column.key for column in columns)]
    lines += ["\t".join(_tsv_field(row.get(column.key)) for column in columns) for row in rows]
    _write("\n".join(lines))


def emit(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[Column],
    fmt: OutputFormat,
    *,
    title: str | None = None,
    caption: str | None = None,
) -> None:
    """Print ``rows`` in ``fmt``: a rich table (``title``, ``caption``), a JSON list of objects, or TSV lines."""
    emit_groups([RowGroup(list(rows), title, caption)], columns, fmt)


def emit_document(document: Mapping[str, Any]) -> None:
    """Print one JSON object on stdout (a report that is not a list of rows, e.g. the PACS probe)."""
    _write(json.dumps(_plain(document), indent=2, ensure_ascii=False))
