"""Shared by the benchmarks that run the pipeline on the sandbox: the synthetic hospital's settings with a ledger
database of the benchmark's own, created (and upgraded) on entry and dropped on exit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import psycopg2.extensions
from pydantic import SecretStr

from riskbridge.dev.pg import admin
from riskbridge.dev.synth.cohort import MRN_SYSTEM, PACS_ISSUER, SITE_TIMEZONE
from riskbridge.ledger import Ledger
from riskbridge.settings import DatabaseSettings, IdentitySettings, Settings, SiteSettings


@contextmanager
def synthetic_site(base: Settings, work: Path, prefix: str) -> Iterator[Settings]:
    """``base`` (the sandbox's settings) with the synthetic hospital's zone and identity rules, staging, models and
    reports under ``work``, and a new ledger database named ``<prefix>_<random>``, dropped when the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin(base.database.dsn.get_secret_value(), f'CREATE DATABASE "{name}"')
    dsn = psycopg2.extensions.make_dsn(base.database.dsn.get_secret_value(), dbname=name)
    settings = base.model_copy(
        update={
            "database": DatabaseSettings(dsn=SecretStr(dsn)),
            "site": SiteSettings(timezone=SITE_TIMEZONE),
            "identity": IdentitySettings(issuer_systems={PACS_ISSUER: MRN_SYSTEM}, default_issuer=PACS_ISSUER),
            "staging_dir": work / "staging",
            "model_dir": work / "models",
            "run": base.run.model_copy(update={"report_dir": work / "reports", "quarantine_alert_fraction": 1.0}),
        }
    )
    try:
        with Ledger.connect(settings.database) as ledger:
            ledger.upgrade()
        yield settings
    finally:
        admin(base.database.dsn.get_secret_value(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
