"""docs/api.md's library example, run as written against the sandbox: one study of a synthetic cohort found on the
PACS, matched, retrieved, its labs windowed and scored with the reference model, without the CLI or the ledger."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.synth.cohort import MRN_SYSTEM, PACS_ISSUER, SITE_TIMEZONE
from riskbridge.settings import IdentitySettings, Settings, SiteSettings

pytestmark = pytest.mark.integration

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _example() -> Callable[[Settings, str], float]:
    """The one Python block of docs/api.md, executed; its ``score_study`` function."""
    [code] = re.findall(r"```python\n(.*?)```", API_DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    namespace: dict[str, Any] = {"__name__": "api_example"}
    exec(compile(code, str(API_DOC), "exec"), namespace)
    function: Callable[[Settings, str], float] = namespace["score_study"]
    return function


def test_the_library_example_scores_a_study_end_to_end(sandbox: Settings, tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    generate(cohort, patients=6, seed=311)
    load(cohort, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    clean = [record for record in read_truth(cohort) if record["quarantine"] is None]
    assert clean, "the cohort has a patient without edge cases"
    settings = sandbox.model_copy(
        update={
            "site": SiteSettings(timezone=SITE_TIMEZONE),
            "identity": IdentitySettings(issuer_systems={PACS_ISSUER: MRN_SYSTEM}, default_issuer=PACS_ISSUER),
            "staging_dir": tmp_path / "staging",
            "model_dir": tmp_path / "models",
        }
    )
    score_study = _example()
    probability = score_study(settings, clean[0]["index_study"]["accession"])
    assert 0.0 < probability < 1.0
    staged = list((tmp_path / "staging" / clean[0]["index_study"]["study_uid"]).glob("*/*.dcm"))
    assert staged, "the chosen series was staged"
