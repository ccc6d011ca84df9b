"""Settings for pipeline tests against a synthetic cohort loaded into the sandbox: the synthetic hospital's site rules
(time zone, identity map), a ledger of the test's own, and the test's staging, model and report directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from riskbridge.dev.synth.cohort import MRN_SYSTEM, PACS_ISSUER, SITE_TIMEZONE
from riskbridge.settings import DatabaseSettings, IdentitySettings, RunSettings, Settings, SiteSettings


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
