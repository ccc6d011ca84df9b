"""PHI retention without a server: every migration column that can name a patient has a decision (cleared by
``riskbridge db purge`` or kept, with why), the purge's UPDATEs clear exactly those, never overlap and run in one
transaction (a dry run only counts), cutoffs and settings; ``riskbridge db purge`` prints counts per table only; a
malformed ledger DSN is one line naming the problem, never the password and never a traceback. The purge's SQL
against PostgreSQL: tests/integration/test_retention_sandbox.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.connectors import db
from riskbridge.errors import ConfigurationError, LedgerError
from riskbridge.ledger import load_migrations
from riskbridge.retention import KEPT_COLUMNS, PHI_COLUMNS, PurgeCounts, cutoff, purge_phi, purge_steps
from riskbridge.settings import DatabaseSettings, RetentionSettings, SettingsError, load_settings

NOW = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
# Column names that can hold what names a patient (or the ids that lead to one).
_PHI_LIKE = re.compile(r"patient|birth|accession|mrn|sex|other_ids|candidate")
_TYPES = r"(?:bigserial|bigint|integer|text|jsonb|timestamptz|boolean|double precision)"


def _schema() -> dict[tuple[str, str], str]:
    """(table, column) -> its definition, across every shipped migration (later ALTERs appended)."""
    columns: dict[tuple[str, str], str] = {}
    table = ""
    for migration in load_migrations():
        for line in migration.sql.splitlines():
            code = line.split("--", 1)[0]
            opened = re.match(r"\s*(?:CREATE|ALTER) TABLE (\w+)", code)
            if opened:
                table = opened.group(1)
                continue
            defined = re.match(rf"\s+(?:ADD COLUMN\s+)?(\w+)\s+({_TYPES}.*)", code)
            if defined and defined.group(1).upper() not in ("PRIMARY", "FOREIGN", "UNIQUE", "CHECK", "CONSTRAINT"):
                columns[(table, defined.group(1))] = defined.group(2)
            altered = re.match(r"\s+ALTER COLUMN (\w+) (.*)", code)
            if altered:
                columns[(table, altered.group(1))] += " " + altered.group(2)
    return columns


def test_every_column_that_can_name_a_patient_is_cleared_or_kept_for_a_stated_reason() -> None:
    schema = _schema()
    assert ("studies", "patient_name") in schema and ("runs", "accessions") in schema  # the parser sees the tables
    decided = {(c.table, c.column) for c in (*PHI_COLUMNS, *KEPT_COLUMNS)}
    phi_like = {key for key in schema if _PHI_LIKE.search(key[1])}
    assert phi_like - decided == set(), "a new column that can name a patient needs a decision in retention.py"
    assert decided - set(schema) == set(), "a decided column no migration defines"
    assert all(c.why for c in (*PHI_COLUMNS, *KEPT_COLUMNS))
    assert not any(c.kept for c in PHI_COLUMNS) and all(c.kept for c in KEPT_COLUMNS)
    assert {(c.table, c.column) for c in PHI_COLUMNS if c.undecided} == {
        ("studies", "patient_name"),
        ("studies", "patient_birth_date"),
    }


def test_what_a_purge_writes_fits_each_column() -> None:
    schema = _schema()
    for column in PHI_COLUMNS:
        definition = schema[(column.table, column.column)]
        if column.cleared_to == "NULL":  # nullable after every migration (0008 drops studies.patient_id's NOT NULL)
            assert "NOT NULL" not in definition or definition.endswith("DROP NOT NULL;"), column
        else:
            kind = {"'[]'": "jsonb", "'{}'": "text[]", "''": "text"}[str(column.cleared_to)]
            assert definition.startswith(kind), column


def test_purge_steps_clear_every_phi_column_in_three_disjoint_updates() -> None:
    identifiers, runs, undecided = purge_steps()
    assert (identifiers.table, runs.table, undecided.table) == ("studies", "runs", "studies")
    for column in PHI_COLUMNS:
        step = runs if column.table == "runs" else identifiers
        assert f"{column.column} = {column.cleared_to}" in step.set
        assert (f"{column.column} = " in undecided.set) == column.undecided
    assert "phi_purged = %(now)s" in runs.set and "t.phi_purged IS NULL" in runs.where
    # The undecided step leaves decided studies and runs the identifier step takes, so counts never overlap.
    assert "NOT EXISTS (SELECT 1 FROM identity_decisions" in undecided.where
    assert "NOT IN (SELECT r.run_id FROM runs r" in undecided.where and "%(phi_cutoff)s" in undecided.where
    for step in (identifiers, runs, undecided):
        assert "max(t.updated) FROM stage_timings" in step.where  # a run's last stage call is activity
        assert set(re.findall(r"%\((\w+)\)s", step.update_sql())) <= {"phi_cutoff", "undecided_cutoff", "now"}
        assert step.count_sql().endswith(f"WHERE {step.where}") and step.update_sql().endswith(f"WHERE {step.where}")
        assert step.count_sql().startswith("SELECT count(*)")


def test_cutoffs_count_whole_days_back_from_an_aware_now() -> None:
    assert cutoff(NOW, 30) == NOW - timedelta(days=30)
    with pytest.raises(ValueError, match="aware"):
        cutoff(datetime(2026, 3, 1), 30)
    with pytest.raises(ValueError, match="at least 1 day"):
        cutoff(NOW, 0)


def test_retention_settings_default_to_30_and_7_days_and_name_a_bad_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (RetentionSettings().phi_days, RetentionSettings().undecided_days) == (30, 7)
    monkeypatch.setenv("RISKBRIDGE_RETENTION__PHI_DAYS", "90")
    assert load_settings().retention.phi_days == 90
    monkeypatch.setenv("RISKBRIDGE_RETENTION__UNDECIDED_DAYS", "120")
    with pytest.raises(SettingsError, match=r"retention: .*undecided_days must not exceed phi_days"):
        load_settings()
    monkeypatch.setenv("RISKBRIDGE_RETENTION__UNDECIDED_DAYS", "0")
    with pytest.raises(SettingsError, match=r"retention\.undecided_days"):
        load_settings()


class _Cursor:
    """Records the SQL of one transaction and answers counts and row counts."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.statements: list[tuple[str, dict[str, Any]]] = []
        self.rowcount = 0
        self.fail_with = fail_with

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.statements.append((sql, params))
        self.rowcount = len(self.statements)

    def fetchone(self) -> dict[str, int]:
        return {"n": 10 * len(self.statements)}


