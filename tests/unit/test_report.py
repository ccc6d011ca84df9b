"""The run report: its page, its plots, and that it shows no identifier."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from riskbridge.stages.report import (
    PatternCounts,
    ReportError,
    RunSummary,
    calibration_bins,
    expected_calibration_error,
    quarantine_alert,
    write_report,
)

STARTED = datetime(2024, 1, 15, 2, 0, tzinfo=UTC)


def _summary(scores: list[tuple[str, float, str]], **overrides: object) -> RunSummary:
    values: dict[str, object] = {
        "run_id": 7,
        "run_key": "cli:2024-01-01..2024-01-14",
        "kind": "nightly",
        "status": "success",
        "window": (STARTED - timedelta(days=14), STARTED),
        "started": STARTED,
        "finished": STARTED + timedelta(minutes=3),
        "stage_counts": {
            "discover": {"done": 30},
            "match": {"done": 26, "quarantined": 4},
            "select": {"done": 24, "quarantined": 2},
            "score": {"done": len(scores)},
        },
        "stage_seconds": {"discover": 0.4, "retrieve": 12.5, "score": 3.2},
        "quarantine": {"identity_conflict": 2, "identity_unmatched": 2, "no_usable_series": 2},
        "scores": scores,
        "attention": [{"image": 0.2, "labs": 0.5, "notes": 0.3}] * len(scores),
        "writebacks": {"created": len(scores)},
        "model": "chest-ct-fusion 1.0.0 0123456789ab",
        "thresholds": (0.2, 0.5),
        "patterns": {
            "image+labs": PatternCounts(scored=len(scores) // 2, auroc=(0.81, 0.81)),
            "image+labs+notes": PatternCounts(scored=len(scores) - len(scores) // 2, unscored=1, auroc=(0.86, 0.86)),
            "image": PatternCounts(quarantined=3),
        },
    }
    values.update(overrides)
    return RunSummary(**values)  # type: ignore[arg-type]


def _scores(n: int, seed: int = 3) -> tuple[list[tuple[str, float, str]], dict[str, int]]:
    rng = random.Random(seed)
    scores, labels = [], {}
    for i in range(n):
        p = rng.random()
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
        scores.append((uid, p, "low" if p < 0.2 else "high" if p >= 0.5 else "moderate"))
        labels[uid] = int(rng.random() < p)
    return scores, labels


def test_report_writes_page_and_every_plot(tmp_path: Path) -> None:
    scores, labels = _scores(60)
    page = write_report(_summary(scores), tmp_path / "7", labels=labels)
    text = page.read_text()
    expected = {"stage_counts.png", "quarantine.png", "risk_distribution.png", "calibration.png", "attention.png"}
    expected |= {"stage_timings.png", "patterns.png"}
    assert {p.name for p in page.parent.glob("*.png")} == expected
    for name in expected:
        assert f"src='{name}'" in text
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "identity_conflict" in text and "ECE" in text
    assert not any(uid in text for uid, _, _ in scores), "the report must not show a StudyInstanceUID"


def test_without_labels_there_is_no_calibration_plot(tmp_path: Path) -> None:
    scores, _ = _scores(10)
    page = write_report(_summary(scores), tmp_path)
    assert not (tmp_path / "calibration.png").exists()
    assert "calibration.png" not in page.read_text()


def test_empty_run_reports_without_plots_it_cannot_draw(tmp_path: Path) -> None:
    summary = _summary([], stage_counts={}, stage_seconds={}, quarantine={}, attention=[], writebacks={}, patterns={})
    page = write_report(summary, tmp_path)
    assert "No study was scored" in page.read_text()
    assert "No study reached the minimum-data policy" in page.read_text()
    assert "Nothing was quarantined" in page.read_text()
    assert list(tmp_path.glob("*.png")) == []


def test_run_key_is_escaped(tmp_path: Path) -> None:
    page = write_report(_summary([], run_key="<script>x</script>"), tmp_path)
    assert "<script>x" not in page.read_text()


def test_probability_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ReportError, match="outside"):
        _summary([("1.2.3", 1.5, "high")])


def test_calibration_bins_and_ece() -> None:
    bins = calibration_bins([0.05, 0.15, 0.95, 0.95], [0, 1, 1, 1], bins=10)
    assert bins == [(0.05, 0.0, 1), (0.15, 1.0, 1), (0.95, 1.0, 2)]
    ece = expected_calibration_error([0.05, 0.15, 0.95, 0.95], [0, 1, 1, 1], bins=10)
    assert ece == pytest.approx((0.05 + 0.85 + 2 * 0.05) / 4)
    with pytest.raises(ReportError):
        calibration_bins([0.1], [])


def test_the_quarantine_alert_fires_above_the_share_and_names_reasons_not_uids() -> None:
    counts = {"discover": {"done": 20}, "match": {"done": 4, "quarantined": 16}}
    scored = [("1.2.840.99.1", 0.4, "high")]  # the alert must never carry a study's UID
    summary = _summary(scored, stage_counts=counts, quarantine={"identity_unmatched": 15, "identity_conflict": 1})
    alert = quarantine_alert(summary, max_fraction=0.5, min_studies=10)
    assert alert is not None
    assert "16 of the 20 studies" in alert and "80%" in alert
    assert alert.index("identity_unmatched 15") < alert.index("identity_conflict 1")
    assert "Most are identity_unmatched; likely cause: no FHIR Patient carries the PACS identifiers" in alert
    assert "1.2.840" not in alert
    assert quarantine_alert(summary, max_fraction=0.8, min_studies=10) is None  # 80% is not above 80%
    assert quarantine_alert(summary, max_fraction=0.5, min_studies=21) is None  # too few studies to say


def test_the_alert_names_the_cause_of_a_strict_pacs_without_header_sampling() -> None:
    counts = {"discover": {"done": 11}, "match": {"done": 11}, "select": {"quarantined": 11}}
    summary = _summary([], stage_counts=counts, quarantine={"no_usable_series": 11})
    alert = quarantine_alert(summary, max_fraction=0.5, min_studies=10)
    assert alert is not None and "Most are no_usable_series" in alert and "header_sampling" in alert
    unknown = _summary([], stage_counts=counts, quarantine={"scoring_error": 11})
    assert "usually means a site setting" in (quarantine_alert(unknown, max_fraction=0.5, min_studies=10) or "")


def test_a_normal_run_raises_no_quarantine_alert() -> None:
    assert quarantine_alert(_summary([]), max_fraction=0.5, min_studies=10) is None  # 6 of 30 quarantined


def _rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as cell texts."""
    import re

    table = text.split(heading, 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in table.split("</tr>") if "<td>" in row]


