"""Site configuration of identity matching: issuer-to-system mapping, identifier normalization, the policies.

:class:`IdentityConfig` (built from the ``[identity]`` settings by :meth:`IdentityConfig.from_settings`) says which
FHIR identifier system each IssuerOfPatientID maps to, how identifiers are normalized
(:class:`IdentifierNormalization`: whitespace, case, site prefix, leading zeros), when demographics count as
disagreeing (:class:`DemographicPolicy`) and whether and how the demographic fallback links
(:class:`FallbackPolicy`). Invalid values raise ValueError when the configuration is built, not per patient. The
matching that uses it is :mod:`riskbridge.harmonize.identity` (docs/identity.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from riskbridge.settings import IdentitySettings

__all__ = [
    "DEFAULT_SITE_PREFIX_PATTERN",
    "DemographicPolicy",
    "FallbackPolicy",
    "IdentifierNormalization",
    "IdentityConfig",
]

DEFAULT_SITE_PREFIX_PATTERN = r"^[A-Z][A-Z0-9]*-"


@dataclass(frozen=True)
class IdentifierNormalization:
    """How a PatientID (and the FHIR identifier value it is compared with) is normalized.

    Steps, in order: remove all whitespace; upper-case (when ``uppercase``); remove one site prefix matching
    ``site_prefix_pattern`` (applied to the upper-cased value; None disables it); remove leading zeros (when
    ``strip_leading_zeros``; an all-zero value keeps one zero).
    """

    uppercase: bool = True
    site_prefix_pattern: str | None = DEFAULT_SITE_PREFIX_PATTERN
    strip_leading_zeros: bool = True

    def __post_init__(self) -> None:
        if self.site_prefix_pattern is not None:
            re.compile(self.site_prefix_pattern)  # fail at configuration time, not per patient

    def normalize(self, value: str) -> str:
        """The normalized form of an identifier value ("" when nothing is left)."""
        text = "".join(value.split())
        if self.uppercase:
            text = text.upper()
        if self.site_prefix_pattern is not None:
            text = re.sub(self.site_prefix_pattern, "", text, count=1)
        if self.strip_leading_zeros and text:
            text = text.lstrip("0") or "0"
        return text


@dataclass(frozen=True)
class DemographicPolicy:
    """When the demographics of an identifier-matched Patient count as disagreeing with the PACS.

    A name disagrees when its similarity (:func:`~riskbridge.harmonize.identity_names.name_similarity`, 0..1) is
    below ``name_threshold``. Birth date and sex disagree when both sides are known and differ. ``check_*`` switch
    a check off entirely.
    """

    name_threshold: float = 0.85
    check_birth_date: bool = True
    check_sex: bool = True
    check_name: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.name_threshold <= 1.0:
            raise ValueError(f"name_threshold must lie in [0, 1] (value {self.name_threshold})")


@dataclass(frozen=True)
class FallbackPolicy:
    """The demographic fallback used only when no identifier resolved (off by default).

    Candidates must have exactly the PACS birth date (full precision on both sides) and no sex disagreement.
    A candidate scoring at least ``link_threshold`` is linked when it is the only one at or above
    ``review_threshold``; scores in ``[review_threshold, link_threshold)`` need review; lower scores are ignored.
    """

    enabled: bool = False
    link_threshold: float = 0.97
    review_threshold: float = 0.88

    def __post_init__(self) -> None:
        if not 0.0 <= self.review_threshold <= self.link_threshold <= 1.0:
            raise ValueError(
                f"need 0 <= review_threshold <= link_threshold <= 1 "
                f"(values {self.review_threshold}, {self.link_threshold})"
            )


@dataclass(frozen=True)
class IdentityConfig:
    """Site configuration of identity matching.

    ``issuer_systems`` maps IssuerOfPatientID values (compared trimmed and case-insensitively) to FHIR identifier
    systems; ``default_issuer`` stands in for a missing issuer. ``issuer_normalization`` overrides
    ``normalization`` per issuer. ``search_zero_padded_widths`` also searches the normalized value zero-padded to
    these widths (for servers that store padded MRNs); ``max_link_depth`` bounds replaced-by chains.
    """

    issuer_systems: Mapping[str, str]
    default_issuer: str | None = None
    normalization: IdentifierNormalization = field(default_factory=IdentifierNormalization)
    issuer_normalization: Mapping[str, IdentifierNormalization] = field(default_factory=dict)
    demographics: DemographicPolicy = field(default_factory=DemographicPolicy)
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    max_link_depth: int = 5
    search_zero_padded_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_link_depth < 0:
            raise ValueError(f"max_link_depth must be >= 0 (value {self.max_link_depth})")
        if self.default_issuer is not None and self.system_for(self.default_issuer) is None:
            raise ValueError(f"default_issuer {self.default_issuer!r} is not a key of issuer_systems")

    @classmethod
    def from_settings(cls, identity: IdentitySettings) -> IdentityConfig:
        """The configuration the ``[identity]`` settings describe."""
        return cls(
            issuer_systems=dict(identity.issuer_systems),
            default_issuer=identity.default_issuer,
            normalization=IdentifierNormalization(site_prefix_pattern=identity.site_prefix_pattern),
            fallback=FallbackPolicy(
                enabled=identity.fallback,
                link_threshold=identity.fallback_link_threshold,
                review_threshold=identity.fallback_review_threshold,
            ),
        )

    def system_for(self, issuer: str) -> str | None:
        """The identifier system an issuer maps to, or None when it is not configured."""
        wanted = issuer.strip().casefold()
        return next((system for key, system in self.issuer_systems.items() if key.strip().casefold() == wanted), None)

    def normalization_for(self, issuer: str) -> IdentifierNormalization:
        """The normalization for identifiers of ``issuer`` (its override, else the default)."""
        wanted = issuer.strip().casefold()
        return next(
            (rule for key, rule in self.issuer_normalization.items() if key.strip().casefold() == wanted),
            self.normalization,
        )