class _Ledger:
    def __init__(self, cursor: _Cursor) -> None:
        self.cursor = cursor
        self.transactions = 0
        self.schema_checked = False

    def check_schema(self) -> None:
        self.schema_checked = True

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        self.transactions += 1
        yield self.cursor


def test_a_purge_updates_in_one_transaction_and_a_dry_run_only_counts() -> None:
    retention = RetentionSettings(phi_days=30, undecided_days=7)
    cursor = _Cursor()
    ledger = _Ledger(cursor)
    counts = purge_phi(ledger, retention, NOW)  # type: ignore[arg-type]
    assert ledger.schema_checked and ledger.transactions == 1
    assert [sql.split()[0] for sql, _ in cursor.statements] == ["UPDATE", "UPDATE", "UPDATE"]
    assert cursor.statements[0][1] == {
        "phi_cutoff": NOW - timedelta(days=30),
        "undecided_cutoff": NOW - timedelta(days=7),
        "now": NOW,
    }
    assert counts == PurgeCounts(NOW - timedelta(days=30), NOW - timedelta(days=7), 1, 3, 2)
    assert counts.per_table() == {"studies": 4, "runs": 2}

    cursor = _Cursor()
    counts = purge_phi(_Ledger(cursor), retention, NOW, dry_run=True)  # type: ignore[arg-type]
    assert [sql.split()[0] for sql, _ in cursor.statements] == ["SELECT", "SELECT", "SELECT"]
    assert (counts.identifiers, counts.runs, counts.undecided, counts.dry_run) == (10, 20, 30, True)


def test_a_database_error_during_a_purge_is_one_line_without_the_row() -> None:
    error = psycopg2.IntegrityError(
        'null value in column "x" violates a constraint\nDETAIL: Failing row contains (DOE)'
    )
    with pytest.raises(LedgerError, match="purge failed, nothing was cleared: null value") as raised:
        purge_phi(_Ledger(_Cursor(error)), RetentionSettings(), NOW)  # type: ignore[arg-type]
    assert "DOE" not in str(raised.value)


