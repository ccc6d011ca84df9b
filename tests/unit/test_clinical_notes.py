"""The clinical stage's notes without a server: one note whose attachment cannot be read is recorded ``unreadable``
and the patient's other notes still count; a server failure (not one attachment's) still fails the chunk."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from riskbridge.connectors.fhir import AttachmentError, FhirError
from riskbridge.connectors.fhir.notes import NoteText
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.stages.clinical import ClinicalHarmonizer, PatientIndex

INDEX = datetime(2024, 1, 10, 14, 0, tzinfo=UTC)


def _note(ident: str) -> dict[str, Any]:
    return {"resourceType": "DocumentReference", "id": ident, "status": "current", "date": "2024-01-05T10:00:00Z"}


class _Client:
    """Answers note_texts like a FHIR client: ``bad`` raises AttachmentError, ``down`` a server failure."""

    def note_texts(self, resource: Mapping[str, Any]) -> list[NoteText]:
        if resource["id"] == "bad":
            raise AttachmentError("DocumentReference/bad: attachment data is not valid base64")
        if resource["id"] == "down":
            raise FhirError("GET Binary: 503 after 4 attempts", 503)
        return [NoteText("DocumentReference", str(resource["id"]), "History of COPD.", "text/plain", "data")]


def test_an_unreadable_note_is_recorded_and_the_other_notes_still_count() -> None:
    harmonizer = ClinicalHarmonizer(_Client(), load_default_feature_spec(), "UTC")  # type: ignore[arg-type]
    texts, dispositions = harmonizer._notes(PatientIndex("p1", INDEX), [_note("good"), _note("bad")])
    assert [(d.resource_id, d.code) for d in dispositions] == [("good", "used"), ("bad", "unreadable")]
    assert texts == [("DocumentReference/good", "History of COPD.")]


def test_a_failing_server_still_fails_the_chunk() -> None:
    harmonizer = ClinicalHarmonizer(_Client(), load_default_feature_spec(), "UTC")  # type: ignore[arg-type]
    with pytest.raises(FhirError, match="503"):
        harmonizer._notes(PatientIndex("p1", INDEX), [_note("good"), _note("down")])
