"""The run report: one HTML page with PNG plots per pipeline run, for the people who look after the nightly job.

The last step of every run, after the stages of :data:`riskbridge.stages.STAGES`: :func:`run_summary` reads what
the ledger knows about a run (each stage counts its own outcomes), :func:`quarantine_alert` says whether the run
quarantined so much that a site setting is likely wrong, and :func:`write_report` turns the summary into
``index.html`` plus one PNG per plot in the run's report directory: studies per stage and outcome, quarantine
reasons, studies per modality pattern (scored or quarantined by the minimum-data policy), the risk distribution with
the qualitative thresholds, calibration (only when labels are given, e.g. the synthetic cohort's truth),
per-modality attention weights and stage timings. A windowed run's report also states its coverage: the interval,
where a nightly run's new coverage began, the late arrivals it found, the studies already done by earlier runs and
any gap in the coverage of the month before it (there must be none). The page shows counts and
distributions only, never a UID, patient id or name, so it can be passed around like a log.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from riskbridge.coverage import Interval, uncovered
from riskbridge.errors import DataError
from riskbridge.harmonize.features import NO_MODALITY, PATTERNS
from riskbridge.ledger import Ledger, RunInfo
from riskbridge.model.plots import PAGE_STYLE, figure, figures_html, save_png, write_page
from riskbridge.stages import STAGE_NAMES, STAGES
from riskbridge.stages.base import OUTCOMES, Cursor
from riskbridge.stages.shadow import ShadowComparison, shadow_comparisons

MODALITIES = ("image", "labs", "notes")
_OUTCOME_COLOURS = {"done": "#2b8a3e", "skipped": "#868e96", "quarantined": "#e67700", "failed": "#c92a2a"}
_RISK_COLOURS = {"low": "#2b8a3e", "moderate": "#e67700", "high": "#c92a2a"}
# Vectors decided without a pattern: built by another feature spec, or decided before the ledger recorded patterns.
UNKNOWN_PATTERN = "unknown"
PATTERN_OUTCOMES = ("scored", "quarantined", "unscored")
_PATTERN_COLOURS = {"scored": "#2b8a3e", "quarantined": "#e67700", "unscored": "#868e96"}


class ReportError(DataError, ValueError):
    """The summary cannot be reported as given (inconsistent values)."""


@dataclass(frozen=True)
class PatternCounts:
    """The harmonized studies of one modality pattern: scored, quarantined by the minimum-data policy, or let
    through and not scored (not yet, or the scorer failed); ``auroc`` is the (lowest, highest) validated AUROC
    the run's decisions used for the pattern, None when it was not validated."""

    scored: int = 0
    quarantined: int = 0
    unscored: int = 0
    auroc: tuple[float, float] | None = None

    @property
    def total(self) -> int:
        """Studies with this pattern."""
        return self.scored + self.quarantined + self.unscored

    def count(self, outcome: str) -> int:
        """The studies of one of :data:`PATTERN_OUTCOMES`."""
        if outcome not in PATTERN_OUTCOMES:
            raise ReportError(f"pattern outcome must be one of {', '.join(PATTERN_OUTCOMES)}, not {outcome!r}")
        return int(getattr(self, outcome))


@dataclass(frozen=True)
class HeaderSampling:
    """What reading sampled instance headers did in a run: series sampled for selection and the seconds that took,
    and studies whose identity came from a sampled header (docs/series-selection.md "Header sampling")."""

    series: int = 0
    seconds: float = 0.0
    identities: int = 0


# How far back a run's report looks for gaps in the coverage (never before the first covered instant).
GAP_CHECK_SPAN = timedelta(days=31)


@dataclass(frozen=True)
class CoverageSummary:
    """A windowed run's coverage: its window, the watermark (a nightly run's new coverage begins there), studies
    already done by earlier runs, late arrivals (new to the ledger, before the watermark), quarantined studies tried
    again, and the uncovered parts of ``checked`` (the month before the run's end, this run's window counted)."""

    window: Interval
    watermark: datetime | None
    already_done: int
    late_arrivals: int
    retried: int
    checked: Interval
    gaps: tuple[Interval, ...] = ()

    def lines(self) -> list[tuple[str, str]]:
        """(label, text) rows, as the report and ``riskbridge run`` show them."""
        window = str(self.window)
        if self.watermark is not None and self.watermark > self.window.start:
            window += f" (new from {self.watermark.astimezone(UTC):%Y-%m-%dT%H:%MZ}; before it the lookback)"
        gaps = ", ".join(str(gap) for gap in self.gaps) if self.gaps else "none"
        return [
            ("covered", window),
            ("late arrivals", str(self.late_arrivals)),
            ("already done", f"{self.already_done} (scored and written by an earlier run with this model)"),
            ("quarantined before, tried again", str(self.retried)),
            (f"gaps since {self.checked.start.astimezone(UTC):%Y-%m-%dT%H:%MZ}", gaps),
        ]


