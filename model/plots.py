"""PNG plots for riskbridge's HTML pages (the run report, the monitoring page): one figure, saved and closed.

matplotlib is imported when a plot is made, with the Agg backend (no display on a scheduler's worker), so importing a
page's module costs nothing.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PAGE_STYLE", "figure", "figures_html", "save_png", "write_page"]

# The stylesheet the pages share (a page adds its own rules after it).
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #212529; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #dee2e6; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
"""


def figure(width: float = 6.4, height: float = 3.6) -> Any:
    """A new ``(figure, axes)`` of ``width`` x ``height`` inches at 100 dpi."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return fig, ax


def save_png(fig: Any, path: Path) -> str:
    """Lay out ``fig``, write it to ``path`` as PNG and close it; return the file's name (what a page links)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path.name


def figures_html(plots: Sequence[tuple[str, str | None]]) -> list[str]:
    """``<figure>`` elements for the ``(caption, PNG file name)`` pairs a page shows (None: no plot was made)."""
    return [
        f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, name in plots
        if name is not None
    ]


def write_page(path: Path, parts: Sequence[str]) -> Path:
    """Write an HTML page's ``parts`` (one per line) to ``path`` atomically (a reader never sees half a page)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
