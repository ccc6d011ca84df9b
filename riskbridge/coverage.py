"""Coverage: which instants the windowed runs have covered, and the window the next nightly run must take.

The nightly job promises that every CT study is scored once. A fixed window before each trigger breaks that promise
twice a year (the DST fall-back night leaves an hour uncovered, spring-forward overlaps one) and on every night the
scheduler was down. So a nightly run covers from the **watermark** (the end of the coverage it continues) to its
trigger time, whatever the zone, the length of the night or the number of nights missed, and looks a **lookback**
further back for studies that reached the PACS after their night's run. A run whose watermark is more than the
maximum catch-up span behind its trigger does not cover the gap silently: it fails with the uncovered interval and
the backfill command (:class:`CoverageGapError`).

Pure arithmetic over aware instants (compared in UTC); the ledger stores each finished run's covered interval
(:meth:`riskbridge.ledger.Ledger.coverage`) and the pipeline plans with :func:`plan_nightly`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from riskbridge.errors import RiskbridgeError

__all__ = [
    "CoverageError",
    "CoverageGapError",
    "Interval",
    "NightlyWindow",
    "as_utc",
    "backfill_days",
    "merged",
    "plan_nightly",
    "uncovered",
    "watermark",
]


class CoverageError(RiskbridgeError, ValueError):
    """An interval that is not one (naive instants, an end before its start)."""


class CoverageGapError(RiskbridgeError):
    """The nightly job is further behind than it may catch up by itself: the message names the uncovered interval
    and the backfill that covers it."""

    def __init__(self, message: str, gap: Interval) -> None:
        super().__init__(message)
        self.gap = gap


def as_utc(moment: datetime) -> datetime:
    """An aware instant as a plain ``datetime`` in UTC (Airflow hands out pendulum datetimes)."""
    if moment.tzinfo is None:
        raise CoverageError("an interval needs aware instants (with their offset)")
    return datetime.fromtimestamp(moment.timestamp(), tz=UTC)


@dataclass(frozen=True, order=True)
class Interval:
    """The instants from ``start`` (included) to ``end`` (excluded); given aware, kept in UTC."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", as_utc(self.start))
        object.__setattr__(self, "end", as_utc(self.end))
        if not self.start < self.end:
            raise CoverageError(f"an interval must end after it starts, got {self.start} .. {self.end}")

    @property
    def duration(self) -> timedelta:
        """How long the interval is."""
        return self.end - self.start

    def __str__(self) -> str:
        return f"{_instant(self.start)} .. {_instant(self.end)}"


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def merged(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``intervals`` as disjoint intervals in time order (overlapping or touching ones joined)."""
    out: list[Interval] = []
    for interval in sorted(intervals):
        if out and interval.start <= out[-1].end:
            if interval.end > out[-1].end:
                out[-1] = Interval(out[-1].start, interval.end)
        else:
            out.append(interval)
    return out


def uncovered(intervals: Iterable[Interval], span: Interval) -> list[Interval]:
    """The parts of ``span`` that no interval covers, in time order."""
    gaps: list[Interval] = []
    cursor, end = span.start, span.end
    for interval in merged(intervals):
        if interval.end <= cursor:
            continue
        if interval.start >= end:
            break
        if interval.start > cursor:
            gaps.append(Interval(cursor, interval.start))
        cursor = max(cursor, interval.end)
    if cursor < end:
        gaps.append(Interval(cursor, end))
    return gaps


def watermark(covered: Sequence[Interval], base: datetime) -> datetime:
    """Where the coverage that continues from ``base`` ends: ``base`` moved forward through every covered interval
    that holds or touches it (a backfill joined to the nightly coverage moves it on, one beyond a gap does not)."""
    mark = as_utc(base)
    for interval in merged(covered):
        if interval.start <= mark < interval.end:
            mark = interval.end
    return mark


@dataclass(frozen=True)
class NightlyWindow:
    """A nightly run's window: it discovers ``window`` (from ``lookback`` before the watermark to the trigger) and
    adds ``[watermark, trigger)`` to the coverage; studies before the watermark that are new to the ledger are late
    arrivals."""

    window: Interval
    watermark: datetime
    trigger: datetime

    @property
    def new_coverage(self) -> Interval | None:
        """The part of the window after the watermark (None when the watermark is already at the trigger)."""
        return Interval(self.watermark, self.trigger) if self.watermark < self.trigger else None


def backfill_days(gap: Interval, zone: str) -> tuple[str, str]:
    """The site days (first, last; ISO dates) a backfill of ``gap`` takes: from the day the gap begins to the day
    before the one it ends on (the nightly run covers the rest of that day itself), at least the first day."""
    tz = ZoneInfo(zone)
    first = gap.start.astimezone(tz).date()
    last = max(first, gap.end.astimezone(tz).date() - timedelta(days=1))
    return first.isoformat(), last.isoformat()


def plan_nightly(
    trigger: datetime,
    covered: Sequence[Interval],
    last_nightly_end: datetime | None,
    first_start: datetime,
    lookback: timedelta,
    max_catchup: timedelta,
    zone: str,
) -> NightlyWindow:
    """The window of the nightly run triggered at ``trigger``.

    The watermark continues from the end of the last nightly coverage before the trigger (``last_nightly_end``)
    through every covered interval joined to it (:func:`watermark`), never past the trigger, and the run discovers
    from ``lookback`` before the watermark to the trigger. A night with nothing to continue (the job's first, or an
    old night triggered again after later ones ran) takes its data interval, ``first_start`` to the trigger, however
    long. Raises :class:`CoverageGapError` when the watermark lies more than ``max_catchup`` before the trigger (a
    long outage, a gap nobody backfilled), naming the interval and the backfill command.
    """
    trigger, first_start = as_utc(trigger), as_utc(first_start)
    last_nightly_end = as_utc(last_nightly_end) if last_nightly_end is not None else None
    if lookback <= timedelta(0) or max_catchup <= timedelta(0):
        raise CoverageError("the lookback and the maximum catch-up must be positive")
    if last_nightly_end is None or last_nightly_end > trigger:
        # Nothing to continue (the job's first night, or an old night triggered again): the data interval.
        return NightlyWindow(Interval(first_start, trigger), first_start, trigger)
    mark = min(watermark(covered, last_nightly_end), trigger)
    if trigger - mark > max_catchup:
        gap = Interval(mark, trigger)
        first, last = backfill_days(gap, zone)
        hours = gap.duration.total_seconds() / 3600
        raise CoverageGapError(
            f"the nightly job has not covered {gap} ({hours:.0f} h, more than the maximum catch-up of "
            f"{max_catchup.total_seconds() / 3600:.0f} h, [airflow] nightly_max_catchup_hours): backfill it with "
            f"`riskbridge run --window {first}..{last}` or `airflow dags trigger riskbridge_backfill --conf "
            f'\'{{"start": "{first}", "end": "{last}"}}\'`, then let the nightly run again',
            gap,
        )
    return NightlyWindow(Interval(mark - lookback, trigger), mark, trigger)
