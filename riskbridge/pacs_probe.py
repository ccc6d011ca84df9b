"""``riskbridge doctor --pacs-capabilities``: what a PACS answers to the queries riskbridge sends, and what riskbridge
will therefore do with it.

One sample study (the one given, else the most recent CT study a STUDY-level C-FIND over the last 30 days finds,
else the most recent CT study of any date) is queried the way riskbridge queries it: STUDY level
(:data:`~riskbridge.connectors.query.STUDY_RETURN_KEYS` and OtherPatientIDsSequence), SERIES level
(:data:`~riskbridge.connectors.query.SERIES_RETURN_KEYS` plus the rules' keywords) and IMAGE level (the rules'
keywords, for one series). An attribute counts as answered at a level when at least one answer carries it
non-empty. Then the PACS is asked whether it accepts an association with the Study Root GET model, and
``pacs.dicomweb_url`` whether it answers QIDO-RS.

:func:`probe` gathers the answers into a :class:`PacsCapabilities`; :func:`conclusions` turns one into what
riskbridge will do: the transport ``auto`` picks, whether selection completes series at IMAGE level, which
attributes only header sampling can give, what identity matching can see. Nothing here prints (``riskbridge.cli``
does), and one failing part never hides another: its error is kept and the rest is still asked.

An attribute the sample study's objects simply lack (ContrastBolusAgent on a scan without contrast) looks the same
as one the PACS does not return: probe a study that has it (``--study``) before concluding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from riskbridge.connectors import dicom, query
from riskbridge.connectors.dicomweb import DicomwebClient
from riskbridge.errors import RiskbridgeError
from riskbridge.harmonize.series import RuleSet
from riskbridge.records import SeriesRef, StudyRef
from riskbridge.settings import PacsSettings

__all__ = [
    "RECENT_DAYS",
    "Conclusion",
    "LevelAnswer",
    "OtherIds",
    "PacsCapabilities",
    "accepts_c_get",
    "auto_transport",
    "conclusions",
    "image_level",
    "offers_dicomweb",
    "optional_keywords",
    "probe",
    "sample_series",
    "sample_study",
    "series_level",
    "study_level",
]

RECENT_DAYS = 30
INSTANCE_COUNT = "NumberOfSeriesRelatedInstances"
OTHER_IDS = "OtherPatientIDsSequence"
EXPECTED_ERRORS = (RiskbridgeError, OSError)

# What a STUDY-level answer said about OtherPatientIDsSequence: items with a PatientID, the sequence without any,
# no sequence at all, or no answer to tell.
OtherIds = Literal["answered", "empty", "absent", "unknown"]


@dataclass(frozen=True)
class LevelAnswer:
    """What one C-FIND level answered for the sample: the keywords asked for, and which came back non-empty.

    ``counts`` says in how many of the ``answers`` each requested keyword was non-empty; ``answered`` and ``empty``
    split ``requested`` by it (in request order). ``error`` is why the query failed, or why it was not asked
    (``asked`` False), None when it ran.
    """

    level: str
    requested: tuple[str, ...]
    answers: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    answered: tuple[str, ...] = ()
    empty: tuple[str, ...] = ()
    error: str | None = None
    asked: bool = True

    @classmethod
    def of(cls, level: str, requested: Iterable[str], answers: Sequence[Mapping[str, Any]]) -> LevelAnswer:
        """Count, for each requested keyword, the answers (attributes by keyword) that carry it non-empty."""
        keywords = tuple(dict.fromkeys(requested))
        counts = {keyword: sum(not _is_empty(answer.get(keyword)) for answer in answers) for keyword in keywords}
        return cls(
            level=level,
            requested=keywords,
            answers=len(answers),
            counts=counts,
            answered=tuple(k for k in keywords if counts[k]),
            empty=tuple(k for k in keywords if not counts[k]),
        )

    @classmethod
    def failed(cls, level: str, requested: Iterable[str], error: str, *, asked: bool = True) -> LevelAnswer:
        """A level whose C-FIND failed (or, ``asked`` False, was not sent): nothing answered, ``error`` says why."""
        keywords = tuple(dict.fromkeys(requested))
        return cls(level=level, requested=keywords, empty=keywords, error=error, asked=asked)


@dataclass(frozen=True)
class PacsCapabilities:
    """Everything the probe found about one PACS, for one sample study (see the module docstring).

    ``completion_*`` mirror selection on the sample study: how many of its series lack an attribute a decision
    needs (:meth:`~riskbridge.harmonize.series.RuleSet.needed_attributes`), which attributes those are, and which
    of them the IMAGE level answers. ``sampling_keywords``: the rules' attributes answered at neither SERIES nor
    IMAGE level (NumberOfSeriesRelatedInstances counts as answered at IMAGE level when that level lists the
    instances); only a sampled header can give them. ``auto_transport``: what ``pacs.transport = auto`` picks.
    """

    peer: str
    rules: str
    rule_keywords: tuple[str, ...]
    optional_keywords: tuple[str, ...]
    study_uid: str | None
    study_source: str
    study: LevelAnswer
    series: LevelAnswer
    image: LevelAnswer
    image_series_uid: str | None = None
    series_count: int = 0
    issuer_of_patient_id: bool = False
    other_patient_ids: OtherIds = "unknown"
    image_find: bool = False
    instance_count_answered: bool = False
    instance_count_agrees: bool | None = None
    c_get: bool = False
    c_get_detail: str = ""
    dicomweb_url: str | None = None
    dicomweb: bool = False
    completion_series: int = 0
    completion_keywords: tuple[str, ...] = ()
    image_fills: tuple[str, ...] = ()
    sampling_keywords: tuple[str, ...] = ()
    configured_transport: str = "auto"
    auto_transport: str = "c-move"
    header_sampling: str | None = None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conclusion:
    """One thing the probe means for riskbridge: its ``topic``, the ``finding`` and a ``verdict``.

    ``ok``: works as riskbridge wants; ``note``: works, at a cost or with a limit worth knowing; ``problem``: the
    site must act (a setting, a PACS configuration) or riskbridge cannot do it.
    """

    topic: str
    verdict: Literal["ok", "note", "problem"]
    finding: str


# --- the questions -------------------------------------------------------------------------------------------


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, tuple | list):
        return not value or all(_is_empty(item) for item in value)
    return False


def _error(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _latest(studies: Sequence[StudyRef]) -> StudyRef:
    """The study with the latest StudyDate/StudyTime (wall time; undated ones first), then the highest UID."""

    def key(study: StudyRef) -> tuple[datetime, str]:
        moment = study.study_datetime.replace(tzinfo=None) if study.study_datetime else datetime.min
        return moment, study.study_uid

    return max(studies, key=key)


def sample_study(pacs: PacsSettings, today: date | None = None) -> tuple[str | None, str]:
    """Pick the study to probe: ``(StudyInstanceUID or None, how it was found)``.

    The most recent CT study a STUDY-level C-FIND over the last :data:`RECENT_DAYS` days finds, else the most recent
    CT study of any date (one C-FIND over the whole archive: every answer is read). Raises what the C-FIND raises.
    """
    today = today or date.today()
    recent = list(query.find_studies(pacs, study_date=(today - timedelta(days=RECENT_DAYS), today), modality="CT"))
    if recent:
        return _latest(recent).study_uid, f"most recent CT study of the last {RECENT_DAYS} days"
    anything = list(query.find_studies(pacs, modality="CT"))
    if anything:
        return _latest(anything).study_uid, f"most recent CT study (none in the last {RECENT_DAYS} days)"
    return None, "no CT study found"


def study_level(pacs: PacsSettings, study_uid: str) -> tuple[LevelAnswer, OtherIds]:
    """STUDY-level C-FIND of one study for :data:`~riskbridge.connectors.query.STUDY_RETURN_KEYS` and
    OtherPatientIDsSequence (with PatientID and IssuerOfPatientID in its item), as identity matching asks.

    OtherPatientIDsSequence counts as answered when an item carries a PatientID; the second value says whether the
    sequence came back with identifiers, came back without any, or did not come back.
    """
    identifier = Dataset()
    identifier.StudyInstanceUID = study_uid
    for keyword in query.STUDY_RETURN_KEYS:
        if keyword != "StudyInstanceUID":
            setattr(identifier, keyword, None)
    item = Dataset()
    item.PatientID = None
    item.IssuerOfPatientID = None
    identifier.OtherPatientIDsSequence = DicomSequence([item])
    answers = list(dicom.find(pacs, "STUDY", identifier, pacs.timeout_s))
    rows: list[dict[str, Any]] = []
    other: OtherIds = "absent" if answers else "unknown"
    for answer in answers:
        attributes = query.answer_attributes(answer)
        ids = query.study_from_answer(answer).patient.other_ids
        attributes[OTHER_IDS] = tuple(patient_id for patient_id, _ in ids) or None
        rows.append(attributes)
        if ids:
            other = "answered"
        elif other != "answered" and isinstance(answer.get(OTHER_IDS), DicomSequence):
            other = "empty"
    return LevelAnswer.of("STUDY", [*query.STUDY_RETURN_KEYS, OTHER_IDS], rows), other


def series_level(pacs: PacsSettings, study_uid: str, rule_set: RuleSet) -> tuple[LevelAnswer, list[SeriesRef]]:
    """SERIES-level C-FIND of the study for SERIES_RETURN_KEYS plus the rules' keywords; the answer and the series."""
    keywords = [*query.SERIES_RETURN_KEYS, *rule_set.keywords]
    listed = list(query.find_series(pacs, study_uid, keywords=rule_set.keywords))
    return LevelAnswer.of("SERIES", keywords, [series.attributes for series in listed]), listed