def test_db_purge_prints_counts_per_table_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    opened: list[DatabaseSettings] = []

    class _Connected:
        def __enter__(self) -> _Connected:
            return self

        def __exit__(self, *exc_info: object) -> None:
            return None

    def connect(database: DatabaseSettings) -> _Connected:
        opened.append(database)
        return _Connected()

    def purge(ledger: Any, retention: RetentionSettings, now: Any = None, dry_run: bool = False) -> PurgeCounts:
        return PurgeCounts(NOW - timedelta(days=retention.phi_days), NOW - timedelta(days=7), 12, 3, 4, dry_run)

    monkeypatch.setattr("riskbridge.ledger.Ledger.connect", connect)
    monkeypatch.setattr("riskbridge.retention.purge_phi", purge)
    monkeypatch.setenv("RISKBRIDGE_RETENTION__PHI_DAYS", "60")
    result = CliRunner().invoke(app, ["db", "purge", "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert opened and "would clear (dry run, nothing changed)" in result.output
    assert "since 2025-12-31 02:00 UTC" in result.output  # 60 days before NOW
    assert "studies: 15 row(s) (12 identifiers, 3 undecided names and birth dates)" in result.output
    assert "runs: 4 row(s)" in result.output
    result = CliRunner().invoke(app, ["db", "purge"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "cleared the identifiers" in result.output and "dry run" not in result.output


MALFORMED = [
    ("postgresql://rb:s3cretpw@db.example:5432/ledger?sslmod=require", "invalid URI query parameter"),
    ("host=db.example password=s3cretpw user", 'missing "=" after "user"'),
    ("host=db.example password= s3cretpw dbname", 'missing "=" after "dbname"'),
    ("host=db.example password='s3cretpw", "unterminated quoted string"),
    ("host=db.example s3cretpw", 'missing "=" after "..."'),
    ("mysql://rb:s3cretpw@db.example/ledger", 'missing "=" after "..."'),
    ("postgresql://rb:s3cretpw@[::1/ledger", "IPv6 host address"),
    ("postgresql://rb:s3cr@tpw@db.example/ledger", "unescaped '@' or '/'"),
    ("postgresql://rb:s3cr/tpw@db.example/ledger", "unescaped '@' or '/'"),
    ("postgresql://rb:s3cret\0pw@db.example/ledger", "NUL character"),
]


@pytest.mark.parametrize(("dsn", "problem"), MALFORMED)
def test_a_malformed_dsn_is_a_configuration_error_naming_the_problem_not_the_password(dsn: str, problem: str) -> None:
    with pytest.raises(db.MalformedDsnError) as raised:
        db.connect(DatabaseSettings(dsn=SecretStr(dsn)))
    message = str(raised.value)
    assert message.startswith("database.dsn is malformed: ") and problem in message
    assert "s3cr" not in message and "tpw" not in message
    assert isinstance(raised.value, ConfigurationError) and isinstance(raised.value, LedgerError)
    assert db.safe_dsn(dsn) == "(malformed DSN)"


@pytest.mark.parametrize("command", [["db", "purge", "--dry-run"], ["db", "upgrade"], ["doctor"]])
def test_commands_report_a_malformed_dsn_in_one_line_without_traceback_or_password(
    command: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RISKBRIDGE_DATABASE__DSN", "host=127.0.0.1 port=9 password=s3cretpw dbname")
    monkeypatch.setenv("RISKBRIDGE_PACS__PORT", "9")  # doctor's other checks fail fast on loopback
    monkeypatch.setenv("RISKBRIDGE_FHIR__BASE_URL", "http://127.0.0.1:9/fhir")
    result = CliRunner().invoke(app, command, env={"COLUMNS": None})  # off a terminal: no line is wrapped
    assert result.exit_code == (1 if command == ["doctor"] else 2)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "database.dsn is malformed" in result.output and 'missing "=" after "dbname"' in result.output
    assert "s3cretpw" not in result.output and "Traceback" not in result.output


def test_a_dsn_that_parses_still_fails_to_connect_without_its_password() -> None:
    with pytest.raises(db.DatabaseError) as raised:
        db.connect(DatabaseSettings(dsn=SecretStr("postgresql://rb:s3cretpw@127.0.0.1:9/ledger")), timeout_s=2)
    assert not isinstance(raised.value, db.MalformedDsnError)
    assert "rb@127.0.0.1:9/ledger" in str(raised.value) and "s3cretpw" not in str(raised.value)
