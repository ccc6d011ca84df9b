"""Upload a generated synthetic cohort to Orthanc (REST) or any PACS (C-STORE), and a FHIR R4 server (transactions).

DICOM goes to ``POST {orthanc}/instances`` as one uncompressed ZIP archive per series, two at a time;
Orthanc answers per file ``Status: Success`` for a new instance and ``AlreadyStored`` for one it has.
To a PACS without a REST API (the sandbox dcmqrscp) it goes over C-STORE instead (:func:`load_dicom_into`): one
association per series, after an IMAGE-level C-FIND that lists what the PACS already has, so only missing instances
are sent (C-STORE answers success either way) and afterwards the same C-FIND must list every instance of the series.
FHIR goes as one transaction per patient bundle (``POST {base}``); every entry is a ``PUT`` with a
client-assigned id, so the server answers 201 for a resource it creates and 200 for one that existed.
Loading the same cohort twice therefore leaves the same contents in both servers, and the second
:class:`LoadReport` counts everything as already existing. Logs name files by patient key and UIDs only.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from pydicom.filereader import read_file_meta_info

from riskbridge.connectors import dicom, query
from riskbridge.dev.synth.generate import DICOM_DIR, FHIR_DIR, read_manifest
from riskbridge.errors import RiskbridgeError
from riskbridge.settings import PacsSettings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class LoadError(RiskbridgeError, RuntimeError):
    """Raised when a server refuses part of the cohort; the message names the file and the server's reason."""


@dataclass
class LoadReport:
    """Counts of one :func:`load` run.

    ``instances_sent`` counts the cohort's instances offered to the PACS: ``instances_new`` were stored by this run,
    ``instances_already_stored`` were there before (over C-STORE those are not sent again). ``dicom_target`` names the
    PACS in :meth:`describe`.
    """

    cohort_id: str
    dicom_target: str = "Orthanc"
    instances_sent: int = 0
    instances_new: int = 0
    instances_already_stored: int = 0
    fhir_bundles: int = 0
    fhir_created: dict[str, int] = field(default_factory=dict)
    fhir_existing: dict[str, int] = field(default_factory=dict)
    dicom_seconds: float = 0.0
    fhir_seconds: float = 0.0

    @property
    def fhir_resources_sent(self) -> int:
        """Number of FHIR resources sent (created plus already existing)."""
        return sum(self.fhir_created.values()) + sum(self.fhir_existing.values())

    def describe(self) -> str:
        """A few human-readable lines with the counts per server."""
        created = ", ".join(f"{n} {kind}" for kind, n in sorted(self.fhir_created.items())) or "none"
        existing = ", ".join(f"{n} {kind}" for kind, n in sorted(self.fhir_existing.items())) or "none"
        return "\n".join(
            [
                f"cohort {self.cohort_id} loaded",
                f"  {self.dicom_target}: {self.instances_sent} instances, {self.instances_new} new,"
                f" {self.instances_already_stored} already stored ({self.dicom_seconds:.1f} s)",
                f"  FHIR: {self.fhir_bundles} bundles; created {created}; already existing {existing}"
                f" ({self.fhir_seconds:.1f} s)",
            ]
        )

    @property
    def all_existing(self) -> bool:
        """True when nothing was new on either server (a reload of an unchanged cohort)."""
        return self.instances_new == 0 and not any(self.fhir_created.values())


def _diagnostics(response: requests.Response) -> str:
    """The server's reason for an error: OperationOutcome diagnostics, Orthanc's message, or the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500].strip() or response.reason
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        texts = [str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code")) for i in issues]
        return "; ".join(texts) or "OperationOutcome without diagnostics"
    if isinstance(body, dict) and ("Message" in body or "OrthancError" in body):
        parts = [str(body[key]) for key in ("Message", "OrthancError", "Details") if body.get(key)]
        return "; ".join(dict.fromkeys(parts))
    return json.dumps(body)[:500]


class _Sessions:
    """One requests.Session per thread (a Session is not safe to share between threads)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._all.append(session)
        return session

    def close(self) -> None:
        for session in self._all:
            session.close()


ZIP_CHUNK_BYTES = 32 * 1024 * 1024


def _dicom_chunks(out_dir: Path) -> list[list[Path]]:
    """Files grouped by series, split so that no upload exceeds :data:`ZIP_CHUNK_BYTES`."""
    chunks: list[list[Path]] = []
    for series_dir in sorted(p for p in (out_dir / DICOM_DIR).glob("*/*") if p.is_dir()):
        chunk: list[Path] = []
        size = 0
        for path in sorted(series_dir.glob("*.dcm")):
            length = path.stat().st_size
            if chunk and size + length > ZIP_CHUNK_BYTES:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(path)
            size += length
        if chunk:
            chunks.append(chunk)
    return chunks


