"""The staging area without a server: UIDs checked whole (no trailing newline), writes fsynced before their
rename (and the series directory once the series is complete), a crashed attempt's temporary files swept when a
series' retrieval starts, and the free-space guard that fails a series ``staging_disk_full`` before any transfer.
Completeness is judged by SOP Instance UID against the listing: an unlisted staged file is removed, never counted.
The PACS here is a stand-in (a fetch that writes files into staging, and a listing)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from riskbridge.connectors import staging
from riskbridge.connectors.dicom import SubOperations
from riskbridge.connectors.retrieval import DISK_FULL, RetrievalError, RetrievalFailure, Retriever, retrieve_all
from riskbridge.records import uid_hash
from riskbridge.settings import PacsSettings

STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = f"{STUDY}.1"
MIB = 1024 * 1024
LISTED = [f"1.2.3.{i}" for i in range(1, 65)]  # what the stand-in PACS lists for the series


# --- UIDs -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1.2.3\n", "1.2.3\n\n", "\n1.2.3", "1.2.3 ", "1..2", "1.2.", "../1.2", "1" * 65])
def test_a_uid_that_is_not_exactly_a_dicom_uid_is_refused_as_a_path(tmp_path: Path, bad: str) -> None:
    with pytest.raises(staging.StagingError, match="is not a valid DICOM UID"):
        staging.series_dir(tmp_path, STUDY, bad)
    with pytest.raises(staging.StagingError, match="is not a valid DICOM UID"):
        staging.instance_path(tmp_path, STUDY, SERIES, bad)


def test_a_valid_uid_names_its_path(tmp_path: Path) -> None:
    assert staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3") == tmp_path / STUDY / SERIES / "1.2.3.dcm"


# --- durable writes ---------------------------------------------------------------------------------------------------


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """Records, in order, each fsync (a file with its size at that moment, or a directory) and each rename."""
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(handle: int) -> None:
        status = os.fstat(handle)
        events.append(("fsync dir", None) if stat.S_ISDIR(status.st_mode) else ("fsync file", status.st_size))
        real_fsync(handle)

    def replace(source: Any, target: Any) -> None:
        events.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    yield events


def test_a_write_is_fsynced_with_all_its_bytes_before_the_rename(tmp_path: Path, synced: list[tuple[str, Any]]) -> None:
    target = staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3")
    assert staging.write_atomic(target, [b"abc", b"defg"]) == 7
    assert synced == [("fsync file", 7), ("replace", "1.2.3.dcm")]
    assert target.read_bytes() == b"abcdefg"
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3.dcm"]
    staging.fsync_directory(target.parent)
    assert synced[-1] == ("fsync dir", None)


def test_without_directory_opening_the_directory_fsync_is_skipped(
    tmp_path: Path, synced: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the OS has no O_DIRECTORY (Windows) a directory cannot be opened to fsync; nothing fails."""
    monkeypatch.delattr(os, "O_DIRECTORY", raising=False)
    staging.fsync_directory(tmp_path)
    assert synced == []


