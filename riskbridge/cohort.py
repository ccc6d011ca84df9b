"""Cohort export: a labelled, pseudonymized training table of the site's own patients (docs/site-training.md).

``riskbridge cohort export --window A..B --out DIR`` runs the pipeline's stages up to harmonize over a
retrospective window (or over the studies of a list of accession numbers: ``--accessions FILE``, a cohort the site
chose) as a run of kind ``export`` (the same ledger, resumable by its run key, idempotent; it scores
nothing and writes nothing to the FHIR server, and it does every study again, whatever a nightly run decided),
labels each patient from the FHIR server by a label spec (:mod:`riskbridge.harmonize.labels`; the resources come
through FHIR Bulk Data ``$export`` when the server offers it, else batched searches), and writes a
training table in the format :mod:`riskbridge.model.data` reads, so ``riskbridge train --table DIR`` trains on it.

What leaves the hospital's systems in the table is only what the model needs: a key per row that is a keyed HMAC of
(FHIR Patient id, StudyInstanceUID) with the site's secret (``[export] pseudonym_secret``), the label, the feature
vector (ages in years, no dates) and the preprocessed volume (voxels, no DICOM header). No name, MRN, birth date,
accession number or UID; the manifest has counts, exclusions by reason and the export's settings. One row per
patient: the patient's first study of the export (later ones would put one patient on both sides of a split).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from riskbridge.coverage import Interval
from riskbridge.errors import ConfigurationError, DataError
from riskbridge.harmonize.features import FeatureVector
from riskbridge.harmonize.labels import LabelDecision, LabelSpec, label_patient, load_label_spec
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline
from riskbridge.records import keyed_digest
from riskbridge.settings import Settings
from riskbridge.stages.clinical import feature_vector_of

__all__ = [
    "ExportResult",
    "ExportStudy",
    "export_cohort",
    "fetch_label_resources",
    "label_resource_types",
    "pseudonym",
    "start_export_run",
    "write_table",
]

LOG = logging.getLogger(__name__)
RUN_KIND = "export"
LAST_STAGE = "harmonize"  # the vectors exist, the minimum-data decision is recorded; no score, no write-back
LATER_STUDY = "later_study_of_patient"
VOLUME_ERROR = "volume_unreadable"


@dataclass(frozen=True)
class ExportStudy:
    """A study of the export run with a feature vector and a staged series: what a table row is built from."""

    study_uid: str
    fhir_patient_id: str
    index_time: datetime
    series_dir: Path
    vector: FeatureVector


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the table, its rows and positives, the studies left out by reason, the ledger run."""

    table: Path
    run_id: int
    rows: int
    positives: int
    excluded: Mapping[str, int]


def pseudonym(secret: bytes, fhir_patient_id: str, study_uid: str) -> str:
    """A table row's key: HMAC-SHA256 of the patient and study with the site's secret (24 hex characters): stable
    across exports with the same secret, and not reversible or recomputable without it."""
    digest = hmac.new(secret, f"{fhir_patient_id}|{study_uid}".encode(), hashlib.sha256).hexdigest()
    return digest[:24]


def label_resource_types(spec: LabelSpec) -> tuple[str, ...]:
    """The FHIR resource types the label spec reads (outcomes and follow-up evidence), in a fixed order."""
    wanted: set[str] = set(spec.negative.follow_up_resources)
    if spec.outcome.conditions:
        wanted.add("Condition")
    if spec.outcome.observations:
        wanted.add("Observation")
    return tuple(sorted(wanted))


def export_studies(ledger: Ledger, run_id: int, spec_label: str) -> list[ExportStudy]:
    """The run's studies with a vector of ``spec_label`` and a complete retrieval, by index time."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT f.study_uid, f.fhir_patient_id, f.spec, f.names, f.feature_values, f.observed, r.path,
                      r.index_time
               FROM features f JOIN retrievals r USING (run_id, study_uid)
               WHERE f.run_id = %s AND r.complete AND f.spec = %s ORDER BY r.index_time, f.study_uid""",
            (run_id, spec_label),
        )
        rows = cursor.fetchall()
    return [
        ExportStudy(
            row["study_uid"],
            row["fhir_patient_id"],
            row["index_time"],
            Path(row["path"]),
            feature_vector_of(row),
        )
        for row in rows
    ]