def coverage_summary(ledger: Ledger, run: RunInfo) -> CoverageSummary | None:
    """The run's :class:`CoverageSummary` (None for a run without a window)."""
    if run.window is None:
        return None
    window = Interval(*run.window)
    first = ledger.first_covered()
    start = window.start if first is None else min(window.start, max(first, window.end - GAP_CHECK_SPAN))
    checked = Interval(start, window.end)
    covered = [covered_run.interval for covered_run in ledger.coverage(checked)] + [window]
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT count(*) FILTER (WHERE late_arrival) AS late, count(*) FILTER (WHERE earlier_run IS NOT NULL
                      AND EXISTS (SELECT 1 FROM quarantine q WHERE q.run_id = s.earlier_run
                                  AND q.study_uid = s.study_uid)) AS retried,
                      (SELECT count(*) FROM already_done WHERE run_id = %s) AS done
               FROM studies s WHERE run_id = %s""",
            (run.run_id, run.run_id),
        )
        row = cursor.fetchone()
    return CoverageSummary(
        window=window,
        watermark=run.watermark,
        already_done=int(row["done"]),
        late_arrivals=int(row["late"]),
        retried=int(row["retried"]),
        checked=checked,
        gaps=tuple(uncovered(covered, checked)),
    )


@dataclass(frozen=True)
class RunSummary:
    """What the ledger knows about one run, reduced to what the report shows."""

    run_id: int
    run_key: str
    kind: str  # nightly, backfill or on_demand
    status: str
    window: tuple[datetime, datetime] | None
    started: datetime
    finished: datetime | None
    stage_counts: Mapping[str, Mapping[str, int]]  # stage -> {done, skipped, quarantined, failed}
    stage_seconds: Mapping[str, float]
    quarantine: Mapping[str, int]  # reason code -> studies
    scores: Sequence[tuple[str, float, str]]  # (StudyInstanceUID, calibrated probability, qualitative risk)
    attention: Sequence[Mapping[str, float]] = ()  # per scored study, modality -> weight
    writebacks: Mapping[str, int] = field(default_factory=dict)  # status -> count
    model: str | None = None  # "name version sha256[:12]"
    thresholds: tuple[float, float] | None = None  # (low_below, high_from) of the qualitative risk
    patterns: Mapping[str, PatternCounts] = field(default_factory=dict)  # modality pattern -> harmonized studies
    sampling: HeaderSampling | None = None  # what header sampling did in select and match
    coverage: CoverageSummary | None = None  # a windowed run's coverage
    shadow: Sequence[ShadowComparison] = ()  # candidate models scored in shadow

    def __post_init__(self) -> None:
        for _, probability, _ in self.scores:
            if math.isnan(probability) or not 0.0 <= probability <= 1.0:
                raise ReportError(f"run {self.run_id}: a probability outside [0, 1] ({probability!r})")
        known = {*PATTERNS, NO_MODALITY, UNKNOWN_PATTERN}
        for pattern, counts in self.patterns.items():
            if pattern not in known:
                raise ReportError(f"run {self.run_id}: {pattern!r} is not a modality pattern")
            if min(counts.scored, counts.quarantined, counts.unscored) < 0:
                raise ReportError(f"run {self.run_id}: a negative count for pattern {pattern}")

    def pattern_order(self) -> list[str]:
        """The run's patterns, the fullest first (image+labs+notes, image+labs, ...), then none and unknown."""
        return [p for p in (*PATTERNS, NO_MODALITY, UNKNOWN_PATTERN) if p in self.patterns]


