"""The monitoring page: one HTML page with PNG plots of what ``riskbridge monitor`` found, for the people who look
after the model.

:func:`write_monitor_page` turns the results of :mod:`riskbridge.model.drift` into ``monitor.html`` plus one PNG per
plot: the context (window, model, training table...), the alerts, a table of every drift with its status in colour,
the outcome performance, reference-against-current histograms of each feature's observed values and of the score,
the missing share of each feature, and the calibration curve. It looks like the run report
(riskbridge/stages/report.py), which the model layer may not import. Like that report it shows counts and
distributions only: the caller passes values, never identifiers.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from riskbridge.model.drift import Drift, Performance, alerts
from riskbridge.model.plots import PAGE_STYLE, figure, figures_html, save_png, write_page

STATUS_COLOURS = {
    "ok": "#2b8a3e",
    "warn": "#e67700",
    "alert": "#c92a2a",
    "too_few": "#868e96",
    "one_class": "#868e96",
}
_REFERENCE_COLOUR = "#868e96"
_CURRENT_COLOUR = "#1c7ed6"
_HISTOGRAM_BINS = 30

_STYLE = (
    PAGE_STYLE
    + """.meta td, td.detail { text-align: left; }
td.status { color: white; font-weight: 600; text-align: center; }
ul.alerts li { color: #c92a2a; }
"""
)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "feature"


def _plain(text: str) -> str:
    """Text as matplotlib shows it literally (a ``$`` would start mathtext)."""
    return text.replace("$", r"\$")


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _plot_histogram(name: str, values: tuple[np.ndarray, np.ndarray], path: Path) -> str | None:
    reference, current = _finite(values[0]), _finite(values[1])
    if not (reference.size or current.size):
        return None
    both = np.concatenate([reference, current])
    low, high = float(both.min()), float(both.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, _HISTOGRAM_BINS + 1)
    fig, ax = figure(4.8, 3.2)
    # densities, so a window of 200 and a training table of 5000 compare
    if reference.size:
        ax.hist(reference, bins=bins, density=True, color=_REFERENCE_COLOUR, alpha=0.6,
                label=f"reference (n={reference.size})")  # fmt: skip
    if current.size:
        ax.hist(current, bins=bins, density=True, histtype="step", linewidth=1.8, color=_CURRENT_COLOUR,
                label=f"current (n={current.size})")  # fmt: skip
    ax.set_ylabel("density")
    ax.set_title(_plain(name))
    ax.legend(fontsize="x-small")
    return save_png(fig, path)


def _plot_missing(drifts: Sequence[Drift], out: Path) -> str | None:
    missing = [d for d in drifts if d.kind == "missing"]
    if not missing:
        return None
    fig, ax = figure(height=max(2.0, 0.4 * len(missing) + 1.2))
    positions = np.arange(len(missing))[::-1]
    reference = [d.reference_missing_share or 0.0 for d in missing]
    current = [d.current_missing_share or 0.0 for d in missing]
    ax.barh(positions + 0.2, reference, height=0.4, color=_REFERENCE_COLOUR, label="reference")
    ax.barh(positions - 0.2, current, height=0.4, color=[STATUS_COLOURS[d.status] for d in missing],
            label="current (status colour)")  # fmt: skip
    ax.set_yticks(positions, [_plain(d.name) for d in missing])
    ax.set_xlim(0, 1)
    ax.set_xlabel("missing share")
    ax.set_title("Missing share per feature")
    ax.legend(fontsize="x-small", loc="lower right")
    return save_png(fig, out / "missing_share.png")


def _plot_calibration(performance: Performance | None, out: Path) -> str | None:
    if performance is None or not performance.calibration:
        return None
    fig, ax = figure(4.8, 4.4)
    points = performance.calibration
    ax.plot([0, 1], [0, 1], color="#868e96", linestyle="--", linewidth=1, label="perfect")
    ax.plot([b.mean_predicted for b in points], [b.observed_rate for b in points], marker="o",
            color=_CURRENT_COLOUR, label="current")  # fmt: skip
    for b in points:
        ax.annotate(str(b.n), (b.mean_predicted, b.observed_rate), textcoords="offset points", xytext=(4, -10),
                    fontsize="x-small")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed rate")
    ece = "" if performance.ece is None else f"ECE {performance.ece:.3f}, "
    ax.set_title(f"Calibration ({ece}n={performance.n})")
    ax.legend(fontsize="small", loc="upper left")
    return save_png(fig, out / "calibration.png")


def _number(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _status_cell(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#495057")
    return f"<td class='status' style='background:{colour}'>{html.escape(status)}</td>"


def _cells(values: Sequence[Any]) -> str:
    return "".join(f"<td>{html.escape(str(v))}</td>" for v in values)


def _drift_table(drifts: Sequence[Drift]) -> str:
    header = ["name", "kind", "status", "PSI", "KS D", "KS p", "reference n", "current n", "missing reference",
              "missing current", "detail"]  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for d in drifts:
        numbers = [_number(d.psi), _number(d.ks_statistic), _number(d.ks_p, ".1e"), d.reference_n, d.current_n,
                   _share(d.reference_missing_share), _share(d.current_missing_share)]  # fmt: skip
        rows.append(
            f"<tr>{_cells([d.name, d.kind])}{_status_cell(d.status)}{_cells(numbers)}"
            f"<td class='detail'>{html.escape(d.detail)}</td></tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _performance_table(performance: Performance) -> str:
    header = ["labelled patients", "with the outcome", "AUROC (95% CI)", "reference AUROC", "ECE", "status", "detail"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    auroc = "-" if performance.auroc is None else performance.auroc.text()
    numbers = [performance.n, performance.positives, auroc, _number(performance.reference_auroc),
               _number(performance.ece)]  # fmt: skip
    row = (
        f"{_cells(numbers)}{_status_cell(performance.status)}<td class='detail'>{html.escape(performance.detail)}</td>"
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody><tr>{row}</tr></tbody></table>"


def write_monitor_page(
    out_dir: Path,
    title: str,
    drifts: Sequence[Drift],
    performance: Performance | None,
    histograms: Mapping[str, tuple[np.ndarray, np.ndarray]],
    context: Mapping[str, str],
) -> Path:
    """Write ``monitor.html`` and its PNG plots into ``out_dir`` (created if needed); return the page's path.

    ``drifts`` from :func:`~riskbridge.model.drift.feature_drift`, :func:`~riskbridge.model.drift.pattern_drift`
    and :func:`~riskbridge.model.drift.score_drift`, shown in the order given; ``performance`` from
    :func:`~riskbridge.model.drift.outcome_performance`, or None when no outcome arrived (no calibration plot then);
    ``histograms`` maps a value feature's or the score's drift name to its (reference values, current values),
    observed values only (non-finite ones are left out); a histogram is drawn for each ``value`` and ``score`` drift
    named there. ``context`` (window, model, training table...) is shown as a key/value table at the top. All text
    is HTML-escaped. Rewriting a page overwrites its files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str | None]] = []
    plotted = [d for d in drifts if d.kind in ("value", "score") and d.name in histograms]
    for i, drift in enumerate(plotted):
        path = out_dir / f"hist_{i:03d}_{_slug(drift.name)}.png"
        plot = _plot_histogram(drift.name, histograms[drift.name], path)
        plots.append((f"{drift.name}: reference against current", plot))
    plots.append(("Missing share per feature", _plot_missing(drifts, out_dir)))
    plots.append(("Calibration", _plot_calibration(performance, out_dir)))

    found = alerts(drifts, performance)
    counts = {status: sum(d.status == status for d in drifts) for status in ("alert", "warn", "ok", "too_few")}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table class='meta'><tbody>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in context.items())
        + "</tbody></table>",
        "<h2>Alerts</h2>",
        "<ul class='alerts'>" + "".join(f"<li>{html.escape(m)}</li>" for m in found) + "</ul>"
        if found
        else "<p>No alerts.</p>",
        "<h2>Drift</h2>",
        "<p>" + html.escape(", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())) + ". Value drift "
        "compares observed values only (imputed values left out). An alert needs a large shift (the population "
        "stability index, PSI, or a missing share's change past its threshold) that is also significant at this "
        "window's size (Kolmogorov-Smirnov, Fisher's exact or chi-square test); a large shift that is not is a "
        "warning.</p>",
        _drift_table(drifts) if drifts else "<p>No drift was computed.</p>",
        "<h2>Outcome performance</h2>",
        _performance_table(performance)
        if performance is not None
        else "<p>No outcomes have arrived for this window's scores.</p>",
        "<h2>Plots</h2>",
    ]
    parts += figures_html(plots)
    parts.append("</body></html>")
    return write_page(out_dir / "monitor.html", parts)
