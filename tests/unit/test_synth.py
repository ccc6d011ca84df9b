"""The synthetic cohort: deterministic, valid DICOM and FHIR, every edge case present, and a ground truth that an
independent re-implementation of the documented policies reproduces from the written files."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
from collections import Counter, defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import ExplicitVRLittleEndian

from riskbridge.dev.synth import (
    EDGE_CASE_CODES,
    OPT_IN_EDGE_CASES,
    QUARANTINE_CODES,
    CohortError,
    EdgeCaseRates,
    generate,
    read_manifest,
    read_truth,
)
from riskbridge.dev.synth.cohort import ANCHOR, ASSERTIONS, PHRASES, build_cohort, truth_record
from riskbridge.dev.synth.dicom import series_instances
from riskbridge.dev.synth.phantom import render_study

SEED = 7
PATIENTS = 30

# Independent of riskbridge.dev.synth: unit factors to the canonical unit as a lab handbook states them
# (creatinine 88.4 umol/L per mg/dL, glucose 18.0 mg/dL per mmol/L), hence the 0.2 % tolerance below.
FACTORS: dict[tuple[str, str], float] = {
    ("wbc", "10*3/uL"): 1.0, ("wbc", "K/uL"): 1.0, ("wbc", "x10^9/L"): 1.0, ("wbc", "10^3/uL"): 1.0,
    ("wbc", "/uL"): 0.001,
    ("crp", "mg/L"): 1.0, ("crp", "mg/dL"): 10.0, ("crp", "mg/dl"): 10.0,
    ("creatinine", "mg/dL"): 1.0, ("creatinine", "mg/dl"): 1.0, ("creatinine", "umol/L"): 1 / 88.4,
    ("creatinine", "µmol/L"): 1 / 88.4,
    ("glucose", "mg/dL"): 1.0, ("glucose", "mg/dl"): 1.0, ("glucose", "mmol/L"): 18.0,
    ("hemoglobin", "g/dL"): 1.0, ("hemoglobin", "g/dl"): 1.0, ("hemoglobin", "g/L"): 0.1,
    ("lactate", "mmol/L"): 1.0, ("lactate", "mmol/l"): 1.0, ("lactate", "mEq/L"): 1.0,
    ("sodium", "mmol/L"): 1.0, ("sodium", "mEq/L"): 1.0, ("sodium", "meq/L"): 1.0,
}  # fmt: skip
LOINC_FEATURE = {"6690-2": "wbc", "1988-5": "crp", "2160-0": "creatinine", "2345-7": "glucose",
                 "718-7": "hemoglobin", "2524-7": "lactate", "32693-4": "lactate", "2951-2": "sodium"}  # fmt: skip
LUNG_KERNELS = {"B70f", "LUNG", "L", "FC86"}
CT_REQUIRED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID", "PatientName",
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "SeriesNumber",
    "SeriesDescription", "Manufacturer", "TimezoneOffsetFromUTC", "ImageType", "ConvolutionKernel",
    "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
    "RescaleIntercept", "AcquisitionDateTime", "InstanceNumber", "FrameOfReferenceUID", "BodyPartExamined", "Rows",
    "Columns", "BitsAllocated", "PixelRepresentation",
)  # fmt: skip


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    generate(out, patients=PATIENTS, seed=SEED)
    return out


@pytest.fixture(scope="module")
def truth(cohort_dir: Path) -> list[dict[str, Any]]:
    return read_truth(cohort_dir)


@pytest.fixture(scope="module")
def dicom_index(cohort_dir: Path) -> dict[str, dict[str, list[pydicom.Dataset]]]:
    """study UID -> series UID -> datasets (pixels loaded lazily)."""
    index: dict[str, dict[str, list[pydicom.Dataset]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((cohort_dir / "dicom").glob("*/*/*.dcm")):
        ds = pydicom.dcmread(path)
        assert path.parent.parent.name == ds.StudyInstanceUID
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.stem == ds.SOPInstanceUID
        index[ds.StudyInstanceUID][ds.SeriesInstanceUID].append(ds)
    return index


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


# --- determinism -----------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    generate(tmp_path / "a", patients=3, seed=3)
    generate(tmp_path / "b", patients=3, seed=3)
    generate(tmp_path / "c", patients=3, seed=4)
    first, second, other = (_tree_digest(tmp_path / name) for name in "abc")
    assert first == second
    assert "ground_truth.jsonl" in first and "manifest.json" in first
    assert first["ground_truth.jsonl"] != other["ground_truth.jsonl"]
    uids = {part for path in first for part in path.split("/") if part.startswith("1.2.")}
    other_uids = {part for path in other for part in path.split("/") if part.startswith("1.2.")}
    assert uids and not uids & other_uids


def test_truth_is_deterministic_for_the_default_cohort() -> None:
    def lines(seed: int) -> list[str]:
        cohort = build_cohort(seed, PATIENTS)
        return [json.dumps(truth_record(p, cohort.cohort_id), sort_keys=True) for p in cohort.patients]

    assert lines(SEED) == lines(SEED)
    assert lines(SEED) != lines(SEED + 1)


def test_regenerating_replaces_a_cohort_but_refuses_a_foreign_directory(tmp_path: Path) -> None:
    generate(tmp_path / "cohort", patients=2, seed=1)
    generate(tmp_path / "cohort", patients=1, seed=2)
    assert read_manifest(tmp_path / "cohort")["patients"] == 1
    assert len(read_truth(tmp_path / "cohort")) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(CohortError, match="not empty"):
        generate(tmp_path / "other", patients=1, seed=1)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(CohortError, match="size"):
        build_cohort(1, 3, size="huge")
    with pytest.raises(CohortError, match="patients"):
        build_cohort(1, 0)
    with pytest.raises(CohortError, match="no_labs"):
        EdgeCaseRates(no_labs=1.5)
    with pytest.raises(CohortError, match="> 1"):
        EdgeCaseRates(shared_mrn=0.5, no_fhir_patient=0.6)


def test_a_lab_shift_moves_only_the_named_labs_and_names_another_cohort() -> None:
    plain = build_cohort(SEED, 60)
    shifted = build_cohort(SEED, 60, lab_shift={"crp": 3.0, "creatinine": 2.0})
    assert build_cohort(SEED, 60, lab_shift={}).cohort_id == plain.cohort_id, "no shift: the same cohort"
    assert shifted.cohort_id != plain.cohort_id and shifted.lab_shift == {"crp": 3.0, "creatinine": 2.0}
    for before, after in zip(plain.patients, shifted.patients, strict=True):
        assert after.lab_state["hemoglobin"] == before.lab_state["hemoglobin"]
        assert after.lab_state["creatinine"] == pytest.approx(min(12.0, 2.0 * before.lab_state["creatinine"]))
    pairs = zip(shifted.patients, plain.patients, strict=True)
    ratio = np.median([after.lab_state["crp"] / before.lab_state["crp"] for after, before in pairs])
    assert ratio == pytest.approx(3.0, rel=0.05)
    with pytest.raises(CohortError, match="not a lab"):
        build_cohort(SEED, 3, lab_shift={"ldl": 2.0})
    with pytest.raises(CohortError, match="factor"):
        build_cohort(SEED, 3, lab_shift={"crp": 0.0})


def test_an_anchor_moves_every_time_of_the_cohort_and_names_another_cohort() -> None:
    plain = build_cohort(SEED, 12)
    assert build_cohort(SEED, 12, anchor=ANCHOR.date()).cohort_id == plain.cohort_id, "the default: the same cohort"
    moved = build_cohort(SEED, 12, anchor=date(2003, 2, 9))
    assert moved.cohort_id != plain.cohort_id and moved.anchor == datetime(2003, 2, 9, tzinfo=ANCHOR.tzinfo)
    shift = moved.anchor - plain.anchor
    for before, after in zip(plain.patients, moved.patients, strict=True):
        assert after.mrn == before.mrn and after.lab_state == before.lab_state  # the same people, other days
        assert [s.start - b.start for s, b in zip(after.studies, before.studies, strict=True)] == [shift] * len(
            before.studies
        )
        assert [a.effective - b.effective for a, b in zip(after.labs, before.labs, strict=True)] == [shift] * len(
            before.labs
        )
        assert {s.uid for s in after.studies}.isdisjoint({s.uid for s in before.studies})
        window = moved.anchor - timedelta(days=14) <= after.index_study.start < moved.anchor
        assert window, after.key
    with pytest.raises(CohortError, match="January or February"):
        build_cohort(SEED, 3, anchor=date(2003, 7, 1))  # the site is at -04:00 in summer


def test_zero_rates_give_a_cohort_without_edge_cases() -> None:
    zero = EdgeCaseRates(**{name: 0.0 for name in EdgeCaseRates.__dataclass_fields__})
    cohort = build_cohort(SEED, 20, rates=zero)
    assert all(not p.edge_cases for p in cohort.patients)
    assert all(truth_record(p, cohort.cohort_id)["quarantine"] is None for p in cohort.patients)


# --- edge cases and truth schema -------------------------------------------------------------------------


def test_default_rates_hit_every_edge_case_in_30_patients_seed_7(cohort_dir: Path, truth: list[dict[str, Any]]) -> None:
    counts = Counter(code for record in truth for code in record["edge_cases"])
    missing = [code for code in EDGE_CASE_CODES if counts[code] == 0 and code not in OPT_IN_EDGE_CASES]
    assert not missing, f"edge cases not hit: {missing}"
    quarantines = Counter(record["quarantine"] for record in truth)
    assert all(quarantines[code] >= 1 for code in QUARANTINE_CODES)
    manifest = read_manifest(cohort_dir)
    assert manifest["edge_cases"] == {code: counts[code] for code in EDGE_CASE_CODES}
    variants = Counter(record["identity"]["variant"] for record in truth)
    assert {"exact", "leading_zeros", "site_prefix", "missing_issuer"} <= set(variants)
    assert len({record["index_study"]["manufacturer"] for record in truth}) == 4


def test_truth_schema(truth: list[dict[str, Any]]) -> None:
    assert [r["patient_key"] for r in truth] == [f"p{i:05d}" for i in range(1, PATIENTS + 1)]
    for record in truth:
        assert record["quarantine"] in (None, *QUARANTINE_CODES)
        identity = record["identity"]
        assert identity["outcome"] in ("matched", "conflict", "unmatched")
        if identity["outcome"] == "matched":
            assert identity["fhir_patient_id"] == identity["candidate_fhir_patient_ids"][0]
            assert not identity["fhir_patient_id"].isdigit()
        elif identity["outcome"] == "conflict":
            assert record["quarantine"] == "identity_conflict"
            assert identity["fhir_patient_id"] is None and len(identity["candidate_fhir_patient_ids"]) == 2
        else:
            assert record["quarantine"] == "identity_unmatched" and identity["candidate_fhir_patient_ids"] == []
        assert (record["correct_series_uid"] is None) == ("no_usable_series" in record["edge_cases"])
        assert set(record["labs"]) == {"wbc", "crp", "creatinine", "glucose", "hemoglobin", "lactate", "sodium"}
        for value in record["labs"].values():
            assert value is None or (isinstance(value["value"], float) and value["censored"] in (None, "<"))
        if "no_labs" in record["edge_cases"] or identity["outcome"] == "unmatched":
            assert all(v is None for v in record["labs"].values()) and record["lab_observations"] == []
        if "no_notes" in record["edge_cases"] or identity["outcome"] == "unmatched":
            assert record["comorbidities"] is None and record["notes"] == []
        outcome = record["outcome"]
        assert outcome["label"] in (0, 1) and 0.0 < outcome["probability"] < 1.0
        logit = sum(outcome["logit_components"].values())
        assert outcome["probability"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-5)
        index_time = datetime.fromisoformat(record["index_time"])
        assert (
            datetime(2024, 1, 1, tzinfo=index_time.tzinfo)
            <= index_time
            < datetime(2024, 1, 15, tzinfo=index_time.tzinfo)
        )
        for prior in record["prior_studies"]:
            assert datetime.fromisoformat(prior["acquisition_time"]) < index_time - timedelta(days=150)


def test_each_modality_carries_signal_and_together_more() -> None:
    cohort = build_cohort(11, 1500)
    labels = np.array([p.label for p in cohort.patients])
    parts = {name: np.array([p.logit_components[name] for p in cohort.patients]) for name in ("image", "labs", "notes")}
    aucs = {name: _auc(values, labels) for name, values in parts.items()}
    combined = _auc(parts["image"] + parts["labs"] + parts["notes"], labels)
    assert all(auc > 0.6 for auc in aucs.values()), aucs
    assert combined > max(aucs.values()) + 0.03, (combined, aucs)
    assert 0.15 < labels.mean() < 0.45


# --- DICOM -----------------------------------------------------------------------------------------------


def test_every_file_is_valid_part10_with_required_tags(
    dicom_index: dict[str, dict[str, list[pydicom.Dataset]]], truth: list[dict[str, Any]], cohort_dir: Path
) -> None:
    by_study = {r["index_study"]["study_uid"]: r for r in truth}
    by_study |= {prior["study_uid"]: r for r in truth for prior in r["prior_studies"]}
    count = 0
    for study_uid, series_map in dicom_index.items():
        record = by_study[study_uid]
        for datasets in series_map.values():
            for ds in datasets:
                count += 1
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert ds.preamble == b"\0" * 128
                assert ds.PatientID == record["pacs"]["patient_id"]
                assert ds.get("IssuerOfPatientID") == record["pacs"]["issuer"]
                assert str(ds.PatientName) == record["pacs"]["name"]
                assert ds.PatientBirthDate == record["pacs"]["birth_date"]
                if ds.Modality == "SR":
                    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.67"
                    continue
                assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
                missing = [k for k in CT_REQUIRED if k not in ds]
                assert not missing, missing
                contrast = "ContrastBolusAgent" in ds
                assert contrast == (ds.StudyDescription == "CT CHEST W CONTRAST")
    assert count == read_manifest(cohort_dir)["counts"]["instances"]


def test_series_kinds_geometry_and_hu(
    dicom_index: dict[str, dict[str, list[pydicom.Dataset]]], truth: list[dict[str, Any]]
) -> None:
    kinds = {s["uid"]: s for r in truth for st in [r["index_study"], *r["prior_studies"]] for s in st["series"]}
    for series_map in dicom_index.values():
        frames = {ds.FrameOfReferenceUID for dss in series_map.values() for ds in dss if ds.Modality == "CT"}
        assert len(frames) == 1
        for series_uid, datasets in series_map.items():
            spec = kinds[series_uid]
            assert len(datasets) == spec["instances"]
            if spec["kind"] == "dose_sr":
                continue
            datasets = sorted(datasets, key=lambda d: d.InstanceNumber)
            assert [d.InstanceNumber for d in datasets] == list(range(1, len(datasets) + 1))
            first = datasets[0]
            assert "\\".join(first.ImageType) == spec["image_type"]
            assert first.ConvolutionKernel == spec["kernel"] and first.SeriesDescription == spec["description"]
            if spec["kind"] in ("thin_lung", "thin_soft", "thick_soft"):
                assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
                positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
                steps = np.diff(positions, axis=0)
                assert np.allclose(steps[:, :2], 0.0)
                assert np.allclose(-steps[:, 2], float(first.SliceThickness), atol=1e-4)
                hu = np.stack([d.pixel_array.astype(np.float64) for d in datasets])
                if "PixelPaddingValue" in first:
                    hu = hu[hu != first.PixelPaddingValue]
                hu = hu * float(first.RescaleSlope) + float(first.RescaleIntercept)
                assert hu.min() >= -1024 and hu.max() <= 3071
                assert np.percentile(hu, 5) < -950  # air around the body
                assert np.percentile(hu, 99.9) > 400  # bone
                lung_share = np.mean((hu > -950) & (hu < -700))
                assert lung_share > 0.08  # lungs
            elif spec["kind"] == "coronal":
                assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
                ys = [float(d.ImagePositionPatient[1]) for d in datasets]
                assert np.allclose(np.diff(ys), float(first.SliceThickness), atol=1e-4)


def test_correct_series_is_the_only_thin_lung_original_axial(
    dicom_index: dict[str, dict[str, list[pydicom.Dataset]]], truth: list[dict[str, Any]]
) -> None:
    for record in truth:
        chosen = []
        for series_uid, datasets in dicom_index[record["index_study"]["study_uid"]].items():
            ds = datasets[0]
            if ds.Modality != "CT":
                continue
            if (
                list(ds.ImageType)[:3] == ["ORIGINAL", "PRIMARY", "AXIAL"]
                and float(ds.SliceThickness) <= 1.5
                and ds.ConvolutionKernel in LUNG_KERNELS
            ):
                chosen.append(series_uid)
        assert chosen == ([record["correct_series_uid"]] if record["correct_series_uid"] else [])


def test_nodules_are_visible_where_the_truth_puts_them(
    dicom_index: dict[str, dict[str, list[pydicom.Dataset]]], truth: list[dict[str, Any]]
) -> None:
    checked = 0
    for record in truth:
        series = next(s for s in record["index_study"]["series"] if s["kind"] == "thick_soft")
        datasets = sorted(
            dicom_index[record["index_study"]["study_uid"]][series["uid"]], key=lambda d: d.InstanceNumber
        )
        for nodule in record["image"]["nodules"]:
            if nodule["diameter_mm"] < 8:
                continue  # small nodules are blurred away in 5 mm slices
            x, y, z = nodule["center_lps"]
            ds = min(datasets, key=lambda d: abs(float(d.ImagePositionPatient[2]) - z))
            ox, oy = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])
            spacing = float(ds.PixelSpacing[0])
            col, row = round((x - ox) / spacing), round((y - oy) / spacing)
            value = ds.pixel_array[row, col] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert value > -500, (record["patient_key"], nodule, value)
            checked += 1
    assert checked >= 5


def test_dose_report_content_tree(dicom_index: dict[str, dict[str, list[pydicom.Dataset]]]) -> None:
    reports = [d for series in dicom_index.values() for dss in series.values() for d in dss if d.Modality == "SR"]
    assert reports
    for ds in reports:
        assert ds.ValueType == "CONTAINER" and ds.ConceptNameCodeSequence[0].CodeValue == "113701"
        assert ds.ContentTemplateSequence[0].TemplateIdentifier == "10011"
        accumulated = next(i for i in ds.ContentSequence if i.ValueType == "CONTAINER")
        dlp = next(i for i in accumulated.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113813")
        assert float(dlp.MeasuredValueSequence[0].NumericValue) > 0


def test_fast_encoder_writes_what_pydicom_writes() -> None:
    cohort = build_cohort(SEED, 8)
    for patient in cohort.patients[:4]:
        study = patient.index_study
        volumes = render_study(study, patient.nodules)
        for series in study.series:
            for encoder, ds in series_instances(patient, study, series, volumes):
                if encoder is None:
                    continue
                reference = io.BytesIO()
                pydicom.dcmwrite(reference, encoder.dataset(ds), enforce_file_format=True)
                assert encoder.encode(ds) == reference.getvalue()
                break


# --- FHIR and the truth behind it ------------------------------------------------------------------------


def _bundles(cohort_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((cohort_dir / "fhir").glob("*.json"))}


def test_every_bundle_is_a_valid_r4_transaction(cohort_dir: Path, truth: list[dict[str, Any]]) -> None:
    bundles = _bundles(cohort_dir)
    assert set(bundles) == {r["patient_key"] for r in truth if r["identity"]["outcome"] != "unmatched"}
    mrns: Counter[str] = Counter()
    for key, raw in bundles.items():
        bundle = Bundle.model_validate(raw)
        assert bundle.type == "transaction"
        entries = raw["entry"]
        assert entries[0]["resource"]["resourceType"] == "Patient"
        ids = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries}
        for entry in entries:
            resource = entry["resource"]
            assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
            assert not resource["id"].isdigit() and len(resource["id"]) <= 64
            assert entry["fullUrl"].startswith("urn:uuid:")
            if resource["resourceType"] == "Patient":
                mrns.update(i["value"] for i in resource["identifier"] if i["system"] == "http://hospital.example/mrn")
            else:
                assert resource["subject"]["reference"] in ids, key
    shared = {mrn for mrn, n in mrns.items() if n > 1}
    assert shared == {r["mrn"] for r in truth if r["identity"]["outcome"] == "conflict"}


def _index_time(record: dict[str, Any], dicom_index: dict[str, dict[str, list[pydicom.Dataset]]]) -> datetime:
    """Index time read back from the DICOM (axial AcquisitionDateTime + TimezoneOffsetFromUTC)."""
    for datasets in dicom_index[record["index_study"]["study_uid"]].values():
        ds = datasets[0]
        if ds.Modality == "CT" and "AXIAL" in ds.ImageType:
            offset = ds.TimezoneOffsetFromUTC
            tz = timezone((1 if offset[0] == "+" else -1) * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))
            return datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S").replace(tzinfo=tz)
    raise AssertionError("no axial series")


def test_truth_labs_follow_from_the_fhir_observations(
    cohort_dir: Path, truth: list[dict[str, Any]], dicom_index: dict[str, dict[str, list[pydicom.Dataset]]]
) -> None:
    bundles = _bundles(cohort_dir)
    seen_units: set[str] = set()
    for record in truth:
        index_time = _index_time(record, dicom_index)
        assert index_time == datetime.fromisoformat(record["index_time"])
        expected: dict[str, Any] = dict.fromkeys(record["labs"])
        latest: dict[str, datetime] = {}
        observations = [
            e["resource"] for e in bundles.get(record["patient_key"], {}).get("entry", [])
            if e["resource"]["resourceType"] == "Observation"
        ]  # fmt: skip
        for obs in observations:
            feature = LOINC_FEATURE[obs["code"]["coding"][0]["code"]]
            when = datetime.fromisoformat(obs["effectiveDateTime"])
            if obs["status"] not in ("final", "amended", "corrected"):
                continue
            if not index_time - timedelta(hours=48) <= when <= index_time:
                continue
            if feature in latest and latest[feature] >= when:
                continue
            latest[feature] = when
            if "valueString" in obs:
                assert obs["valueString"].startswith("<")
                expected[feature] = (float(obs["valueString"][1:]), "<")
            else:
                quantity = obs["valueQuantity"]
                seen_units.add(quantity["unit"])
                value = quantity["value"] * FACTORS[(feature, quantity["unit"])]
                expected[feature] = (value, quantity.get("comparator"))
        for feature, value in record["labs"].items():
            if expected[feature] is None:
                assert value is None, (record["patient_key"], feature)
            else:
                assert value is not None, (record["patient_key"], feature)
                assert value["value"] == pytest.approx(expected[feature][0], rel=2e-3)
                assert value["censored"] == expected[feature][1]
    assert {"K/uL", "x10^9/L", "/uL", "mg/dl", "umol/L", "mmol/L", "mEq/L", "g/L"} <= seen_units


def test_lab_edge_cases_are_present_in_the_feed(cohort_dir: Path, truth: list[dict[str, Any]]) -> None:
    observations = [e["resource"] for b in _bundles(cohort_dir).values() for e in b["entry"]
                    if e["resource"]["resourceType"] == "Observation"]  # fmt: skip
    statuses = Counter(o["status"] for o in observations)
    assert statuses["entered-in-error"] >= 1 and statuses["amended"] + statuses["corrected"] >= 1
    assert any("valueString" in o for o in observations)
    assert any(o.get("valueQuantity", {}).get("comparator") == "<" for o in observations)
    assert any(o["effectiveDateTime"].endswith("Z") for o in observations)
    dispositions = Counter(o["disposition"] for r in truth for o in r["lab_observations"])
    assert {"used", "superseded", "before_window", "after_index", "entered_in_error"} <= set(dispositions)
    amended_used = [o for r in truth for o in r["lab_observations"] if o["status"] in ("amended", "corrected")]
    assert any(o["disposition"] == "used" for o in amended_used)


def _note_text(resource: dict[str, Any]) -> tuple[str, str]:
    attachment = (
        resource["presentedForm"][0] if resource["resourceType"] == "DiagnosticReport"
        else resource["content"][0]["attachment"]
    )  # fmt: skip
    charset = attachment["contentType"].lower().split("charset=")[1]
    return base64.b64decode(attachment["data"]).decode(charset), charset


def test_truth_comorbidities_follow_from_the_note_texts(
    cohort_dir: Path, truth: list[dict[str, Any]], dicom_index: dict[str, dict[str, list[pydicom.Dataset]]]
) -> None:
    bundles = _bundles(cohort_dir)
    charsets: set[str] = set()
    assertions: Counter[str] = Counter()
    for record in truth:
        index_time = _index_time(record, dicom_index)
        mentions = {n["id"]: {(m["comorbidity"], m["assertion"]) for m in n["mentions"]} for n in record["notes"]}
        flags = None
        for entry in bundles.get(record["patient_key"], {}).get("entry", []):
            resource = entry["resource"]
            if resource["resourceType"] not in ("DocumentReference", "DiagnosticReport"):
                continue
            text, charset = _note_text(resource)
            charsets.add(charset)
            found = {
                (c, a) for c, by_assertion in PHRASES.items() for a, phrases in by_assertion.items()
                if any(phrase in text for phrase in phrases)
            }  # fmt: skip
            assert found == mentions[resource["id"]], resource["id"]
            assertions.update(a for _, a in found)
            when = datetime.fromisoformat(resource.get("date") or resource["effectiveDateTime"])
            usable = resource["status"] in ("current", "final")
            if usable and index_time - timedelta(days=365) <= when <= index_time:
                flags = flags or dict.fromkeys(record["comorbidities"] or {}, False)
                for c, a in found:
                    if a in ("present", "historical"):
                        flags[c] = True
        assert flags == record["comorbidities"], record["patient_key"]
    assert {"utf-8", "iso-8859-1"} <= charsets
    assert all(assertions[a] >= 1 for a in ASSERTIONS)


def test_site_environment_configures_the_synthetic_hospital(monkeypatch: pytest.MonkeyPatch) -> None:
    from riskbridge.dev.synth import site_environment
    from riskbridge.settings import load_settings

    for key, value in site_environment().items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.site.timezone == "America/New_York"
    assert settings.identity.issuer_systems == {"SYNTH_HOSP": "http://hospital.example/mrn"}
    assert settings.identity.default_issuer == "SYNTH_HOSP"


def test_riskbridge_synth_anchor_puts_the_index_window_before_that_day(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from riskbridge import cli

    out = tmp_path / "cohort"
    done = CliRunner().invoke(cli.app, ["synth", "-n", "2", "--seed", "5", "--out", str(out), "--anchor", "2003-02-09"])
    assert done.exit_code == 0, done.output
    assert read_manifest(out)["index_window"] == {
        "start": "2003-01-26T00:00:00-05:00",
        "end": "2003-02-09T00:00:00-05:00",
    }
    for argument, message in (("2003-02-30", "--anchor takes a date"), ("2003-07-01", "January or February")):
        refused = CliRunner().invoke(
            cli.app, ["synth", "-n", "2", "--out", str(tmp_path / argument), "--anchor", argument]
        )
        assert refused.exit_code != 0 and message in " ".join(refused.output.split()), refused.output