def _upload_chunk(sessions: _Sessions, orthanc_url: str, files: list[Path], timeout_s: float) -> Counter[str]:
    """POST one ZIP archive (stored, not deflated) of a series' files; Orthanc answers one status per file."""
    where = f"series {files[0].parent.name} of study {files[0].parent.parent.name}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            archive.writestr(path.name, path.read_bytes())
    try:
        response = sessions.get().post(
            f"{orthanc_url}/instances",
            data=buffer.getvalue(),
            headers={"Content-Type": "application/zip"},
            timeout=timeout_s,
        )
    except requests.RequestException as exc:
        raise LoadError(f"Orthanc at {orthanc_url} unreachable while sending {where}: {exc}") from exc
    if response.status_code != 200:
        raise LoadError(f"Orthanc refused {where}: HTTP {response.status_code}: {_diagnostics(response)}")
    answer = response.json()
    answers = answer if isinstance(answer, list) else [answer]
    statuses = Counter(str(item.get("Status", "")) for item in answers)
    if len(answers) != len(files) or set(statuses) - {"Success", "AlreadyStored"}:
        # Orthanc skips the files of an archive it cannot store without saying why: resend them one by one.
        return _upload_one_by_one(sessions, orthanc_url, files, timeout_s)
    return statuses


def _upload_one_by_one(sessions: _Sessions, orthanc_url: str, files: list[Path], timeout_s: float) -> Counter[str]:
    statuses: Counter[str] = Counter()
    for path in files:
        where = f"{path.name} (series {path.parent.name} of study {path.parent.parent.name})"
        try:
            response = sessions.get().post(
                f"{orthanc_url}/instances",
                data=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
                timeout=timeout_s,
            )
        except requests.RequestException as exc:
            raise LoadError(f"Orthanc at {orthanc_url} unreachable while sending {where}: {exc}") from exc
        if response.status_code != 200:
            raise LoadError(f"Orthanc refused {where}: HTTP {response.status_code}: {_diagnostics(response)}")
        status = str(response.json().get("Status", ""))
        if status not in ("Success", "AlreadyStored"):
            raise LoadError(f"Orthanc did not store {where}: Status {status!r}")
        statuses[status] += 1
    return statuses


def load_dicom(
    out_dir: Path,
    orthanc_url: str,
    report: LoadReport,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int = 2,
    timeout_s: float = 300.0,
) -> None:
    """Send every DICOM file of the cohort to Orthanc (one ZIP per series) and add the counts to ``report``.

    ZIP upload (``POST /instances`` with ``application/zip``, Orthanc >= 1.8.2) costs one request per series
    instead of one per file: 5x faster than per-file POSTs from Python for a small cohort.
    """
    began = time.perf_counter()
    chunks = _dicom_chunks(out_dir)
    total = sum(len(chunk) for chunk in chunks)
    sessions = _Sessions()
    statuses: Counter[str] = Counter()
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(lambda chunk: _upload_chunk(sessions, orthanc_url, chunk, timeout_s), chunks)
            for chunk, result in zip(chunks, results, strict=True):
                statuses.update(result)
                done += len(chunk)
                if progress:
                    progress("orthanc", done, total)
    finally:
        sessions.close()
    report.instances_sent += total
    report.instances_new += statuses["Success"]
    report.instances_already_stored += statuses["AlreadyStored"]
    report.dicom_seconds += time.perf_counter() - began
    log.info(
        "synth load: %d instances to Orthanc (%d new, %d already stored)",
        total,
        statuses["Success"],
        statuses["AlreadyStored"],
    )


# C-STORE statuses that mean "stored": success and the warnings (coercion of data elements, elements discarded,
# data set does not match the SOP class).
_STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def _series_files(out_dir: Path) -> list[list[Path]]:
    """The cohort's DICOM files, one list per series (``dicom/<study UID>/<series UID>/<SOP instance UID>.dcm``)."""
    series = (sorted(d.glob("*.dcm")) for d in sorted((out_dir / DICOM_DIR).glob("*/*")) if d.is_dir())
    return [files for files in series if files]


def _listed(pacs: PacsSettings, study_uid: str, series_uid: str, timeout_s: float, where: str) -> set[str]:
    try:
        instances = query.find_instances(pacs, study_uid, series_uid, timeout_s=timeout_s)
        return {instance.sop_instance_uid for instance in instances}
    except dicom.DicomError as exc:
        raise LoadError(f"cannot list {where}: {exc}") from exc


class _NoResponse(Exception):
    """The PACS stopped answering within one association: worth another association."""


