"""The imaging stage from Python: choose each study's series by the configured rules, then retrieve the choices.

This is the four-step path the nightly DAG and ``riskbridge imaging`` share: SERIES-level C-FIND, completion of
attributes the PACS left out (one IMAGE-level C-FIND per series that needs it), rule-based selection with a
recorded decision per series, and verified retrieval of the chosen series. No Airflow here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from riskbridge.connectors import query
from riskbridge.harmonize.series import RuleSet, SelectionResult, load_default_rules, load_rules, select_series
from riskbridge.records import RetrievedSeries, uid_hash
from riskbridge.retrieve import RetrievalFailure, retrieve_all
from riskbridge.settings import Settings, names_a_file

LOG = logging.getLogger(__name__)


def load_rule_set(spec: str) -> RuleSet:
    """Load the rules named by ``spec``: a shipped rule set (``chest_ct``) or the path of a YAML rule file."""
    if names_a_file(spec):
        return load_rules(Path(spec))
    return load_default_rules(spec)


def select_study(settings: Settings, study_uid: str, rule_set: RuleSet) -> SelectionResult:
    """List a study's series, complete what the rules need, and decide; every series gets a decision."""
    return _select(settings, study_uid, rule_set)[0]


def _select(settings: Settings, study_uid: str, rule_set: RuleSet) -> tuple[SelectionResult, dict[str, int]]:
    """The selection and the instance count the PACS gave for each candidate series."""
    candidates = query.find_complete_series(
        settings.pacs, study_uid, rule_set.needed_attributes, keywords=rule_set.keywords
    )
    counts = {series.series_uid: series.instance_count for series in candidates if series.instance_count}
    result = select_series(study_uid, candidates, rule_set)
    if result.skipped:
        LOG.info("study %s: skipped: %s", uid_hash(study_uid), result.reason)
    else:
        assert result.chosen is not None
        LOG.info("study %s: chose series %s", uid_hash(study_uid), uid_hash(result.chosen.series_uid))
    return result, counts


@dataclass(frozen=True)
class StudyImaging:
    """One study's imaging outcome: the selection and, when a series was chosen, its retrieval."""

    selection: SelectionResult
    retrieval: RetrievedSeries | RetrievalFailure | None  # None: skipped by selection

    @property
    def ready(self) -> bool:
        """True when the chosen series is staged complete."""
        return isinstance(self.retrieval, RetrievedSeries) and self.retrieval.complete


def select_and_retrieve(
    settings: Settings,
    study_uids: Sequence[str],
    rule_set: RuleSet,
    transport: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[StudyImaging]:
    """Select a series in each study, then retrieve every chosen series (``settings.pacs.workers`` at once).

    The instance counts of the SERIES-level C-FIND set what each retrieval must deliver (see
    :meth:`riskbridge.retrieve.Retriever.retrieve`).
    """
    selections: list[SelectionResult] = []
    counts: dict[str, int] = {}
    for study_uid in study_uids:
        selection, study_counts = _select(settings, study_uid, rule_set)
        selections.append(selection)
        counts.update(study_counts)
    chosen = [(s.study_uid, s.chosen.series_uid) for s in selections if s.chosen is not None]
    retrieved = retrieve_all(settings, chosen, transport, progress, counts) if chosen else []
    by_series = {(r.study_uid, r.series_uid): r for r in retrieved}
    return [
        StudyImaging(s, by_series[(s.study_uid, s.chosen.series_uid)] if s.chosen is not None else None)
        for s in selections
    ]
