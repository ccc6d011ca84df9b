"""The PACS side of the ``riskbridge`` command line: ``doctor`` (with the PACS conformance probe) and
``imaging studies|select|retrieve``.

Registered on the main command by :mod:`riskbridge.cli`; listings take ``--format table|json|tsv`` and print through
:func:`riskbridge.console.emit`. Errors a person can fix end in one line on stderr and exit status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext as _no_status
from datetime import date
from typing import TYPE_CHECKING, Any

import typer

from riskbridge.console import Column, OutputFormat, RowGroup, console, emit, emit_document, emit_groups, format_option
from riskbridge.console import cli_settings as _settings
from riskbridge.console import count_progress as _count_progress
from riskbridge.console import fail as _fail
from riskbridge.errors import RiskbridgeError
from riskbridge.settings import Settings

if TYPE_CHECKING:
    from riskbridge.harmonize.series import SelectionResult
    from riskbridge.pacs_probe import LevelAnswer, PacsCapabilities

imaging_app = typer.Typer(help="Query the PACS, select each study's series by the rules, retrieve it verified.")

STUDY_COLUMNS = (
    Column("study_uid", "study UID", identifier=True),
    Column("datetime", "date/time"),
    Column("modalities", "modalities"),
    Column("description", "description"),
    Column("instances", "instances"),
)


def _verdict_style(value: Any) -> str | None:
    return {"OK": "green", "WARN": "yellow", "FAIL": "red", "ok": "green", "note": "yellow", "problem": "red"}.get(
        str(value)
    )


DOCTOR_COLUMNS = (
    Column("check", "check"),
    Column("target", "target", identifier=True),
    Column("result", "result", style=_verdict_style),
    Column("detail", "detail"),
)


def doctor(
    pacs_capabilities: bool = typer.Option(
        False,
        "--pacs-capabilities",
        help="Instead of the checks: probe what the PACS answers at STUDY, SERIES and IMAGE level, whether it "
        "accepts C-GET and offers DICOMweb, and what riskbridge will therefore do (docs/retrieval.md).",
    ),
    study: str | None = typer.Option(
        None, "--study", help="With --pacs-capabilities: the StudyInstanceUID to probe (default: the latest CT study)."
    ),
    rules: str | None = typer.Option(
        None, "--rules", help="With --pacs-capabilities: rule set name or YAML file (default: series_rules)."
    ),
    fmt: OutputFormat = format_option(),
) -> None:
    """Check the PACS (C-ECHO), the FHIR server (/metadata) and the ledger database; exit 1 on any FAIL.

    With --pacs-capabilities, probe the PACS instead; exit 1 when the probe finds a problem.
    """
    if not pacs_capabilities:
        if study is not None or rules is not None:
            raise _fail("--study and --rules go with --pacs-capabilities")
        from riskbridge.doctor import run_checks

        results = run_checks(_settings())
        rows = [{"check": r.name, "target": r.target, "result": r.result, "detail": r.detail} for r in results]
        emit(rows, DOCTOR_COLUMNS, fmt, title="riskbridge doctor")
        if not all(result.ok for result in results):
            raise typer.Exit(code=1)
        return
    _pacs_capabilities(study, rules, fmt)


PROBE_COLUMNS = (
    Column("question", "question"),
    Column("answer", "answer", identifier=True),
    Column("detail", "detail"),
)
ATTRIBUTE_COLUMNS = (
    Column("attribute", "attribute"),
    Column("STUDY", "STUDY"),
    Column("SERIES", "SERIES"),
    Column("IMAGE", "IMAGE"),
    Column("rules", "rules"),
)
CONCLUSION_COLUMNS = (
    Column("topic", "topic"),
    Column("verdict", "verdict", style=_verdict_style),
    Column("finding", "finding"),
)
TSV_PROBE_COLUMNS = (Column("section", "section"), Column("item", "item"), Column("value", "value"),
                     Column("detail", "detail"))  # fmt: skip


def _level_cell(level: LevelAnswer, keyword: str) -> str:
    """``yes`` (every answer), ``n of N`` (some), ``no``, ``-`` (not asked at that level) or the level's error."""
    if keyword not in level.requested or not level.asked:
        return "-"
    if level.error is not None:
        return "error"
    count = level.counts.get(keyword, 0)
    return "yes" if count and count == level.answers else f"{count} of {level.answers}" if count else "no"


