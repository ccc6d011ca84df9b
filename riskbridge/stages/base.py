"""What every stage module is given and gives back: :class:`StageContext`, :class:`StageResult`, the chunk helpers.

:class:`StageContext` holds what the stages share for one run of the pipeline: the settings, the ledger connection,
and the parts opened on first use (FHIR client, rules, feature spec, model package, scorer), so a stage that has
nothing left to do opens nothing. No torch import here: the scorer is imported when the score stage asks for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import psycopg2.extras

from riskbridge.errors import ConfigurationError
from riskbridge.ledger import Ledger, LedgerError
from riskbridge.settings import Settings

if TYPE_CHECKING:
    from riskbridge.connectors.fhir import FhirClient
    from riskbridge.harmonize.features import FeatureSpec
    from riskbridge.harmonize.series import RuleSet
    from riskbridge.model.package import PackageInfo
    from riskbridge.model.scoring import Scorer

__all__ = [
    "OUTCOMES",
    "Cursor",
    "PipelineError",
    "Progress",
    "StageContext",
    "StageResult",
    "chunk_key",
    "chunked",
]

Progress = Callable[[int, int], None]
T = TypeVar("T")
Cursor: TypeAlias = psycopg2.extras.RealDictCursor
OUTCOMES = ("done", "skipped", "quarantined", "failed")


class PipelineError(ConfigurationError):
    """A stage cannot run as configured (no site time zone, a run without window or list, ...)."""


@dataclass(frozen=True)
class StageResult:
    """What one stage call did for a run (work already done before the call is not counted again)."""

    stage: str
    done: int = 0
    skipped: int = 0
    quarantined: int = 0
    failed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for XCom."""
        return asdict(self)

    @property
    def total(self) -> int:
        """Items this call handled, whatever the outcome."""
        return self.done + self.skipped + self.quarantined + self.failed


def chunked(items: Sequence[str], size: int) -> list[list[str]]:
    """``items`` in lists of at most ``size``, in order."""
    if size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def chunk_key(items: Iterable[str] | None) -> str:
    """A short digest naming a chunk by its inputs (a rerun of the same chunk adds to the same timing row);
    ``all`` for a stage that is not chunked."""
    if items is None:
        return "all"
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


class StageContext:
    """What the stages of one pipeline share: settings, the ledger, and the parts opened on first use."""

    def __init__(self, settings: Settings, ledger: Ledger | None = None) -> None:
        self.settings = settings
        self._ledger = ledger
        self._fhir: FhirClient | None = None
        self._spec: FeatureSpec | None = None
        self._rules: RuleSet | None = None
        self._package_info: PackageInfo | None = None
        self._scorer: Scorer | None = None
        self._shadow_scorer: Scorer | None = None
        self._kept: dict[str, Any] = {}

    def close(self) -> None:
        """Close the FHIR client and the ledger connection."""
        if self._fhir is not None:
            self._fhir.close()
            self._fhir = None
            self._kept.clear()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def kept(self, name: str, make: Callable[[], T]) -> T:
        """A part a stage keeps between its calls during this pipeline (the clinical stage's harmonizer over the
        FHIR client), made by ``make`` on first use; dropped with the FHIR client on :meth:`close`."""
        if name not in self._kept:
            self._kept[name] = make()
        part: T = self._kept[name]
        return part

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened and checked against the shipped migrations on first use."""
        if self._ledger is None:
            ledger = Ledger.connect(self.settings.database)
            try:
                ledger.check_schema()
            except LedgerError:
                ledger.close()
                raise
            self._ledger = ledger
        return self._ledger

    @property
    def zone(self) -> str:
        """The site's IANA time zone (required: windows and times without an offset depend on it)."""
        if self.settings.site.timezone is None:
            raise PipelineError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE), e.g. 'America/New_York'")
        return self.settings.site.timezone

    def fhir(self) -> FhirClient:
        """The FHIR client (one per pipeline, pooled connections)."""
        if self._fhir is None:
            from riskbridge.connectors.fhir import FhirClient

            self._fhir = FhirClient(self.settings.fhir)
        return self._fhir

    @property
    def spec(self) -> FeatureSpec:
        """The configured feature spec."""
        if self._spec is None:
            from riskbridge.harmonize.features import resolve_feature_spec

            self._spec = resolve_feature_spec(self.settings.feature_spec)
        return self._spec

    @property
    def rules(self) -> RuleSet:
        """The configured series-selection rules."""
        if self._rules is None:
            from riskbridge.stages.select import load_rule_set

            self._rules = load_rule_set(self.settings.series_rules)
        return self._rules

    def model_package_path(self) -> Path:
        """The configured model package, else the reference model shipped with riskbridge."""
        if self.settings.run.model_package is not None:
            return self.settings.run.model_package
        from riskbridge.model.package import reference_package_path

        return reference_package_path()

    def package_info(self) -> PackageInfo:
        """The :class:`riskbridge.model.package.PackageInfo` of the configured model package: verified (against
        ``[run] model_sha256`` when pinned), read once, without torch (the harmonize stage needs only its validated
        pattern table)."""
        if self._package_info is None:
            from riskbridge.model.package import read_package_info

            self._package_info = read_package_info(self.model_package_path(), self.settings.run.model_sha256)
        return self._package_info

    def scorer(self) -> Scorer:
        """The :class:`riskbridge.model.scoring.Scorer` of the configured package (loaded and verified once, against
        ``[run] model_sha256`` when pinned)."""
        if self._scorer is None:
            from riskbridge.model.scoring import Scorer

            self._scorer = Scorer.from_package(
                self.model_package_path(),
                self.spec,
                cache_dir=self.settings.model_dir / "preprocessed",
                workers=self.settings.run.score_workers,
                expected_sha256=self.settings.run.model_sha256,
            )
        return self._scorer

    def shadow_scorer(self) -> Scorer | None:
        """The :class:`riskbridge.model.scoring.Scorer` of ``[run] shadow_package`` (verified against
        ``shadow_sha256`` when pinned), or None when no candidate is set. Its preprocessed volumes are cached apart
        from the active model's (its preprocessing may differ)."""
        if self.settings.run.shadow_package is None:
            return None
        if self._shadow_scorer is None:
            from riskbridge.model.scoring import Scorer

            self._shadow_scorer = Scorer.from_package(
                self.settings.run.shadow_package,
                self.spec,
                cache_dir=self.settings.model_dir / "preprocessed-shadow",
                workers=self.settings.run.score_workers,
                expected_sha256=self.settings.run.shadow_sha256,
            )
        return self._shadow_scorer