def stage_counts(ledger: Ledger, run_id: int) -> dict[str, dict[str, int]]:
    """Studies per stage and outcome (done, skipped, quarantined, failed): each stage counts its own ledger rows."""
    with ledger.transaction() as cursor:
        found = {stage.name: stage.module.counts(cursor, run_id) for stage in STAGES}
    return {name: {outcome: int(counts[outcome]) for outcome in OUTCOMES} for name, counts in found.items()}


def run_summary(ledger: Ledger, run_id: int, thresholds: tuple[float, float] | None = None) -> RunSummary:
    """The run reduced to what its report shows; ``thresholds`` are the qualitative risk's (low_below, high_from)."""
    run = ledger.run(run_id)
    with ledger.transaction() as cursor:
        cursor.execute(
            "SELECT stage, sum(seconds) AS seconds FROM stage_timings WHERE run_id = %s GROUP BY stage", (run_id,)
        )
        seconds = {r["stage"]: float(r["seconds"]) for r in cursor.fetchall()}
        cursor.execute(
            "SELECT reason, count(*) AS n FROM quarantine WHERE run_id = %s GROUP BY reason ORDER BY reason",
            (run_id,),
        )
        quarantine = {r["reason"]: int(r["n"]) for r in cursor.fetchall()}
        cursor.execute(
            "SELECT study_uid, probability, risk, attention FROM scores WHERE run_id = %s ORDER BY study_uid",
            (run_id,),
        )
        scored = cursor.fetchall()
        patterns = _pattern_counts(cursor, run_id)
        cursor.execute(
            """SELECT coalesce(sum(sampled_series), 0) AS series, coalesce(sum(sampling_seconds), 0) AS seconds,
                      (SELECT count(*) FROM identity_decisions WHERE run_id = %s AND from_sampled_header) AS identities
               FROM selections WHERE run_id = %s""",
            (run_id, run_id),
        )
        row = cursor.fetchone()
        sampling = HeaderSampling(int(row["series"]), float(row["seconds"]), int(row["identities"]))
        shadow = shadow_comparisons(cursor, run_id)
    statuses = Counter(writeback.status for writeback in ledger.writebacks(run_id))
    return RunSummary(
        run_id=run.run_id,
        run_key=run.run_key,
        kind=run.kind,
        status=run.status,
        window=run.window,
        started=run.started,
        finished=run.finished,
        stage_counts=stage_counts(ledger, run_id),
        stage_seconds=seconds,
        quarantine=quarantine,
        scores=[(r["study_uid"], float(r["probability"]), r["risk"]) for r in scored],
        attention=[{str(k): float(v) for k, v in r["attention"].items()} for r in scored],
        writebacks=dict(statuses),
        model=run.model,
        thresholds=thresholds,
        patterns=patterns,
        sampling=sampling,
        coverage=coverage_summary(ledger, run),
        shadow=shadow,
    )


def _pattern_counts(cursor: Cursor, run_id: int) -> dict[str, PatternCounts]:
    """Decided vectors of the run per modality pattern: scored, quarantined by the policy, let through and not
    (yet) scored, and the validated AUROCs the decisions used."""
    cursor.execute(
        """SELECT f.pattern, f.decision, s.study_uid IS NOT NULL AS scored, count(*) AS n,
                  min(f.pattern_auroc) AS auroc_low, max(f.pattern_auroc) AS auroc_high
           FROM features f LEFT JOIN scores s USING (run_id, study_uid)
           WHERE f.run_id = %s AND f.decision IS NOT NULL GROUP BY 1, 2, 3""",
        (run_id,),
    )
    found: dict[str, dict[str, Any]] = {}
    for row in cursor.fetchall():
        counts = found.setdefault(row["pattern"] or UNKNOWN_PATTERN, {"aurocs": []})
        outcome = "quarantined" if row["decision"] == "skip" else "scored" if row["scored"] else "unscored"
        counts[outcome] = counts.get(outcome, 0) + int(row["n"])
        counts["aurocs"] += [float(v) for v in (row["auroc_low"], row["auroc_high"]) if v is not None]
    return {
        pattern: PatternCounts(
            scored=counts.get("scored", 0),
            quarantined=counts.get("quarantined", 0),
            unscored=counts.get("unscored", 0),
            auroc=(min(counts["aurocs"]), max(counts["aurocs"])) if counts["aurocs"] else None,
        )
        for pattern, counts in found.items()
    }


