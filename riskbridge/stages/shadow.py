"""Shadow scoring compared: how a candidate model's scores of a run relate to the active model's.

The score stage records a candidate's scores in ``shadow_scores`` (:func:`riskbridge.stages.score.score_shadow`);
:func:`shadow_comparisons` reads them beside the active scores for the run report: Spearman rank correlation, mean
absolute difference, the share with the same qualitative risk, and AUROC of both where outcomes are known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from riskbridge.errors import DataError
from riskbridge.stages.base import Cursor

__all__ = ["ShadowComparison", "auroc", "shadow_comparisons"]


class ShadowError(DataError, ValueError):
    """A comparison that cannot be computed as asked (an AUROC without both outcomes)."""


@dataclass(frozen=True)
class ShadowComparison:
    """A candidate model scored in shadow next to the active one: how many it scored and failed, and how its scores
    compare (Spearman rank correlation, mean absolute difference, share with the same qualitative risk); ``pairs``
    are (StudyInstanceUID, active, candidate probability)."""

    model: str  # "name version sha256[:12]"
    failed: int
    pairs: tuple[tuple[str, float, float], ...] = ()
    risk_agreement: float | None = None

    @property
    def scored(self) -> int:
        """Studies both models scored."""
        return len(self.pairs)

    @property
    def spearman(self) -> float | None:
        """Spearman's rank correlation of the two models' probabilities (None below three studies or for a
        constant score)."""
        if len(self.pairs) < 3:
            return None
        return _pearson(_ranks([a for _, a, _ in self.pairs]), _ranks([c for _, _, c in self.pairs]))

    @property
    def mean_abs_difference(self) -> float | None:
        """The mean absolute difference of the probabilities (None without pairs)."""
        if not self.pairs:
            return None
        return sum(abs(a - c) for _, a, c in self.pairs) / len(self.pairs)

    def auroc(self, labels: Mapping[str, int]) -> tuple[float, float, int] | None:
        """(active AUROC, candidate AUROC, studies) over the studies with a known outcome; None without both
        classes."""
        known = [(a, c, int(labels[uid])) for uid, a, c in self.pairs if uid in labels]
        ys = [y for _, _, y in known]
        if not known or len(set(ys)) < 2:
            return None
        return auroc([a for a, _, _ in known], ys), auroc([c for _, c, _ in known], ys), len(known)


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share their mean rank), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The area under the ROC curve (the Mann-Whitney statistic; ties count half)."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        raise ShadowError("an AUROC needs both outcomes")
    ranks = _ranks(list(scores))
    positive_ranks = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    n_pos, n_neg = len(positives), len(negatives)
    return (positive_ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def shadow_comparisons(cursor: Cursor, run_id: int) -> list[ShadowComparison]:
    """One :class:`ShadowComparison` per candidate model that scored the run in shadow."""
    cursor.execute(
        """SELECT h.model_name, h.model_version, h.model_sha256, h.study_uid, h.probability AS candidate,
                  h.risk AS candidate_risk, s.probability AS active, s.risk AS active_risk
           FROM shadow_scores h JOIN scores s USING (run_id, study_uid)
           WHERE h.run_id = %s ORDER BY h.model_sha256, h.study_uid""",
        (run_id,),
    )
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in cursor.fetchall():
        grouped.setdefault(f"{row['model_name']} {row['model_version']} {row['model_sha256'][:12]}", []).append(row)
    found = []
    for model, rows in grouped.items():
        scored = [r for r in rows if r["candidate"] is not None]
        agreement = sum(r["candidate_risk"] == r["active_risk"] for r in scored) / len(scored) if scored else None
        pairs = tuple((r["study_uid"], float(r["active"]), float(r["candidate"])) for r in scored)
        found.append(ShadowComparison(model, len(rows) - len(scored), pairs, agreement))
    return found