def test_a_filesystem_that_cannot_fsync_a_directory_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(handle: int) -> None:
        if stat.S_ISDIR(os.fstat(handle).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        raise AssertionError("only the directory is synced here")

    monkeypatch.setattr(os, "fsync", fsync)
    staging.fsync_directory(tmp_path)


def test_a_failed_fsync_leaves_no_file_under_its_final_name_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(handle: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    target = staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3")
    with pytest.raises(OSError, match="Input/output error"):
        staging.write_atomic(target, [b"abc"])
    assert list(target.parent.iterdir()) == []


def test_the_background_writer_fsyncs_a_batch_before_renaming_any_of_it(
    tmp_path: Path, synced: list[tuple[str, Any]]
) -> None:
    """Files are written on the writer's threads, but only commit makes them staged: every one fsynced with all its
    bytes, then renamed into place."""
    writer = staging.BackgroundWriter(threads=3)
    sizes = {f"1.2.3.{n}": n for n in range(1, 9)}  # a distinct size per instance identifies its fsync
    for sop, size in sizes.items():
        writer.submit(staging.instance_path(tmp_path, STUDY, SERIES, sop), [b"x" * (size - 1), b"y"])
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set()  # temporary files until the commit
    committed = writer.commit()
    assert (committed.files, committed.bytes, committed.failures) == (8, sum(sizes.values()), ())
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set(sizes)
    first_rename = next(index for index, event in enumerate(synced) if event[0] == "replace")
    assert sorted(size for kind, size in synced[:first_rename] if kind == "fsync file") == sorted(sizes.values())
    for sop, size in sizes.items():
        assert staging.instance_path(tmp_path, STUDY, SERIES, sop).read_bytes() == b"x" * (size - 1) + b"y"
    writer.close()
    assert sorted(p.name for p in staging.series_dir(tmp_path, STUDY, SERIES).iterdir()) == sorted(
        f"{sop}.dcm" for sop in sizes
    )


def test_a_failed_background_write_is_reported_once_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(handle: int) -> None:
        if os.fstat(handle).st_size == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = staging.BackgroundWriter()
    writer.submit(staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3"), [b"abc"])
    writer.submit(staging.instance_path(tmp_path, STUDY, SERIES, "1.2.4"), [b"abcd"])
    committed = writer.commit()
    assert committed.files == 1
    [failure] = committed.failures
    assert failure.path.name == "1.2.3.dcm" and failure.error.errno == errno.ENOSPC
    assert writer.commit() == staging.Committed()  # reported once: the caller has judged it already
    assert [p.name for p in staging.series_dir(tmp_path, STUDY, SERIES).iterdir()] == ["1.2.4.dcm"]
    writer.close()


def test_the_background_writer_holds_at_most_max_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second instance waits while the first one's bytes are still being written, so memory stays bounded."""
    release = threading.Event()
    real = staging._write_partial

    def slow(path: Path, chunks: Any) -> tuple[Path, int]:
        release.wait(5)
        return real(path, chunks)

    monkeypatch.setattr(staging, "_write_partial", slow)
    writer = staging.BackgroundWriter(threads=2, max_bytes=10)
    writer.submit(staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3.1"), [b"12345678"])
    second = threading.Thread(
        target=writer.submit, args=(staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3.2"), [b"12345678"])
    )
    second.start()
    time.sleep(0.2)
    assert second.is_alive(), "the second submit should wait for room"
    release.set()
    second.join(5)
    assert writer.commit().files == 2
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == {"1.2.3.1", "1.2.3.2"}
    writer.close()


# --- sweeping a crashed attempt's temporary files ---------------------------------------------------------------------


def _leftovers(directory: Path, age_s: float) -> list[Path]:
    """Temporary files as a crashed write_atomic (and a crashed other writer) leaves them, last touched age_s ago."""
    directory.mkdir(parents=True, exist_ok=True)
    made = [directory / ".incoming-abc123.part", directory / ".incoming-def456.part", directory / "1.2.9.dcm.part"]
    moment = time.time() - age_s
    for path in made:
        path.write_bytes(b"half")
        os.utime(path, (moment, moment))
    return made


def test_the_sweep_removes_old_partial_files_and_nothing_else(tmp_path: Path) -> None:
    directory = staging.series_dir(tmp_path, STUDY, SERIES)
    old = _leftovers(directory, age_s=3600)
    kept = staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3")
    staging.write_atomic(kept, [b"whole"])
    os.utime(kept, (time.time() - 3600, time.time() - 3600))
    young = directory / ".incoming-live.part"  # a write in progress in another process
    young.write_bytes(b"still arriving")
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == {"1.2.3"}  # leftovers never count
    assert staging.sweep_partial(directory) == len(old)
    assert sorted(p.name for p in directory.iterdir()) == sorted([kept.name, young.name])
    assert staging.sweep_partial(directory) == 0
    assert staging.sweep_partial(tmp_path / "absent") == 0


# --- the retriever: sweep and free-space guard ------------------------------------------------------------------------


class _Usage(NamedTuple):
    """What shutil.disk_usage answers."""

    total: int
    used: int
    free: int


class _Fetched(NamedTuple):
    series_uid: str
    subset: list[str] | None


@pytest.fixture
def fetches(monkeypatch: pytest.MonkeyPatch) -> list[_Fetched]:
    """Stands in for the PACS: each fetch of a series stages its instances 1.2.3.1 ... 1.2.3.64 (or the subset)."""
    calls: list[_Fetched] = []

    def fetch(self: Retriever, study_uid: str, series_uid: str, subset: list[str] | None) -> SubOperations:
        calls.append(_Fetched(series_uid, subset))
        sops = subset or [f"1.2.3.{i}" for i in range(1, 65)]
        for sop in sops:
            staging.write_atomic(staging.instance_path(self.staging_root, study_uid, series_uid, sop), [b"x"])
        # Written past the sink, so a whole-series answer proves nothing here: every series is judged by its listing.
        return SubOperations(0x0000, len(sops), 0, 0, "0x0000 (success)")

    monkeypatch.setattr(Retriever, "_fetch", fetch)
    monkeypatch.setattr("riskbridge.connectors.retrieval.expected_instances", lambda *a: set(LISTED))
    return calls


def _free(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> list[str]:
    """Fakes the staging filesystem's free space: a real disk cannot be made full on demand in a unit test (the
    integration fault suite fills a small tmpfs instead). Returns the paths asked about."""
    asked: list[str] = []

    def disk_usage(path: Any) -> _Usage:
        asked.append(str(path))
        return _Usage(100 * 1024 * MIB, 100 * 1024 * MIB - free_bytes, free_bytes)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def test_a_series_that_would_not_fit_fails_staging_disk_full_before_any_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched]
) -> None:
    """64 instances of 520 KiB need 33 MiB above the 1024 MiB reserve; 1040 MiB free is too little."""
    asked = _free(monkeypatch, 1040 * MIB)
    staging_root = tmp_path / "staging"  # not created yet: its nearest existing parent is asked
    with Retriever(PacsSettings(), staging_root, "c-get") as retriever, pytest.raises(RetrievalError) as caught:
        retriever.retrieve(STUDY, SERIES, expected=64)
    assert caught.value.code == DISK_FULL == "staging_disk_full"
    message = str(caught.value)
    assert f"series {uid_hash(SERIES)}: staging has 1040 MiB free" in message
    assert "64 instance(s) still to retrieve need about 33 MiB plus the 1024 MiB reserve" in message
    assert SERIES not in message
    assert asked == [str(tmp_path)]
    monkeypatch.setattr(  # no count from selection: the instances are listed first, then checked the same way
        "riskbridge.connectors.retrieval.expected_instances", lambda *a: {f"1.2.3.{i}" for i in range(1, 65)}
    )
    with Retriever(PacsSettings(), staging_root, "c-get") as retriever, pytest.raises(RetrievalError) as caught:
        retriever.retrieve(STUDY, SERIES)
    assert caught.value.code == DISK_FULL
    assert fetches == []


def test_a_series_that_fits_is_retrieved_and_the_reserve_is_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched]
) -> None:
    _free(monkeypatch, 1100 * MIB)
    synced: list[Path] = []
    monkeypatch.setattr(staging, "fsync_directory", synced.append)
    with Retriever(PacsSettings(), tmp_path, "c-get") as retriever:
        record = retriever.retrieve(STUDY, SERIES, expected=64)
    assert record.received == 64
    assert fetches == [_Fetched(SERIES, None)]
    assert synced == [record.path], "the complete series' directory is fsynced once"
    other = f"{STUDY}.2"
    small = PacsSettings(staging_min_free_mb=2000, staging_instance_kb=1)
    with Retriever(small, tmp_path, "c-get") as retriever, pytest.raises(RetrievalError, match="2000 MiB reserve"):
        retriever.retrieve(STUDY, other, expected=64)


def test_only_the_instances_still_missing_need_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched]
) -> None:
    """A series staged whole is never refused for space; one with 60 of 64 staged needs room for 4."""
    for i in range(1, 61):
        staging.write_atomic(staging.instance_path(tmp_path, STUDY, SERIES, f"1.2.3.{i}"), [b"x"])
    _free(monkeypatch, 1024 * MIB + 4 * 520 * 1024)
    monkeypatch.setattr(
        "riskbridge.connectors.retrieval.expected_instances", lambda *a: {f"1.2.3.{i}" for i in range(1, 65)}
    )
    with Retriever(PacsSettings(), tmp_path, "c-get") as retriever:
        assert retriever.retrieve(STUDY, SERIES, expected=64).received == 64
        assert fetches == [_Fetched(SERIES, ["1.2.3.61", "1.2.3.62", "1.2.3.63", "1.2.3.64"])]
        _free(monkeypatch, 0)
        assert retriever.retrieve(STUDY, SERIES, expected=64).received == 64
        assert retriever.retrieve(STUDY, SERIES).received == 64  # listed, nothing missing
    assert len(fetches) == 1


