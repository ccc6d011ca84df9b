"""The synthetic hospital records its outcome in FHIR the way the shipped label spec reads it: the labels derived
from each patient's bundle by :func:`riskbridge.harmonize.labels.label_patient` are the truth's labels."""

from __future__ import annotations

import json

from riskbridge.dev.synth.cohort import SITE_TIMEZONE, build_cohort
from riskbridge.dev.synth.fhir import bundle_json, patient_bundle
from riskbridge.harmonize.labels import NEGATIVE, POSITIVE, label_counts, label_patient, load_label_spec


def test_labels_from_the_synthetic_ehr_are_the_truths_labels() -> None:
    spec = load_label_spec("chest_ct")
    cohort = build_cohort(11, 60)
    decisions = []
    for patient in cohort.patients:
        bundle = patient_bundle(patient, cohort.cohort_id)
        if bundle is None:  # no FHIR Patient: nothing in the EHR to label from
            continue
        resources = [entry["resource"] for entry in json.loads(bundle_json(bundle))["entry"]]
        decision = label_patient(spec, patient.index_study.acquisition, resources, SITE_TIMEZONE)
        assert decision.label == patient.label, (patient.key, decision)
        assert decision.reason == (POSITIVE if patient.label else NEGATIVE)
        if patient.label:
            assert decision.onset == patient.outcome_onset
            assert decision.evidence == (f"Condition/{patient.fhir_patients[0].id}-outcome",)
        decisions.append(decision)
    counts = label_counts(decisions)
    assert counts[POSITIVE] > 5 and counts[NEGATIVE] > 20


def test_pseudonyms_are_keyed_stable_and_name_nothing() -> None:
    from riskbridge.cohort import label_resource_types, pseudonym

    first = pseudonym(b"a-site-secret-of-enough-length", "rb-x-p00001", "1.2.3.4")
    assert first == pseudonym(b"a-site-secret-of-enough-length", "rb-x-p00001", "1.2.3.4")
    assert first != pseudonym(b"another-secret-of-enough-length", "rb-x-p00001", "1.2.3.4")
    assert first != pseudonym(b"a-site-secret-of-enough-length", "rb-x-p00001", "1.2.3.5")
    assert len(first) == 24 and "p00001" not in first
    assert label_resource_types(load_label_spec("chest_ct")) == ("Condition", "Encounter", "Observation")