def _send(pacs: PacsSettings, paths: list[Path], where: str, timeout_s: float) -> None:
    """C-STORE ``paths`` over one association; raise :class:`_NoResponse` when the PACS stops answering."""
    metas = {path: read_file_meta_info(path) for path in paths}
    ae = dicom.new_ae(pacs.calling_ae, timeout_s)
    for sop_class, syntax in sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas.values()}
    ):
        ae.add_requested_context(sop_class, syntax)
    try:
        assoc = dicom.associate(pacs, (), "C-STORE", timeout_s, ae=ae)
    except dicom.DicomError as exc:
        raise LoadError(f"cannot store {where}: {exc}") from exc
    answered = False
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # pynetdicom: no accepted presentation context for this class and syntax
                meta = metas[path]
                raise LoadError(
                    f"{dicom.peer_name(pacs)} refused {path.name} ({where}): SOP class {meta.MediaStorageSOPClassUID}"
                    f" with transfer syntax {meta.TransferSyntaxUID} not accepted ({exc})"
                ) from None
            if not status or "Status" not in status:
                raise _NoResponse(f"no C-STORE response for {path.name} within {timeout_s:.0f} s")
            if int(status.Status) not in _STORED:
                raise LoadError(
                    f"{dicom.peer_name(pacs)} did not store {path.name} ({where}): status 0x{int(status.Status):04X}"
                )
        answered = True
    finally:
        if assoc.is_established:
            if answered:
                assoc.release()
            else:  # after a missing response the association's state is unknown: abort, do not wait for a release
                assoc.abort()


def _store_series(pacs: PacsSettings, files: list[Path], timeout_s: float) -> tuple[int, int]:
    """C-STORE the files of one series the PACS does not list yet, over one association; return (new, already).

    A C-STORE left without a response aborts the association; the series is then listed again and what is still
    missing goes over a new association, up to ``pacs.max_attempts`` times. It happens about once in ten
    534-instance loads into dcmqrscp: pynetdicom 3.0.4's reactor thread can take a response that arrives within
    microseconds (it logs "Received unexpected C-STORE service message") before ``send_c_store`` waits for it.
    """
    study_uid, series_uid = files[0].parent.parent.name, files[0].parent.name
    where = f"series {series_uid} of study {study_uid}"
    listed = _listed(pacs, study_uid, series_uid, timeout_s, where)
    already = sum(1 for path in files if path.stem in listed)
    for attempt in range(1, pacs.max_attempts + 1):
        missing = [path for path in files if path.stem not in listed]
        if not missing:
            break
        try:
            _send(pacs, missing, where, timeout_s)
        except _NoResponse as exc:
            if attempt == pacs.max_attempts:
                raise LoadError(f"{dicom.peer_name(pacs)} stopped answering while storing {where}: {exc}") from None
            log.warning("synth load: %s: %s; attempt %d of %d", dicom.peer_name(pacs), exc, attempt, pacs.max_attempts)
        listed = _listed(pacs, study_uid, series_uid, timeout_s, where)
    unlisted = [path.stem for path in files if path.stem not in listed]
    if unlisted:
        raise LoadError(
            f"{dicom.peer_name(pacs)} answered success but lists {len(files) - len(unlisted)} of the {len(files)}"
            f" instances of {where} (first missing: {unlisted[0]})"
        )
    return len(files) - already, already


def load_dicom_into(
    pacs: PacsSettings,
    cohort_dir: Path,
    report: LoadReport | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int = 1,
    timeout_s: float | None = None,
) -> LoadReport:
    """C-STORE every DICOM file of the cohort in ``cohort_dir`` to ``pacs``; add the counts to ``report`` and return it.

    Idempotent: an IMAGE-level C-FIND per series lists what the PACS has, only the missing instances are sent (one
    association per series, ``workers`` series at a time), and the same C-FIND must then list them all, so a PACS
    that answers success without indexing an instance fails the load. One worker by default: dcmqrscp's forked
    children name stored files from the clock (seeded with ``time()``), and two associations storing at once lost
    files (status 0xC000, "Cannot open file"). ``report`` defaults to a new one for the cohort;
    ``progress(stage, done, total)`` is called with the stage "c-store". Raises :class:`LoadError` naming the file or
    series and the PACS's answer.
    """
    cohort_dir = Path(cohort_dir)
    if report is None:
        report = LoadReport(cohort_id=str(read_manifest(cohort_dir)["cohort_id"]))
    report.dicom_target = f"{dicom.peer_name(pacs)} (C-STORE)"
    began = time.perf_counter()
    series = _series_files(cohort_dir)
    total = sum(len(files) for files in series)
    timeout = timeout_s or pacs.timeout_s
    new = already = done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda files: _store_series(pacs, files, timeout), series)
        for files, (stored, existing) in zip(series, results, strict=True):
            new += stored
            already += existing
            done += len(files)
            if progress:
                progress("c-store", done, total)
    report.instances_sent += total
    report.instances_new += new
    report.instances_already_stored += already
    report.dicom_seconds += time.perf_counter() - began
    log.info("synth load: %d instances to %s (%d new, %d already stored)", total, dicom.peer_name(pacs), new, already)
    return report