def _probe_rows(result: PacsCapabilities) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The probe's answers (question, answer, detail) and its attribute matrix (attribute, STUDY, SERIES, IMAGE)."""

    def yes(flag: bool | None) -> str:
        return "-" if flag is None else "yes" if flag else "no"

    levels = (result.study, result.series, result.image)
    errors = "; ".join(f"{level.level}: {level.error}" for level in levels if level.error and level.asked) or None
    count_detail = f"IMAGE level lists {result.image.answers}" if result.instance_count_agrees is not None else None
    answers: list[dict[str, Any]] = [
        {"question": "PACS", "answer": result.peer, "detail": f"rules {result.rules}"},
        {"question": "sample study", "answer": result.study_uid, "detail": result.study_source},
        {"question": "series in the study", "answer": str(result.series_count), "detail": errors},
        {"question": "IMAGE-level sample series", "answer": result.image_series_uid,
         "detail": f"{result.image.answers} instance(s) listed" if result.image_find else result.image.error},
        {"question": "IMAGE-level C-FIND works", "answer": yes(result.image_find), "detail": None},
        {"question": "NumberOfSeriesRelatedInstances answered", "answer": yes(result.instance_count_answered),
         "detail": count_detail},
        {"question": "C-GET accepted", "answer": yes(result.c_get), "detail": result.c_get_detail},
        {"question": "DICOMweb offered", "answer": yes(result.dicomweb),
         "detail": result.dicomweb_url or "no pacs.dicomweb_url"},
        {"question": "IssuerOfPatientID answered", "answer": yes(result.issuer_of_patient_id), "detail": None},
        {"question": "OtherPatientIDsSequence", "answer": result.other_patient_ids, "detail": None},
        {"question": "transport auto picks", "answer": result.auto_transport,
         "detail": f"pacs.transport = {result.configured_transport}"},
    ]  # fmt: skip
    keywords = dict.fromkeys([*result.study.requested, *result.series.requested, *result.image.requested])
    attributes: list[dict[str, Any]] = [
        {
            "attribute": keyword,
            **{level.level: _level_cell(level, keyword) for level in levels},
            "rules": ("optional" if keyword in result.optional_keywords else "required")
            if keyword in result.rule_keywords
            else "",
        }
        for keyword in keywords
    ]
    for row in attributes:
        # Not an attribute of an instance: IMAGE level gives the count by listing the series (complete_series).
        if row["attribute"] == "NumberOfSeriesRelatedInstances" and row["IMAGE"] == "no" and result.image_find:
            row["IMAGE"] = "counted"
    return answers, attributes


