"""The select stage: each matched study's series chosen by the rules, with a recorded decision for every series.

:func:`select_study` is the one selection path, shared by the pipeline and ``riskbridge imaging``: SERIES-level
C-FIND, completion of the attributes the PACS left out (one IMAGE-level C-FIND per series that needs it), then,
for what a strict PACS returns at neither level, the header of one sampled instance
(:class:`riskbridge.connectors.sampling.HeaderSampler`, ``[pacs] header_sampling``), then
:func:`riskbridge.harmonize.series.select_series`. The choice, every series' decision with the source of each
attribute it judged, the chosen series' instance count (what its retrieval must deliver) and what sampling cost go
to ``selections`` and ``series_decisions``; a study without a usable series is quarantined ``no_usable_series``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from riskbridge.connectors import query
from riskbridge.connectors.sampling import HeaderSampler
from riskbridge.harmonize.series import RuleSet, SelectionResult, load_default_rules, load_rules, select_series
from riskbridge.ledger import Ledger, record_quarantine
from riskbridge.records import SeriesRef, uid_hash
from riskbridge.settings import PacsSettings, names_a_file
from riskbridge.stages.base import Cursor, Progress, StageContext

LOG = logging.getLogger(__name__)

NAME = "select"


def load_rule_set(spec: str) -> RuleSet:
    """Load the rules named by ``spec``: a shipped rule set (``chest_ct``) or the path of a YAML rule file."""
    if names_a_file(spec):
        return load_rules(Path(spec))
    return load_default_rules(spec)


@dataclass(frozen=True)
class StudySelection:
    """One study's selection with what it was judged on: the instance count and attribute sources the PACS gave for
    each candidate series, and the series sampled for their headers and the seconds that took."""

    selection: SelectionResult
    instance_counts: Mapping[str, int] = field(default_factory=dict)
    sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    sampled_series: int = 0
    sampling_seconds: float = 0.0

    @property
    def expected(self) -> int | None:
        """The chosen series' instance count (what its retrieval must deliver); None without a choice or a count."""
        chosen = self.selection.chosen
        return self.instance_counts.get(chosen.series_uid) if chosen is not None else None


def select_study(
    pacs: PacsSettings, study_uid: str, rule_set: RuleSet, sampler: HeaderSampler | None = None
) -> StudySelection:
    """List a study's series, complete what the rules need (IMAGE-level C-FIND, then a sampled header when the
    ``sampler`` allows it), and decide: every series gets a decision."""
    started = time.perf_counter()
    sampled_before = sampler.stats.series if sampler is not None else 0
    candidates = query.find_complete_series(pacs, study_uid, rule_set.needed_attributes, keywords=rule_set.keywords)
    if sampler is not None:
        candidates = [_sampled(sampler, series, rule_set) for series in candidates]
    sampled = sampler.stats.series - sampled_before if sampler is not None else 0
    result = select_series(study_uid, candidates, rule_set)
    if result.chosen is None:
        LOG.info("study %s: no usable series: %s", uid_hash(study_uid), result.reason)
    else:
        LOG.info("study %s: chose series %s", uid_hash(study_uid), uid_hash(result.chosen.series_uid))
    return StudySelection(
        result,
        {series.series_uid: series.instance_count for series in candidates if series.instance_count},
        {series.series_uid: dict(series.sources) for series in candidates},
        sampled,
        round(time.perf_counter() - started, 3) if sampled else 0.0,
    )


def _sampled(sampler: HeaderSampler, series: SeriesRef, rule_set: RuleSet) -> SeriesRef:
    """The series completed from a sampled header when the rules still lack an attribute (or sampling is
    ``always``); a series the rules already reject on what the PACS returned is not sampled."""
    wanted = rule_set.needed_attributes(series)
    if sampler.mode == "always" and not rule_set.failures(series):
        wanted = rule_set.keywords
    return sampler.complete(series, wanted) if wanted or sampler.mode == "always" else series


def pending(ledger: Ledger, run_id: int) -> list[str]:
    """Matched studies of the run without a selection."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT d.study_uid FROM identity_decisions d
               LEFT JOIN selections s USING (run_id, study_uid)
               WHERE d.run_id = %s AND d.outcome = 'matched' AND s.study_uid IS NULL ORDER BY d.study_uid""",
            (run_id,),
        )
        return [r["study_uid"] for r in cursor.fetchall()]


def record(ledger: Ledger, run_id: int, study: StudySelection) -> None:
    """Record a study's selection with every series decision and the source of each attribute judged; a study
    without a usable series is quarantined ``no_usable_series``."""
    selection = study.selection
    chosen = selection.chosen
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO selections (run_id, study_uid, rule_set, chosen_series_uid, expected_instances, reason,
                   sampled_series, sampling_seconds)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
            (
                run_id,
                selection.study_uid,
                selection.rule_set,
                chosen.series_uid if chosen else None,
                study.expected,
                selection.reason,
                study.sampled_series,
                study.sampling_seconds,
            ),
        )
        if not cursor.rowcount:
            return
        for decision in selection.decisions:
            judged_sources = {
                keyword: source
                for keyword, source in study.sources.get(decision.series_uid, {}).items()
                if keyword in decision.judged
            }
            cursor.execute(
                """INSERT INTO series_decisions (run_id, study_uid, series_uid, chosen, rule, reason, rank, judged,
                       sources)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (
                    run_id,
                    selection.study_uid,
                    decision.series_uid,
                    decision.chosen,
                    decision.rule,
                    decision.reason,
                    decision.rank,
                    json.dumps(dict(decision.judged), default=str),
                    json.dumps(judged_sources),
                ),
            )
        if chosen is None:
            record_quarantine(cursor, run_id, selection.study_uid, NAME, "no_usable_series", selection.reason)


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Choose each matched study's series by the rules (every series' decision recorded), or quarantine it."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    studies = pending(ledger, run_id)
    if not studies:
        return counts
    settings = context.settings
    pacs = settings.pacs
    with HeaderSampler(pacs, settings.staging_dir, pacs.header_sampling, pacs.header_sample_limit) as sampler:
        for done, study_uid in enumerate(studies, start=1):
            study = select_study(pacs, study_uid, context.rules, sampler)
            record(ledger, run_id, study)
            counts["done" if study.selection.chosen is not None else "quarantined"] += 1
            if progress:
                progress(done, len(studies))
    if sampler.stats.series:
        LOG.info("run %d select: %d series sampled in %.1f s", run_id, sampler.stats.series, sampler.stats.seconds)
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Studies with a chosen series (done) and without one (quarantined)."""
    cursor.execute(
        "SELECT chosen_series_uid IS NOT NULL AS chosen, count(*) AS n FROM selections WHERE run_id = %s GROUP BY 1",
        (run_id,),
    )
    found: Counter[str] = Counter()
    for row in cursor.fetchall():
        found["done" if row["chosen"] else "quarantined"] += int(row["n"])
    return found
