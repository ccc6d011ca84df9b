"""RiskAssessment write-back bundles: deterministic identifiers, R4 content, idempotent requests, bundling."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from riskbridge.records import pattern_name
from riskbridge.settings import WritebackSettings
from riskbridge.stages.write_back import (
    FHIR_CANONICAL_BASE,
    MODALITIES,
    MODALITY_ATTENTION_URL,
    MODALITY_CODE_SYSTEM_URL,
    MODALITY_PATTERN_URL,
    Score,
    WritebackConfig,
    WritebackError,
    assessment_key,
    build_risk_assessment,
    definition_entries,
    definition_resources,
    install_definitions,
    modality_pattern,
    qualitative_risk,
    transaction_bundles,
    write_assessments,
)

EST = timezone(timedelta(hours=-5))


def _score(
    patient: str = "p1",
    study: str = "1.2.3",
    version: str = "1.0.0",
    probability: float = 0.2,
    attention: Mapping[str, float] | None = None,
) -> Score:
    return Score(
        patient_id=patient,
        study_uid=study,
        model_name="fusion",
        model_version=version,
        probability=probability,
        occurrence=datetime(2024, 1, 4, 18, 44, tzinfo=EST),
        scored_at=datetime(2024, 1, 5, 2, 0, tzinfo=UTC),
        attention={"image": 0.6, "labs": 0.3, "notes": 0.1} if attention is None else attention,
        observation_ids=("obs-1",),
        document_ids=("doc-1",),
    )


def test_the_key_depends_on_model_version_patient_and_study_only() -> None:
    key = assessment_key("1.0.0", "p1", "1.2.3")
    assert key == assessment_key("1.0.0", "p1", "1.2.3")
    assert len({key, assessment_key("1.1.0", "p1", "1.2.3"), assessment_key("1.0.0", "p2", "1.2.3"),
                assessment_key("1.0.0", "p1", "1.2.4")}) == 4  # fmt: skip
    # The separator keeps ("1.0", "0p1") and ("1.00", "p1") apart.
    assert assessment_key("1.0", "0p1", "s") != assessment_key("1.00", "p1", "s")


@pytest.mark.parametrize(
    ("probability", "code"), [(0.0, "low"), (0.099, "low"), (0.1, "moderate"), (0.299, "moderate"), (0.3, "high")]
)
def test_qualitative_risk_follows_the_thresholds(probability: float, code: str) -> None:
    assert qualitative_risk(probability, (0.1, 0.3))[0] == code


def test_a_bundle_is_valid_r4_with_a_conditional_create_and_a_provenance_upsert() -> None:
    bundle, keys = next(transaction_bundles([_score()], WritebackConfig()))
    data = bundle.model_dump(mode="json", exclude_none=True)
    Bundle.model_validate(data)  # R4B models accept what we send
    assessment, provenance = data["entry"]
    key = keys[0]
    assert assessment["request"] == {
        "method": "POST",
        "url": "RiskAssessment",
        "ifNoneExist": f"identifier=urn:riskbridge:risk-assessment|{key}",
    }
    resource = assessment["resource"]
    assert resource["status"] == "final" and resource["subject"] == {"reference": "Patient/p1"}
    assert resource["occurrenceDateTime"] == "2024-01-04T18:44:00-05:00"
    prediction = resource["prediction"][0]
    assert prediction["probabilityDecimal"] == 0.2 and prediction["qualitativeRisk"]["coding"][0]["code"] == "moderate"
    assert resource["method"]["coding"][0] == {"system": "urn:riskbridge:model", "code": "fusion", "version": "1.0.0"}
    basis = resource["basis"]
    assert {"reference": "Observation/obs-1"} in basis and {"reference": "DocumentReference/doc-1"} in basis
    assert basis[-1]["identifier"] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}
    assert "image 0.600" in resource["note"][0]["text"]
    assert provenance["request"] == {"method": "PUT", "url": f"Provenance/{key}-provenance"}
    assert provenance["resource"]["target"] == [{"reference": assessment["fullUrl"]}]
    assert provenance["resource"]["recorded"] == "2024-01-05T02:00:00Z"
    assert provenance["resource"]["agent"][0]["who"]["type"] == "Device"
    assert len(provenance["resource"]["entity"]) == len(basis)


def test_the_same_scores_give_byte_identical_bundles() -> None:
    # Rewriting must send exactly the same content: the Provenance PUT then changes nothing on the server.
    def dump() -> list[dict[str, Any]]:
        return [b.model_dump(mode="json") for b, _ in transaction_bundles([_score(), _score("p2")], WritebackConfig())]

    assert dump() == dump()


def test_an_imaging_study_on_the_server_is_referenced_directly() -> None:
    score = Score(**{**_score().__dict__, "imaging_study_id": "img-9"})
    bundle, _ = next(transaction_bundles([score], WritebackConfig()))
    basis = bundle.model_dump(mode="json", exclude_none=True)["entry"][0]["resource"]["basis"]
    assert basis[-1] == {"reference": "ImagingStudy/img-9"}


def test_bundles_are_cut_at_the_configured_size_and_a_key_never_repeats() -> None:
    scores = [_score(patient=f"p{i}") for i in range(5)]
    bundles = list(transaction_bundles(scores, WritebackConfig(bundle_size=2)))
    assert [len(keys) for _, keys in bundles] == [2, 2, 1]
    assert [len(bundle.entry or []) for bundle, _ in bundles] == [4, 4, 2]
    with pytest.raises(WritebackError, match="two scores for assessment"):
        list(transaction_bundles([_score(), _score(probability=0.9)], WritebackConfig()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probability": 1.2}, "probability"),
        ({"occurrence": datetime(2024, 1, 4)}, "occurrence must carry"),
        ({"attention": {"image": 0.5, "xray": 0.5}}, "unknown modalities"),
        ({"attention": {"image": 1.5}}, "attention of image"),
        ({"attention": {"image": float("nan"), "labs": 1.0}}, "attention of image"),
        ({"attention": {"image": 0.0, "labs": 0.0, "notes": 0.0}}, "no modality"),
    ],
)
def test_bad_scores_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(WritebackError, match=message):
        Score(**{**_score().__dict__, **change})


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(WritebackError, match="thresholds"):
        WritebackConfig(thresholds=(0.5, 0.2))


@dataclass(frozen=True)
class _Answer:
    status: int


class _Server:
    """Answers every entry of a transaction with one status (a stand-in for the FHIR client's transaction)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.sent: list[list[Mapping[str, Any]]] = []

    def transaction(self, entries: Sequence[Mapping[str, Any]]) -> list[_Answer]:
        self.sent.append(list(entries))
        return [_Answer(self.status) for _ in entries]


def test_the_report_tells_created_from_existing_and_refuses_surprises() -> None:
    scores = [_score(), _score("p2")]
    server = _Server(201)
    assert len(write_assessments(scores, server).created) == 2
    assert [entry["request"]["method"] for entry in server.sent[0]] == ["POST", "PUT", "POST", "PUT"]
    assert len(write_assessments(scores, _Server(200)).existing) == 2
    with pytest.raises(WritebackError, match="unexpected transaction status 400"):
        write_assessments(scores, _Server(400))


def test_bundle_workers_come_from_the_settings_and_must_be_at_least_one() -> None:
    assert WritebackConfig.from_settings(WritebackSettings(bundle_workers=3)).bundle_workers == 3
    assert WritebackConfig.from_settings(WritebackSettings()).bundle_workers == 2
    with pytest.raises(WritebackError, match="bundle_workers"):
        WritebackConfig(bundle_workers=0)


def _resource(score: Score) -> dict[str, Any]:
    return build_risk_assessment(score, WritebackConfig()).model_dump(mode="json", exclude_none=True)


def _attention_extensions(resource: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(modality, weight) of every modality-attention extension, in the order written."""
    pairs = []
    for extension in resource.get("extension", []):
        if extension["url"] == MODALITY_ATTENTION_URL:
            parts = {part["url"]: part for part in extension["extension"]}
            pairs.append((parts["modality"]["valueCode"], parts["weight"]["valueDecimal"]))
    return pairs


@pytest.mark.parametrize(
    ("attention", "pattern"),
    [
        ({"image": 0.5, "labs": 0.3, "notes": 0.2}, "image+labs+notes"),
        ({"notes": 0.2, "labs": 0.3, "image": 0.5}, "image+labs+notes"),  # the order is fixed, not the mapping's
        ({"image": 0.7, "labs": 0.3, "notes": 0.0}, "image+labs"),
        ({"image": 1.0, "labs": 0.0, "notes": 0.0}, "image"),
        ({"image": 0.0, "labs": 0.5, "notes": 0.5}, "labs+notes"),
        ({"image": 0.5, "notes": 0.5}, "image+notes"),  # a modality left out counts as not used
        ({"image": 0.0, "labs": 0.0, "notes": 0.0}, "none"),
        ({}, "none"),
    ],
)
def test_the_modality_pattern_joins_the_used_modalities_in_model_order(
    attention: dict[str, float], pattern: str
) -> None:
    assert modality_pattern(attention) == pattern


def test_the_modality_pattern_refuses_unknown_modalities_and_names_patterns_as_the_records_do() -> None:
    with pytest.raises(WritebackError, match="unknown modalities"):
        modality_pattern({"image": 1.0, "ecg": 0.0})
    for flags in itertools.product((True, False), repeat=len(MODALITIES)):
        attention = {name: 0.5 if used else 0.0 for name, used in zip(MODALITIES, flags, strict=True)}
        assert modality_pattern(attention) == pattern_name(flags)


def test_the_modalities_are_the_models() -> None:
    from riskbridge.model.network import MODALITIES as MODEL_MODALITIES

    assert MODEL_MODALITIES == MODALITIES


@pytest.mark.parametrize(
    ("attention", "pattern"),
    [
        ({"image": 0.5, "labs": 0.3, "notes": 0.2}, "image+labs+notes"),
        ({"image": 0.6, "labs": 0.4, "notes": 0.0}, "image+labs"),
        ({"image": 1.0, "labs": 0.0, "notes": 0.0}, "image"),
    ],
)
def test_the_assessment_carries_the_pattern_and_every_modality_weight_as_extensions(
    attention: dict[str, float], pattern: str
) -> None:
    resource = _resource(_score(attention=attention))
    patterns = [e["valueCode"] for e in resource["extension"] if e["url"] == MODALITY_PATTERN_URL]
    assert patterns == [pattern]
    assert _attention_extensions(resource) == [(name, attention[name]) for name in MODALITIES]
    assert pattern in resource["note"][0]["text"]


def test_weights_keep_six_significant_digits_so_a_used_modality_never_reads_zero() -> None:
    attention = {"image": 0.6000000238418579, "labs": 0.39999997, "notes": 2.5e-9}
    weights = dict(_attention_extensions(_resource(_score(attention=attention))))
    assert weights == {"image": 0.6, "labs": 0.4, "notes": 2.5e-9}
    assert modality_pattern(weights) == modality_pattern(attention) == "image+labs+notes"


def test_no_attention_writes_no_extension_and_every_assessment_is_labelled_ai_asserted() -> None:
    resource = _resource(_score(attention={}))
    assert "extension" not in resource and "note" not in resource
    for score in (_score(attention={}), _score()):
        assert _resource(score)["meta"]["security"] == [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "code": "AIAST",
                "display": "Artificial Intelligence asserted",
            }
        ]


def test_the_shipped_definitions_are_r4_resources_under_the_canonical_base() -> None:
    definitions = {resource["url"]: resource for resource in definition_resources()}
    assert all(url.startswith(FHIR_CANONICAL_BASE + ":") for url in definitions)
    for resource in definitions.values():
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for url in (MODALITY_ATTENTION_URL, MODALITY_PATTERN_URL):
        definition = definitions[url]
        assert definition["type"] == "Extension" and definition["context"] == [
            {"type": "element", "expression": "RiskAssessment"}
        ]
        fixed = {e["id"]: e.get("fixedUri") for e in definition["differential"]["element"]}
        assert fixed["Extension.url"] == url
    codes = [concept["code"] for concept in definitions[MODALITY_CODE_SYSTEM_URL]["concept"]]
    assert tuple(codes) == MODALITIES


def test_the_pattern_invariant_accepts_exactly_the_patterns_the_write_back_names() -> None:
    definition = next(r for r in definition_resources() if r["url"] == MODALITY_PATTERN_URL)
    value = next(e for e in definition["differential"]["element"] if e["id"] == "Extension.value[x]")
    expression = value["constraint"][0]["expression"]
    regex = re.fullmatch(r"matches\('(.*)'\)", expression)
    assert regex is not None
    named = {
        modality_pattern({name: 0.5 if used else 0.0 for name, used in zip(MODALITIES, flags, strict=True)})
        for flags in itertools.product((True, False), repeat=len(MODALITIES))
    } - {"none"}
    assert len(named) == 7
    # Every sequence of up to four modality names: wrong orders and repeats included.
    candidates = {"+".join(names) for n in range(1, 5) for names in itertools.product(MODALITIES, repeat=n)}
    assert {c for c in candidates if re.search(regex.group(1), c)} == named


def test_definitions_install_as_conditional_updates_on_their_canonical_urls() -> None:
    entries = definition_entries()
    assert [e["request"]["method"] for e in entries] == ["PUT"] * len(definition_resources())
    attention = next(e for e in entries if e["resource"]["url"] == MODALITY_ATTENTION_URL)
    assert attention["request"]["url"] == (
        "StructureDefinition?url=urn%3Ariskbridge%3Afhir%3AStructureDefinition%3Amodality-attention"
    )
    server = _Server(201)
    statuses = install_definitions(server)
    assert server.sent == [entries] and set(statuses) == {r["url"] for r in definition_resources()}
    assert set(install_definitions(_Server(200)).values()) == {200}
    with pytest.raises(WritebackError, match="unexpected status 412"):
        install_definitions(_Server(412))
