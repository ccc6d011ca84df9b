"""Write a synthetic cohort to disk: DICOM files, FHIR transaction bundles, ground truth and manifest.

Layout of ``out_dir`` (docs/synthetic-cohort.md has the details)::

    manifest.json                         parameters, cohort id, counts (written last: marks a complete cohort)
    ground_truth.jsonl                    one JSON object per PACS patient, in patient-key order
    dicom/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm
    fhir/<patient key>.json               one transaction Bundle per patient that has a FHIR Patient
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from riskbridge.dev.synth.cohort import (
    CORRECT_SERIES_KIND,
    EDGE_CASE_CODES,
    GENERATOR_VERSION,
    INDEX_WINDOW_DAYS,
    LAB_WINDOW,
    LABS,
    MRN_SYSTEM,
    NOTE_LOOKBACK,
    PACS_ISSUER,
    Cohort,
    CohortError,
    EdgeCaseRates,
    PatientSpec,
    build_cohort,
    expected_quarantine,
    iso,
    truth_record,
)
from riskbridge.dev.synth.dicom import write_patient
from riskbridge.dev.synth.fhir import bundle_json, patient_bundle

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.jsonl"
DICOM_DIR = "dicom"
FHIR_DIR = "fhir"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`generate` wrote: where, which cohort, and how much of everything."""

    out_dir: Path
    cohort_id: str
    seed: int
    size: str
    patients: int
    studies: int
    series: int
    instances: int
    fhir_bundles: int
    fhir_resources: dict[str, int] = field(default_factory=dict)
    edge_cases: dict[str, int] = field(default_factory=dict)
    quarantine: dict[str, int] = field(default_factory=dict)
    positives: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        """A few human-readable lines: what was written where, edge cases and expected quarantines."""
        resources = ", ".join(f"{count} {kind}" for kind, count in self.fhir_resources.items())
        edge = ", ".join(f"{code} {count}" for code, count in self.edge_cases.items() if count)
        quarantine = ", ".join(f"{code} {count}" for code, count in self.quarantine.items()) or "none"
        return "\n".join(
            [
                f"cohort {self.cohort_id} (seed {self.seed}, size {self.size}) in {self.out_dir}"
                f" ({self.seconds:.1f} s)",
                f"  {self.patients} patients ({self.positives} positive), {self.studies} studies, {self.series} series,"
                f" {self.instances} DICOM instances",
                f"  {self.fhir_bundles} FHIR bundles: {resources}",
                f"  edge cases: {edge}",
                f"  expected quarantine: {quarantine}",
            ]
        )


def _prepare(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).is_file():
            raise CohortError(f"refusing to write into {out_dir}: not empty and not a synthetic cohort (no {MANIFEST})")
        (out_dir / MANIFEST).unlink()
        for name in (DICOM_DIR, FHIR_DIR):
            if (out_dir / name).exists():
                shutil.rmtree(out_dir / name)
        (out_dir / GROUND_TRUTH).unlink(missing_ok=True)
    (out_dir / DICOM_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / FHIR_DIR).mkdir(parents=True, exist_ok=True)


def _write_dicom_job(patient: PatientSpec, root: str) -> int:
    return write_patient(patient, Path(root))


def _write_dicom(cohort: Cohort, root: Path, workers: int, progress: Progress | None) -> int:
    total = len(cohort.patients)
    written = 0
    if workers <= 1 or total < 4:
        for done, patient in enumerate(cohort.patients, start=1):
            written += write_patient(patient, root)
            if progress:
                progress("dicom", done, total)
        return written
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_dicom_job, patient, str(root)) for patient in cohort.patients]
        for done, future in enumerate(futures, start=1):
            written += future.result()
            if progress:
                progress("dicom", done, total)
    return written


def _manifest(
    cohort: Cohort, counts: dict[str, Any], edge: dict[str, int], quarantine: dict[str, int]
) -> dict[str, Any]:
    start = cohort.anchor - timedelta(days=INDEX_WINDOW_DAYS)
    return {
        "generator": "riskbridge.synth",
        "version": GENERATOR_VERSION,
        "cohort_id": cohort.cohort_id,
        "seed": cohort.seed,
        "patients": len(cohort.patients),
        "size": cohort.size,
        "rates": asdict(cohort.rates),
        "lab_shift": cohort.lab_shift,
        "index_window": {"start": iso(start), "end": iso(cohort.anchor)},
        "policy": {
            "lab_window_hours_before_index": LAB_WINDOW.total_seconds() / 3600.0,
            "note_lookback_days": NOTE_LOOKBACK.days,
            "correct_series": CORRECT_SERIES_KIND,
            "canonical_units": {spec.feature: spec.canonical_unit for spec in LABS.values()},
        },
        "identity": {"mrn_system": MRN_SYSTEM, "pacs_issuer": PACS_ISSUER},
        "counts": counts,
        "edge_cases": edge,
        "quarantine": quarantine,
        "files": {"ground_truth": GROUND_TRUTH, "dicom": DICOM_DIR, "fhir": FHIR_DIR},
    }


