"""``--format table|json|tsv`` of the listing commands (doctor, doctor --pacs-capabilities, imaging studies, select,
retrieve): JSON is one document on stdout, TSV a header and one line per row, and no format cuts an identifier
short, not even the table off a terminal or on a narrow one. The PACS answers are stand-ins (the query functions
and the stages' entry points are monkeypatched); the commands against a real server are integration tests."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from riskbridge import doctor, pacs_probe
from riskbridge.cli import app
from riskbridge.connectors import query, retrieval
from riskbridge.connectors.retrieval import RetrievalFailure
from riskbridge.doctor import CheckResult
from riskbridge.harmonize.series import SelectionResult
from riskbridge.pacs_probe import LevelAnswer, PacsCapabilities
from riskbridge.records import PacsPatient, RetrievedSeries, SeriesRef, StudyRef
from riskbridge.stages import retrieve as retrieve_stage
from riskbridge.stages.retrieve import StudyImaging

runner = CliRunner()

# 62 characters each: longer than rich leaves a column on an 80-column terminal.
STUDY_A = "1.2.826.0.1.3680043.8.498.123456789012345678901234567890123451"
STUDY_B = "1.2.826.0.1.3680043.8.498.123456789012345678901234567890123452"
SERIES_1 = "1.2.826.0.1.3680043.8.498.987654321098765432109876543210987651"
SERIES_2 = "1.2.826.0.1.3680043.8.498.987654321098765432109876543210987652"
DSN_SHOWN = "riskbridge_reader@ledger-primary.hospital.example.org:5432/riskbridge_ledger_production"


def _narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def _study(uid: str, when: datetime) -> StudyRef:
    return StudyRef(uid, "ACC1", PacsPatient("P1"), when, None, ("CT", "SR"), "CT CHEST\twith contrast", 312)


@pytest.fixture
def studies(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [_study(STUDY_A, datetime(2026, 12, 1, 10, 15)), _study(STUDY_B, datetime(2026, 12, 2, 8, 0))]
    monkeypatch.setattr(query, "find_studies", lambda *args, **kwargs: iter(found))


def test_studies_json_is_one_document_with_whole_uids(studies: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _narrow(monkeypatch)
    result = runner.invoke(app, ["imaging", "studies", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["study_uid"] for row in rows] == [STUDY_A, STUDY_B]
    assert rows[0] == {"study_uid": STUDY_A, "datetime": "2026-12-01T10:15:00", "modalities": ["CT", "SR"],
                       "description": "CT CHEST\twith contrast", "instances": 312}  # fmt: skip


def test_studies_tsv_has_a_header_and_one_whole_line_per_row(studies: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _narrow(monkeypatch)
    result = runner.invoke(app, ["imaging", "studies", "--format", "tsv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "study_uid\tdatetime\tmodalities\tdescription\tinstances"
    assert len(lines) == 3
    fields = lines[1].split("\t")
    assert fields == [STUDY_A, "2026-12-01 10:15:00", "CT/SR", "CT CHEST with contrast", "312"]  # tab -> space
    assert "\x1b" not in result.stdout and "…" not in result.stdout


@pytest.mark.parametrize("columns", [None, "80", "40"])
def test_studies_table_off_a_terminal_holds_whole_uids(
    studies: None, monkeypatch: pytest.MonkeyPatch, columns: str | None
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    result = runner.invoke(app, ["imaging", "studies"])
    assert result.exit_code == 0, result.output
    assert STUDY_A in result.stdout and STUDY_B in result.stdout
    assert "…" not in result.stdout


def test_an_unknown_format_is_a_usage_error(studies: None) -> None:
    result = runner.invoke(app, ["imaging", "studies", "--format", "xml"])
    assert result.exit_code == 2


def _series(uid: str, number: int, kernel: str) -> SeriesRef:
    attributes = {"Modality": "CT", "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"), "SliceThickness": 1.0,
                  "ImageOrientationPatient": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "ConvolutionKernel": kernel,
                  "NumberOfSeriesRelatedInstances": 200, "BodyPartExamined": "CHEST"}  # fmt: skip
    return SeriesRef(STUDY_A, uid, "CT", number, f"series {number}", 200, attributes)


@pytest.fixture
def series(monkeypatch: pytest.MonkeyPatch) -> None:
    listed = [_series(SERIES_1, 2, "B70f"), _series(SERIES_2, 3, "B30f")]
    monkeypatch.setattr(query, "find_series", lambda *args, **kwargs: iter(listed))


def test_select_json_lists_every_decision_with_whole_uids(series: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _narrow(monkeypatch)
    result = runner.invoke(app, ["imaging", "select", STUDY_A, "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(row["study_uid"], row["series_uid"], row["decision"]) for row in rows] == [
        (STUDY_A, SERIES_1, "chosen"),
        (STUDY_A, SERIES_2, "runner-up 2"),
    ]
    assert rows[0]["reason"].startswith("chosen")
    assert rows[0]["series_number"] is None  # the "#" column: SeriesNumber only when the rules judge it


def test_select_tsv_and_table(series: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _narrow(monkeypatch)
    tsv = runner.invoke(app, ["imaging", "select", STUDY_A, "--format", "tsv"])
    assert tsv.exit_code == 0, tsv.output
    lines = tsv.stdout.splitlines()
    assert lines[0] == "study_uid\tseries_number\tseries_uid\tdecision\trule\treason"
    assert lines[1].split("\t")[:4] == [STUDY_A, "", SERIES_1, "chosen"]
    table = runner.invoke(app, ["imaging", "select", STUDY_A])
    assert table.exit_code == 0, table.output
    assert f"study {STUDY_A}" in table.stdout and SERIES_1 in table.stdout and SERIES_2 in table.stdout
    assert "…" not in table.stdout


@pytest.fixture
def retrieved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    staged = RetrievedSeries(STUDY_A, SERIES_1, tmp_path / STUDY_A / SERIES_1, 200, 200, "c-get", 2.5, 104_857_600)
    outcomes = [
        StudyImaging(SelectionResult(STUDY_A, "chest_ct@1", (), "chose 1 of 1 series"), staged),
        StudyImaging(SelectionResult(STUDY_B, "chest_ct@1", (), "chose 1 of 1 series"),
                     RetrievalFailure(STUDY_B, SERIES_2, "retrieval_incomplete", "0 of 64 instances")),
        StudyImaging(SelectionResult(STUDY_B, "chest_ct@1", (), "skipped: none of the 3 series passes"), None),
    ]  # fmt: skip
    monkeypatch.setattr(retrieval, "resolve_transport", lambda pacs: "c-get")
    monkeypatch.setattr(retrieve_stage, "select_and_retrieve", lambda *args, **kwargs: outcomes)
    monkeypatch.setenv("RISKBRIDGE_STAGING_DIR", str(tmp_path))


def test_retrieve_json_keeps_exit_status_1_for_a_failure(retrieved: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _narrow(monkeypatch)
    result = runner.invoke(app, ["imaging", "retrieve", STUDY_A, STUDY_B, "--format", "json"])
    assert result.exit_code == 1
    rows = json.loads(result.stdout)  # progress bars went to stderr
    assert [(row["study_uid"], row["series_uid"], row["outcome"]) for row in rows] == [
        (STUDY_A, SERIES_1, "staged"),
        (STUDY_B, SERIES_2, "failed"),
        (STUDY_B, None, "skipped"),
    ]
    assert rows[0]["received"] == 200 and rows[0]["mb"] == pytest.approx(104.8576)
    assert rows[1]["reason"] == "0 of 64 instances"


def test_retrieve_tsv_and_table(retrieved: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _narrow(monkeypatch)
    tsv = runner.invoke(app, ["imaging", "retrieve", STUDY_A, STUDY_B, "--format", "tsv"])
    assert tsv.exit_code == 1
    lines = tsv.stdout.splitlines()
    assert lines[0] == "study_uid\tseries_uid\toutcome\treason\treceived\texpected\tmb\tseconds\tattempts"
    assert lines[1].split("\t")[:3] == [STUDY_A, SERIES_1, "staged"] and len(lines) == 4
    table = runner.invoke(app, ["imaging", "retrieve", STUDY_A, STUDY_B])
    assert table.exit_code == 1
    assert all(uid in table.stdout for uid in (STUDY_A, STUDY_B, SERIES_1, SERIES_2))
    assert "104.9" in table.stdout and "…" not in table.stdout


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> None:
    results = [
        CheckResult("PACS (DICOM)", "ORTHANC@pacs.hospital.example.org:11112", True, "C-ECHO answered Success"),
        CheckResult("Ledger database", DSN_SHOWN, False, "connection refused"),
    ]
    monkeypatch.setattr(doctor, "run_checks", lambda settings: results)


@pytest.mark.parametrize("fmt", ["table", "json", "tsv"])
def test_doctor_formats_keep_the_exit_status_and_whole_targets(
    checks: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    _narrow(monkeypatch)
    result = runner.invoke(app, ["doctor", "--format", fmt])
    assert result.exit_code == 1
    assert DSN_SHOWN in result.stdout and "…" not in result.stdout
    if fmt == "json":
        assert [row["result"] for row in json.loads(result.stdout)] == ["OK", "FAIL"]
    elif fmt == "tsv":
        assert result.stdout.splitlines()[0] == "check\ttarget\tresult\tdetail"


def _capabilities() -> PacsCapabilities:
    keywords = ("Modality", "ImageType", "SliceThickness")
    series_answers = [{"SeriesInstanceUID": SERIES_1, "Modality": "CT", "ImageType": ("ORIGINAL",)}]
    return PacsCapabilities(
        peer="ORTHANC@127.0.0.1:14242",
        rules="chest_ct@1",
        rule_keywords=keywords,
        optional_keywords=(),
        study_uid=STUDY_A,
        study_source="given",
        study=LevelAnswer.of("STUDY", ["StudyInstanceUID", "IssuerOfPatientID"], [{"StudyInstanceUID": STUDY_A}]),
        series=LevelAnswer.of("SERIES", ["SeriesInstanceUID", *keywords], series_answers),
        image=LevelAnswer.of("IMAGE", ["SOPInstanceUID", *keywords], [{"SOPInstanceUID": f"{SERIES_1}.1"}]),
        image_series_uid=SERIES_1,
        series_count=1,
        image_find=True,
        c_get=True,
        c_get_detail="accepted",
        dicomweb_url="http://127.0.0.1:18042/dicom-web",
        completion_series=1,
        completion_keywords=("SliceThickness",),
        sampling_keywords=("SliceThickness",),
        auto_transport="c-get",
        other_patient_ids="absent",
    )


@pytest.mark.parametrize("fmt", ["table", "json", "tsv"])
def test_the_probe_in_each_format(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    _narrow(monkeypatch)
    monkeypatch.setattr(pacs_probe, "probe", lambda pacs, rules, study: _capabilities())
    result = runner.invoke(app, ["doctor", "--pacs-capabilities", "--study", STUDY_A, "--format", fmt])
    assert result.exit_code == 0, result.output  # notes, no problem
    assert STUDY_A in result.stdout and SERIES_1 in result.stdout and "…" not in result.stdout
    if fmt == "json":
        document: dict[str, Any] = json.loads(result.stdout)
        assert document["study_uid"] == STUDY_A and document["auto_transport"] == "c-get"
        assert document["series"]["answered"] == ["SeriesInstanceUID", "Modality", "ImageType"]
        topics = {c["topic"]: c["verdict"] for c in document["conclusions"]}
        assert topics["header sampling"] == "note" and topics["selection"] == "note"
    elif fmt == "tsv":
        lines = result.stdout.splitlines()
        assert lines[0] == "section\titem\tvalue\tdetail"
        assert "attribute\tSliceThickness\tSTUDY=- SERIES=no IMAGE=no\trules: required" in lines
        assert all(len(line.split("\t")) == 4 for line in lines)
    else:
        assert "what riskbridge will do" in result.stdout and "SliceThickness: returned at neither" in result.stdout


def test_study_without_pacs_capabilities_is_refused() -> None:
    result = runner.invoke(app, ["doctor", "--study", STUDY_A])
    assert result.exit_code == 2
    assert "--pacs-capabilities" in result.output