def test_retrieve_all_reports_a_full_disk_as_its_own_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched]
) -> None:
    _free(monkeypatch, 0)
    [failure] = retrieve_all(PacsSettings(workers=1), tmp_path, [(STUDY, SERIES)], "c-get", None, {SERIES: 64})
    assert isinstance(failure, RetrievalFailure)
    assert (failure.code, failure.series_uid) == ("staging_disk_full", SERIES)
    assert "0 MiB free" in failure.reason


def test_a_retrieval_sweeps_what_a_crashed_attempt_left_and_logs_only_the_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched], caplog: pytest.LogCaptureFixture
) -> None:
    _free(monkeypatch, 100 * 1024 * MIB)
    directory = staging.series_dir(tmp_path, STUDY, SERIES)
    _leftovers(directory, age_s=3600)
    with (
        caplog.at_level(logging.INFO, logger="riskbridge.connectors.retrieval"),
        Retriever(PacsSettings(), tmp_path, "c-get") as retriever,
    ):
        assert retriever.retrieve(STUDY, SERIES, expected=64).received == 64
    assert not [p.name for p in directory.iterdir() if not p.name.endswith(".dcm")]
    assert f"series {uid_hash(SERIES)}: removed 3 partial file(s) left by an earlier attempt" in caplog.text
    assert STUDY not in caplog.text  # SERIES starts with STUDY: neither UID is logged


