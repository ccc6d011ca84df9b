"""The pipeline's stages as one object over the ledger: what the Airflow DAGs and ``riskbridge run`` both call.

A run is a row in the ledger (:meth:`Pipeline.start_run`, keyed by ``run_key``: the same key resumes the same
run). Each stage method reads from the ledger what is still to do for the run, does it with the modules that own the
work (:mod:`riskbridge.connectors.query` C-FIND, :mod:`riskbridge.harmonize.identity`,
:mod:`riskbridge.harmonize.series`, :mod:`riskbridge.retrieve`, :mod:`riskbridge.clinical`,
:func:`riskbridge.harmonize.features.decide`, :mod:`riskbridge.model.scoring`, :mod:`riskbridge.writeback`) and
writes each decision back before it moves on, so a stage interrupted anywhere resumes with only the rest, and a
stage run again does nothing. Studies leave the run through the quarantine with a stable reason code.

Arguments and results are ids and counts (:class:`StageResult`), never records, so Airflow's XCom carries only
small JSON. No torch import here at module level: scoring loads the model inside :meth:`Pipeline.score`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from riskbridge.clinical import ClinicalStage, PatientIndex
from riskbridge.connectors import query
from riskbridge.connectors.fhir import EntryResult, FhirClient, FhirError
from riskbridge.harmonize.features import FeatureSpec, FeatureSpecError, FeatureVector, decide, resolve_feature_spec
from riskbridge.harmonize.identity import IdentityConfig, Outcome, PatientDirectory, PatientResource, match_studies
from riskbridge.harmonize.series import RuleSet, select_series
from riskbridge.harmonize.windows import IndexTimeError, index_time, index_time_of_study, site_zone
from riskbridge.ledger import ClinicalTask, Ledger, LedgerError, ScoreTask, StoredVector
from riskbridge.records import RetrievedSeries, StudyRef, uid_hash
from riskbridge.retrieve import RetrievalFailure, retrieve_all
from riskbridge.settings import Settings
from riskbridge.writeback import (
    Score,
    WritebackConfig,
    WritebackError,
    assessment_key,
    qualitative_risk,
    write_assessments,
)

if TYPE_CHECKING:
    from riskbridge.model.package import PackageInfo
    from riskbridge.report import RunSummary

LOG = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

IDENTITY_QUARANTINE = {
    Outcome.CONFLICT: "identity_conflict",
    Outcome.UNMATCHED: "identity_unmatched",
    Outcome.NEEDS_REVIEW: "identity_needs_review",
}
# Scores recorded per scoring call: a crash loses at most this many studies' work.
SCORE_CHUNK = 64


class PipelineError(Exception):
    """A stage cannot run as configured (no site time zone, a run without window or list, ...)."""


@dataclass(frozen=True)
class StageResult:
    """What one stage call did for a run (work already done before the call is not counted again)."""

    stage: str
    done: int = 0
    skipped: int = 0
    quarantined: int = 0
    failed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for XCom."""
        return asdict(self)

    @property
    def total(self) -> int:
        """Items this call handled, whatever the outcome."""
        return self.done + self.skipped + self.quarantined + self.failed


def fhir_patient_directory(client: FhirClient, birth_date_search: bool = False) -> PatientDirectory:
    """The identity module's view of a FHIR server: Patients by identifier, by id (None when gone), by birth date."""

    def by_identifier(system: str, value: str) -> list[PatientResource]:
        return list(client.search("Patient", {"identifier": f"{system}|{value}"}))

    def read(patient_id: str) -> PatientResource | None:
        try:
            return client.read("Patient", patient_id)
        except FhirError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def by_birth_date(day: str) -> list[PatientResource]:
        return list(client.search("Patient", {"birthdate": day}))

    return PatientDirectory(by_identifier, read, by_birth_date if birth_date_search else None)


def window_of_days(first: date, last: date, zone: str) -> tuple[datetime, datetime]:
    """The window from ``first`` 00:00 to the end of ``last`` (exclusive: ``last`` + 1 day 00:00) in the site zone."""
    if last < first:
        raise PipelineError(f"the window ends ({last}) before it starts ({first})")
    tz = site_zone(zone)
    start = datetime.combine(first, datetime.min.time()).replace(tzinfo=tz)
    end = datetime.combine(last + timedelta(days=1), datetime.min.time()).replace(tzinfo=tz)
    return start, end