# The likely cause of a reason code that dominates a run's quarantine, and what to look at first.
LIKELY_CAUSES: dict[str, str] = {
    "no_usable_series": (
        "the series rules accept no series of these studies: when the PACS returns no ImageType, SliceThickness or "
        "ConvolutionKernel in C-FIND (riskbridge doctor --pacs-capabilities shows it), keep [pacs] header_sampling "
        "on; otherwise the series rules (series_rules) do not fit this site's protocols"
    ),
    "identity_unmatched": (
        "no FHIR Patient carries the PACS identifiers: check [identity] issuer_systems and default_issuer; when the "
        "MRN is only in OtherPatientIDsSequence and the PACS does not return it, keep [pacs] header_sampling on"
    ),
    "identity_conflict": "PACS identifiers name several FHIR Patients: check [identity] issuer_systems",
    "staging_disk_full": (
        "the staging filesystem is out of room: free space in staging_dir (or lower [pacs] staging_min_free_mb) "
        "and run the window again"
    ),
    "identity_needs_review": "demographics disagree with the matched Patient: check [identity] demographics",
    "missing_required": "required labs are missing: check the FHIR Observations' LOINC codes and [site] timezone",
    "too_much_missing": "most features are missing: check the FHIR Observations' LOINC codes and [site] timezone",
    "no_index_time": "the scans carry no usable acquisition time: check [site] timezone",
    "retrieval_incomplete": "series arrive incomplete: check the PACS's move destinations and [pacs] transport",
    "retrieval_error": "retrieval fails: check the PACS's move destinations and [pacs] transport",
    "pattern_not_validated": (
        "the model package carries no validated pattern table for these patients' modalities: check the package "
        "and the feature spec's minimum_data.pattern_auroc_floor (docs/features.md)"
    ),
    "pattern_below_floor": (
        "the model's validated AUROC for these patients' modalities is below the feature spec's "
        "minimum_data.pattern_auroc_floor (docs/features.md)"
    ),
}


def quarantine_alert(summary: RunSummary, max_fraction: float, min_studies: int) -> str | None:
    """A message when the run quarantined more than ``max_fraction`` of the studies it discovered, else None.

    A share that large usually means a site setting does not match the data (an identity issuer map that resolves
    nothing, series rules that accept no series, a PACS whose C-FIND returns too little, the wrong time zone), not
    that the studies are bad, and such a run would otherwise finish green having scored almost nothing. Runs that
    discovered fewer than ``min_studies`` studies never alert: a handful of studies says too little. The message
    names reason codes and counts, no UIDs, and the likely cause of the dominating reason (:data:`LIKELY_CAUSES`).
    """
    discovered = summary.stage_counts.get("discover", {}).get("done", 0)
    quarantined = sum(summary.quarantine.values())
    if discovered < min_studies or quarantined <= max_fraction * discovered:
        return None
    ranked = sorted(summary.quarantine.items(), key=lambda kv: -kv[1])
    reasons = ", ".join(f"{reason} {n}" for reason, n in ranked)
    cause = LIKELY_CAUSES.get(ranked[0][0])
    likely = (
        f"Most are {ranked[0][0]}; likely cause: {cause}."
        if cause is not None
        else "A share this large usually means a site setting does not match the data."
    )
    return (
        f"run {summary.run_id} quarantined {quarantined} of the {discovered} studies it discovered "
        f"({quarantined / discovered:.0%}; the alert is above {max_fraction:.0%}): {reasons}. {likely} Fix it and run "
        "the window again (a new run scores what this one quarantined)."
    )


def _in_stage_order(by_stage: Mapping[str, Any]) -> list[str]:
    """The stages of ``by_stage`` in pipeline order, then any others (older runs' names) by name."""
    return [s for s in STAGE_NAMES if s in by_stage] + sorted(set(by_stage) - set(STAGE_NAMES))


def _plot_stage_counts(summary: RunSummary, out: Path) -> str | None:
    stages = [s for s in STAGE_NAMES if s in summary.stage_counts] + sorted(
        set(summary.stage_counts) - set(STAGE_NAMES)
    )
    if not stages:
        return None
    fig, ax = figure()
    bottoms = [0] * len(stages)
    for outcome in OUTCOMES:
        heights = [int(summary.stage_counts[s].get(outcome, 0)) for s in stages]
        if any(heights):
            ax.bar(stages, heights, bottom=bottoms, label=outcome, color=_OUTCOME_COLOURS[outcome])
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("studies")
    ax.set_title("Studies per stage")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize="small")
    return save_png(fig, out / "stage_counts.png")