def test_a_young_partial_file_is_left_to_its_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched]
) -> None:
    _free(monkeypatch, 100 * 1024 * MIB)
    directory = staging.series_dir(tmp_path, STUDY, SERIES)
    live = _leftovers(directory, age_s=5)
    with Retriever(PacsSettings(), tmp_path, "c-get") as retriever:
        retriever.retrieve(STUDY, SERIES, expected=64)
    assert all(path.exists() for path in live)


# --- completeness by SOP Instance UID ---------------------------------------------------------------------------------


def test_a_stale_file_never_stands_in_for_a_missing_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched], caplog: pytest.LogCaptureFixture
) -> None:
    """63 listed instances and one the PACS no longer lists make 64 files, the count selection knows: the stale one
    is removed and counted, and the missing listed one is fetched alone."""
    _free(monkeypatch, 100 * 1024 * MIB)
    for sop in [*LISTED[:63], "1.2.3.999"]:
        staging.write_atomic(staging.instance_path(tmp_path, STUDY, SERIES, sop), [b"x"])
    with (
        caplog.at_level(logging.WARNING, logger="riskbridge.connectors.retrieval"),
        Retriever(PacsSettings(), tmp_path, "c-get") as retriever,
    ):
        record = retriever.retrieve(STUDY, SERIES, expected=64)
    assert (record.received, record.unlisted, record.complete) == (64, 1, True)
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set(LISTED)
    assert fetches == [_Fetched(SERIES, ["1.2.3.64"])]
    assert f"removed 1 staged instance(s) the PACS does not list for the series: {uid_hash('1.2.3.999')}" in caplog.text


def test_an_unrequested_instance_that_names_the_series_is_removed_after_a_whole_series_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetches: list[_Fetched]
) -> None:
    """The whole-series request accepts any instance naming the series; one the listing lacks does not stay."""
    _free(monkeypatch, 100 * 1024 * MIB)
    monkeypatch.setattr("riskbridge.connectors.retrieval.expected_instances", lambda *a: set(LISTED[:60]))
    with Retriever(PacsSettings(), tmp_path, "c-get") as retriever:
        record = retriever.retrieve(STUDY, SERIES, expected=60)
    assert (record.expected, record.received, record.unlisted, record.attempts) == (60, 60, 4, 1)
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set(LISTED[:60])
    assert fetches == [_Fetched(SERIES, None)]


def test_remove_instances_counts_only_what_was_there(tmp_path: Path) -> None:
    staging.write_atomic(staging.instance_path(tmp_path, STUDY, SERIES, "1.2.3.1"), [b"x"])
    assert staging.remove_instances(tmp_path, STUDY, SERIES, ["1.2.3.1", "1.2.3.2"]) == 1
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set()