def sample_series(series: Sequence[SeriesRef], rule_set: RuleSet) -> SeriesRef | None:
    """The series to ask at IMAGE level: one selection would complete there (it lacks what the rules need), else a
    CT series; the one with the most instances, then the lowest SeriesNumber."""

    def key(candidate: SeriesRef) -> tuple[bool, bool, int, int, str]:
        number = candidate.series_number if candidate.series_number is not None else 1 << 30
        return (
            not rule_set.needed_attributes(candidate),
            candidate.modality != "CT",
            -(candidate.instance_count or 0),
            number,
            candidate.series_uid,
        )

    return min(series, key=key) if series else None


def image_level(pacs: PacsSettings, series: SeriesRef, rule_set: RuleSet) -> LevelAnswer:
    """IMAGE-level C-FIND listing the whole series for SOPInstanceUID, SOPClassUID, InstanceNumber and the rules'
    keywords."""
    keywords = [*query.INSTANCE_RETURN_KEYS, *rule_set.keywords]
    instances = list(query.find_instances(pacs, series.study_uid, series.series_uid, keywords=rule_set.keywords))
    rows = [{**instance.attributes, "SOPInstanceUID": instance.sop_instance_uid} for instance in instances]
    return LevelAnswer.of("IMAGE", keywords, rows)


