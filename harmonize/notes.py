"""Comorbidity flags from clinical note text (medspaCy TargetMatcher + ConText) merged with coded Conditions.

The risk model wants one boolean per comorbidity (diabetes, COPD, heart failure, chronic kidney disease,
hypertension, prior MI, active smoking, immunosuppression, prior malignancy). Notes assert these in prose, with
negations ("denies COPD"), family history ("mother had diabetes"), hypotheticals ("return if symptoms of heart
failure develop"), uncertainty ("rule out MI") and history ("history of CKD", "former smoker"). This module finds
the mentions with medspaCy's TargetMatcher, assigns each an assertion with ConText (medspaCy's default English
rules plus the rules of ``data/comorbidity_rules.yaml``), and decides per flag:

* present and (for chronic disease) historical mentions count; negated, family, hypothetical and uncertain
  mentions do not; historical smoking is not active smoking;
* coded FHIR Condition resources (plain dicts) count when their SNOMED CT / ICD-10-CM code maps to a flag, their
  verification status is not refuted / entered-in-error / unconfirmed, and their clinical status is active
  (or inactive too, for flags that mean "ever had": prior MI, prior malignancy);
* the result keeps the source ("text", "coded" or "both") and every mention with its note id and character
  offsets, and the modifiers that excluded it. Nothing here stores or logs note text (it is PHI).

The spaCy pipeline is ``spacy.blank("en")`` + a line-break sentence-boundary component + spaCy's "sentencizer"
(medspaCy's PyRuSH splitter was measured about 5x slower) + TargetMatcher + ConText; it is built once per rule
file and reused; many notes go through ``nlp.pipe``. docs/notes.md documents the rules and the measured F1.

The rule file itself (its flags, codes and extra ConText rules: :class:`RuleSet`, :func:`load_rules`,
:class:`RuleFileError`) is read by :mod:`riskbridge.harmonize.notes_rule_file`; those names are importable from
here too.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from riskbridge.harmonize.notes_rule_file import (
    CONTEXT_DIRECTIONS,
    CURRENT_CATEGORY,
    HISTORICAL_CATEGORY,
    KNOWN_CATEGORIES,
    RULES_RESOURCE,
    ContextRuleSpec,
    FlagRule,
    RuleFileError,
    RuleSet,
    TargetTerm,
    load_rules,
    parse_rules,
    rule_file_key,
)
from riskbridge.harmonize.windows import parse_fhir_datetime

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Span

__all__ = [
    "ACTIVE_CLINICAL_STATUSES",
    "CONTEXT_DIRECTIONS",
    "CONTEXT_PIPE",
    "CURRENT_CATEGORY",
    "EXCLUDED_VERIFICATION_STATUSES",
    "EXCLUDING_CATEGORIES",
    "HISTORICAL_CATEGORY",
    "INACTIVE_CLINICAL_STATUSES",
    "KNOWN_CATEGORIES",
    "NOT_THIS_LABEL",
    "RULES_RESOURCE",
    "SENTENCE_BOUNDARY_PIPE",
    "Assertion",
    "CodedEvidence",
    "ContextRuleSpec",
    "FlagEvidence",
    "FlagRule",
    "Mention",
    "ModifierHit",
    "PatientComorbidities",
    "RuleFileError",
    "RuleSet",
    "Source",
    "TargetTerm",
    "build_pipeline",
    "coded_evidence",
    "extract_comorbidities",
    "extract_comorbidities_batch",
    "load_rules",
    "merge_flags",
    "note_mentions",
    "parse_rules",
]

logger = logging.getLogger(__name__)

# TargetMatcher label of the phrases that contain a target term but assert something else ("diabetes
# insipidus"): the matcher keeps the longest overlapping match, so these swallow the target inside them.
NOT_THIS_LABEL = "NOT_THIS"
SENTENCE_BOUNDARY_PIPE = "riskbridge_line_breaks"
CONTEXT_PIPE = "medspacy_context"

Assertion = Literal["present", "historical", "negated", "family", "hypothetical", "uncertain"]
Source = Literal["text", "coded", "both"]

# ConText categories that make a mention not count, strongest first: the first one found names the assertion.
EXCLUDING_CATEGORIES: tuple[tuple[str, Assertion], ...] = (
    ("NEGATED_EXISTENCE", "negated"),
    ("FAMILY", "family"),
    ("HYPOTHETICAL", "hypothetical"),
    ("POSSIBLE_EXISTENCE", "uncertain"),
)

ACTIVE_CLINICAL_STATUSES = frozenset({"active", "recurrence", "relapse"})
INACTIVE_CLINICAL_STATUSES = frozenset({"inactive", "remission", "resolved"})
# Refuted and entered-in-error are wrong; unconfirmed/provisional/differential are the coded form of a "possible"
# mention, which does not count in text either.
EXCLUDED_VERIFICATION_STATUSES = frozenset(
    {"refuted", "entered-in-error", "unconfirmed", "provisional", "differential"}
)

# A header line such as "Family history:" (a short label, then a colon); the label is matched against the rule
# file's family_section_headers.
HEADER_LINE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z0-9 /&()'-]{0,40}?)[ \t]*:", re.MULTILINE)
BLANK_LINE = re.compile(r"\n[ \t]*\n")
LIST_BULLET = re.compile(r"^(?:[-*\u2022]|\d{1,2}[.)])$")


# --- the spaCy pipeline ----------------------------------------------------------------------------------


def _mark_line_breaks(doc: Doc) -> Doc:
    """Start a sentence after a blank line, after a header line ending in ':', and at a list bullet.

    spaCy's sentencizer splits on sentence punctuation only, so "Past medical history:\\nCOPD" would put the
    header into COPD's sentence and "Denies chest pain\\n\\nDiabetes" would carry the negation over. A single
    line break inside running text is left alone: real notes wrap lines mid-sentence. The sentencizer keeps
    boundaries set here (it only fills in tokens whose boundary is still unset).
    """
    for i in range(1, len(doc) - 1):
        token = doc[i]
        if not token.is_space or "\n" not in token.text:
            continue
        following = doc[i + 1]
        previous = doc[i - 1]
        if token.text.count("\n") >= 2 or previous.text == ":" or LIST_BULLET.match(following.text):
            following.is_sent_start = True
    return doc


def build_pipeline(path: str | Path | None = None) -> Language:
    """The spaCy pipeline for a rule file (default: the packaged one), built once per file and cached.

    ``spacy.blank("en")`` -> line-break boundaries -> "sentencizer" -> medspaCy TargetMatcher (flag targets and
    not-this phrases) -> medspaCy ConText (default English rules + the rule file's context rules).
    """
    return _build_pipeline(rule_file_key(path))


@contextmanager
def _torch_left_out() -> Iterator[None]:
    """Keep thinc (spaCy's machine-learning layer) from importing torch while spaCy is imported.

    thinc imports torch at its own import whenever torch is installed (3.5 s of the 4.4 s spaCy took to import on
    the development VM), and this rule-based pipeline never runs a thinc model. While this holds, ``import torch``
    raises ImportError, so thinc records that torch is absent; afterwards torch imports as usual (the score stage's).
    Nothing is done when torch is imported already (it costs nothing more then) or thinc is (too late to matter).
    While it holds, ``import torch`` fails on every thread: ``riskbridge run`` builds this pipeline on a thread only
    while the retrieve stage runs, which imports no torch.
    """
    if "torch" in sys.modules or "thinc" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # the documented way to make an import fail
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


@lru_cache(maxsize=4)
def _build_pipeline(key: str | None) -> Language:
    # Imported here: spaCy/medspaCy take about a second to import, and only this stage needs them.
    with _torch_left_out():
        import spacy
    from medspacy.context import ConText, ConTextRule
    from medspacy.target_matcher import TargetMatcher, TargetRule
    from spacy.language import Language

    rules = load_rules(key)
    if SENTENCE_BOUNDARY_PIPE not in Language.factories:
        Language.component(SENTENCE_BOUNDARY_PIPE, func=_mark_line_breaks)
    nlp = spacy.blank("en")
    nlp.add_pipe(SENTENCE_BOUNDARY_PIPE)
    nlp.add_pipe("sentencizer")
    matcher: TargetMatcher = nlp.add_pipe("medspacy_target_matcher")
    target_rules = []
    for flag in rules.flags:
        for term in flag.targets:
            pattern = [dict(token) for token in term.pattern] if term.pattern else None
            target_rules.append(TargetRule(term.literal, flag.name, pattern=pattern))
        target_rules += [TargetRule(phrase, NOT_THIS_LABEL) for phrase in flag.not_this]
    matcher.add(target_rules)
    context: ConText = nlp.add_pipe(CONTEXT_PIPE, config={"rules": "default"})
    context.add(
        [
            ConTextRule(
                rule.literal,
                rule.category,
                pattern=[dict(token) for token in rule.pattern] if rule.pattern else None,
                direction=rule.direction,
                allowed_types=set(rule.allowed_types) or None,
                max_scope=rule.max_scope,
            )
            for rule in rules.context_rules
        ]
    )
    return nlp


# --- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModifierHit:
    """A ConText modifier that applied to a mention: its category, the rule's literal and its character span.

    ``rule`` is the rule file's / medspaCy's literal (e.g. "deny", "no history of"), never note text; a
    ``section:`` rule means the mention lies in a family-history section.
    """

    category: str
    rule: str
    start: int
    end: int


@dataclass(frozen=True)
class Mention:
    """One mention of a flag in one note: where it is (character offsets) and what ConText made of it."""

    note_id: str
    flag: str
    start: int  # character offsets of the matched term in the note text
    end: int
    sentence_start: int  # character offsets of its sentence
    sentence_end: int
    assertion: Assertion
    counts: bool
    modifiers: tuple[ModifierHit, ...] = ()  # every modifier that applied
    excluded_by: tuple[ModifierHit, ...] = ()  # the modifiers that made it not count (empty when it counts)


@dataclass(frozen=True)
class CodedEvidence:
    """A Condition whose code maps to a flag, with its statuses and whether it counts (and why not)."""

    condition_id: str | None
    flag: str
    system: str
    code: str
    clinical_status: str | None
    verification_status: str | None
    counts: bool
    reason: str  # "active", "inactive counts for this flag", or why it does not count


@dataclass(frozen=True)
class FlagEvidence:
    """The decision for one flag of one patient and everything behind it."""

    present: bool
    source: Source | None  # where the counting evidence came from; None when the flag is absent
    mentions: tuple[Mention, ...] = ()
    coded: tuple[CodedEvidence, ...] = ()


@dataclass(frozen=True)
class PatientComorbidities:
    """Per flag: the :class:`FlagEvidence`; plus what was read (to tell "absent" from "nothing to read").

    ``note_ids`` are the notes that had text; ``condition_ids`` every Condition given (mapped to a flag or not).
    """

    flags: Mapping[str, FlagEvidence]
    note_ids: tuple[str, ...] = ()
    condition_ids: tuple[str, ...] = ()

    @property
    def has_sources(self) -> bool:
        """True when at least one note or one Condition was read."""
        return bool(self.note_ids or self.condition_ids)

    def as_booleans(self, names: Iterable[str] | None = None) -> dict[str, bool] | None:
        """flag -> present, or None when there was nothing to read (the flags are then missing, not False).

        ``names`` picks flags (e.g. a feature spec's ``flags``, which
        :func:`riskbridge.harmonize.features.build_vector` takes as is); a name the rule file does not define
        raises ``KeyError`` rather than reading as absent.
        """
        if not self.has_sources:
            return None
        chosen = list(self.flags) if names is None else list(names)
        unknown = [name for name in chosen if name not in self.flags]
        if unknown:
            raise KeyError(f"no such comorbidity flag(s) in the rule file: {', '.join(unknown)}")
        return {name: self.flags[name].present for name in chosen}


# --- text ------------------------------------------------------------------------------------------------


def _family_sections(text: str, headers: Sequence[str]) -> list[tuple[int, int]]:
    """Character ranges of family-history sections: from such a header to the next header or blank line."""
    if not headers:
        return []
    header_matches = list(HEADER_LINE.finditer(text))
    blank_starts = [m.start() for m in BLANK_LINE.finditer(text)]
    ranges = []
    for index, match in enumerate(header_matches):
        if match.group(1).strip().lower() not in headers:
            continue
        end = len(text)
        if index + 1 < len(header_matches):
            end = header_matches[index + 1].start()
        end = min([end, *(b for b in blank_starts if b > match.end())])
        ranges.append((match.end(), end))
    return ranges


def _assertion(flag: FlagRule, categories: set[str]) -> tuple[Assertion, set[str]]:
    """The assertion of a mention from its modifier categories, and the categories that exclude it."""
    for category, assertion in EXCLUDING_CATEGORIES:
        if category in categories:
            return assertion, {category}
    if HISTORICAL_CATEGORY in categories and CURRENT_CATEGORY not in categories:
        return "historical", set() if flag.historical_counts else {HISTORICAL_CATEGORY}
    return "present", set()


def _stripped_bounds(span: Span) -> tuple[int, int]:
    """Character bounds of a span without its leading/trailing whitespace (sentences start at line breaks)."""
    text = span.text
    return span.start_char + len(text) - len(text.lstrip()), span.end_char - len(text) + len(text.rstrip())


def _doc_mentions(
    doc: Doc, note_id: str, rules: RuleSet, context: Any, family_ranges: Sequence[tuple[int, int]]
) -> list[Mention]:
    """Run ConText on the sentences of ``doc`` that hold a target and turn each target into a :class:`Mention`.

    ConText's token matcher costs about 4 ms per 90-token note when run over the whole note; its scopes never
    cross a sentence, so running it on only the sentences with a target gives the same result 2-3x faster.
    """
    by_sentence: dict[int, list[Span]] = {}
    for entity in doc.ents:
        if entity.label_ != NOT_THIS_LABEL:
            by_sentence.setdefault(entity.sent.start, []).append(entity)
    mentions = []
    for sentence_start, entities in by_sentence.items():
        sentence = doc[sentence_start].sent
        # A target that runs past its sentence's end keeps its last tokens in the piece given to ConText.
        piece = doc[sentence.start : max(sentence.end, *(entity.end for entity in entities))]
        piece_doc = context(piece.as_doc())
        offset = piece.start_char
        sentence_bounds = _stripped_bounds(sentence)
        # The piece's entities by their offsets in the note (the piece also holds not-this spans).
        in_piece = {(offset + e.start_char, offset + e.end_char): e for e in piece_doc.ents}
        for entity in entities:
            piece_entity = in_piece[(entity.start_char, entity.end_char)]
            flag = rules.flag(entity.label_)
            hits = []
            for modifier in piece_entity._.modifiers:
                start, end = modifier.modifier_span
                trigger = piece_doc[start:end]
                hits.append(
                    ModifierHit(
                        modifier.category.upper(),
                        modifier.rule.literal,
                        offset + trigger.start_char,
                        offset + trigger.end_char,
                    )
                )
            for section_start, section_end in family_ranges:
                if section_start <= entity.start_char < section_end:
                    hits.append(ModifierHit("FAMILY", "section:family history", section_start, section_end))
            assertion, excluding = _assertion(flag, {hit.category for hit in hits})
            mentions.append(
                Mention(
                    note_id=note_id,
                    flag=flag.name,
                    start=entity.start_char,
                    end=entity.end_char,
                    sentence_start=sentence_bounds[0],
                    sentence_end=sentence_bounds[1],
                    assertion=assertion,
                    counts=not excluding,
                    modifiers=tuple(hits),
                    excluded_by=tuple(hit for hit in hits if hit.category in excluding),
                )
            )
    mentions.sort(key=lambda mention: mention.start)
    return mentions


def note_mentions(
    notes: Iterable[tuple[str, str]], rules_path: str | Path | None = None, batch_size: int = 64
) -> dict[str, list[Mention]]:
    """Every flag mention in every note, by note id (notes with no mention map to an empty list).

    ``notes`` are ``(note_id, text)`` pairs. The texts go through the cached pipeline with ``nlp.pipe`` up to
    the TargetMatcher; ConText then runs on the sentences that hold a target. Empty texts are skipped (they
    still appear in the result, with no mentions). A note id given twice is read once.
    """
    rules = load_rules(rules_path)
    nlp = build_pipeline(rules_path)
    context = nlp.get_pipe(CONTEXT_PIPE)
    ids: list[str] = []
    texts: list[str] = []
    result: dict[str, list[Mention]] = {}
    for note_id, text in notes:
        if note_id in result:
            continue  # the same note handed over twice is read once (the first text wins)
        result[note_id] = []
        if text and text.strip():
            ids.append(note_id)
            texts.append(text)
    started = time.perf_counter()
    docs = nlp.pipe(texts, batch_size=batch_size, disable=[CONTEXT_PIPE])
    for note_id, text, doc in zip(ids, texts, docs, strict=True):
        family = _family_sections(text, rules.family_section_headers)
        result[note_id].extend(_doc_mentions(doc, note_id, rules, context, family))
    seconds = time.perf_counter() - started
    # Counts only: note text (and anything cut from it) is PHI.
    logger.debug(
        "notes: %d notes, %d mentions in %.3f s",
        len(texts),
        sum(len(found) for found in result.values()),
        seconds,
    )
    return result


# --- coded Conditions ------------------------------------------------------------------------------------


def _status_code(concept: Any) -> str | None:
    """The first coding's code of a CodeableConcept dict (Condition.clinicalStatus / verificationStatus)."""
    if not isinstance(concept, Mapping):
        return None
    for coding in concept.get("coding") or ():
        if isinstance(coding, Mapping) and coding.get("code"):
            return str(coding["code"])
    return None


def condition_known_from(condition: Mapping[str, Any], zone: str | tzinfo) -> datetime | None:
    """The earliest time a Condition can have been known: its recordedDate, else its onset (onsetDateTime or
    onsetPeriod.start); the start of a partial date (a day, in ``zone``). None when it says neither, or malformed."""
    onset_period = condition.get("onsetPeriod")
    candidates = (
        condition.get("recordedDate"),
        condition.get("onsetDateTime"),
        onset_period.get("start") if isinstance(onset_period, Mapping) else None,
    )
    for value in candidates:
        if isinstance(value, str) and value.strip():
            try:
                return parse_fhir_datetime(value, zone).start
            except ValueError:
                return None
    return None


def _recorded_after(condition: Mapping[str, Any], known_at: datetime, zone: str | tzinfo) -> bool:
    known_from = condition_known_from(condition, zone)
    return known_from is not None and known_from > known_at


def coded_evidence(
    conditions: Iterable[Mapping[str, Any]],
    rules_path: str | Path | None = None,
    known_at: datetime | None = None,
    zone: str | tzinfo = "UTC",
) -> list[CodedEvidence]:
    """Map Condition resources (plain dicts) to flags; one entry per (Condition, flag) its codes assert.

    A Condition counts when its verificationStatus is not refuted / entered-in-error / unconfirmed /
    provisional / differential (absent means confirmed), and its clinicalStatus is active, recurrence or
    relapse; inactive, remission or resolved count only for flags with ``coded_inactive_counts`` (prior MI,
    prior malignancy). A Condition without clinicalStatus counts unless it has an abatement (R4 requires the
    status, but some feeds leave it out on current problem-list entries).

    With ``known_at`` (the scan's index time), a Condition recorded after it never counts, whatever its onset: a
    backfill or a training export must not see a diagnosis the scan's night could not have seen (the outcome
    itself, for one). One without recordedDate or onset counts as the rules above say (a problem-list entry).
    """
    rules = load_rules(rules_path)
    found: list[CodedEvidence] = []
    for condition in conditions:
        if not isinstance(condition, Mapping) or condition.get("resourceType", "Condition") != "Condition":
            continue
        clinical = _status_code(condition.get("clinicalStatus"))
        verification = _status_code(condition.get("verificationStatus"))
        abated = any(key.startswith("abatement") for key in condition)
        late = known_at is not None and _recorded_after(condition, known_at, zone)
        code_concept = condition.get("code")
        codings = code_concept.get("coding") if isinstance(code_concept, Mapping) else None
        seen: set[str] = set()
        for coding in codings or ():
            if not isinstance(coding, Mapping) or not coding.get("code"):
                continue
            kind = rules.system_kind(coding.get("system"))
            if kind is None:
                continue
            code = str(coding["code"])
            for flag in rules.flags:
                if flag.name in seen or not flag.matches_code(kind, code):
                    continue
                seen.add(flag.name)
                counts, reason = _coded_decision(flag, clinical, verification, abated)
                if late:
                    counts, reason = False, "recorded after the index time"
                found.append(
                    CodedEvidence(
                        condition_id=condition.get("id"),
                        flag=flag.name,
                        system=str(coding.get("system")),
                        code=code,
                        clinical_status=clinical,
                        verification_status=verification,
                        counts=counts,
                        reason=reason,
                    )
                )
    return found


def _coded_decision(flag: FlagRule, clinical: str | None, verification: str | None, abated: bool) -> tuple[bool, str]:
    if verification in EXCLUDED_VERIFICATION_STATUSES:
        return False, f"verificationStatus {verification}"
    if clinical in ACTIVE_CLINICAL_STATUSES:
        return True, f"clinicalStatus {clinical}"
    if clinical in INACTIVE_CLINICAL_STATUSES or (clinical is None and abated):
        status = clinical or "absent, abated"
        if flag.coded_inactive_counts:
            return True, f"clinicalStatus {status}; counts for {flag.name}"
        return False, f"clinicalStatus {status}"
    if clinical is None:
        return True, "clinicalStatus absent, no abatement"
    return False, f"clinicalStatus {clinical} not recognized"


# --- merge -----------------------------------------------------------------------------------------------


def merge_flags(
    mentions: Iterable[Mention], coded: Iterable[CodedEvidence], rules_path: str | Path | None = None
) -> dict[str, FlagEvidence]:
    """Per flag of the rule file: present if any mention or Condition counts; the source says which did."""
    rules = load_rules(rules_path)
    by_flag_mentions: dict[str, list[Mention]] = {name: [] for name in rules.flag_names}
    by_flag_coded: dict[str, list[CodedEvidence]] = {name: [] for name in rules.flag_names}
    for mention in mentions:
        by_flag_mentions[mention.flag].append(mention)
    for item in coded:
        by_flag_coded[item.flag].append(item)
    result = {}
    for name in rules.flag_names:
        text = any(m.counts for m in by_flag_mentions[name])
        code = any(c.counts for c in by_flag_coded[name])
        source: Source | None = "both" if text and code else "text" if text else "coded" if code else None
        result[name] = FlagEvidence(
            present=text or code,
            source=source,
            mentions=tuple(by_flag_mentions[name]),
            coded=tuple(by_flag_coded[name]),
        )
    return result


@dataclass
class _PatientInputs:
    note_ids: list[str] = field(default_factory=list)
    conditions: list[Mapping[str, Any]] = field(default_factory=list)


def extract_comorbidities_batch(
    notes_by_patient: Mapping[str, Iterable[tuple[str, str]]],
    conditions_by_patient: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
    rules_path: str | Path | None = None,
    index_times: Mapping[str, datetime] | None = None,
    zone: str | tzinfo = "UTC",
) -> dict[str, PatientComorbidities]:
    """Comorbidity flags of many patients; all their notes go through one ``nlp.pipe`` run.

    ``notes_by_patient``: patient key -> ``(note_id, text)`` pairs (note ids unique across patients);
    ``conditions_by_patient``: patient key -> Condition dicts. Patients in either mapping get a result.
    ``index_times``: patient key -> the scan's index time; a Condition recorded after it does not count
    (:func:`coded_evidence`). ``zone`` reads partial FHIR dates.
    """
    index_times = index_times or {}
    conditions_by_patient = conditions_by_patient or {}
    inputs: dict[str, _PatientInputs] = {}
    all_notes: list[tuple[str, str]] = []
    owner: dict[str, str] = {}
    for patient, notes in notes_by_patient.items():
        entry = inputs.setdefault(patient, _PatientInputs())
        for note_id, text in notes:
            if owner.setdefault(note_id, patient) != patient:
                raise ValueError(f"note id {note_id!r} belongs to two patients")
            # A note without text was not read: a patient whose notes are all empty has missing flags.
            if text and text.strip() and note_id not in entry.note_ids:
                entry.note_ids.append(note_id)
            all_notes.append((note_id, text))
    for patient, conditions in conditions_by_patient.items():
        inputs.setdefault(patient, _PatientInputs()).conditions.extend(conditions)
    mentions = note_mentions(all_notes, rules_path)
    result = {}
    for patient, entry in inputs.items():
        patient_mentions = [m for note_id in entry.note_ids for m in mentions[note_id]]
        known_at = index_times.get(patient)
        coded = coded_evidence(entry.conditions, rules_path, known_at, zone)
        # A Condition recorded after the scan was not there to read: it makes no missing flags present-and-false.
        read = [c for c in entry.conditions if known_at is None or not _recorded_after(c, known_at, zone)]
        result[patient] = PatientComorbidities(
            flags=merge_flags(patient_mentions, coded, rules_path),
            note_ids=tuple(entry.note_ids),
            condition_ids=tuple(str(c.get("id")) for c in read),
        )
    return result


def extract_comorbidities(
    notes: Iterable[tuple[str, str]],
    conditions: Iterable[Mapping[str, Any]] = (),
    rules_path: str | Path | None = None,
) -> PatientComorbidities:
    """Comorbidity flags of one patient from ``(note_id, text)`` pairs and Condition dicts."""
    return extract_comorbidities_batch({"patient": notes}, {"patient": conditions}, rules_path)["patient"]
