"""Write-back of scores as FHIR R4 RiskAssessments with Provenance, idempotent by construction.

One RiskAssessment per (patient, study, model version). Its identifier is a configured system plus a SHA-256 of
that triple, so a rerun finds what it wrote: each RiskAssessment is a conditional create (``If-None-Exist:
identifier=system|value``) inside a transaction bundle, and its Provenance is a PUT to an id derived from the same
hash (an upsert; R4 Provenance has no identifier to condition on), whose content, ``recorded`` included, depends
only on the score, so rewriting it changes nothing. A new
model version hashes differently and so creates new resources. Every resource is built with
``fhir.resources.R4B`` models (the package's default models are R5) and sent as their JSON.

What the model used is written as data, not only as note text: a ``modality-pattern`` extension (the modalities
with attention above 0, e.g. ``image+labs``) and one ``modality-attention`` extension per modality (its weight, 0
for a modality the patient lacked or the model does not read). Their StructureDefinitions, with the CodeSystem and
ValueSet of the modality codes, ship in ``riskbridge/fhir_definitions`` under the canonical base
:data:`FHIR_CANONICAL_BASE`; :func:`install_definitions` loads them into a server (idempotent), so its
``$validate`` checks the extensions. Following HL7's AI Transparency on FHIR IG, each RiskAssessment carries the
``meta.security`` label ``AIAST`` (AI asserted). See docs/writeback.md.

An identifier appears in one bundle only and bundles are posted one after another: HAPI can create duplicates
when two conditional creates for the same identifier run in parallel.

The bundles are built here (pure, unit-tested); :func:`write_assessments` posts them through anything with a
``transaction(entries)`` method, such as :class:`riskbridge.connectors.fhir.FhirClient`. The stage sends a run's
scores through the ledger's outbox: enqueued as pending, posted in bundles (several at once), each key marked
created or exists as its bundle is answered, so a key answered once is never sent again. A run claims its open keys
(:meth:`riskbridge.ledger.Ledger.claim_writebacks`) before it sends them, so overlapping runs (a nightly and an
on-demand run scoring one study) never send one key at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.provenance import Provenance, ProvenanceAgent, ProvenanceEntity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.riskassessment import RiskAssessment, RiskAssessmentPrediction

from riskbridge import __version__
from riskbridge.connectors.fhir import EntryResult, FhirClient, FhirError
from riskbridge.errors import FhirServerError
from riskbridge.ledger import Ledger, LedgerError
from riskbridge.records import MODALITIES, pattern_name, uid_hash
from riskbridge.settings import WritebackSettings
from riskbridge.stages.base import Cursor, Progress, StageContext

LOG = logging.getLogger(__name__)

NAME = "write_back"

RISK_PROBABILITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/risk-probability"
PROVENANCE_AGENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DICOM_UID_SYSTEM = "urn:dicom:uid"

NO_MODALITY = pattern_name((False,) * len(MODALITIES))  # the pattern name when no modality was used

# riskbridge's conformance resources are named under this base; the URLs are the contract with whoever reads the
# extensions, so they never depend on site settings.
FHIR_CANONICAL_BASE = "urn:riskbridge:fhir"
MODALITY_ATTENTION_URL = f"{FHIR_CANONICAL_BASE}:StructureDefinition:modality-attention"
MODALITY_PATTERN_URL = f"{FHIR_CANONICAL_BASE}:StructureDefinition:modality-pattern"
MODALITY_CODE_SYSTEM_URL = f"{FHIR_CANONICAL_BASE}:CodeSystem:modality"
DEFINITIONS_DIR = "fhir_definitions"  # package data of riskbridge: the JSON of every resource above

# HL7 AI Transparency on FHIR: the security label of a resource whose content an AI asserted.
SECURITY_OBSERVATION_VALUE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AI_ASSERTED_CODE = "AIAST"
AI_ASSERTED_DISPLAY = "Artificial Intelligence asserted"


class WritebackError(FhirServerError):
    """A score cannot be written: bad input, or the server refused a bundle (the message says which entry)."""


@dataclass(frozen=True)
class WritebackConfig:
    """How assessments are identified, coded and bundled (site settings)."""

    identifier_system: str = "urn:riskbridge:risk-assessment"
    outcome: tuple[str, str, str] = ("http://snomed.info/sct", "363358000", "Malignant tumor of lung")
    thresholds: tuple[float, float] = (0.1, 0.3)  # below the first: low; below the second: moderate; else high
    method_system: str = "urn:riskbridge:model"
    device_identifier_system: str = "urn:riskbridge:device"
    bundle_size: int = 50
    bundle_workers: int = 2  # bundles posted at once by the pipeline's write-back stage

    @classmethod
    def from_settings(cls, writeback: WritebackSettings) -> WritebackConfig:
        """The configuration the ``[writeback]`` settings describe."""
        return cls(
            identifier_system=writeback.identifier_system,
            outcome=(writeback.outcome_system, writeback.outcome_code, writeback.outcome_display),
            thresholds=(writeback.low_below, writeback.high_from),
            bundle_size=writeback.bundle_size,
            bundle_workers=writeback.bundle_workers,
        )

    def __post_init__(self) -> None:
        low, high = self.thresholds
        if not 0.0 < low < high < 1.0:
            raise WritebackError(f"thresholds must satisfy 0 < low < high < 1, got {self.thresholds}")
        if self.bundle_size < 1:
            raise WritebackError(f"bundle_size must be at least 1, got {self.bundle_size}")
        if self.bundle_workers < 1:
            raise WritebackError(f"bundle_workers must be at least 1, got {self.bundle_workers}")


@dataclass(frozen=True)
class Score:
    """What the score stage produced for one (patient, study), and the inputs behind it."""

    patient_id: str  # FHIR Patient id (the identity stage's match)
    study_uid: str
    model_name: str
    model_version: str
    probability: float
    occurrence: datetime  # the index time: when the scan was acquired, with its offset
    scored_at: datetime  # when the model produced the score: Provenance.recorded, the same on every rewrite
    attention: Mapping[str, float] = field(default_factory=dict)  # per-modality attention weights
    observation_ids: tuple[str, ...] = ()
    document_ids: tuple[str, ...] = ()  # DocumentReference ids
    imaging_study_id: str | None = None  # the server's ImagingStudy, when it has one

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise WritebackError(f"probability must lie in [0, 1], got {self.probability}")
        for name in ("occurrence", "scored_at"):
            if getattr(self, name).tzinfo is None:
                raise WritebackError(f"{name} must carry its UTC offset (a naive datetime is ambiguous)")
        for name, weight in self.attention.items():
            if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
                raise WritebackError(f"attention of {name} must lie in [0, 1], got {weight}")
        if self.attention and modality_pattern(self.attention) == NO_MODALITY:
            raise WritebackError("attention gives no modality a weight above 0 (a score uses at least one)")


def modality_pattern(attention: Mapping[str, float]) -> str:
    """The modalities the model used (attention above 0), joined with ``+`` in the order image, labs, notes.

    E.g. ``image+labs+notes``, ``image+labs``, ``image``; ``none`` when no weight is above 0. A name outside
    :data:`MODALITIES` raises WritebackError.
    """
    unknown = sorted(set(attention) - set(MODALITIES))
    if unknown:
        raise WritebackError(f"attention names unknown modalities {unknown} (known: {', '.join(MODALITIES)})")
    return pattern_name([attention.get(name, 0.0) > 0.0 for name in MODALITIES])


def assessment_key(model_version: str, patient_id: str, study_uid: str) -> str:
    """The deterministic identifier value of the RiskAssessment of (model version, patient, study)."""
    digest = hashlib.sha256("\x1f".join((model_version, patient_id, study_uid)).encode()).hexdigest()
    return f"rb-{digest[:40]}"


def qualitative_risk(probability: float, thresholds: tuple[float, float]) -> tuple[str, str]:
    """The risk-probability code (low, moderate, high) and display for a probability."""
    low, high = thresholds
    if probability < low:
        return "low", "Low likelihood"
    if probability < high:
        return "moderate", "Moderate likelihood"
    return "high", "High likelihood"


def _basis(score: Score) -> list[Reference]:
    references = [Reference(reference=f"Observation/{ident}") for ident in score.observation_ids]
    references += [Reference(reference=f"DocumentReference/{ident}") for ident in score.document_ids]
    if score.imaging_study_id:
        references.append(Reference(reference=f"ImagingStudy/{score.imaging_study_id}"))
    else:
        # No ImagingStudy on the server: a logical reference by the DICOM StudyInstanceUID.
        study = Identifier(system=DICOM_UID_SYSTEM, value=f"urn:oid:{score.study_uid}")
        references.append(Reference(type="ImagingStudy", identifier=study, display="CT study"))
    return references


def _weight(value: float) -> float:
    # Six significant digits, not six decimals: a tiny positive weight must not round to 0 and so contradict
    # the pattern, which counts every weight above 0 as used.
    return float(f"{value:.6g}")


def modality_extensions(attention: Mapping[str, float]) -> list[Extension]:
    """The ``modality-pattern`` extension and one ``modality-attention`` extension per modality, in
    :data:`MODALITIES` order (a modality missing from ``attention`` has weight 0); none for an empty mapping."""
    if not attention:
        return []
    pattern = modality_pattern(attention)
    if pattern == NO_MODALITY:
        raise WritebackError("attention gives no modality a weight above 0 (a score uses at least one)")
    extensions = [Extension(url=MODALITY_PATTERN_URL, valueCode=pattern)]
    for name in MODALITIES:
        parts = [
            Extension(url="modality", valueCode=name),
            Extension(url="weight", valueDecimal=_weight(attention.get(name, 0.0))),
        ]
        extensions.append(Extension(url=MODALITY_ATTENTION_URL, extension=parts))
    return extensions


def ai_asserted_label() -> Coding:
    """The ``meta.security`` label AIAST (HL7 AI Transparency on FHIR): the resource's content is AI-asserted."""
    return Coding(system=SECURITY_OBSERVATION_VALUE_SYSTEM, code=AI_ASSERTED_CODE, display=AI_ASSERTED_DISPLAY)