def accepts_c_get(pacs: PacsSettings) -> tuple[bool, str]:
    """Ask for an association proposing the Study Root GET model only: ``(accepted, what happened)``.

    The same question :func:`~riskbridge.connectors.retrieval.resolve_transport` asks for ``auto``; one attempt.
    """
    operation = "C-GET probe"
    try:
        assoc = dicom.associate(
            pacs, dicom.StudyRootQueryRetrieveInformationModelGet, operation, min(pacs.timeout_s, 10.0), attempts=1
        )
    except dicom.DicomError as exc:
        return False, _error(exc)
    try:
        accepted = bool(assoc.accepted_contexts)
    finally:
        assoc.release()
    if accepted:
        return True, "association with the Study Root GET model accepted"
    return False, "association made, but the Study Root GET model was rejected"


def offers_dicomweb(pacs: PacsSettings) -> bool:
    """True when ``pacs.dicomweb_url`` is set and answers QIDO-RS (:meth:`DicomwebClient.supports_dicomweb`)."""
    if not pacs.dicomweb_url:
        return False
    with DicomwebClient.from_settings(pacs) as client:
        return client.supports_dicomweb()


def auto_transport(dicomweb: bool, c_get: bool) -> str:
    """The transport ``pacs.transport = auto`` picks: DICOMweb, else C-GET, else C-MOVE (``resolve_transport``'s
    order)."""
    return "dicomweb" if dicomweb else "c-get" if c_get else "c-move"


