"""The select stage: each matched study's series chosen by the rules, with a recorded decision for every series.

:func:`select_study` is the one selection path, shared by the pipeline and ``riskbridge imaging``: SERIES-level
C-FIND, completion of the attributes the PACS left out (one IMAGE-level C-FIND per series that needs it), then
:func:`riskbridge.harmonize.series.select_series`. The choice, every series' decision and the chosen series'
instance count (what its retrieval must deliver) go to ``selections`` and ``series_decisions``; a study without a
usable series is quarantined ``no_usable_series``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from riskbridge.connectors import query
from riskbridge.harmonize.series import RuleSet, SelectionResult, load_default_rules, load_rules, select_series
from riskbridge.ledger import Ledger, record_quarantine
from riskbridge.records import uid_hash
from riskbridge.settings import PacsSettings, names_a_file
from riskbridge.stages.base import Cursor, Progress, StageContext

LOG = logging.getLogger(__name__)

NAME = "select"


def load_rule_set(spec: str) -> RuleSet:
    """Load the rules named by ``spec``: a shipped rule set (``chest_ct``) or the path of a YAML rule file."""
    if names_a_file(spec):
        return load_rules(Path(spec))
    return load_default_rules(spec)


def select_study(pacs: PacsSettings, study_uid: str, rule_set: RuleSet) -> tuple[SelectionResult, dict[str, int]]:
    """List a study's series, complete what the rules need, and decide (every series gets a decision); also return
    the instance count the PACS gave for each candidate series."""
    candidates = query.find_complete_series(pacs, study_uid, rule_set.needed_attributes, keywords=rule_set.keywords)
    instance_counts = {series.series_uid: series.instance_count for series in candidates if series.instance_count}
    result = select_series(study_uid, candidates, rule_set)
    if result.chosen is None:
        LOG.info("study %s: no usable series: %s", uid_hash(study_uid), result.reason)
    else:
        LOG.info("study %s: chose series %s", uid_hash(study_uid), uid_hash(result.chosen.series_uid))
    return result, instance_counts


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


def record(ledger: Ledger, run_id: int, selection: SelectionResult, expected: int | None) -> None:
    """Record a selection with every series decision; a study without a usable series is quarantined
    ``no_usable_series``. ``expected``: the chosen series' instance count."""
    chosen = selection.chosen
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO selections (run_id, study_uid, rule_set, chosen_series_uid, expected_instances, reason)
               VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
            (
                run_id,
                selection.study_uid,
                selection.rule_set,
                chosen.series_uid if chosen else None,
                expected,
                selection.reason,
            ),
        )
        if not cursor.rowcount:
            return
        for decision in selection.decisions:
            cursor.execute(
                """INSERT INTO series_decisions (run_id, study_uid, series_uid, chosen, rule, reason, rank, judged)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (
                    run_id,
                    selection.study_uid,
                    decision.series_uid,
                    decision.chosen,
                    decision.rule,
                    decision.reason,
                    decision.rank,
                    json.dumps(dict(decision.judged), default=str),
                ),
            )
        if chosen is None:
            record_quarantine(cursor, run_id, selection.study_uid, NAME, "no_usable_series", selection.reason)


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Choose each matched study's series by the rules (every series' decision recorded), or quarantine it."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    studies = pending(ledger, run_id)
    for done, study_uid in enumerate(studies, start=1):
        selection, instance_counts = select_study(context.settings.pacs, study_uid, context.rules)
        chosen = selection.chosen
        record(ledger, run_id, selection, instance_counts.get(chosen.series_uid) if chosen is not None else None)
        counts["done" if chosen is not None else "quarantined"] += 1
        if progress:
            progress(done, len(studies))
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