def build_risk_assessment(score: Score, config: WritebackConfig) -> RiskAssessment:
    """Build the R4 RiskAssessment of a score (no id: the server assigns it on create).

    It carries the AIAST security label and, when the score has attention weights, the modality extensions
    (:func:`modality_extensions`) next to the same facts as note text for people.
    """
    key = assessment_key(score.model_version, score.patient_id, score.study_uid)
    system, code, display = config.outcome
    risk_code, risk_display = qualitative_risk(score.probability, config.thresholds)
    note = None
    if score.attention:
        weights = ", ".join(f"{name} {score.attention.get(name, 0.0):.3f}" for name in MODALITIES)
        used = modality_pattern(score.attention)
        note = [{"text": f"Per-modality attention weights: {weights}; modalities used: {used}"}]
    return RiskAssessment(
        meta=Meta(security=[ai_asserted_label()]),
        extension=modality_extensions(score.attention) or None,
        identifier=[Identifier(system=config.identifier_system, value=key)],
        status="final",
        subject=Reference(reference=f"Patient/{score.patient_id}"),
        occurrenceDateTime=score.occurrence,
        basis=_basis(score),
        method=CodeableConcept(
            coding=[Coding(system=config.method_system, code=score.model_name, version=score.model_version)],
            text=f"{score.model_name} {score.model_version}",
        ),
        prediction=[
            RiskAssessmentPrediction(
                outcome=CodeableConcept(coding=[Coding(system=system, code=code, display=display)], text=display),
                probabilityDecimal=round(score.probability, 6),
                qualitativeRisk=CodeableConcept(
                    coding=[Coding(system=RISK_PROBABILITY_SYSTEM, code=risk_code, display=risk_display)]
                ),
            )
        ],
        note=note,
    )