def optional_keywords(rule_set: RuleSet) -> tuple[str, ...]:
    """The rules' keywords whose absence decides nothing: every rule on them accepts a missing value and no rank key
    reads them (BodyPartExamined in the chest CT rules)."""
    ranked = {key.attribute for key in rule_set.rank}
    optional = []
    for keyword in rule_set.keywords:
        rules = [rule for rule in rule_set.rules if rule.attribute == keyword]
        if keyword not in ranked and rules and all(rule.missing == "accept" and not rule.present for rule in rules):
            optional.append(keyword)
    return tuple(optional)


# --- the probe -----------------------------------------------------------------------------------------------


def probe(
    pacs: PacsSettings, rule_set: RuleSet, study_uid: str | None = None, *, today: date | None = None
) -> PacsCapabilities:
    """Probe the PACS with one sample study (``study_uid``, else :func:`sample_study`) and the rules' attributes.

    Never raises for what the PACS or the network does: each failing part is recorded (its level's ``error``, or
    ``errors``) and the other parts are still asked.
    """
    errors: list[str] = []
    study_keys = [*query.STUDY_RETURN_KEYS, OTHER_IDS]
    series_keys = [*query.SERIES_RETURN_KEYS, *rule_set.keywords]
    image_keys = [*query.INSTANCE_RETURN_KEYS, *rule_set.keywords]
    source = "given"
    if study_uid is None:
        try:
            study_uid, source = sample_study(pacs, today)
        except EXPECTED_ERRORS as exc:
            errors.append(f"finding a sample study: {_error(exc)}")
            source = "STUDY-level C-FIND failed"

    not_asked = "not asked: no sample study"
    study = LevelAnswer.failed("STUDY", study_keys, not_asked, asked=False)
    series = LevelAnswer.failed("SERIES", series_keys, not_asked, asked=False)
    image = LevelAnswer.failed("IMAGE", image_keys, not_asked, asked=False)
    other: OtherIds = "unknown"
    listed: list[SeriesRef] = []
    sample: SeriesRef | None = None
    if study_uid is not None:
        try:
            study, other = study_level(pacs, study_uid)
        except EXPECTED_ERRORS as exc:
            study = LevelAnswer.failed("STUDY", study_keys, _error(exc))
        try:
            series, listed = series_level(pacs, study_uid, rule_set)
        except EXPECTED_ERRORS as exc:
            series = LevelAnswer.failed("SERIES", series_keys, _error(exc))
        sample = sample_series(listed, rule_set)
        if sample is None:
            image = LevelAnswer.failed("IMAGE", image_keys, "not asked: the study has no series", asked=False)
        else:
            try:
                image = image_level(pacs, sample, rule_set)
            except EXPECTED_ERRORS as exc:
                image = LevelAnswer.failed("IMAGE", image_keys, _error(exc))

    c_get, c_get_detail = accepts_c_get(pacs)
    try:
        dicomweb = offers_dicomweb(pacs)
    except EXPECTED_ERRORS as exc:
        dicomweb = False
        errors.append(f"DICOMweb: {_error(exc)}")

    image_find = image.error is None and image.answers > 0
    image_answered = set(image.answered) | ({INSTANCE_COUNT} if image_find else set())
    needing = [needed for needed in (rule_set.needed_attributes(s) for s in listed) if needed]
    completion = tuple(dict.fromkeys(keyword for needed in needing for keyword in needed))
    agrees: bool | None = None
    if sample is not None and sample.instance_count is not None and image_find:
        agrees = sample.instance_count == image.answers
    return PacsCapabilities(
        peer=dicom.peer_name(pacs),
        rules=rule_set.label,
        rule_keywords=rule_set.keywords,
        optional_keywords=optional_keywords(rule_set),
        study_uid=study_uid,
        study_source=source,
        study=study,
        series=series,
        image=image,
        image_series_uid=sample.series_uid if sample is not None else None,
        series_count=len(listed),
        issuer_of_patient_id=bool(study.counts.get("IssuerOfPatientID")),
        other_patient_ids=other,
        image_find=image_find,
        instance_count_answered=bool(listed) and series.counts.get(INSTANCE_COUNT, 0) == len(listed),
        instance_count_agrees=agrees,
        c_get=c_get,
        c_get_detail=c_get_detail,
        dicomweb_url=pacs.dicomweb_url,
        dicomweb=dicomweb,
        completion_series=len(needing),
        completion_keywords=completion,
        image_fills=tuple(keyword for keyword in completion if keyword in image_answered),
        sampling_keywords=tuple(
            keyword for keyword in rule_set.keywords if keyword not in series.answered and keyword not in image_answered
        ),
        configured_transport=pacs.transport,
        auto_transport=auto_transport(dicomweb, c_get),
        header_sampling=getattr(pacs, "header_sampling", None),
        errors=tuple(errors),
    )