def _plot_quarantine(summary: RunSummary, out: Path) -> str | None:
    reasons = sorted(((n, r) for r, n in summary.quarantine.items() if n), reverse=True)
    if not reasons:
        return None
    fig, ax = figure(height=max(2.0, 0.45 * len(reasons) + 1.2))
    ax.barh([r for _, r in reasons][::-1], [n for n, _ in reasons][::-1], color=_OUTCOME_COLOURS["quarantined"])
    ax.set_xlabel("studies")
    ax.set_title("Quarantine reasons")
    return save_png(fig, out / "quarantine.png")


def _plot_patterns(summary: RunSummary, out: Path) -> str | None:
    patterns = [p for p in summary.pattern_order() if summary.patterns[p].total]
    if not patterns:
        return None
    fig, ax = figure(height=max(2.0, 0.45 * len(patterns) + 1.4))
    lefts = [0] * len(patterns)
    for outcome in PATTERN_OUTCOMES:
        widths = [summary.patterns[p].count(outcome) for p in patterns]
        if any(widths):
            # reversed, so the fullest pattern is the top bar
            label = outcome.replace("unscored", "not scored")
            ax.barh(patterns[::-1], widths[::-1], left=lefts[::-1], label=label, color=_PATTERN_COLOURS[outcome])
            lefts = [left + width for left, width in zip(lefts, widths, strict=True)]
    ax.set_xlim(0, max(lefts) * 1.4)  # room on the right for the legend
    ax.set_xlabel("studies")
    ax.set_title("Studies per modality pattern")
    ax.legend(fontsize="small", loc="lower right")
    return save_png(fig, out / "patterns.png")


def _pattern_rows(summary: RunSummary) -> list[list[Any]]:
    rows = []
    for pattern in summary.pattern_order():
        counts = summary.patterns[pattern]
        if counts.auroc is None:
            auroc = "not validated"
        elif counts.auroc[0] == counts.auroc[1]:
            auroc = f"{counts.auroc[0]:.3f}"
        else:  # the model package changed during the run
            auroc = f"{counts.auroc[0]:.3f} to {counts.auroc[1]:.3f}"
        rows.append([pattern, counts.total, counts.scored, counts.quarantined, counts.unscored, auroc])
    return rows


def _plot_risk(summary: RunSummary, out: Path) -> str | None:
    if not summary.scores:
        return None
    fig, ax = figure()
    bins = [i / 20 for i in range(21)]
    for level in ("low", "moderate", "high"):
        values = [p for _, p, q in summary.scores if q == level]
        if values:
            ax.hist(values, bins=bins, label=f"{level} ({len(values)})", color=_RISK_COLOURS[level], alpha=0.85)
    others = [p for _, p, q in summary.scores if q not in _RISK_COLOURS]
    if others:
        ax.hist(others, bins=bins, label=f"other ({len(others)})", color="#495057")
    if summary.thresholds:
        for threshold in summary.thresholds:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("calibrated probability")
    ax.set_ylabel("studies")
    ax.set_title("Risk distribution")
    ax.legend(fontsize="small")
    return save_png(fig, out / "risk_distribution.png")


def calibration_bins(
    probabilities: Sequence[float], labels: Sequence[int], bins: int = 10
) -> list[tuple[float, float, int]]:
    """Equal-width reliability bins: (mean predicted, observed rate, count) for each non-empty bin."""
    if len(probabilities) != len(labels):
        raise ReportError("calibration needs one label per probability")
    sums: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(bins)]
    for probability, label in zip(probabilities, labels, strict=True):
        index = min(int(probability * bins), bins - 1)
        sums[index][0] += probability
        sums[index][1] += label
        sums[index][2] += 1
    return [(p / n, y / n, int(n)) for p, y, n in sums if n]


def expected_calibration_error(probabilities: Sequence[float], labels: Sequence[int], bins: int = 10) -> float:
    """ECE over equal-width bins: the count-weighted mean gap between predicted and observed rates."""
    total = len(probabilities)
    if not total:
        raise ReportError("calibration needs at least one scored study")
    return sum(n * abs(p - y) for p, y, n in calibration_bins(probabilities, labels, bins)) / total