def _by_subject(resources: Iterable[dict[str, Any]], found: dict[str, list[dict[str, Any]]]) -> None:
    from riskbridge.connectors.fhir import subject_patient_id

    for resource in resources:
        patient = subject_patient_id(resource)
        if patient is not None:
            found[patient].append(resource)


def fetch_label_resources(
    pipeline: Pipeline, job: str, patient_ids: Iterable[str], types: Sequence[str]
) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """FHIR Patient id -> the resources of ``types`` that reference it, and how they were read: ``bulk`` (one
    ``Patient/$export`` job for the patients; its NDJSON files live in the staging directory, in a folder named
    ``job``, only while they are read) or ``search`` (batched ``subject`` OR-list searches, the clinical stage's
    way), by ``[export] clinical_source`` (auto: bulk when the server declares ``$export`` at Patient level)."""
    from riskbridge.connectors.fhir.bulk import bulk_export, read_ndjson, supports_bulk_export

    settings = pipeline.settings.export
    ids = sorted(set(patient_ids))
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    client = pipeline.context.fhir()
    source = settings.clinical_source
    if source == "auto":
        source = "bulk" if ids and supports_bulk_export(client, "patient") else "search"
    if source == "bulk":
        work = pipeline.settings.staging_dir / "bulk-export" / job
        try:
            files = bulk_export(
                client,
                list(types),
                out_dir=work,
                patient_ids=ids,
                timeout_s=settings.bulk_timeout_s,
                max_poll_interval_s=settings.bulk_max_poll_interval_s,
            )
            for paths in files.values():
                _by_subject(read_ndjson(paths), found)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # PHI: not kept beyond the labelling
        return dict(found), source
    for resource_type in types:
        _by_subject(client.search_by_patients(resource_type, ids), found)
    return dict(found), source


def _required(settings: Settings) -> tuple[bytes, str]:
    """The pseudonym secret and the site zone an export cannot do without."""
    secret = settings.export.pseudonym_secret
    if secret is None:
        raise ConfigurationError(
            "set [export] pseudonym_secret (RISKBRIDGE_EXPORT__PSEUDONYM_SECRET): the key of the table's pseudonyms"
        )
    zone = settings.site.timezone
    if zone is None:
        raise ConfigurationError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE): labels are judged in site time")
    return secret.get_secret_value().encode(), zone


def _scope_key(window: tuple[datetime, datetime] | None, accessions: Sequence[str]) -> str:
    if window is not None:
        return str(Interval(*window))
    digest = keyed_digest("\n".join(sorted(set(accessions))))
    return f"accessions-{len(set(accessions))}-{digest}"


def start_export_run(
    pipeline: Pipeline,
    window: tuple[datetime, datetime] | None,
    run_key: str | None = None,
    accessions: Sequence[str] = (),
) -> int:
    """Create (or resume, by ``run_key``; default ``cli:export:<window>``, or ``cli:export:accessions-<n>-<digest>``)
    the export run of ``window``, or of a list of accession numbers (a cohort the site chose, e.g. from a
    registry); it does every study again, whatever earlier runs decided."""
    _required(pipeline.settings)
    if (window is None) == (not accessions):
        raise ConfigurationError("an export takes either a window or a list of accession numbers")
    key = run_key or f"cli:export:{_scope_key(window, accessions)}"
    return pipeline.start_run(RUN_KIND, key, window, accessions=tuple(accessions), rescore=True)