def build_provenance(score: Score, target: str, config: WritebackConfig) -> Provenance:
    """Build the Provenance of a RiskAssessment (``target`` is its reference, or the bundle's placeholder)."""
    device = Identifier(system=config.device_identifier_system, value=f"riskbridge/{__version__}")
    author = CodeableConcept(coding=[Coding(system=PROVENANCE_AGENT_TYPE_SYSTEM, code="author", display="Author")])
    inputs = [ProvenanceEntity(role="source", what=reference) for reference in _basis(score)]
    return Provenance(
        id=f"{assessment_key(score.model_version, score.patient_id, score.study_uid)}-provenance",
        target=[Reference(reference=target)],
        recorded=score.scored_at,
        agent=[
            ProvenanceAgent(
                type=author, who=Reference(type="Device", identifier=device, display=f"riskbridge {__version__}")
            )
        ],
        entity=inputs,
    )


def _json(resource: RiskAssessment | Provenance) -> dict[str, Any]:
    return resource.model_dump(mode="json", exclude_none=True)


def transaction_bundles(scores: Iterable[Score], config: WritebackConfig) -> Iterator[tuple[Bundle, list[str]]]:
    """Yield transaction bundles of at most ``config.bundle_size`` scores, with the keys each one carries.

    Each score gives two entries: its RiskAssessment (conditional create), then its Provenance (PUT).

    A key met twice is an error (two scores for the same patient, study and model version cannot both be right).
    """
    seen: set[str] = set()
    entries: list[BundleEntry] = []
    keys: list[str] = []
    for score in scores:
        key = assessment_key(score.model_version, score.patient_id, score.study_uid)
        if key in seen:
            raise WritebackError(f"two scores for assessment {key} (same patient, study and model version)")
        seen.add(key)
        placeholder = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, config.identifier_system + '|' + key)}"
        assessment = build_risk_assessment(score, config)
        provenance = build_provenance(score, placeholder, config)
        entries.append(
            BundleEntry(
                fullUrl=placeholder,
                resource=_json(assessment),
                request=BundleEntryRequest(
                    method="POST", url="RiskAssessment", ifNoneExist=f"identifier={config.identifier_system}|{key}"
                ),
            )
        )
        entries.append(
            BundleEntry(
                resource=_json(provenance),
                request=BundleEntryRequest(method="PUT", url=f"Provenance/{provenance.id}"),
            )
        )
        keys.append(key)
        if len(keys) == config.bundle_size:
            yield Bundle(type="transaction", entry=entries), keys
            entries, keys = [], []
    if keys:
        yield Bundle(type="transaction", entry=entries), keys