def _pacs_capabilities(study: str | None, rules: str | None, fmt: OutputFormat) -> None:
    """``riskbridge doctor --pacs-capabilities``: probe, then print answers, attributes and conclusions."""
    from dataclasses import asdict

    from riskbridge.pacs_probe import conclusions, probe

    settings = _settings()
    rule_set = _rule_set(settings, rules)
    with console.status("probing the PACS") if fmt == OutputFormat.table else _no_status():
        result = probe(settings.pacs, rule_set, study)
    found = conclusions(result)
    answers, attributes = _probe_rows(result)
    if fmt == OutputFormat.json:
        emit_document({**asdict(result), "conclusions": [asdict(conclusion) for conclusion in found]})
    elif fmt == OutputFormat.tsv:
        rows = [{"section": "answer", "item": r["question"], "value": r["answer"], "detail": r["detail"]}
                for r in answers]  # fmt: skip
        rows += [{"section": "attribute", "item": r["attribute"], "detail": f"rules: {r['rules'] or '-'}",
                  "value": " ".join(f"{level}={r[level]}" for level in ("STUDY", "SERIES", "IMAGE"))}
                 for r in attributes]  # fmt: skip
        rows += [{"section": "conclusion", "item": c.topic, "value": c.verdict, "detail": c.finding} for c in found]
        emit(rows, TSV_PROBE_COLUMNS, fmt)
    else:
        emit(answers, PROBE_COLUMNS, fmt, title=f"PACS capabilities: {result.peer}")
        emit(attributes, ATTRIBUTE_COLUMNS, fmt, title="attributes answered non-empty, by C-FIND level")
        emit([asdict(c) for c in found], CONCLUSION_COLUMNS, fmt, title="what riskbridge will do")
    if any(conclusion.verdict == "problem" for conclusion in found):
        raise typer.Exit(code=1)


def parse_day(value: str | None, option: str) -> date | None:
    """A ``--from``/``--to``/``--window`` day (YYYY-MM-DD), or None; a malformed one exits with status 2."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _fail(f"{option} must be a date like 2026-11-23, not {value!r}") from None


@imaging_app.command("studies")
def imaging_studies(
    date_from: str | None = typer.Option(None, "--from", help="First study date (YYYY-MM-DD), inclusive."),
    date_to: str | None = typer.Option(None, "--to", help="Last study date (YYYY-MM-DD), inclusive."),
    modality: str = typer.Option("CT", "--modality", help="ModalitiesInStudy to match; '' for any."),
    fmt: OutputFormat = format_option(),
) -> None:
    """List the PACS's studies in a date range (STUDY-level C-FIND); identifiers shown are UIDs only."""
    from riskbridge.connectors import query

    settings = _settings()
    study_date = (parse_day(date_from, "--from"), parse_day(date_to, "--to"))
    try:
        rows = [
            {"study_uid": study.study_uid, "datetime": study.study_datetime, "modalities": study.modalities,
             "description": study.description, "instances": study.instance_count}
            for study in query.find_studies(settings.pacs, study_date=study_date, modality=modality or None)
        ]  # fmt: skip
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    emit(rows, STUDY_COLUMNS, fmt)


def _rule_set(settings: Settings, rules: str | None) -> Any:
    from riskbridge.stages.select import load_rule_set

    try:
        return load_rule_set(rules or settings.series_rules)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None


def _decision_style(value: Any) -> str | None:
    text = str(value)
    return "bold green" if text == "chosen" else "yellow" if text.startswith("runner-up") else "red"


DECISION_COLUMNS = (
    Column("study_uid", "study UID", identifier=True, in_table=False),  # the table's title
    Column("series_number", "#"),
    Column("series_uid", "series UID", identifier=True),
    Column("decision", "decision", style=_decision_style),
    Column("rule", "rule"),
    Column("reason", "reason"),
)


def _decision_rows(selection: SelectionResult) -> RowGroup:
    """One study's decisions: a row per series (chosen, runner-up N or rejected, with the rule and the reason)."""
    rows = []
    for decision in selection.decisions:
        if decision.chosen:
            verdict = "chosen"
        elif decision.rank is not None:
            verdict = f"runner-up {decision.rank}"
        else:
            verdict = "rejected"
        rows.append({"study_uid": selection.study_uid, "series_number": decision.judged.get("SeriesNumber"),
                     "series_uid": decision.series_uid, "decision": verdict, "rule": decision.rule,
                     "reason": decision.reason})  # fmt: skip
    return RowGroup(rows, title=f"study {selection.study_uid}", caption=selection.reason)