# --- what it means -------------------------------------------------------------------------------------------


def _listed(keywords: Iterable[str]) -> str:
    return ", ".join(keywords) or "none"


def _transport_conclusions(result: PacsCapabilities) -> list[Conclusion]:
    found = []
    if result.dicomweb:
        why = f"{result.dicomweb_url} answers QIDO-RS"
    elif result.c_get:
        web = f"{result.dicomweb_url} does not answer QIDO-RS" if result.dicomweb_url else "no pacs.dicomweb_url"
        why = f"{web}; the PACS accepts C-GET"
    else:
        web = f"{result.dicomweb_url} does not answer QIDO-RS" if result.dicomweb_url else "no pacs.dicomweb_url"
        why = f"{web}; C-GET refused ({result.c_get_detail}). C-MOVE needs the PACS to know riskbridge's storage SCP"
        why += " AE title(s), host and port(s) (not probed)"
    verdict: Literal["ok", "note"] = "ok" if result.auto_transport != "c-move" else "note"
    found.append(Conclusion("transport (auto)", verdict, f"auto picks {result.auto_transport}: {why}"))
    configured = result.configured_transport
    if configured != "auto":
        usable = (
            (configured == "dicomweb" and result.dicomweb)
            or (configured == "c-get" and result.c_get)
            or configured == "c-move"
        )
        finding = f"pacs.transport = {configured} is used as set"
        if usable:
            found.append(Conclusion("transport (configured)", "ok", finding))
        else:
            found.append(Conclusion("transport (configured)", "problem", f"{finding}, but the PACS does not offer it"))
    return found


def _selection_conclusions(result: PacsCapabilities) -> list[Conclusion]:
    if result.series.error is not None:
        return [Conclusion("selection", "problem", f"SERIES-level C-FIND failed: {result.series.error}")]
    found = []
    if not result.completion_series:
        finding = "the SERIES-level answer holds what the rules judge: no IMAGE-level completion"
        found.append(Conclusion("selection", "ok", finding))
    else:
        unfilled = [k for k in result.completion_keywords if k not in result.image_fills]
        finding = (
            f"{result.completion_series} of {result.series_count} series need IMAGE-level completion (one IMAGE-level "
            f"C-FIND each) for {_listed(result.completion_keywords)}; IMAGE level fills {_listed(result.image_fills)}"
        )
        if unfilled:
            finding += f", not {_listed(unfilled)}"
        found.append(Conclusion("selection", "note", finding))
    required = [k for k in result.sampling_keywords if k not in result.optional_keywords]
    optional = [k for k in result.sampling_keywords if k in result.optional_keywords]
    if required:
        mode = result.header_sampling
        finding = f"{_listed(required)}: returned at neither SERIES nor IMAGE level; selection needs header sampling"
        finding += f" (pacs.header_sampling = {mode})" if mode is not None else ""
        found.append(Conclusion("header sampling", "problem" if mode == "off" else "note", finding))
    else:
        finding = "not needed: every attribute the rules require comes back at SERIES or IMAGE level"
        found.append(Conclusion("header sampling", "ok", finding))
    if optional:
        finding = f"{_listed(optional)}: not returned at any level; the rules accept it missing"
        found.append(Conclusion("optional attributes", "note", finding))
    return found


