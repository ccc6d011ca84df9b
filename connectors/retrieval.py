"""Retrieve series into the staging area, verified complete, over C-MOVE, C-GET or DICOMweb.

Completeness is decided by SOP Instance UID: the instances staged against the PACS's own account of the series,
never by the retrieve status alone (Orthanc answers many different failures with 0xC000 and zero counters, and
stops a whole C-MOVE when one sub-operation fails) and never by a count of files (an unrequested instance naming
the series, or a file an earlier attempt left, would stand in for a missing one). That account is the IMAGE-level
listing (C-FIND, or QIDO-RS over DICOMweb); or, when selection already knows the series' instance count and the
whole series is asked for at once, the answer itself, if it came whole (DICOMweb: closing delimiter, no part
refused; C-MOVE/C-GET: success, no failed or warning sub-operation, as many completed as staged) with exactly that
many distinct instances, each verified from its bytes as one of the series. Any other answer is judged by the
listing. Staged instances the account does not name are removed and counted (``RetrievedSeries.unlisted``). A
partial retrieval retries only the missing instances, a bounded number of times, then fails with an error naming
the series (hashed) and the counts.

Before a series is fetched, its staging directory is swept of a crashed attempt's temporary files, and the staging
filesystem must have room for the instances still to come plus a reserve (``PacsSettings.staging_min_free_mb``):
a series that would not fit fails ``staging_disk_full`` before any transfer, rather than mid-write.

Several series are retrieved in parallel. Over C-MOVE and C-GET the workers are processes, not threads:
pynetdicom is bound by Python CPU (about 250 images/s per association), so each worker has its own association
and, for C-MOVE, its own storage SCP and AE title (``PacsSettings.scp_endpoints``). Over DICOMweb they are
threads: the work is socket reads and file writes, which release the GIL.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from riskbridge.connectors import dicom, query, staging
from riskbridge.connectors.dicomweb import DicomwebClient, DicomwebError
from riskbridge.connectors.storescp import CT_STORAGE_CLASSES, InstanceSink, StorageSCP
from riskbridge.errors import PacsError
from riskbridge.records import RetrievedSeries, uid_hash
from riskbridge.settings import PacsSettings

LOG = logging.getLogger(__name__)

DIMSE_TRANSPORTS = ("c-move", "c-get")

# The quarantine reason of a series the staging filesystem has no room for (checked before any transfer).
DISK_FULL = "staging_disk_full"


class RetrievalError(PacsError):
    """A series could not be retrieved completely; ``code`` is the stable quarantine reason."""

    def __init__(self, message: str, code: str, partial: RetrievedSeries | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.partial = partial


@dataclass(frozen=True)
class RetrievalFailure:
    """A series of a batch that failed, with its reason; the rest of the batch goes on."""

    study_uid: str
    series_uid: str
    code: str
    reason: str


def expected_instances(pacs: PacsSettings, study_uid: str, series_uid: str) -> set[str]:
    """Return the SOPInstanceUIDs the PACS lists for a series (IMAGE-level C-FIND)."""
    listed = query.find_instances(pacs, study_uid, series_uid, timeout_s=pacs.timeout_s)
    return {instance.sop_instance_uid for instance in listed if instance.sop_instance_uid}


def check_free_space(pacs: PacsSettings, staging_root: Path, series_uid: str, instances: int) -> None:
    """Raise :class:`RetrievalError` ``staging_disk_full`` when the staging filesystem has less free space than
    ``instances`` more instances of a series are expected to take (``pacs.staging_instance_kb`` each: C-FIND tells
    no sizes) plus the reserve ``pacs.staging_min_free_mb``.

    Checked before each series is fetched, so a full disk quarantines the study with a clear reason instead of
    failing writes mid-series (the storage SCP would answer success and then lose the file). Several workers check
    at once, so the reserve is also what absorbs their concurrent series.
    """
    if instances <= 0:  # a series staged whole needs no room: refusing it would quarantine a scorable study
        return
    needed = instances * pacs.staging_instance_kb * 1024
    reserve = pacs.staging_min_free_mb * 1024 * 1024
    free = staging.free_bytes(staging_root)
    if free >= needed + reserve:
        return
    mib = 1024 * 1024
    raise RetrievalError(
        f"series {uid_hash(series_uid)}: staging has {free // mib} MiB free; the {instances} instance(s) still to "
        f"retrieve need about {-(-needed // mib)} MiB plus the {pacs.staging_min_free_mb} MiB reserve "
        "(pacs.staging_min_free_mb): free space in staging_dir, then run again",
        DISK_FULL,
    )


def resolve_transport(pacs: PacsSettings) -> str:
    """Return the configured transport, or for ``auto`` the fastest one this PACS supports.

    Order for ``auto``: DICOMweb when a ``dicomweb_url`` is set and answers, then C-GET when the PACS accepts
    the GET model, else C-MOVE (what most hospital PACS allow).
    """
    if pacs.transport != "auto":
        return pacs.transport
    if pacs.dicomweb_url:
        with DicomwebClient.from_settings(pacs) as client:
            if client.supports_dicomweb():
                return "dicomweb"
    try:
        assoc = dicom.associate(
            pacs, dicom.StudyRootQueryRetrieveInformationModelGet, "C-GET probe", min(pacs.timeout_s, 10.0)
        )
    except dicom.DicomError:
        return "c-move"
    try:
        accepted = bool(assoc.accepted_contexts)
    finally:
        assoc.release()
    return "c-get" if accepted else "c-move"


class Retriever:
    """Retrieves series one after another over one transport; a context manager (C-MOVE runs an SCP).

    ``scp_endpoint`` is this retriever's own storage SCP (AE title, port) for C-MOVE; ``sink_class`` is the
    :class:`InstanceSink` (sub)class that receives C-MOVE and C-GET instances.
    """

    def __init__(
        self,
        pacs: PacsSettings,
        staging_dir: Path,
        transport: str,
        scp_endpoint: tuple[str, int] | None = None,
        sink_class: type[InstanceSink] = InstanceSink,
    ) -> None:
        if transport not in (*DIMSE_TRANSPORTS, "dicomweb"):
            raise ValueError(f"unknown transport {transport!r}")
        self.pacs = pacs
        self.transport = transport
        self.staging_root = staging_dir
        self.scp_ae, scp_port = scp_endpoint or pacs.scp_endpoints()[0]
        allowed = frozenset({pacs.called_ae}) if transport == "c-move" else None
        self.sink = sink_class(self.staging_root, allowed_calling_aes=allowed)
        self._scp = (
            StorageSCP(
                self.scp_ae,
                scp_port,
                self.sink,
                bind_address=pacs.scp_bind_address,
                tls=pacs.tls,
                timeout_s=pacs.timeout_s,
                allowed_peers=pacs.scp_allowed_peers,
                pacs_host=pacs.host,
                allow_plaintext=pacs.scp_allow_plaintext,
                tls_handshake_timeout_s=pacs.tls_handshake_timeout_s,
                max_pdu_kb=pacs.max_pdu_kb,
                max_instance_mb=pacs.max_instance_mb,
            )
            if transport == "c-move"
            else None
        )
        self._web: DicomwebClient | None = None

    def __enter__(self) -> Retriever:
        if self._scp is not None:
            self._scp.start()
        if self.transport == "dicomweb":
            self._web = DicomwebClient.from_settings(self.pacs)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._scp is not None:
            self._scp.stop()
        self.sink.close()
        if self._web is not None:
            self._web.close()
            self._web = None

    def _fetch(self, study_uid: str, series_uid: str, subset: list[str] | None) -> dicom.SubOperations:
        pacs = self.pacs
        if self.transport == "c-move":
            return dicom.move(pacs, self.scp_ae, study_uid, series_uid, subset, pacs.timeout_s)
        return dicom.get(
            pacs, study_uid, series_uid, self.sink.handle_store, CT_STORAGE_CLASSES, subset, pacs.timeout_s
        )

    def retrieve(self, study_uid: str, series_uid: str, expected: set[str] | int | None = None) -> RetrievedSeries:
        """Retrieve one series until every expected instance is staged; raise :class:`RetrievalError` if not.

        ``expected`` is the set of SOPInstanceUIDs the PACS lists for the series, or only their number
        (NumberOfSeriesRelatedInstances, which selection's SERIES-level C-FIND already has), or None to list them
        here (IMAGE-level C-FIND). With a number the first attempt asks for the whole series and accepts any of its
        instances; the list is fetched only when fewer arrive, to ask for exactly the missing ones.

        A complete series' directory is fsynced once before it is returned (each file was fsynced before its
        rename), so what the ledger then records as staged survives a power loss.
        """
        record = self._retrieve(study_uid, series_uid, expected)
        staging.fsync_directory(record.path)
        return record

    def _retrieve(self, study_uid: str, series_uid: str, expected: set[str] | int | None) -> RetrievedSeries:
        started = time.perf_counter()
        tag = uid_hash(series_uid)
        attempts_used = 0
        self._sweep(study_uid, series_uid)
        if isinstance(expected, int):
            staged = len(staging.staged_instances(self.staging_root, study_uid, series_uid))
            check_free_space(self.pacs, self.staging_root, series_uid, max(expected - staged, 0))
            attempts_used, answered = self._fetch_counted(study_uid, series_uid, expected)
            expected = answered if answered is not None else self._listing(study_uid, series_uid)
        if expected is None:
            expected = self._listing(study_uid, series_uid)
        if not expected:
            raise RetrievalError(f"series {tag}: the PACS lists no instances", "series_empty")
        unlisted = self._remove_unlisted(study_uid, series_uid, expected)
        missing = expected - staging.staged_instances(self.staging_root, study_uid, series_uid)
        check_free_space(self.pacs, self.staging_root, series_uid, len(missing))
        if self._web is not None:
            record = self._web.retrieve_series(study_uid, series_uid, self.staging_root, expected)
            unlisted += self._remove_unlisted(study_uid, series_uid, expected)
            record = replace(
                record,
                attempts=record.attempts + attempts_used,
                seconds=time.perf_counter() - started,
                unlisted=unlisted,
            )
            return self._checked(record, "")
        directory = staging.series_dir(self.staging_root, study_uid, series_uid)
        attempts = attempts_used
        status = "already staged" if not attempts_used else "the whole series came back short"
        while missing and attempts < self.pacs.max_attempts:
            if attempts:
                time.sleep(min(0.5 * 2**attempts, 8.0))
            attempts += 1
            subset = None if missing == expected else sorted(missing)
            self.sink.expect(study_uid, series_uid, missing)
            try:
                status = self._fetch(study_uid, series_uid, subset).meaning
            except dicom.DicomError as exc:
                status = str(exc)
                LOG.warning("series %s: %s attempt %d failed: %s", tag, self.transport, attempts, exc)
            finally:
                self.sink.flush()
                self.sink.forget(missing)
            missing = expected - staging.staged_instances(self.staging_root, study_uid, series_uid)
            LOG.info(
                "series %s: %s attempt %d: %d/%d staged (%s)",
                tag, self.transport, attempts, len(expected) - len(missing), len(expected), status,
            )  # fmt: skip
        unlisted += self._remove_unlisted(study_uid, series_uid, expected)
        record = RetrievedSeries(
            study_uid=study_uid,
            series_uid=series_uid,
            path=directory,
            expected=len(expected),
            received=len(expected) - len(missing),
            transport=self.transport,
            seconds=time.perf_counter() - started,
            bytes=_directory_bytes(directory),
            attempts=attempts,
            missing=tuple(sorted(missing)),
            unlisted=unlisted,
        )
        return self._checked(record, f"; last answer: {status}")

    def _listing(self, study_uid: str, series_uid: str) -> set[str]:
        """The SOPInstanceUIDs the PACS lists for a series: QIDO-RS over DICOMweb, IMAGE-level C-FIND otherwise."""
        if self._web is not None:
            return self._web.series_instances(study_uid, series_uid)
        return expected_instances(self.pacs, study_uid, series_uid)

    def _remove_unlisted(self, study_uid: str, series_uid: str, listed: set[str]) -> int:
        """Remove the staged instances of a series that ``listed`` does not name; return how many were removed.

        Such a file is an instance the PACS sent unasked that names the series, or one an earlier attempt staged
        that the PACS no longer lists (deleted or replaced since): either would end up in the volume.
        """
        unlisted = staging.staged_instances(self.staging_root, study_uid, series_uid) - listed
        removed = staging.remove_instances(self.staging_root, study_uid, series_uid, unlisted)
        if removed:
            LOG.warning(
                "series %s: removed %d staged instance(s) the PACS does not list for the series: %s",
                uid_hash(series_uid), removed, ", ".join(sorted(uid_hash(uid) for uid in unlisted)[:10]),
            )  # fmt: skip
        return removed

    def fetch_instances(self, study_uid: str, series_uid: str, sop_instance_uids: Collection[str]) -> set[str]:
        """Stage exactly these instances of a series, in one request (an IMAGE-level C-MOVE/C-GET with their UIDs,
        or WADO-RS per instance), never the whole series; return those of them now staged. One attempt: the caller
        decides what a missing one means (header sampling logs it and goes on)."""
        wanted = set(sop_instance_uids)
        if self._web is not None:
            try:
                self._web.retrieve_instances(study_uid, series_uid, sorted(wanted), self.staging_root)
            except DicomwebError as exc:
                LOG.warning(
                    "series %s: DICOMweb fetch of %d instance(s) failed: %s", uid_hash(series_uid), len(wanted), exc
                )
        else:
            self.sink.expect(study_uid, series_uid, wanted)
            try:
                self._fetch(study_uid, series_uid, sorted(wanted))
            except dicom.DicomError as exc:
                LOG.warning("series %s: %s of %d instance(s) failed: %s", uid_hash(series_uid), self.transport,
                            len(wanted), exc)  # fmt: skip
            finally:
                self.sink.flush()
                self.sink.forget(wanted)
        return wanted & staging.staged_instances(self.staging_root, study_uid, series_uid)

    def _sweep(self, study_uid: str, series_uid: str) -> None:
        """Remove what a crashed earlier attempt left half-written in the series' directory, and say how much."""
        # Generous beside pacs.timeout_s: a younger temporary file may still be written by another process.
        grace = max(staging.PARTIAL_GRACE_S, 4 * self.pacs.timeout_s)
        removed = staging.sweep_partial(staging.series_dir(self.staging_root, study_uid, series_uid), grace)
        if removed:
            LOG.info("series %s: removed %d partial file(s) left by an earlier attempt", uid_hash(series_uid), removed)

    def _fetch_counted(self, study_uid: str, series_uid: str, count: int) -> tuple[int, set[str] | None]:
        """Ask for the whole series at once, accepting instances by their series, unless half of its ``count``
        instances or more are staged already (a resumed series is completed instance by instance from the
        listing); return the attempts spent and, when the answer proves the series, the SOPInstanceUIDs it holds
        (None: the caller lists the series and judges what arrived against that).

        An answer proves the series when it came whole and holds exactly ``count`` distinct instances (selection's
        NumberOfSeriesRelatedInstances), each verified from its own bytes as an instance of this series and staged:
        over DICOMweb, a multipart answer that ended with its closing delimiter and refused no part; over C-MOVE and
        C-GET, a final status of success with no failed or warning sub-operation and as many completed as were
        staged. That is the PACS's own account of the series at that moment, so it stands for the IMAGE-level
        listing, which costs Orthanc about 1.5 ms of CPU per instance over QIDO-RS (it reads every file), more than
        serving the bytes. Anything else (a broken or short answer, a duplicate, a count that differs from the
        SERIES-level C-FIND's) falls back to the listing.
        """
        staged = staging.staged_instances(self.staging_root, study_uid, series_uid)
        if count <= 0 or len(staged) >= count / 2:
            return 0, None
        answered = (
            self._whole_series_web(study_uid, series_uid) if self._web else self._whole_series(study_uid, series_uid)
        )
        if answered is None or len(answered) != count:
            LOG.info(
                "series %s: the whole-series answer does not prove the series (%s of %d counted instances): "
                "listing it", uid_hash(series_uid), "no count" if answered is None else len(answered), count,
            )  # fmt: skip
            return 1, None
        return 1, answered

    def _whole_series_web(self, study_uid: str, series_uid: str) -> set[str] | None:
        """One WADO-RS request for the whole series; the SOPInstanceUIDs of a whole, clean answer, else None."""
        assert self._web is not None
        try:
            answer = self._web.retrieve_instances(study_uid, series_uid, None, self.staging_root)
        except DicomwebError as exc:
            if not exc.transient:
                raise
            LOG.warning("series %s: DICOMweb attempt failed: %s", uid_hash(series_uid), exc)
            return None
        answered = set(answer.instances)
        return answered if not answer.refused and len(answered) == len(answer.instances) else None

    def _whole_series(self, study_uid: str, series_uid: str) -> set[str] | None:
        """One C-MOVE or C-GET of the whole series; the SOPInstanceUIDs staged from it when the PACS answered
        success with every sub-operation completed and as many completed as were staged, else None."""
        tag = uid_hash(series_uid)
        self.sink.expect_series(study_uid, series_uid)
        answer: dicom.SubOperations | None = None
        try:
            answer = self._fetch(study_uid, series_uid, None)
            LOG.info("series %s: %s of the whole series: %s", tag, self.transport, answer.meaning)
        except dicom.DicomError as exc:
            LOG.warning("series %s: %s of the whole series failed: %s", tag, self.transport, exc)
        finally:
            self.sink.flush()
            self.sink.forget_series(study_uid, series_uid)
        received = self.sink.take_received(study_uid, series_uid)
        clean = answer is not None and answer.status == 0 and not answer.failed and not answer.warning
        return received if clean and answer is not None and answer.completed == len(received) else None

    def _checked(self, record: RetrievedSeries, detail: str) -> RetrievedSeries:
        if record.missing:
            raise RetrievalError(
                f"series {uid_hash(record.series_uid)}: {record.received} of {record.expected} instances after "
                f"{record.attempts} {self.transport} attempt(s){detail}",
                "retrieval_incomplete",
                record,
            )
        return record


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.dcm")) if directory.is_dir() else 0


