"""Declarative series selection: which series of a study the model reads, decided by rules in a YAML file.

A rule file names a rule set, lists **rules** every acceptable series must pass, and **rank** keys that order
the accepted ones (docs/series-selection.md has the format). :func:`select_series` is pure: it judges the
:class:`~riskbridge.records.SeriesRef` candidates a SERIES-level C-FIND returned and gives every candidate a
:class:`~riskbridge.records.SeriesDecision` (chosen, accepted runner-up, or rejected with the rule and the values
judged), in a :class:`SelectionResult` that explains a skipped study. Fetching what a PACS leaves out at SERIES
level is the connectors' job (:func:`riskbridge.connectors.query.find_complete_series`), guided by
:meth:`RuleSet.needed_attributes`.

The rules themselves (:class:`RuleSet`, :class:`Rule`, :class:`RankKey`; operators ``equals``, ``one_of``,
``matches`` / ``not_matches``, ``min`` / ``max``, ``includes`` / ``excludes``, ``orientation`` /
``max_obliquity_deg``, ``present``, and ``missing``) live in :mod:`riskbridge.harmonize.series_rules`; reading a
rule file into them (:func:`load_rules`, :func:`load_default_rules`, :class:`RuleFileError`) in
:mod:`riskbridge.harmonize.series_rule_file`. Both are importable from here too.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from riskbridge.harmonize.rule_file import RuleFileError
from riskbridge.harmonize.series_rule_file import (
    DEFAULT_RULES,
    load_default_rules,
    load_rules,
    parse_rules,
    parse_rules_text,
    shipped_rule_files,
)
from riskbridge.harmonize.series_rules import (
    OBLIQUE,
    ORIENTATIONS,
    RULE_OPERATORS,
    RankKey,
    Rule,
    RuleSet,
    series_value,
    show_value,
    slice_orientation,
)
from riskbridge.records import SeriesDecision, SeriesRef, uid_hash

__all__ = [
    "DEFAULT_RULES",
    "OBLIQUE",
    "ORIENTATIONS",
    "RULE_OPERATORS",
    "RankKey",
    "Rule",
    "RuleFileError",
    "RuleSet",
    "SelectionResult",
    "load_default_rules",
    "load_rules",
    "parse_rules",
    "parse_rules_text",
    "select_series",
    "series_value",
    "shipped_rule_files",
    "slice_orientation",
]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionResult:
    """The outcome of series selection for one study: a decision per candidate, and why, or why it is skipped."""

    study_uid: str
    rule_set: str
    decisions: tuple[SeriesDecision, ...]  # chosen, runners-up by rank, then rejected by SeriesNumber
    reason: str
    rejected_by: Mapping[str, int] = field(default_factory=dict)  # rule name -> series it rejected first

    @property
    def chosen(self) -> SeriesDecision | None:
        """The decision of the chosen series, or None when the study is skipped."""
        return next((decision for decision in self.decisions if decision.chosen), None)

    @property
    def skipped(self) -> bool:
        """True when no series is acceptable (``reason`` says why)."""
        return self.chosen is None

    @property
    def accepted(self) -> tuple[SeriesDecision, ...]:
        """Decisions of every acceptable series, best first (the chosen one, then runners-up)."""
        return tuple(decision for decision in self.decisions if decision.rank is not None)

    @property
    def rejected(self) -> tuple[SeriesDecision, ...]:
        """Decisions of the rejected series."""
        return tuple(decision for decision in self.decisions if decision.rank is None)

    def decision_for(self, series_uid: str) -> SeriesDecision:
        """The decision about one series; KeyError when it was no candidate."""
        for decision in self.decisions:
            if decision.series_uid == series_uid:
                return decision
        raise KeyError(f"series {uid_hash(series_uid)} was not a candidate")


def _runner_up_reason(rule_set: RuleSet, series: SeriesRef, chosen: SeriesRef, rank: int, total: int) -> str:
    for key in rule_set.rank:
        mine = series_value(series, key.attribute)
        theirs = series_value(chosen, key.attribute)
        if key.sort_value(mine) != key.sort_value(theirs):
            return (
                f"accepted, rank {rank} of {total}: behind the chosen series on {key.attribute} "
                f"({key.describe(mine)} vs {key.describe(theirs)})"
            )
    if series.series_number != chosen.series_number:
        decider = f"SeriesNumber {show_value(series.series_number)} vs {show_value(chosen.series_number)} decides"
    else:
        decider = "SeriesInstanceUID order decides"
    return f"accepted, rank {rank} of {total}: tied with the chosen series on every ranking key; {decider}"


def select_series(study_uid: str, candidates: Iterable[SeriesRef], rule_set: RuleSet) -> SelectionResult:
    """Judge every candidate series of one study by ``rule_set``; choose the best-ranked acceptable one.

    Pure: no I/O. Candidates of another study raise ValueError; a series UID listed twice is judged once.
    """
    unique: dict[str, SeriesRef] = {}
    for series in candidates:
        if series.study_uid and series.study_uid != study_uid:
            raise ValueError(
                f"series {uid_hash(series.series_uid)} belongs to another study, not {uid_hash(study_uid)}"
            )
        if series.series_uid in unique:
            LOG.warning(
                "study %s: series %s listed twice; judged once", uid_hash(study_uid), uid_hash(series.series_uid)
            )
            continue
        unique[series.series_uid] = series

    accepted: list[SeriesRef] = []
    rejected: list[SeriesDecision] = []
    rejected_by: Counter[str] = Counter()
    for series in unique.values():
        failures = rule_set.failures(series)
        if not failures:
            accepted.append(series)
            continue
        first_rule = failures[0][0].name
        rejected_by[first_rule] += 1
        rejected.append(
            SeriesDecision(
                study_uid=study_uid,
                series_uid=series.series_uid,
                chosen=False,
                rule=first_rule,
                reason="; ".join(f"{rule.name}: {why}" for rule, why in failures),
                rank=None,
                judged=rule_set.judged(series),
            )
        )
    accepted.sort(key=rule_set.sort_key)
    rejected.sort(key=lambda d: rule_set.sort_key(unique[d.series_uid])[-2:])

    decisions: list[SeriesDecision] = []
    for rank, series in enumerate(accepted, start=1):
        if rank == 1:
            shown = "; ".join(key.describe(series_value(series, key.attribute)) for key in rule_set.rank)
            reason = f"chosen: passes all {len(rule_set.rules)} rules, rank 1 of {len(accepted)}"
            reason += f" ({shown})" if shown else ""
        else:
            reason = _runner_up_reason(rule_set, series, accepted[0], rank, len(accepted))
        decisions.append(
            SeriesDecision(
                study_uid=study_uid,
                series_uid=series.series_uid,
                chosen=rank == 1,
                rule=rule_set.label,
                reason=reason,
                rank=rank,
                judged=rule_set.judged(series),
            )
        )
    decisions.extend(rejected)

    if accepted:
        summary = f"chose 1 of {len(unique)} series ({len(accepted) - 1} runner-up, {len(rejected)} rejected)"
    elif not unique:
        summary = f"skipped: the study has no series to judge by {rule_set.label}"
    else:
        counts = ", ".join(f"{rule} {count}" for rule, count in sorted(rejected_by.items()))
        summary = f"skipped: none of the {len(unique)} series passes {rule_set.label} (rejected first by: {counts})"
    LOG.info("study %s: %s", uid_hash(study_uid), summary)
    return SelectionResult(
        study_uid=study_uid,
        rule_set=rule_set.label,
        decisions=tuple(decisions),
        reason=summary,
        rejected_by=dict(rejected_by),
    )