def _labelled(summary: RunSummary, labels: Mapping[str, int] | None) -> tuple[list[float], list[int]]:
    if not labels:
        return [], []
    pairs = [(p, int(labels[uid])) for uid, p, _ in summary.scores if uid in labels]
    return [p for p, _ in pairs], [y for _, y in pairs]


def _plot_calibration(probabilities: list[float], labels: list[int], out: Path) -> str | None:
    if not probabilities:
        return None
    fig, ax = figure(4.8, 4.4)
    points = calibration_bins(probabilities, labels)
    ax.plot([0, 1], [0, 1], color="#868e96", linestyle="--", linewidth=1, label="perfect")
    ax.plot([p for p, _, _ in points], [y for _, y, _ in points], marker="o", color="#1c7ed6", label="this run")
    for p, y, n in points:
        ax.annotate(str(n), (p, y), textcoords="offset points", xytext=(4, -10), fontsize="x-small")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed rate")
    ax.set_title(f"Calibration (ECE {expected_calibration_error(probabilities, labels):.3f}, n={len(labels)})")
    ax.legend(fontsize="small", loc="upper left")
    return save_png(fig, out / "calibration.png")


def _plot_attention(summary: RunSummary, out: Path) -> str | None:
    if not summary.attention:
        return None
    fig, ax = figure()
    data = [[float(a.get(m, 0.0)) for a in summary.attention] for m in MODALITIES]
    ax.boxplot(data, tick_labels=list(MODALITIES))
    ax.set_ylim(0, 1)
    ax.set_ylabel("attention weight")
    ax.set_title(f"Per-modality attention ({len(summary.attention)} scores)")
    return save_png(fig, out / "attention.png")


def _plot_timings(summary: RunSummary, out: Path) -> str | None:
    stages = [s for s in STAGE_NAMES if s in summary.stage_seconds] + sorted(
        set(summary.stage_seconds) - set(STAGE_NAMES)
    )
    if not stages:
        return None
    fig, ax = figure()
    seconds = [float(summary.stage_seconds[s]) for s in stages]
    ax.barh(stages[::-1], seconds[::-1], color="#1c7ed6")
    for y, value in enumerate(seconds[::-1]):
        ax.annotate(f"{value:.1f} s", (value, y), textcoords="offset points", xytext=(3, -3), fontsize="x-small")
    ax.set_xlabel("seconds")
    ax.set_title("Stage timings")
    return save_png(fig, out / "stage_timings.png")


def _shadow_row(comparison: ShadowComparison, labels: Mapping[str, int] | None) -> list[Any]:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    aurocs = comparison.auroc(labels) if labels else None
    versus = "-" if aurocs is None else f"{aurocs[0]:.3f} / {aurocs[1]:.3f} (n={aurocs[2]})"
    return [comparison.model, comparison.scored, comparison.failed, number(comparison.spearman),
            number(comparison.mean_abs_difference), number(comparison.risk_agreement), versus]  # fmt: skip


def _plot_shadow(summary: RunSummary, out: Path) -> str | None:
    comparisons = [c for c in summary.shadow if c.pairs]
    if not comparisons:
        return None
    fig, ax = figure(4.8, 4.4)
    ax.plot([0, 1], [0, 1], color="#868e96", linestyle="--", linewidth=1)
    for comparison in comparisons:
        ax.scatter([a for _, a, _ in comparison.pairs], [c for _, _, c in comparison.pairs], s=12,
                   label=f"{comparison.model} (n={comparison.scored})")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("active model probability")
    ax.set_ylabel("candidate probability")
    ax.set_title("Shadow scoring")
    ax.legend(fontsize="x-small", loc="upper left")
    return save_png(fig, out / "shadow.png")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = PAGE_STYLE + ".meta td { text-align: left; }\n"