_WORKER: Retriever | None = None


def _start_worker(pacs: PacsSettings, staging_dir: Path, transport: str, slots: Any) -> None:
    global _WORKER
    _WORKER = Retriever(pacs, staging_dir, transport, slots.get()).__enter__()


def _retrieve_in_worker(study_uid: str, series_uid: str, expected: int | None) -> RetrievedSeries | RetrievalFailure:
    assert _WORKER is not None
    return _retrieve_or_failure(_WORKER, study_uid, series_uid, expected)


def _retrieve_or_failure(
    retriever: Retriever, study_uid: str, series_uid: str, expected: int | None = None
) -> RetrievedSeries | RetrievalFailure:
    try:
        return retriever.retrieve(study_uid, series_uid, expected)
    except RetrievalError as exc:
        return RetrievalFailure(study_uid, series_uid, exc.code, str(exc))
    except (dicom.DicomError, staging.StagingError, OSError) as exc:
        return RetrievalFailure(study_uid, series_uid, "retrieval_error", str(exc))


def retrieve_all(
    pacs: PacsSettings,
    staging_dir: Path,
    series: Sequence[tuple[str, str]],
    transport: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    expected_counts: Mapping[str, int] | None = None,
) -> list[RetrievedSeries | RetrievalFailure]:
    """Retrieve ``(study_uid, series_uid)`` pairs into ``staging_dir``, ``pacs.workers`` at once; one result each, in
    order.

    ``expected_counts`` maps a SeriesInstanceUID to its instance count when the caller knows it (selection's
    SERIES-level C-FIND): such a series is listed instance by instance only if it arrives short.

    C-MOVE and C-GET workers are processes (pynetdicom is bound by Python CPU); DICOMweb workers are threads
    (socket reads and file writes release the GIL, and no process start-up is paid). A failing series becomes a
    :class:`RetrievalFailure` with its reason; it never stops the others.
    """
    transport = transport or resolve_transport(pacs)
    counts = dict(expected_counts or {})
    workers = min(pacs.workers, len(series))
    if workers <= 1:
        results: list[RetrievedSeries | RetrievalFailure] = []
        with Retriever(pacs, staging_dir, transport) as retriever:
            for study_uid, series_uid in series:
                results.append(_retrieve_or_failure(retriever, study_uid, series_uid, counts.get(series_uid)))
                if progress:
                    progress(len(results), len(series))
        return results
    if transport == "dicomweb":
        return _retrieve_in_threads(pacs, staging_dir, series, workers, progress, counts)
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs SCP threads
    slots = context.Queue()  # handed to each worker at its start: one SCP endpoint per process
    for endpoint in pacs.scp_endpoints()[:workers]:
        slots.put(endpoint)
    initargs = (pacs, staging_dir, transport, slots)
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=initargs)
    with pool:
        futures = [
            pool.submit(_retrieve_in_worker, study_uid, series_uid, counts.get(series_uid))
            for study_uid, series_uid in series
        ]
        return _in_order(series, futures, progress)


