"""Migration files (no server): found in version order, named NNNN_name.sql, numbered without gaps, checksummed;
reason codes without their details."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskbridge.ledger import LedgerError, Migration, load_migrations, reason_code


def test_the_shipped_migrations_start_at_one_and_create_every_ledger_table() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    schema = "\n".join(m.sql for m in migrations)
    for table in ("runs", "studies", "identity_decisions", "series_decisions", "retrievals", "clinical_values",
                  "note_findings", "features", "scores", "writebacks", "quarantine", "stage_timings"):  # fmt: skip
        assert f"CREATE TABLE {table} (" in schema


def test_migrations_are_ordered_by_version_not_by_listing(tmp_path: Path) -> None:
    (tmp_path / "0002_second.sql").write_text("SELECT 2;")
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    (tmp_path / "README.md").write_text("not a migration")
    assert [(m.version, m.name) for m in load_migrations(tmp_path)] == [(1, "first"), (2, "second")]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["0001_a.sql", "0003_c.sql"], "without gaps"),
        (["0001_a.sql", "0001_b.sql"], "without gaps or repeats"),
        (["0002_b.sql"], "without gaps"),
        (["1_a.sql"], "NNNN_name.sql"),
        (["0001_Capital.sql"], "NNNN_name.sql"),
    ],
)
def test_badly_numbered_or_named_migrations_are_refused(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(LedgerError, match=message):
        load_migrations(tmp_path)


def test_the_checksum_changes_with_the_text() -> None:
    assert Migration(1, "a", "SELECT 1;").checksum != Migration(1, "a", "SELECT 1; ").checksum
    assert Migration(1, "a", "SELECT 1;").checksum == Migration(1, "b", "SELECT 1;").checksum


def test_reason_code_drops_the_detail() -> None:
    assert reason_code("missing_required:egfr") == "missing_required"
    assert reason_code("too_much_missing:0.60>0.50") == "too_much_missing"
    assert reason_code("no_image") == "no_image"