def _send_bundle(
    sessions: _Sessions, fhir_base_url: str, path: Path, timeout_s: float
) -> tuple[Counter[str], Counter[str]]:
    bundle: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    entries = bundle.get("entry") or []
    where = f"bundle {path.name} (patient {path.stem})"
    try:
        response = sessions.get().post(
            fhir_base_url,
            data=json.dumps(bundle).encode("utf-8"),
            timeout=timeout_s,
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Prefer": "return=minimal"},
        )
    except requests.RequestException as exc:
        raise LoadError(f"FHIR server at {fhir_base_url} unreachable while sending {where}: {exc}") from exc
    if response.status_code != 200:
        raise LoadError(f"FHIR server refused {where}: HTTP {response.status_code}: {_diagnostics(response)}")
    answers = response.json().get("entry") or []
    if len(answers) != len(entries):
        raise LoadError(f"FHIR server answered {len(answers)} entries for the {len(entries)} of {where}")
    created: Counter[str] = Counter()
    existing: Counter[str] = Counter()
    for sent, answer in zip(entries, answers, strict=True):
        kind = sent["resource"]["resourceType"]
        status = str(answer.get("response", {}).get("status", ""))
        if status.startswith("201"):
            created[kind] += 1
        elif status.startswith("200"):
            existing[kind] += 1
        else:
            raise LoadError(f"FHIR server answered {status!r} for {kind}/{sent['resource']['id']} in {where}")
    return created, existing


def load_fhir(
    out_dir: Path,
    fhir_base_url: str,
    report: LoadReport,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int = 2,
    timeout_s: float = 120.0,
) -> None:
    """Send every patient bundle of the cohort to the FHIR server and add the counts to ``report``."""
    began = time.perf_counter()
    base = fhir_base_url.rstrip("/")
    bundles = sorted((out_dir / FHIR_DIR).glob("*.json"))
    sessions = _Sessions()
    created: Counter[str] = Counter()
    existing: Counter[str] = Counter()
    try:
        # Bundles of different patients share no resources, so sending them concurrently is safe.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(lambda p: _send_bundle(sessions, base, p, timeout_s), bundles)
            for done, (new, old) in enumerate(results, start=1):
                created.update(new)
                existing.update(old)
                if progress:
                    progress("fhir", done, len(bundles))
    finally:
        sessions.close()
    report.fhir_bundles += len(bundles)
    for kind, count in created.items():
        report.fhir_created[kind] = report.fhir_created.get(kind, 0) + count
    for kind, count in existing.items():
        report.fhir_existing[kind] = report.fhir_existing.get(kind, 0) + count
    report.fhir_seconds += time.perf_counter() - began
    log.info(
        "synth load: %d bundles to FHIR (%d resources created, %d existing)",
        len(bundles),
        sum(created.values()),
        sum(existing.values()),
    )


def load(
    out_dir: Path,
    orthanc_url: str,
    fhir_base_url: str,
    progress: Callable[[str, int, int], None] | None = None,
    dicom_workers: int = 2,
    fhir_workers: int = 2,
    pacs: PacsSettings | None = None,
) -> LoadReport:
    """Upload the cohort in ``out_dir`` to Orthanc and the FHIR server; idempotent (see the module docstring).

    With ``pacs``, the DICOM files go to that PACS over C-STORE (:func:`load_dicom_into`, e.g. the sandbox dcmqrscp)
    instead of to ``orthanc_url``, one series at a time (``dicom_workers`` applies to Orthanc only).
    ``progress(stage, done, total)`` is called with the stages "orthanc" (or "c-store") and "fhir". Raises
    :class:`LoadError` naming the file and the server's diagnostics when a server refuses something, and
    riskbridge.dev.synth.cohort.CohortError when ``out_dir`` holds no complete cohort.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    report = LoadReport(cohort_id=str(manifest["cohort_id"]))
    if pacs is not None:
        load_dicom_into(pacs, out_dir, report, progress)  # one association at a time (see load_dicom_into)
    else:
        load_dicom(out_dir, orthanc_url.rstrip("/"), report, progress, workers=dicom_workers)
    load_fhir(out_dir, fhir_base_url, report, progress, workers=fhir_workers)
    report.dicom_seconds = round(report.dicom_seconds, 3)
    report.fhir_seconds = round(report.fhir_seconds, 3)
    return report