def write_report(summary: RunSummary, out_dir: Path, labels: Mapping[str, int] | None = None) -> Path:
    """Write ``index.html`` and its PNG plots into ``out_dir``; return the page's path.

    ``labels`` maps StudyInstanceUID to the observed outcome (0/1) where one is known, e.g. the synthetic cohort's
    truth; only then is a calibration plot drawn. Rewriting a report replaces its files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities, observed = _labelled(summary, labels)
    plots = [
        ("Studies per stage", _plot_stage_counts(summary, out_dir)),
        ("Quarantine reasons", _plot_quarantine(summary, out_dir)),
        ("Studies per modality pattern", _plot_patterns(summary, out_dir)),
        ("Risk distribution", _plot_risk(summary, out_dir)),
        ("Calibration", _plot_calibration(probabilities, observed, out_dir)),
        ("Attention", _plot_attention(summary, out_dir)),
        ("Stage timings", _plot_timings(summary, out_dir)),
        ("Shadow model against the active model", _plot_shadow(summary, out_dir)),
    ]
    window = "-" if summary.window is None else f"{summary.window[0].isoformat()} .. {summary.window[1].isoformat()}"
    duration = "-" if summary.finished is None else f"{(summary.finished - summary.started).total_seconds():.0f} s"
    meta = [
        ("run", f"{summary.run_id} ({summary.kind})"),
        ("run key", summary.run_key),
        ("status", summary.status),
        ("window", window),
        ("started", summary.started.isoformat(timespec="seconds")),
        ("duration", duration),
        ("model", summary.model or "-"),
    ]
    if summary.sampling is not None and (summary.sampling.series or summary.sampling.identities):
        sampling = summary.sampling
        meta.append(
            (
                "header sampling",
                f"{sampling.series} series for selection in {sampling.seconds:.1f} s; "
                f"{sampling.identities} identities from a sampled header",
            )
        )
    if summary.coverage is not None:
        meta += summary.coverage.lines()
    header = ["pattern", "studies", "scored", "quarantined", "not scored", "validated AUROC"]
    patterns = (
        _table(header, _pattern_rows(summary))
        + "<p>Harmonized studies by the modalities they have. The minimum-data policy scores a pattern whose "
        "validated AUROC (the model's cross-validation) reaches the feature spec's floor and quarantines the rest; "
        "not scored: let through, but not scored (yet, or the scorer failed).</p>"
        if summary.patterns
        else "<p>No study reached the minimum-data policy.</p>"
    )
    levels: dict[str, int] = {}
    for _, _, level in summary.scores:
        levels[level] = levels.get(level, 0) + 1
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>riskbridge run {summary.run_id}</title><style>{_STYLE}</style></head><body>",
        f"<h1>riskbridge run {summary.run_id}</h1>",
        "<table class='meta'><tbody>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in meta)
        + "</tbody></table>",
        "<h2>Stages</h2>",
        _table(
            ["stage", *OUTCOMES, "seconds"],
            [
                [
                    stage,
                    *(summary.stage_counts.get(stage, {}).get(o, 0) for o in OUTCOMES),
                    f"{summary.stage_seconds.get(stage, 0.0):.1f}",
                ]
                for stage in [s for s in STAGE_NAMES if s in summary.stage_counts or s in summary.stage_seconds]
            ],
        ),
        "<h2>Scores and write-back</h2>",
        _table(["qualitative risk", "studies"], sorted(levels.items())) if levels else "<p>No study was scored.</p>",
        _table(["write-back", "count"], sorted(summary.writebacks.items())) if summary.writebacks else "",
        "<h2>Modality patterns</h2>",
        patterns,
        "<h2>Quarantine</h2>",
        _table(["reason", "studies"], sorted(summary.quarantine.items()))
        if summary.quarantine
        else "<p>Nothing was quarantined.</p>",
    ]
    if summary.shadow:
        parts.append("<h2>Shadow model</h2>")
        header = ["candidate", "scored", "failed", "Spearman", "mean |difference|", "same risk level",
                  "AUROC active / candidate"]  # fmt: skip
        parts.append(_table(header, [_shadow_row(c, labels) for c in summary.shadow]))
        parts.append(
            "<p>The candidate scores every study the active model scored; its scores stay in the ledger and this "
            "report, never in the FHIR server.</p>"
        )
    if probabilities:
        ece = expected_calibration_error(probabilities, observed)
        parts.append(f"<p>Calibration against {len(observed)} known outcomes: ECE {ece:.3f} (10 equal-width bins).</p>")
    parts.append("<h2>Plots</h2>")
    parts += figures_html(plots)
    parts.append("</body></html>")
    return write_page(out_dir / "index.html", parts)
