"""Settings for pipeline tests against a synthetic cohort loaded into the sandbox: the synthetic hospital's site rules
(time zone, identity map), a ledger of the test's own, the test's staging, model and report directories, and the
index window of each test module's cohort."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

from riskbridge.dev.synth.cohort import INDEX_WINDOW_DAYS, MRN_SYSTEM, PACS_ISSUER, SITE_TIMEZONE
from riskbridge.settings import DatabaseSettings, IdentitySettings, RunSettings, Settings, SiteSettings

# The day each module's cohort ends its index window at (``generate(..., anchor=...)``), for the modules that run the
# pipeline over a window. The sandbox serves the whole test session, so a run over a window that other modules'
# cohorts share would discover, retrieve, score and write back all of them, and a test would take longer the more
# tests ran before it. One January per module, so no two windows (14 days, and the nightly tests' look-backs of up
# to 16) ever meet. Airflow creates no task before its START_DATE (2000-01-01), and test_celery_run picks free
# days in 2002-2022 itself: the modules run through Airflow take 2023 and later. Modules that run no window keep
# the default anchor (2024-01-15).
COHORT_ANCHORS: dict[str, date] = {
    "test_pipeline": date(1991, 1, 15),
    "test_pipeline_two_pacs": date(1992, 1, 15),
    "test_cohort_export": date(1993, 1, 15),
    "test_survey_sandbox": date(1994, 1, 15),
    "test_coverage_nightly": date(2001, 1, 15),
    "test_nightly_e2e": date(2023, 1, 15),
}


def cohort_anchor(module: str) -> date:
    """The anchor of ``module``'s cohort (the module's file name without ``.py``)."""
    return COHORT_ANCHORS[module]


def index_days(module: str) -> tuple[date, date]:
    """First and last local day of ``module``'s cohort's index window (a ``riskbridge run --window`` range)."""
    anchor = cohort_anchor(module)
    return anchor - timedelta(days=INDEX_WINDOW_DAYS), anchor - timedelta(days=1)


def synthetic_site_settings(
    sandbox: Settings, database: DatabaseSettings, tmp_path: Path, run: RunSettings
) -> Settings:
    """The sandbox's settings with the synthetic hospital's rules, ``database`` as the ledger and ``run``."""
    return sandbox.model_copy(
        update={
            "database": database,
            "site": SiteSettings(timezone=SITE_TIMEZONE),
            "identity": IdentitySettings(issuer_systems={PACS_ISSUER: MRN_SYSTEM}, default_issuer=PACS_ISSUER),
            "staging_dir": tmp_path / "staging",
            "model_dir": tmp_path / "models",
            "run": run,
        }
    )


def phi_strings(record: dict[str, Any]) -> set[str]:
    """The identifying strings of one synthetic truth record (names, MRN, PACS id, birth date, UIDs, accession
    numbers, FHIR id) that a test checks never appear in an output."""
    pacs = record["pacs"]
    family, _, given = pacs["name"].partition("^")
    birth = pacs["birth_date"]
    found = {record["mrn"], pacs["patient_id"], family, given, birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}
    for study in [record["index_study"], *record["prior_studies"]]:
        found |= {study["study_uid"], study["accession"]}
    found.add(record["identity"]["fhir_patient_id"] or "")
    return {value for value in found if value and len(value) >= 4}