def _chunk_key(items: Iterable[str]) -> str:
    """A short digest naming a chunk by its inputs (so a rerun of the same chunk adds to the same timing row)."""
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    if size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _vector(stored: StoredVector) -> FeatureVector:
    return FeatureVector(stored.spec, stored.names, stored.values, stored.observed)


class _OutboxSender:
    """Sends write-back bundles through the FHIR client and marks each key in the outbox as soon as it is answered.

    Safe to call from several threads at once: the HTTP requests run in parallel, the ledger (one database
    connection) is written by one thread at a time.
    """

    def __init__(self, client: FhirClient, ledger: Ledger, identifier_system: str) -> None:
        self.client = client
        self.ledger = ledger
        self.prefix = f"identifier={identifier_system}|"
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _keys(self, entries: Sequence[Any]) -> list[str]:
        keys = []
        for entry in entries:
            condition = (entry.get("request") or {}).get("ifNoneExist", "")
            if condition.startswith(self.prefix):
                keys.append(condition.removeprefix(self.prefix))
        return keys

    def transaction(self, entries: Sequence[Any]) -> list[EntryResult]:
        keys = self._keys(entries)
        try:
            answers = self.client.transaction(entries)
        except FhirError as exc:
            with self.lock:
                for key in keys:
                    self.ledger.mark_writeback(key, "failed", error=str(exc)[:2000])
                self.outcomes["failed"] += len(keys)
            raise
        assessments = [
            answer
            for entry, answer in zip(entries, answers, strict=True)
            if "ifNoneExist" in (entry.get("request") or {})
        ]
        with self.lock:
            self._mark(keys, assessments)
        return answers

    def _mark(self, keys: Sequence[str], assessments: Sequence[EntryResult]) -> None:
        for key, answer in zip(keys, assessments, strict=True):
            status = {201: "created", 200: "exists"}.get(answer.status)
            if status is None:
                self.ledger.mark_writeback(key, "failed", error=f"status {answer.status} {answer.diagnostics}"[:2000])
                self.outcomes["failed"] += 1
            else:
                self.ledger.mark_writeback(key, status, answer.resource_id)
                self.outcomes[status] += 1


