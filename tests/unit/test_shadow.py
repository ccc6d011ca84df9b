"""Shadow comparison arithmetic (riskbridge.stages.shadow), without a ledger."""

from __future__ import annotations

import pytest

from riskbridge.stages.shadow import ShadowComparison, ShadowError, auroc


def test_a_candidate_that_ranks_alike_has_spearman_one_and_its_differences_are_averaged() -> None:
    pairs = (("a", 0.1, 0.2), ("b", 0.4, 0.5), ("c", 0.7, 0.9), ("d", 0.8, 0.95))
    comparison = ShadowComparison("cand 1.0 0123456789ab", failed=1, pairs=pairs, risk_agreement=0.75)
    assert comparison.scored == 4 and comparison.spearman == pytest.approx(1.0)
    assert comparison.mean_abs_difference == pytest.approx((0.1 + 0.1 + 0.2 + 0.15) / 4)
    reversed_pairs = tuple((uid, a, 1 - c) for uid, a, c in pairs)
    assert ShadowComparison("x", 0, reversed_pairs).spearman == pytest.approx(-1.0)
    assert ShadowComparison("x", 0, pairs[:2]).spearman is None  # too few to rank
    assert ShadowComparison("x", 0, ()).mean_abs_difference is None


def test_auroc_counts_ties_half_and_needs_both_outcomes() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    with pytest.raises(ShadowError, match="both outcomes"):
        auroc([0.2, 0.3], [1, 1])
    pairs = (("a", 0.1, 0.9), ("b", 0.4, 0.1), ("c", 0.7, 0.2), ("d", 0.9, 0.3))
    versus = ShadowComparison("x", 0, pairs).auroc({"a": 0, "b": 0, "c": 1, "d": 1, "other": 1})
    assert versus == (pytest.approx(1.0), pytest.approx(0.5), 4)
    assert ShadowComparison("x", 0, pairs).auroc({"a": 0, "b": 0}) is None
