"""Shared by the benchmarks: write one benchmark's section of docs/benchmarks.md, leaving the others as they are.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a rerun replaces it.
"""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here was measured by a script under bench/ that runs riskbridge and a reference in the same run.\n"
    "Rerun a script to refresh its section; the other sections are left as they are.\n"
)


def machine() -> str:
    """Describe the machine a benchmark ran on, in one line."""
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Format rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, report: Path = REPORT) -> Path:
    """Replace (or append) the section ``name`` of the report with ``body`` under a ``## title`` heading."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n## {title}\n\n_Measured {stamp} on {machine()}._\n\n{body.strip()}\n{end}"
    text = report.read_text() if report.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text, replaced = pattern.subn(lambda _: section, text)
    if not replaced:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return report