def generate(
    out_dir: Path,
    patients: int,
    seed: int,
    size: str = "small",
    rates: EdgeCaseRates | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    lab_shift: Mapping[str, float] | None = None,
    anchor: date | None = None,
) -> CohortSummary:
    """Generate a cohort into ``out_dir`` (see the module docstring); the same arguments give the same files.

    ``progress(stage, done, total)`` is called per patient for the stages "dicom" and "fhir". ``workers``
    processes write DICOM in parallel (default: up to 4, one per CPU); the output does not depend on it.
    ``lab_shift`` (lab -> factor) shifts the population's labs (:func:`build_cohort`); the manifest records it.
    ``anchor`` (a day in January or February) moves the index window to the days before it, so that this cohort
    shares no window with others loaded into the same servers; the manifest's ``index_window`` says where it is.
    Raises :class:`CohortError` for bad parameters or a non-empty ``out_dir`` that is not a cohort.
    """
    began = time.perf_counter()
    out_dir = Path(out_dir)
    cohort = build_cohort(seed, patients, size, rates, lab_shift, anchor)
    _prepare(out_dir)
    log.info("synth: cohort %s, %d patients, size %s", cohort.cohort_id, patients, size)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    instances = _write_dicom(cohort, out_dir / DICOM_DIR, workers, progress)

    resources: Counter[str] = Counter()
    bundles = 0
    for done, patient in enumerate(cohort.patients, start=1):
        bundle = patient_bundle(patient, cohort.cohort_id)
        if bundle is not None:
            (out_dir / FHIR_DIR / f"{patient.key}.json").write_text(bundle_json(bundle), encoding="utf-8")
            bundles += 1
            resources.update(entry.resource.get_resource_type() for entry in bundle.entry or [] if entry.resource)
        if progress:
            progress("fhir", done, len(cohort.patients))

    with (out_dir / GROUND_TRUTH).open("w", encoding="utf-8") as handle:
        for patient in cohort.patients:
            handle.write(json.dumps(truth_record(patient, cohort.cohort_id), sort_keys=True) + "\n")

    edge = {code: sum(code in p.edge_cases for p in cohort.patients) for code in EDGE_CASE_CODES}
    quarantine = dict(sorted(Counter(q for p in cohort.patients if (q := expected_quarantine(p))).items()))
    studies = sum(len(p.studies) for p in cohort.patients)
    series = sum(len(s.series) for p in cohort.patients for s in p.studies)
    expected = sum(se.n_instances for p in cohort.patients for s in p.studies for se in s.series)
    if instances != expected:
        raise CohortError(f"wrote {instances} DICOM instances, expected {expected}")
    positives = sum(p.label for p in cohort.patients)
    counts: dict[str, Any] = {
        "patients": len(cohort.patients),
        "studies": studies,
        "series": series,
        "instances": instances,
        "fhir_bundles": bundles,
        "fhir_resources": dict(sorted(resources.items())),
        "positives": positives,
    }
    manifest = _manifest(cohort, counts, edge, quarantine)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - began
    log.info(
        "synth: cohort %s written: %d instances, %d bundles in %.1f s", cohort.cohort_id, instances, bundles, seconds
    )
    return CohortSummary(
        out_dir=out_dir,
        cohort_id=cohort.cohort_id,
        seed=seed,
        size=size,
        patients=len(cohort.patients),
        studies=studies,
        series=series,
        instances=instances,
        fhir_bundles=bundles,
        fhir_resources=dict(sorted(resources.items())),
        edge_cases=edge,
        quarantine=quarantine,
        positives=positives,
        seconds=round(seconds, 3),
    )


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a generated cohort; raises :class:`CohortError` if ``out_dir`` holds no complete cohort."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CohortError(f"no synthetic cohort in {out_dir} ({MANIFEST} missing)") from None
    if manifest.get("generator") != "riskbridge.synth":
        raise CohortError(f"{path} is not a riskbridge synthetic-cohort manifest")
    return manifest


def read_truth(out_dir: Path) -> list[dict[str, Any]]:
    """The ground-truth records of a generated cohort, in patient-key order."""
    with (Path(out_dir) / GROUND_TRUTH).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
