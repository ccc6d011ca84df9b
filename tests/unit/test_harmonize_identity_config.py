"""Identity configuration (riskbridge.harmonize.identity_config): identifier normalization and the checks that
refuse an unusable configuration when it is built."""

from __future__ import annotations

import pytest

from riskbridge.harmonize.identity_config import (
    DemographicPolicy,
    FallbackPolicy,
    IdentifierNormalization,
    IdentityConfig,
)

MRN = "http://hospital.example/mrn"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1234567", "1234567"),
        (" 12 34567 ", "1234567"),
        ("0001234567", "1234567"),
        ("H1-1234567", "1234567"),
        ("h1-0001234567", "1234567"),
        ("ab123", "AB123"),
        ("0000", "0"),
        ("H1-", ""),
    ],
)
def test_default_normalization(raw: str, expected: str) -> None:
    assert IdentifierNormalization().normalize(raw) == expected


def test_normalization_steps_can_be_switched_off() -> None:
    plain = IdentifierNormalization(uppercase=False, site_prefix_pattern=None, strip_leading_zeros=False)
    assert plain.normalize(" h1-007 ") == "h1-007"
    assert IdentifierNormalization(site_prefix_pattern=r"^MRN:").normalize("MRN:0042") == "42"
    with pytest.raises(Exception, match=r"unterminated|missing"):
        IdentifierNormalization(site_prefix_pattern="(")


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="default_issuer"):
        IdentityConfig(issuer_systems={"A": MRN}, default_issuer="B")
    with pytest.raises(ValueError, match="max_link_depth"):
        IdentityConfig(issuer_systems={"A": MRN}, max_link_depth=-1)


def test_policy_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="name_threshold"):
        DemographicPolicy(name_threshold=1.5)
    with pytest.raises(ValueError, match="review_threshold"):
        FallbackPolicy(enabled=True, link_threshold=0.8, review_threshold=0.9)