@dataclass
class WritebackReport:
    """What a write-back run did, per RiskAssessment key."""

    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bundles: int = 0


class TransactionResult(Protocol):
    """One entry's answer in a transaction response (e.g. :class:`riskbridge.connectors.fhir.EntryResult`)."""

    @property
    def status(self) -> int:
        """The entry's HTTP status: 201 created, 200 for a conditional create that matched, 200/201 for a PUT."""
        ...


class TransactionSender(Protocol):
    """Sends a transaction Bundle's entries; answers one result per entry, in order (e.g. ``FhirClient``)."""

    def transaction(self, entries: Sequence[Mapping[str, Any]]) -> Sequence[TransactionResult]:
        """POST the entries as one transaction Bundle; raise if the server refuses it."""
        ...


def write_assessments(
    scores: Sequence[Score], sender: TransactionSender, config: WritebackConfig | None = None
) -> WritebackReport:
    """Post the scores' RiskAssessments and Provenances, bundle after bundle; report created vs already there.

    A transaction is all or nothing, so a refused bundle leaves nothing half-written; its error propagates and the
    bundles already posted stay posted (a rerun finds them and creates nothing).
    """
    config = config or WritebackConfig()
    report = WritebackReport()
    for bundle, keys in transaction_bundles(scores, config):
        entries = bundle.model_dump(mode="json", exclude_none=True)["entry"]
        answers = sender.transaction(entries)
        if len(answers) != len(entries):
            raise WritebackError(f"transaction answered {len(answers)} entries for {len(entries)} sent")
        for key, answer in zip(keys, answers[::2], strict=True):
            if answer.status == 201:
                report.created.append(key)
            elif answer.status == 200:
                report.existing.append(key)
            else:
                raise WritebackError(f"RiskAssessment {key}: unexpected transaction status {answer.status}")
        report.bundles += 1
        LOG.info("write-back bundle %d: %d assessments", report.bundles, len(keys))
    return report


def definition_resources() -> list[dict[str, Any]]:
    """The conformance resources the modality extensions need (CodeSystem, ValueSet, StructureDefinitions), as
    shipped in ``riskbridge/fhir_definitions``, in file-name order."""
    folder = resources.files("riskbridge").joinpath(DEFINITIONS_DIR)
    files = sorted((item for item in folder.iterdir() if item.name.endswith(".json")), key=lambda item: item.name)
    return [json.loads(item.read_text(encoding="utf-8")) for item in files]


def definition_entries() -> list[dict[str, Any]]:
    """Transaction entries that load :func:`definition_resources`: each a conditional update on its canonical URL.

    Conditional on the URL rather than a PUT to the id, so a server holding the definition under another id
    keeps one copy (it refuses the mismatch instead of adding a second resource with the same canonical URL), and
    nothing else that happens to have the same id is overwritten.
    """
    return [
        {
            "resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}?url={quote(resource['url'], safe='')}"},
        }
        for resource in definition_resources()
    ]