def _count_conclusions(result: PacsCapabilities) -> list[Conclusion]:
    found = []
    if result.image_find:
        finding = f"works: {result.image.answers} instance(s) listed for series {result.image_series_uid}"
        found.append(Conclusion("IMAGE-level C-FIND", "ok", finding))
    else:
        finding = f"does not work ({result.image.error or 'no instance listed'}): no IMAGE-level completion, and "
        finding += "retrieval cannot list a series' instances to verify it"
        found.append(Conclusion("IMAGE-level C-FIND", "problem", finding))
    if result.series.error is None and result.series_count:
        if result.instance_count_answered:
            finding = "NumberOfSeriesRelatedInstances answered for every series: retrieval knows each size up front"
            found.append(Conclusion("instance count", "ok", finding))
        else:
            finding = "NumberOfSeriesRelatedInstances not answered for every series: a chosen series' instances are "
            finding += "listed at IMAGE level (one more C-FIND each) to count what its retrieval must deliver"
            found.append(Conclusion("instance count", "note", finding))
    if result.instance_count_agrees is False:
        finding = f"NumberOfSeriesRelatedInstances of series {result.image_series_uid} differs from the "
        finding += f"{result.image.answers} instance(s) IMAGE level lists"
        found.append(Conclusion("instance count", "problem", finding))
    return found


_OTHER_IDS_FINDINGS: dict[str, tuple[Literal["ok", "note"], str]] = {
    "answered": ("ok", "OtherPatientIDsSequence answered: the patient's other identifiers are matched too"),
    "empty": (
        "note",
        "OtherPatientIDsSequence returned without identifiers: the sample patient has none, or the PACS does not "
        "fill it (probe a patient with other IDs to tell)",
    ),
    "absent": (
        "note",
        "OtherPatientIDsSequence not returned: identity sees PatientID only, unless header sampling reads it from "
        "an instance",
    ),
    "unknown": ("note", "OtherPatientIDsSequence: no STUDY-level answer to tell"),
}


def _identity_conclusions(result: PacsCapabilities) -> list[Conclusion]:
    if result.study.error is not None:
        return [Conclusion("identity", "problem", f"STUDY-level C-FIND failed: {result.study.error}")]
    if result.issuer_of_patient_id:
        issuer = Conclusion("identity", "ok", "IssuerOfPatientID answered: PatientID is matched in its issuer's system")
    else:
        finding = "IssuerOfPatientID empty: PatientID takes identity's default issuer (without one it is not "
        finding += "matched by identifier)"
        issuer = Conclusion("identity", "note", finding)
    verdict, finding = _OTHER_IDS_FINDINGS[result.other_patient_ids]
    return [issuer, Conclusion("identity", verdict, finding)]


def conclusions(result: PacsCapabilities) -> list[Conclusion]:
    """What the probe means for riskbridge, in a fixed order: sample study, transport, IMAGE-level C-FIND and
    instance counts, selection (IMAGE-level completion, header sampling), identity."""
    found: list[Conclusion] = [Conclusion("probe", "problem", error) for error in result.errors]
    if result.study_uid is None:
        hint = "" if result.errors else ": give one with --study UID"
        found.append(Conclusion("sample study", "problem", f"{result.study_source}{hint}"))
    else:
        finding = f"{result.study_uid} ({result.study_source}), {result.series_count} series"
        found.append(Conclusion("sample study", "ok", finding))
    found += _transport_conclusions(result)
    if result.study_uid is not None:
        found += _count_conclusions(result)
        found += _selection_conclusions(result)
        found += _identity_conclusions(result)
    return found
