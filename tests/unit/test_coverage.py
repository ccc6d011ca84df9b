"""Coverage by watermark (riskbridge.coverage) and the discover stage's triage, without servers.

The central test walks a year of nightly triggers, as Airflow's own CronTriggerTimetable produces them, in two zones
through both DST transitions and a three-day scheduler outage, with studies that reach the PACS late: every instant
is covered, and every study is processed exactly once (by the discover stage's own window filter and triage).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pendulum
import pytest
from airflow.timetables.base import DataInterval, TimeRestriction
from airflow.timetables.trigger import CronTriggerTimetable

from riskbridge.coverage import (
    CoverageError,
    CoverageGapError,
    Interval,
    backfill_days,
    merged,
    plan_nightly,
    uncovered,
    watermark,
)
from riskbridge.records import PacsPatient, StudyRef
from riskbridge.stages.discover import Prior, in_window, triage

LOOKBACK = timedelta(hours=72)
MAX_CATCHUP = timedelta(hours=168)


def _utc(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def _triggers(zone: str, start: datetime, end: datetime) -> list[DataInterval]:
    """The data intervals of a daily 02:00 CronTriggerTimetable (24 h interval) in ``zone``, as the scheduler
    creates them with catch-up, from ``start`` to ``end``."""
    timetable = CronTriggerTimetable("0 2 * * *", timezone=zone, interval=timedelta(hours=24))
    restriction = TimeRestriction(earliest=pendulum.instance(start), latest=None, catchup=True)
    found: list[DataInterval] = []
    last: DataInterval | None = None
    while True:
        info = timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
        assert info is not None and info.data_interval is not None
        if info.run_after >= end:
            return found
        found.append(info.data_interval)
        last = info.data_interval


def test_airflows_fixed_windows_leave_an_hour_uncovered_on_the_fall_back_night() -> None:
    """What issue 18 measured: the data intervals themselves are not contiguous across DST."""
    intervals = _triggers("America/New_York", _utc(2026, 10, 29), _utc(2026, 11, 3))
    windows = [Interval(i.start, i.end) for i in intervals]
    span = Interval(windows[0].start, windows[-1].end)
    assert uncovered(windows, span) == [Interval(_utc(2026, 10, 31, 6), _utc(2026, 10, 31, 7))]


def _study(number: int, moment: datetime, zone: str, naive: bool) -> StudyRef:
    """A study at ``moment``; ``naive``: the PACS sends wall time without an offset (most do)."""
    wall = moment.astimezone(ZoneInfo(zone)).replace(tzinfo=None) if naive else moment
    return StudyRef(f"1.2.826.0.1.{number}", f"A{number}", PacsPatient(f"P{number}"), wall, None, ("CT",))


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Berlin"])
def test_a_year_of_nights_covers_every_instant_and_processes_every_study_once(zone: str) -> None:
    rng = random.Random(zone)
    year = Interval(_utc(2026, 1, 1), _utc(2027, 1, 1))
    nights = _triggers(zone, year.start, year.end)
    outage = Interval(_utc(2026, 6, 10), _utc(2026, 6, 12, 23))  # the scheduler is down for three nights
    runs = [night for night in nights if not outage.start <= night.end < outage.end]
    assert len(nights) - len(runs) == 3

    # Studies all year, each reaching the PACS between minutes and two days after its acquisition (some sent late),
    # with extra studies in the repeated and the skipped hour of both DST nights.
    moments = [year.start + timedelta(seconds=rng.randrange(int(year.duration.total_seconds()))) for _ in range(4000)]
    for day in (datetime(2026, 3, 8), datetime(2026, 3, 29), datetime(2026, 10, 25), datetime(2026, 11, 1)):
        base = day.replace(tzinfo=UTC)
        moments += [base + timedelta(minutes=minute) for minute in range(0, 12 * 60, 7)]
    studies = []
    for number, moment in enumerate(moments):
        delay = timedelta(minutes=rng.choice([5, 30, 120, 600, 2000, 2800]))
        studies.append((_study(number, moment, zone, naive=number % 3 != 0), moment + delay))
    assert max(arrival - moment for moment, (_, arrival) in zip(moments, studies, strict=True)) < LOOKBACK

    covered: list[Interval] = []
    last_nightly_end: datetime | None = None
    processed: dict[str, int] = {}
    late: set[str] = set()
    for run_id, night in enumerate(runs, start=1):
        trigger, first_start = night.end, night.start
        plan = plan_nightly(trigger, covered, last_nightly_end, first_start, LOOKBACK, MAX_CATCHUP, zone)
        if last_nightly_end is not None:
            assert plan.watermark == last_nightly_end, "each night continues exactly where the last one ended"
        seen = [study for study, arrival in studies if arrival <= trigger]
        found = [study for study in seen if in_window(study, (plan.window.start, plan.window.end), zone)]
        priors = {
            uid: Prior(scored_run=run, assessment_key=f"key-{uid}", earlier_run=run) for uid, run in processed.items()
        }
        sorted_out = triage(found, priors, plan.watermark, zone)
        assert set(sorted_out.done) <= set(processed)
        for item in sorted_out.work:
            assert item.study.study_uid not in processed, "a study was processed twice"
            processed[item.study.study_uid] = run_id
            if item.late_arrival:
                late.add(item.study.study_uid)
        covered.append(plan.window)  # the run finished: its window is covered
        last_nightly_end = trigger

    span = Interval(runs[0].start, runs[-1].end)
    assert uncovered(covered, span) == []
    reachable = {
        study.study_uid for study, arrival in studies if span.start <= study_moment(study, zone) and arrival <= span.end
    }
    reachable = {uid for uid in reachable}
    assert set(processed) == reachable
    # The outage: the first night after it covered the three missed nights in one run.
    after = next(run for run in runs if run.end >= outage.end)
    assert after.end - max(run.end for run in runs if run.end < outage.start) > timedelta(days=3)
    assert late, "some studies arrived after their night's run and were found by a later one"


def study_moment(study: StudyRef, zone: str) -> datetime:
    """The instant the discover stage judges a study by."""
    from riskbridge.harmonize.windows import index_time_of_study

    return index_time_of_study(study, zone).moment


def test_a_study_later_than_the_lookback_is_only_found_by_a_backfill() -> None:
    zone = "Europe/Berlin"
    night = Interval(_utc(2026, 5, 1, 0), _utc(2026, 5, 2, 0))
    plan = plan_nightly(night.end, [night], night.end - timedelta(days=1), night.start, LOOKBACK, MAX_CATCHUP, zone)
    assert plan.window.start == night.start - LOOKBACK + timedelta(days=1)
    old = _study(1, plan.window.start - timedelta(minutes=1), zone, naive=False)
    assert not in_window(old, (plan.window.start, plan.window.end), zone)


def test_an_outage_longer_than_the_catch_up_fails_naming_the_gap_and_the_backfill() -> None:
    zone = "America/New_York"
    last = _utc(2026, 3, 1, 7)
    trigger = _utc(2026, 3, 12, 6)  # eleven nights later, across the spring-forward night
    with pytest.raises(CoverageGapError) as caught:
        plan_nightly(trigger, [Interval(last - timedelta(days=1), last)], last, trigger - timedelta(days=1),
                     LOOKBACK, MAX_CATCHUP, zone)  # fmt: skip
    message = str(caught.value)
    assert caught.value.gap == Interval(last, trigger)
    assert "2026-03-01T07:00Z .. 2026-03-12T06:00Z" in message
    assert "riskbridge run --window 2026-03-01..2026-03-11" in message and "riskbridge_backfill" in message
    # The backfill of those site days joins the coverage: the next night continues after it.
    first, end = backfill_days(caught.value.gap, zone)
    backfill = Interval(
        datetime.fromisoformat(first).replace(tzinfo=ZoneInfo(zone)),
        (datetime.fromisoformat(end) + timedelta(days=1)).replace(tzinfo=ZoneInfo(zone)),
    )
    covered = [Interval(last - timedelta(days=1), last), backfill]
    plan = plan_nightly(trigger, covered, last, trigger - timedelta(days=1), LOOKBACK, MAX_CATCHUP, zone)
    assert plan.watermark == backfill.end.astimezone(UTC) == _utc(2026, 3, 12, 4)
    assert plan.window == Interval(plan.watermark - LOOKBACK, trigger)


def test_the_watermark_follows_joined_coverage_but_never_jumps_a_gap() -> None:
    base = _utc(2026, 1, 10)
    joined = Interval(base - timedelta(hours=1), base + timedelta(days=2))
    beyond = Interval(base + timedelta(days=3), base + timedelta(days=4))
    assert watermark([joined, beyond], base) == base + timedelta(days=2)
    assert watermark([beyond], base) == base
    # A nightly run of an old night (triggered again by hand) continues the nightly coverage before it, else takes
    # its data interval.
    old = base - timedelta(days=1)
    plan = plan_nightly(base, [joined], base + timedelta(days=2), old, LOOKBACK, MAX_CATCHUP, "UTC")
    assert plan.watermark == old and plan.window == Interval(old, base)
    later = Interval(old - timedelta(days=1), base + timedelta(days=2))  # nights before and after it ran already
    plan = plan_nightly(base, [later], old, old, LOOKBACK, MAX_CATCHUP, "UTC")
    assert plan.watermark == base and plan.new_coverage is None and plan.window == Interval(base - LOOKBACK, base)


def test_the_first_night_takes_the_data_interval() -> None:
    trigger = _utc(2026, 2, 2, 1)
    plan = plan_nightly(trigger, [], None, trigger - timedelta(days=1), LOOKBACK, MAX_CATCHUP, "Europe/Berlin")
    assert plan.watermark == trigger - timedelta(days=1)
    assert plan.window == plan.new_coverage == Interval(trigger - timedelta(days=1), trigger)
    # A first window longer than the maximum catch-up is the site's setting, not a gap.
    long = plan_nightly(trigger, [], None, trigger - timedelta(days=16), LOOKBACK, MAX_CATCHUP, "Europe/Berlin")
    assert long.watermark == trigger - timedelta(days=16)


def test_intervals_merge_and_report_gaps() -> None:
    a = Interval(_utc(2026, 1, 1), _utc(2026, 1, 2))
    b = Interval(_utc(2026, 1, 2), _utc(2026, 1, 3))  # touching: joined
    c = Interval(_utc(2026, 1, 5), _utc(2026, 1, 6))
    assert merged([c, b, a]) == [Interval(a.start, b.end), c]
    assert uncovered([a, c], Interval(_utc(2025, 12, 31), _utc(2026, 1, 7))) == [
        Interval(_utc(2025, 12, 31), a.start),
        Interval(a.end, c.start),
        Interval(c.end, _utc(2026, 1, 7)),
    ]
    assert str(a) == "2026-01-01T00:00Z .. 2026-01-02T00:00Z"
    with pytest.raises(CoverageError, match="end after it starts"):
        Interval(a.end, a.start)
    with pytest.raises(CoverageError, match="aware"):
        Interval(datetime(2026, 1, 1), datetime(2026, 1, 2))
    with pytest.raises(CoverageError, match="positive"):
        plan_nightly(a.end, [], None, a.start, timedelta(0), MAX_CATCHUP, "UTC")


def test_triage_skips_decided_studies_unless_rescoring_and_marks_late_arrivals() -> None:
    zone = "UTC"
    mark = _utc(2026, 4, 2)
    done = _study(1, mark - timedelta(hours=5), zone, naive=False)
    retried = _study(2, mark - timedelta(hours=4), zone, naive=False)
    late = _study(3, mark - timedelta(hours=3), zone, naive=False)
    fresh = _study(4, mark + timedelta(hours=3), zone, naive=False)
    timeless = StudyRef("1.2.826.0.1.5", None, PacsPatient("P5"), None, None)
    priors = {done.study_uid: Prior(7, "k1", 7), retried.study_uid: Prior(earlier_run=6)}
    sorted_out = triage([done, retried, late, fresh, timeless], priors, mark, zone)
    assert list(sorted_out.done) == [done.study_uid]
    work = {item.study.study_uid: (item.earlier_run, item.late_arrival) for item in sorted_out.work}
    assert work == {
        retried.study_uid: (6, False),
        late.study_uid: (None, True),
        fresh.study_uid: (None, False),
        timeless.study_uid: (None, False),
    }
    again = triage([done], priors, mark, zone, rescore=True)
    assert not again.done and [item.earlier_run for item in again.work] == [7]


def test_the_nightly_dags_first_task_fails_without_retries_naming_the_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    from collections.abc import Iterator
    from contextlib import contextmanager
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from riskbridge.airflow import dagkit

    gap = Interval(_utc(2026, 3, 1, 7), _utc(2026, 3, 12, 6))
    asked: list[tuple[str, datetime, datetime, bool]] = []

    class _Pipeline:
        def start_nightly_run(self, key: str, trigger: datetime, first_start: datetime, rescore: bool) -> int:
            asked.append((key, trigger, first_start, rescore))
            raise CoverageGapError(f"the nightly job has not covered {gap}: backfill it", gap)

    @contextmanager
    def open_pipeline() -> Iterator[_Pipeline]:
        yield _Pipeline()

    monkeypatch.setattr(dagkit, "open_pipeline", open_pipeline)
    context = {
        "params": {"rescore": False},
        "data_interval_start": pendulum.instance(gap.end - timedelta(days=1)),
        "data_interval_end": pendulum.instance(gap.end),
        "dag": SimpleNamespace(dag_id="riskbridge_nightly"),
        "run_id": "scheduled__2026-03-12T06:00:00+00:00",
    }
    with pytest.raises(AirflowFailException, match=r"2026-03-01T07:00Z \.\. 2026-03-12T06:00Z"):
        dagkit.start_ledger_run("nightly", context)
    key = "airflow:riskbridge_nightly:scheduled__2026-03-12T06:00:00+00:00"
    assert asked == [(key, gap.end, gap.end - timedelta(days=1), False)]