class Pipeline:
    """The stages of a run over one ledger connection; FHIR client, rules, spec and model are opened when needed."""

    def __init__(self, settings: Settings, ledger: Ledger | None = None) -> None:
        self.settings = settings
        self._ledger = ledger
        self._fhir: FhirClient | None = None
        self._clinical: ClinicalStage | None = None
        self._spec: FeatureSpec | None = None
        self._rules: RuleSet | None = None
        self._scorer: Any = None
        self._package_info: PackageInfo | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """A pipeline for these settings; the ledger and the servers are reached on first use."""
        return cls(settings)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger connection and the FHIR client."""
        if self._fhir is not None:
            self._fhir.close()
            self._fhir = None
            self._clinical = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    # -- lazily opened parts -------------------------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened and checked against the shipped migrations on first use."""
        if self._ledger is None:
            ledger = Ledger.connect(self.settings.database)
            try:
                ledger.check_schema()
            except LedgerError:
                ledger.close()
                raise
            self._ledger = ledger
        return self._ledger

    @property
    def zone(self) -> str:
        """The site's IANA time zone (required: windows and times without an offset depend on it)."""
        if self.settings.site.timezone is None:
            raise PipelineError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE), e.g. 'America/New_York'")
        return self.settings.site.timezone

    def fhir(self) -> FhirClient:
        """The FHIR client (one per pipeline, pooled connections)."""
        if self._fhir is None:
            self._fhir = FhirClient(self.settings.fhir)
        return self._fhir

    @property
    def spec(self) -> FeatureSpec:
        """The configured feature spec."""
        if self._spec is None:
            self._spec = resolve_feature_spec(self.settings.feature_spec)
        return self._spec

    @property
    def rules(self) -> RuleSet:
        """The configured series-selection rules."""
        if self._rules is None:
            from riskbridge.imaging import load_rule_set

            self._rules = load_rule_set(self.settings.series_rules)
        return self._rules

    def _timed(self, run_id: int, stage: str, chunk: str, work: Callable[[], Counter[str]]) -> StageResult:
        if self.ledger.resume_run(run_id):  # a failed run whose stages run again is running, not failed
            LOG.info("run %d resumed at %s", run_id, stage)
        started = time.perf_counter()
        counts = work()
        seconds = time.perf_counter() - started
        result = StageResult(
            stage, counts["done"], counts["skipped"], counts["quarantined"], counts["failed"], round(seconds, 3)
        )
        self.ledger.record_timing(run_id, stage, chunk, seconds, counts)
        LOG.info(
            "run %d %s: %d done, %d skipped, %d quarantined, %d failed in %.1f s",
            run_id, stage, result.done, result.skipped, result.quarantined, result.failed, seconds,
        )  # fmt: skip
        return result

    # -- runs ----------------------------------------------------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        run_key: str,
        window: tuple[datetime, datetime] | None = None,
        accessions: Sequence[str] = (),
        patient_ids: Sequence[str] = (),
    ) -> int:
        """Create the run (or return the run of ``run_key`` to resume it). A run needs a window or a list."""
        if window is None and not accessions and not patient_ids:
            raise PipelineError("a run needs a window, accession numbers or patient ids")
        return self.ledger.start_run(kind, run_key, window, accessions, patient_ids)

    def finish_run(self, run_id: int, status: str = "success") -> None:
        """Mark the run finished (success or failed)."""
        self.ledger.finish_run(run_id, status)

    def quarantine_alert(self, run_id: int, summary: RunSummary | None = None) -> str | None:
        """The alert message when the run quarantined more than ``[run] quarantine_alert_fraction`` of its studies
        (see :func:`riskbridge.report.quarantine_alert`); None when it did not. Pass the run's ``summary`` when it
        is at hand, so the ledger is not read for it again."""
        from riskbridge.report import quarantine_alert

        run = self.settings.run
        summary = summary if summary is not None else self.ledger.run_summary(run_id)
        return quarantine_alert(summary, run.quarantine_alert_fraction, run.quarantine_alert_min_studies)

    # -- discover ------------------------------------------------------------------------------------------------------

    def _in_window(self, study: StudyRef, window: tuple[datetime, datetime]) -> bool:
        try:
            moment = index_time_of_study(study, self.zone).moment
        except IndexTimeError:
            return True  # the PACS matched its StudyDate; without a time the day is all we know
        return window[0] <= moment < window[1]

    def discover(self, run_id: int, progress: Progress | None = None) -> StageResult:
        """Find the run's CT studies (STUDY-level C-FIND by window, accession or patient id); once per run."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            if self.ledger.stage_marked(run_id, "discover"):
                return counts
            run = self.ledger.run(run_id)
            pacs = self.settings.pacs
            found: dict[str, StudyRef] = {}
            queries: list[dict[str, Any]] = []
            if run.window is not None:
                tz = site_zone(self.zone)
                first = run.window[0].astimezone(tz).date()
                last = (run.window[1] - timedelta(microseconds=1)).astimezone(tz).date()
                queries.append({"study_date": (first, last)})
            queries += [{"accession": accession} for accession in run.accessions]
            queries += [{"patient_id": patient_id} for patient_id in run.patient_ids]
            for done, arguments in enumerate(queries, start=1):
                for study in query.find_studies(pacs, timeout_s=pacs.timeout_s, **arguments):
                    if "study_date" in arguments and run.window is not None and not self._in_window(study, run.window):
                        continue
                    found.setdefault(study.study_uid, study)
                if progress:
                    progress(done, len(queries))
            counts["done"] = self.ledger.add_studies(run_id, found.values())
            self.ledger.mark_stage(run_id, "discover")
            return counts

        return self._timed(run_id, "discover", "all", work)

    # -- match ---------------------------------------------------------------------------------------------------------

    def match(self, run_id: int, progress: Progress | None = None) -> StageResult:
        """Link each undecided study's PACS patient to a FHIR Patient; quarantine conflict/unmatched/needs-review."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            pending = self.ledger.pending_match(run_id)
            if not pending:
                return counts
            config = IdentityConfig.from_settings(self.settings.identity)
            directory = fhir_patient_directory(self.fhir(), config.fallback.enabled)
            by_patient: dict[Any, list[StudyRef]] = defaultdict(list)
            for study in pending:
                by_patient[study.patient].append(study)
            done = 0
            for studies in by_patient.values():
                for study_uid, decision in match_studies(studies, directory, config).items():
                    quarantine = IDENTITY_QUARANTINE.get(decision.outcome)
                    self.ledger.record_identity(
                        run_id,
                        study_uid,
                        decision.outcome.value,
                        decision.fhir_patient_id,
                        [reason.value for reason in decision.reasons],
                        decision.candidate_ids,
                        decision.score,
                        quarantine,
                    )
                    counts["quarantined" if quarantine else "done"] += 1
                    done += 1
                    if progress:
                        progress(done, len(pending))
            return counts

        return self._timed(run_id, "match", "all", work)

    # -- select --------------------------------------------------------------------------------------------------------

    def select(self, run_id: int, progress: Progress | None = None) -> StageResult:
        """Choose each matched study's series by the rules (every series' decision recorded), or quarantine it."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            pending = self.ledger.pending_select(run_id)
            for done, study_uid in enumerate(pending, start=1):
                candidates = query.find_complete_series(
                    self.settings.pacs, study_uid, self.rules.needed_attributes, keywords=self.rules.keywords
                )
                selection = select_series(study_uid, candidates, self.rules)
                chosen = selection.chosen
                expected = next(
                    (c.instance_count for c in candidates if chosen is not None and c.series_uid == chosen.series_uid),
                    None,
                )
                self.ledger.record_selection(run_id, selection, expected)
                counts["done" if chosen is not None else "quarantined"] += 1
                LOG.info("study %s: %s", uid_hash(study_uid), "series chosen" if chosen else "no usable series")
                if progress:
                    progress(done, len(pending))
            return counts

        return self._timed(run_id, "select", "all", work)

    # -- retrieve ------------------------------------------------------------------------------------------------------

    def retrieve_chunks(self, run_id: int, chunk_size: int) -> list[list[str]]:
        """SeriesInstanceUIDs still to retrieve (never staged complete), in chunks of at most ``chunk_size``."""
        return _chunks([task.series_uid for task in self.ledger.pending_retrieval(run_id)], chunk_size)

    def _index_time(self, retrieved: RetrievedSeries) -> tuple[datetime, str]:
        """The index time from the header of one staged instance (acquisition time with its offset)."""
        import pydicom

        first = min(retrieved.path.glob("*.dcm"), default=None)
        if first is None:
            raise IndexTimeError("no staged instance to read the acquisition time from")
        header = pydicom.dcmread(first, stop_before_pixels=True)
        found = index_time(header, self.zone)
        return found.moment, f"{found.source} ({found.offset_source})"

    def retrieve(self, run_id: int, series_uids: Sequence[str], progress: Progress | None = None) -> StageResult:
        """Retrieve these chosen series verified complete; a failure quarantines its study (a rerun tries again)."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            wanted = set(series_uids)
            tasks = [task for task in self.ledger.pending_retrieval(run_id) if task.series_uid in wanted]
            if not tasks:
                return counts
            expected = {task.series_uid: task.expected for task in tasks if task.expected}
            pairs = [(task.study_uid, task.series_uid) for task in tasks]
            for outcome in retrieve_all(self.settings, pairs, None, progress, expected):
                if isinstance(outcome, RetrievalFailure):
                    self.ledger.record_retrieval_failure(
                        run_id, outcome.study_uid, outcome.series_uid, outcome.code, outcome.reason
                    )
                    counts["failed"] += 1
                    continue
                if not outcome.complete:
                    detail = f"{outcome.received} of {outcome.expected} instances staged"
                    self.ledger.record_retrieval_failure(
                        run_id, outcome.study_uid, outcome.series_uid, "incomplete", detail, len(outcome.missing)
                    )
                    counts["failed"] += 1
                    continue
                try:
                    moment, source = self._index_time(outcome)
                except (IndexTimeError, OSError, ValueError) as exc:
                    self.ledger.record_retrieval_failure(
                        run_id, outcome.study_uid, outcome.series_uid, "no_index_time", str(exc)
                    )
                    counts["quarantined"] += 1
                    continue
                self.ledger.record_retrieval(run_id, outcome, moment, source)
                counts["done"] += 1
            return counts

        return self._timed(run_id, "retrieve", _chunk_key(series_uids), work)

    # -- clinical ------------------------------------------------------------------------------------------------------

    def clinical_chunks(self, run_id: int, chunk_size: int) -> list[list[str]]:
        """StudyInstanceUIDs (retrieved, without a feature vector yet) in chunks of at most ``chunk_size``."""
        return _chunks([task.study_uid for task in self.ledger.pending_clinical(run_id)], chunk_size)

    def clinical(self, run_id: int, study_uids: Sequence[str], progress: Progress | None = None) -> StageResult:
        """Fetch and harmonize the labs, notes and demographics of these studies' patients (batched FHIR searches),
        recording every value's and every note's fate and the feature vector."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            wanted = set(study_uids)
            tasks = [task for task in self.ledger.pending_clinical(run_id) if task.study_uid in wanted]
            if not tasks:
                return counts
            if self._clinical is None:
                self._clinical = ClinicalStage.from_settings(self.fhir(), self.settings)
            stage = self._clinical
            units = {lab.name: lab.unit for lab in stage.spec.labs}
            # ClinicalStage answers per patient: a patient with two studies (two index times) goes in two batches.
            batches: list[list[ClinicalTask]] = []
            for task in tasks:
                batch = next((b for b in batches if all(t.fhir_patient_id != task.fhir_patient_id for t in b)), None)
                if batch is None:
                    batches.append([task])
                else:
                    batch.append(task)
            done = 0
            for batch in batches:
                results = stage.run([PatientIndex(t.fhir_patient_id, t.index_time) for t in batch])
                for task in batch:
                    result = results[task.fhir_patient_id]
                    if self.ledger.record_clinical(run_id, task.study_uid, task.fhir_patient_id, result, units):
                        counts["done"] += 1
                done += len(batch)
                if progress:
                    progress(done, len(tasks))
            return counts

        return self._timed(run_id, "clinical", _chunk_key(study_uids), work)

    # -- harmonize -----------------------------------------------------------------------------------------------------

    def package_info(self) -> PackageInfo:
        """The :class:`riskbridge.model.package.PackageInfo` of the configured model package: verified, read once,
        without torch (the harmonize stage needs only its validated pattern table)."""
        if self._package_info is None:
            from riskbridge.model.package import read_package_info

            self._package_info = read_package_info(self.model_package_path())
        return self._package_info

    def harmonize(self, run_id: int, progress: Progress | None = None) -> StageResult:
        """Apply the minimum-data policy to every new feature vector: score it, or skip it with its reasons. The
        policy judges each vector's modality pattern by the model package's validated AUROC for it; the pattern is
        recorded with the decision."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            pending = self.ledger.pending_decision(run_id)
            if not pending:
                return counts  # a rerun with nothing to decide does not read the package
            package = self.package_info()
            if package.feature_spec != self.spec.label:  # its pattern table says nothing about this spec's vectors
                raise PipelineError(
                    f"model package {package.label} was trained on feature spec {package.feature_spec}, "
                    f"the pipeline builds {self.spec.label} (settings feature_spec, run.model_package)"
                )
            patterns = package.validated_patterns
            # The run names the package whose table decided, also when the policy lets nothing through to score.
            self.ledger.set_model(run_id, package.label)
            for done, stored in enumerate(pending, start=1):
                vector = _vector(stored)
                try:
                    # Only retrieved studies reach the clinical stage, so the image is there.
                    decision = decide(self.spec, vector, image_available=True, patterns=patterns)
                except FeatureSpecError:
                    reasons = [f"feature_spec_mismatch:{stored.spec}!={self.spec.label}"]
                    self.ledger.record_decision(run_id, stored.study_uid, False, reasons)
                    counts["skipped"] += 1
                else:
                    self.ledger.record_decision(
                        run_id,
                        stored.study_uid,
                        decision.score,
                        decision.reasons,
                        pattern=decision.pattern,
                        pattern_auroc=decision.pattern_auroc,
                    )
                    counts["done" if decision.score else "skipped"] += 1
                if progress:
                    progress(done, len(pending))
            return counts

        return self._timed(run_id, "harmonize", "all", work)

    # -- score ---------------------------------------------------------------------------------------------------------

    def model_package_path(self) -> Path:
        """The configured model package, else the reference model shipped with riskbridge."""
        if self.settings.run.model_package is not None:
            return self.settings.run.model_package
        from riskbridge.model.package import reference_package_path

        return reference_package_path()

    def scorer(self) -> Any:
        """The :class:`riskbridge.model.scoring.Scorer` of the configured package (loaded and verified once)."""
        if self._scorer is None:
            from riskbridge.model.scoring import Scorer

            self._scorer = Scorer.from_package(
                self.model_package_path(),
                self.spec,
                cache_dir=self.settings.model_dir / "preprocessed",
                workers=self.settings.run.score_workers,
            )
        return self._scorer

    def score(self, run_id: int, progress: Progress | None = None) -> StageResult:
        """Score every study the policy let through, in batches; a study the model cannot score is quarantined."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            tasks = self.ledger.pending_score(run_id)
            if not tasks:
                return counts  # before importing torch: a rerun with nothing to score stays fast
            from riskbridge.model.scoring import ScoreRequest

            scorer = self.scorer()
            model = (scorer.model_name, scorer.model_version, scorer.sha256)
            self.ledger.set_model(run_id, f"{scorer.model_name} {scorer.model_version} {scorer.sha256[:12]}")
            thresholds = (self.settings.writeback.low_below, self.settings.writeback.high_from)
            done = 0
            for start in range(0, len(tasks), SCORE_CHUNK):
                chunk: dict[str, ScoreTask] = {t.vector.study_uid: t for t in tasks[start : start + SCORE_CHUNK]}
                requests = [
                    ScoreRequest(
                        key=uid,
                        series_dir=task.series_dir,
                        series_uid=task.series_uid,
                        vector=_vector(task.vector),
                    )
                    for uid, task in chunk.items()
                ]
                results, failures = scorer.score_with_failures(requests)
                scored_at = datetime.now(UTC).replace(microsecond=0)
                for result in results:
                    task = chunk[result.key]
                    patient = task.vector.fhir_patient_id
                    self.ledger.record_score(
                        run_id,
                        result.key,
                        patient,
                        model,
                        result.probability,
                        result.raw_probability,
                        qualitative_risk(result.probability, thresholds)[0],
                        result.attention,
                        assessment_key(scorer.model_version, patient, result.key),
                        scored_at,
                    )
                    counts["done"] += 1
                for key, reason in failures.items():
                    self.ledger.quarantine(run_id, key, "score", "scoring_error", reason)
                    counts["failed"] += 1
                done += len(chunk)
                if progress:
                    progress(done, len(tasks))
            return counts

        return self._timed(run_id, "score", "all", work)

    # -- write back ----------------------------------------------------------------------------------------------------

    def write_back(self, run_id: int, progress: Progress | None = None) -> StageResult:
        """Send the run's scores through the outbox: enqueue as pending, post as conditional creates, mark each key
        created or exists as its bundle is answered. Keys already answered are never sent again; a failed bundle's
        keys are marked failed and sent again by the next call."""

        def work() -> Counter[str]:
            counts: Counter[str] = Counter()
            self.ledger.enqueue_writebacks(run_id)
            open_scores = self.ledger.open_writebacks(run_id)
            if not open_scores:
                return counts
            scores = []
            for stored in open_scores:
                score = Score(
                    patient_id=stored.fhir_patient_id,
                    study_uid=stored.study_uid,
                    model_name=stored.model_name,
                    model_version=stored.model_version,
                    probability=stored.probability,
                    occurrence=stored.occurrence,
                    scored_at=stored.scored_at,
                    attention=stored.attention,
                    observation_ids=stored.observation_ids,
                    document_ids=stored.document_ids,
                )
                if assessment_key(score.model_version, score.patient_id, score.study_uid) != stored.assessment_key:
                    raise LedgerError(f"score of study {uid_hash(stored.study_uid)}: stored key does not match")
                scores.append(score)
            config = WritebackConfig.from_settings(self.settings.writeback)
            sender = _OutboxSender(self.fhir(), self.ledger, config.identifier_system)
            total = len(scores)

            def report_progress() -> None:
                if progress:
                    progress(sum(sender.outcomes.values()), total)

            bundles = [scores[start : start + config.bundle_size] for start in range(0, total, config.bundle_size)]
            unreachable = threading.Event()

            def send(bundle: Sequence[Score]) -> None:
                if unreachable.is_set():
                    return  # the server was unreachable: bundles not yet sent would only fail the same way
                try:
                    write_assessments(bundle, sender, config)
                except FhirError as exc:
                    if exc.status is None:
                        unreachable.set()
                    raise

            # Each bundle holds its own keys, so bundles posted at once never race on one identifier.
            with ThreadPoolExecutor(config.bundle_workers, thread_name_prefix="fhir-writeback") as pool:
                for future in as_completed([pool.submit(send, bundle) for bundle in bundles]):
                    try:
                        future.result()
                    except FhirError as exc:
                        LOG.warning("run %d write-back: a bundle failed (%s); its keys stay open", run_id, exc)
                    except WritebackError as exc:  # an entry answered neither 201 nor 200; the sender marked it
                        LOG.warning("run %d write-back: %s", run_id, exc)
                    with sender.lock:
                        report_progress()
            counts["done"] = sender.outcomes["created"] + sender.outcomes["exists"]
            counts["failed"] = sender.outcomes["failed"]
            return counts

        return self._timed(run_id, "write_back", "all", work)

    # -- report --------------------------------------------------------------------------------------------------------

    def report(self, run_id: int) -> Path:
        """Write the run's HTML report into ``<run.report_dir>/<run_id>/``; return the index.html path."""
        from riskbridge.report import write_report

        thresholds = (self.settings.writeback.low_below, self.settings.writeback.high_from)
        summary = self.ledger.run_summary(run_id, thresholds)
        return write_report(summary, self.settings.run.report_dir / str(run_id))

    # -- everything, for the CLI and tests -----------------------------------------------------------------------------

    def run_stages(
        self, run_id: int, progress: Callable[[str, int, int], None] | None = None, until: str | None = None
    ) -> list[StageResult]:
        """Run every stage in order for the run (resuming whatever is left), in the configured chunks.

        ``progress(stage, done, total)`` reports each stage; ``until`` stops after that stage (e.g. "retrieve").
        Chunked stages give one result per chunk. The run is not finished here (:meth:`finish_run`).
        """

        def for_stage(stage: str, base: int = 0, total: int | None = None) -> Progress | None:
            if progress is None:
                return None
            return lambda done, count: progress(stage, base + done, count if total is None else total)

        results: list[StageResult] = []
        for stage in ("discover", "match", "select"):
            results.append(getattr(self, stage)(run_id, progress=for_stage(stage)))
            if until == stage:
                return results
        chunked: tuple[tuple[str, Callable[[int, int], list[list[str]]], Any, int], ...] = (
            ("retrieve", self.retrieve_chunks, self.retrieve, self.settings.run.retrieve_chunk_size),
            ("clinical", self.clinical_chunks, self.clinical, self.settings.run.clinical_chunk_size),
        )
        for stage, make_chunks, run_chunk, size in chunked:
            chunks = make_chunks(run_id, size)
            total, handled = sum(len(chunk) for chunk in chunks), 0
            if progress is not None:
                progress(stage, 0, total)
            for chunk in chunks:
                results.append(run_chunk(run_id, chunk, progress=for_stage(stage, handled, total)))
                handled += len(chunk)
            if until == stage:
                return results
        for stage in ("harmonize", "score", "write_back"):
            results.append(getattr(self, stage)(run_id, progress=for_stage(stage)))
            if until == stage:
                return results
        return results