@imaging_app.command("select")
def imaging_select(
    study_uids: list[str] = typer.Argument(..., help="StudyInstanceUID(s)."),
    rules: str | None = typer.Option(None, "--rules", help="Rule set name or YAML file (default: series_rules)."),
    fmt: OutputFormat = format_option(),
) -> None:
    """Decide each study's series by the rules and show every decision with its reason; nothing is retrieved."""
    from riskbridge.stages.select import select_study

    settings = _settings()
    rule_set = _rule_set(settings, rules)

    def groups() -> Iterator[RowGroup]:
        for study_uid in study_uids:
            yield _decision_rows(select_study(settings.pacs, study_uid, rule_set).selection)

    try:
        emit_groups(groups(), DECISION_COLUMNS, fmt)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None


@imaging_app.command("retrieve")
def imaging_retrieve(
    study_uids: list[str] = typer.Argument(..., help="StudyInstanceUID(s)."),
    rules: str | None = typer.Option(None, "--rules", help="Rule set name or YAML file (default: series_rules)."),
    transport: str | None = typer.Option(None, "--transport", help="auto, c-move, c-get or dicomweb."),
    workers: int | None = typer.Option(None, "--workers", min=1, max=16, help="Series retrieved at once."),
    fmt: OutputFormat = format_option(),
) -> None:
    """Select each study's series and retrieve the chosen ones into staging, verified complete.

    Exit status 1 when a chosen series could not be retrieved completely (each failure is listed with its reason).
    """
    from riskbridge.connectors.retrieval import RetrievalFailure, resolve_transport
    from riskbridge.stages.retrieve import select_and_retrieve

    settings = _settings()
    if transport is not None and transport not in ("auto", "c-move", "c-get", "dicomweb"):
        raise _fail(f"--transport must be auto, c-move, c-get or dicomweb, not {transport!r}")
    if workers is not None:
        settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"workers": workers})})
    if transport is not None:
        settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"transport": transport})})
    rule_set = _rule_set(settings, rules)
    try:
        chosen_transport = resolve_transport(settings.pacs)
        with _count_progress(stderr=fmt != OutputFormat.table) as report:
            outcomes = select_and_retrieve(
                settings.pacs, settings.staging_dir, study_uids, rule_set, chosen_transport,
                lambda done, total: report("series", done, total),
            )  # fmt: skip
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    rows: list[dict[str, Any]] = []
    for outcome in outcomes:
        selection, retrieval = outcome.selection, outcome.retrieval
        row: dict[str, Any] = {"study_uid": selection.study_uid}
        if retrieval is None:
            row.update(outcome="skipped", reason=selection.reason)
        elif isinstance(retrieval, RetrievalFailure):
            row.update(series_uid=retrieval.series_uid, outcome="failed", reason=retrieval.reason)
        else:
            row.update(series_uid=retrieval.series_uid, outcome="staged" if outcome.ready else "failed",
                       reason=None if outcome.ready else "incomplete", received=retrieval.received,
                       expected=retrieval.expected, mb=retrieval.bytes / 1e6, seconds=retrieval.seconds,
                       attempts=retrieval.attempts)  # fmt: skip
        rows.append(row)
    emit(rows, RETRIEVAL_COLUMNS, fmt, title=f"retrieval over {chosen_transport} into {settings.staging_dir}")
    if any(row["outcome"] == "failed" for row in rows):
        raise typer.Exit(code=1)


def _outcome_style(value: Any) -> str | None:
    return {"staged": "green", "skipped": "yellow", "failed": "red"}.get(str(value))


RETRIEVAL_COLUMNS = (
    Column("study_uid", "study UID", identifier=True),
    Column("series_uid", "series UID", identifier=True),
    Column("outcome", "outcome", style=_outcome_style),
    Column("reason", "reason"),
    Column("received", "received"),
    Column("expected", "expected"),
    Column("mb", "MB", spec=".1f"),
    Column("seconds", "seconds", spec=".2f"),
    Column("attempts", "attempts"),
)