def test_the_report_counts_studies_per_modality_pattern_scored_and_quarantined(tmp_path: Path) -> None:
    scores, _ = _scores(10)
    patterns = {
        "image": PatternCounts(quarantined=2),
        "image+labs": PatternCounts(scored=4, quarantined=1, auroc=(0.68, 0.74)),  # the package changed mid-run
        "image+labs+notes": PatternCounts(scored=6, unscored=1, auroc=(0.86, 0.86)),
        "unknown": PatternCounts(quarantined=1),
    }
    quarantine = {"pattern_not_validated": 2, "pattern_below_floor": 1, "feature_spec_mismatch": 1}
    page = write_report(_summary(scores, patterns=patterns, quarantine=quarantine), tmp_path)
    text = page.read_text()
    assert _rows(text, "<h2>Modality patterns</h2>") == [
        ["image+labs+notes", "7", "6", "0", "1", "0.860"],  # fullest pattern first
        ["image+labs", "5", "4", "1", "0", "0.680 to 0.740"],
        ["image", "2", "0", "2", "0", "not validated"],
        ["unknown", "1", "0", "1", "0", "not validated"],
    ]
    assert "src='patterns.png'" in text and (tmp_path / "patterns.png").read_bytes()[:4] == b"\x89PNG"
    assert patterns["image+labs"].total == 5 and patterns["image+labs"].count("quarantined") == 1
    with pytest.raises(ReportError, match="pattern outcome"):
        patterns["image"].count("skipped")


def test_a_summary_refuses_what_is_not_a_modality_pattern() -> None:
    with pytest.raises(ReportError, match="'labs\\+image' is not a modality pattern"):
        _summary([], patterns={"labs+image": PatternCounts(scored=1)})
    with pytest.raises(ReportError, match="negative count"):
        _summary([], patterns={"image": PatternCounts(scored=-1)})


def test_the_quarantine_alert_points_at_the_pattern_table_when_the_policy_quarantined() -> None:
    counts = {"discover": {"done": 20}, "harmonize": {"done": 2, "skipped": 18}}
    summary = _summary([], stage_counts=counts, quarantine={"pattern_not_validated": 18})
    alert = quarantine_alert(summary, max_fraction=0.8, min_studies=10)
    assert alert is not None and "pattern_not_validated 18" in alert
    assert "validated pattern table" in alert and "pattern_auroc_floor" in alert
    other = quarantine_alert(_summary([], stage_counts=counts, quarantine={"identity_unmatched": 18}), 0.8, 10)
    assert other is not None and "pattern_auroc_floor" not in other


def test_the_report_states_the_runs_coverage_and_names_a_gap(tmp_path: Path) -> None:
    from riskbridge.coverage import Interval
    from riskbridge.stages.report import CoverageSummary

    window = Interval(STARTED - timedelta(days=4), STARTED)
    gap = Interval(STARTED - timedelta(days=9), STARTED - timedelta(days=8, hours=23))
    coverage = CoverageSummary(
        window=window,
        watermark=STARTED - timedelta(days=1),
        already_done=12,
        late_arrivals=2,
        retried=3,
        checked=Interval(STARTED - timedelta(days=31), STARTED),
        gaps=(gap,),
    )
    page = write_report(_summary([], coverage=coverage), tmp_path).read_text()
    for text in (
        "2024-01-11T02:00Z .. 2024-01-15T02:00Z (new from 2024-01-14T02:00Z; before it the lookback)",
        "late arrivals</th><td>2<",
        "already done</th><td>12 (scored and written by an earlier run with this model)",
        "quarantined before, tried again</th><td>3<",
        "gaps since 2023-12-15T02:00Z</th><td>2024-01-06T02:00Z .. 2024-01-06T03:00Z<",
    ):
        assert text in page, text
    clean = replace(coverage, gaps=())
    assert dict(clean.lines())["gaps since 2023-12-15T02:00Z"] == "none"