def _retrieve_in_threads(
    pacs: PacsSettings,
    staging_dir: Path,
    series: Sequence[tuple[str, str]],
    workers: int,
    progress: Callable[[int, int], None] | None,
    counts: Mapping[str, int],
) -> list[RetrievedSeries | RetrievalFailure]:
    local = threading.local()
    opened: list[Retriever] = []
    lock = threading.Lock()

    def work(study_uid: str, series_uid: str) -> RetrievedSeries | RetrievalFailure:
        if not hasattr(local, "retriever"):
            local.retriever = Retriever(pacs, staging_dir, "dicomweb").__enter__()
            with lock:
                opened.append(local.retriever)
        return _retrieve_or_failure(local.retriever, study_uid, series_uid, counts.get(series_uid))

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="dicomweb") as pool:
            futures = [pool.submit(work, study_uid, series_uid) for study_uid, series_uid in series]
            return _in_order(series, futures, progress)
    finally:
        for retriever in opened:
            retriever.__exit__(None, None, None)


def _in_order(
    series: Sequence[tuple[str, str]],
    futures: Sequence[Future[RetrievedSeries | RetrievalFailure]],
    progress: Callable[[int, int], None] | None,
) -> list[RetrievedSeries | RetrievalFailure]:
    for done, _ in enumerate(as_completed(futures), start=1):
        if progress:
            progress(done, len(series))
    return [future.result() for future in futures]