def install_definitions(sender: TransactionSender) -> dict[str, int]:
    """Load riskbridge's conformance resources into the FHIR server in one transaction; idempotent.

    Returns the HTTP status per canonical URL: 201 created, 200 already there (HAPI then changes nothing when
    the content is the same) or updated to the shipped version. A refused transaction raises (the client's
    error); any other entry status raises WritebackError.
    """
    entries = definition_entries()
    answers = sender.transaction(entries)
    if len(answers) != len(entries):
        raise WritebackError(f"transaction answered {len(answers)} entries for {len(entries)} sent")
    statuses: dict[str, int] = {}
    for entry, answer in zip(entries, answers, strict=True):
        url = entry["resource"]["url"]
        if answer.status not in (200, 201):
            raise WritebackError(f"{entry['resource']['resourceType']} {url}: unexpected status {answer.status}")
        statuses[url] = answer.status
    created = sum(status == 201 for status in statuses.values())
    LOG.info("FHIR definitions: %d created, %d already there or updated", created, len(statuses) - created)
    return statuses


# --- the stage --------------------------------------------------------------------------------------------------------


def open_scores(ledger: Ledger, run_id: int) -> list[Score]:
    """Scores of the run whose RiskAssessment is pending or failed in the outbox, as the :class:`Score` the bundle is
    built from; :class:`riskbridge.ledger.LedgerError` when a stored key does not match its score."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT s.*, f.observation_ids, f.document_ids, r.index_time FROM scores s
               JOIN writebacks w USING (assessment_key)
               JOIN features f ON f.run_id = s.run_id AND f.study_uid = s.study_uid
               JOIN retrievals r ON r.run_id = s.run_id AND r.study_uid = s.study_uid
               WHERE s.run_id = %s AND w.status IN ('pending', 'failed') ORDER BY s.study_uid""",
            (run_id,),
        )
        rows = cursor.fetchall()
    scores = []
    for row in rows:
        score = Score(
            patient_id=row["fhir_patient_id"],
            study_uid=row["study_uid"],
            model_name=row["model_name"],
            model_version=row["model_version"],
            probability=float(row["probability"]),
            occurrence=row["index_time"],
            scored_at=row["scored_at"],
            attention={str(k): float(v) for k, v in row["attention"].items()},
            observation_ids=tuple(row["observation_ids"]),
            document_ids=tuple(row["document_ids"]),
        )
        if assessment_key(score.model_version, score.patient_id, score.study_uid) != row["assessment_key"]:
            raise LedgerError(f"score of study {uid_hash(score.study_uid)}: stored key does not match")
        scores.append(score)
    return scores


class OutboxSender:
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

    def _keys(self, entries: Sequence[Mapping[str, Any]]) -> list[str]:
        keys = []
        for entry in entries:
            condition = (entry.get("request") or {}).get("ifNoneExist", "")
            if condition.startswith(self.prefix):
                keys.append(condition.removeprefix(self.prefix))
        return keys

    def transaction(self, entries: Sequence[Mapping[str, Any]]) -> list[EntryResult]:
        """Post the entries as one transaction and mark each RiskAssessment key by its answer (failed when the
        whole bundle is refused)."""
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


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Send the run's scores through the outbox: enqueue as pending, post as conditional creates, mark each key
    created or exists as its bundle is answered. Keys already answered are never sent again; a failed bundle's
    keys are marked failed and sent again by the next call."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    ledger.enqueue_writebacks(run_id)
    keys = [assessment_key(s.model_version, s.patient_id, s.study_uid) for s in open_scores(ledger, run_id)]
    if not keys:
        return counts
    # An overlapping run sending the same keys holds them until it is done; what it answered is not sent again.
    with ledger.claim_writebacks(keys):
        return _send_open(context, run_id, progress, counts)


def _send_open(context: StageContext, run_id: int, progress: Progress | None, counts: Counter[str]) -> Counter[str]:
    """Post the run's open scores in bundles, several at once, and count what the server answered."""
    ledger = context.ledger
    scores = open_scores(ledger, run_id)
    if not scores:
        return counts
    config = WritebackConfig.from_settings(context.settings.writeback)
    sender = OutboxSender(context.fhir(), ledger, config.identifier_system)
    total = len(scores)
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
                if progress:
                    progress(sum(sender.outcomes.values()), total)
    counts["done"] = sender.outcomes["created"] + sender.outcomes["exists"]
    counts["failed"] = sender.outcomes["failed"]
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """The run's RiskAssessments created or found on the server (done) and those whose last attempt failed."""
    cursor.execute(
        """SELECT w.status, count(*) AS n FROM writebacks w JOIN scores s USING (assessment_key)
           WHERE s.run_id = %s GROUP BY 1""",
        (run_id,),
    )
    found: Counter[str] = Counter()
    for row in cursor.fetchall():
        if row["status"] in ("created", "exists"):
            found["done"] += int(row["n"])
        elif row["status"] == "failed":
            found["failed"] += int(row["n"])
    return found