def write_table(
    pipeline: Pipeline, run_id: int, out_dir: Path, progress: Callable[[str, int, int], None] | None = None
) -> ExportResult:
    """Label the export run's patients and write its training table into ``out_dir`` (after its stages up to
    harmonize ran); mark the run finished. Writing again replaces the table with the same rows."""
    from riskbridge.model.data import DEFAULT_PREPROCESS, TableWriter, series_row
    from riskbridge.model.preprocess import Preprocessor

    settings = pipeline.settings
    secret, zone = _required(settings)
    label_spec = load_label_spec(settings.export.label_spec)
    run = pipeline.ledger.run(run_id)
    if run.kind != RUN_KIND:
        raise ConfigurationError(f"run {run_id} is a {run.kind} run, not an export")
    excluded: Counter[str] = Counter()
    ledger = pipeline.ledger
    feature_spec = pipeline.context.spec
    studies = export_studies(ledger, run_id, feature_spec.label)
    with_vector = {study.study_uid for study in studies}
    for study_uid, (_, reason, _) in ledger.quarantined(run_id).items():
        if study_uid not in with_vector:
            excluded[reason.split(":", 1)[0]] += 1
    first: dict[str, ExportStudy] = {}
    for study in studies:
        if study.fhir_patient_id in first:
            excluded[LATER_STUDY] += 1
        else:
            first[study.fhir_patient_id] = study
    resources, clinical_source = fetch_label_resources(pipeline, str(run_id), first, label_resource_types(label_spec))
    decisions: dict[str, LabelDecision] = {
        patient: label_patient(label_spec, study.index_time, resources.get(patient, []), zone)
        for patient, study in first.items()
    }
    for decision in decisions.values():
        if decision.excluded:
            excluded[decision.reason] += 1
    source = {
        "kind": "site export",
        "window": str(Interval(*run.window)) if run.window else None,
        "accessions": len(run.accessions) if run.accessions else None,
        "label_spec": label_spec.label,
        "label_resources_from": "FHIR Bulk Data $export" if clinical_source == "bulk" else "FHIR searches",
        "feature_spec": feature_spec.label,
        "series_rules": settings.series_rules,
        "one_row_per": "patient (the first study of the export)",
        "pseudonyms": "HMAC-SHA256(site secret, FHIR Patient id | StudyInstanceUID)[:24]",
        "ledger_run": run_id,
    }
    writer = TableWriter(out_dir, feature_spec, DEFAULT_PREPROCESS, source)
    preprocessor = Preprocessor(DEFAULT_PREPROCESS)
    labelled = [(patient, study) for patient, study in first.items() if not decisions[patient].excluded]
    for done, (patient, study) in enumerate(labelled, start=1):
        label = decisions[patient].label
        assert label is not None  # not excluded
        row_key = pseudonym(secret, patient, study.study_uid)
        try:
            row = series_row(row_key, label, study.vector, study.series_dir, preprocessor)
        except (DataError, ValueError, OSError) as exc:  # the volume module's VolumeError is a DataError
            LOG.warning("export row %s: volume not usable (%s)", row_key, type(exc).__name__)
            excluded[VOLUME_ERROR] += 1
            continue
        writer.add(row)
        if progress is not None:
            progress("table", done, len(labelled))
    counts = {reason: n for reason, n in excluded.items() if n}
    writer.close(counts)
    pipeline.finish_run(run_id, "success")
    LOG.info("export run %d: %d rows (%d positive), excluded %s", run_id, writer.count, writer.positives, counts)
    return ExportResult(Path(out_dir), run_id, writer.count, writer.positives, counts)


def export_cohort(
    settings: Settings,
    window: tuple[datetime, datetime] | None,
    out_dir: Path,
    run_key: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    accessions: Sequence[str] = (),
) -> ExportResult:
    """Export the labelled, pseudonymized training table of ``window`` (or of the studies of ``accessions``) into
    ``out_dir`` (see the module docstring): :func:`start_export_run`, the stages up to harmonize, :func:`write_table`.

    Raises :class:`riskbridge.errors.ConfigurationError` without ``[export] pseudonym_secret`` or a site zone; the
    stages raise as they do in a nightly run. The same ``run_key`` resumes an interrupted export.
    """
    with Pipeline.from_settings(settings) as pipeline:
        run_id = start_export_run(pipeline, window, run_key, accessions)
        pipeline.run_stages(run_id, progress, until=LAST_STAGE)
        return write_table(pipeline, run_id, out_dir, progress)
