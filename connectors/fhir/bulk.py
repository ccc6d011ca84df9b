"""FHIR Bulk Data export (``$export``): one asynchronous job instead of many searches, its NDJSON files on disk.

A training cohort's clinical data (Conditions, Encounters, Observations of thousands of patients) can be read with
batched searches (:meth:`FhirClient.search_by_patients`) or exported by the server in one job, as the FHIR Bulk Data
Access IG describes: a kick-off request (``Prefer: respond-async``) answers 202 with a status URL in
``Content-Location``; polling it answers 202 (``Retry-After``, ``X-Progress``) while the job runs and then 200 with
a manifest whose ``output`` lists one or more NDJSON files per resource type; ``DELETE`` on the status URL cancels
a job. :func:`bulk_export` does all of it and streams the files to a directory; :class:`BulkExport` exposes the
steps; :func:`read_ndjson` reads the files back; :func:`supports_bulk_export` checks the CapabilityStatement.

Everything goes through :class:`~riskbridge.connectors.fhir.FhirClient`'s HTTP layer (its session, authorizer and
retries). The kick-off is always a POST with a ``Parameters`` body, at system level, ``Patient/$export`` with the
``patient`` parameter (one reference per patient) or ``Group/[id]/$export``, so neither patient ids nor
``_typeFilter`` queries appear in URLs or access logs, and it carries ``Cache-Control: no-cache``: HAPI otherwise
answers an identical request with another client's running job, which a cancel of ours would then stop.

HAPI facts (8.8.0, the sandbox's): ``Retry-After`` is always 120 s whatever the job's size, so the wait between
polls is capped (``max_poll_interval_s``); a failed job answers 500 with an OperationOutcome, a cancelled or unknown
one 404; output files are ``Binary`` resources on the server, served as NDJSON for ``Accept:
application/fhir+ndjson``; a resource type with no matches has no output entry. Messages name the request, the
status, the server's diagnostics and the status URL (a job id), never patient ids or file contents.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin

import requests

from riskbridge.connectors.http import parse_retry_after, transport_reason

from .client import FhirClient
from .errors import FHIR_JSON, FhirError, checked, diagnostics, json_object
from .notes import media_type
from .search import check_fhir_id

__all__ = [
    "DEFAULT_MAX_POLL_INTERVAL_S",
    "DEFAULT_MIN_POLL_INTERVAL_S",
    "DEFAULT_TIMEOUT_S",
    "NDJSON",
    "BulkExport",
    "BulkExportError",
    "ExportFile",
    "ExportLevel",
    "ExportManifest",
    "bulk_export",
    "declares_bulk_export",
    "export_parameters",
    "poll_delay",
    "read_ndjson",
    "supports_bulk_export",
]

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_MIN_POLL_INTERVAL_S = 1.0
DEFAULT_MAX_POLL_INTERVAL_S = 30.0
_CHUNK_BYTES = 1 << 20
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_CANCELLED_STATUSES = (200, 202, 204)

ExportLevel = Literal["system", "patient", "group"]
# progress(stage, message): stage is "kick-off", "waiting" or "download"; messages hold no PHI.
ProgressCallback = Callable[[str, str], None]


class BulkExportError(FhirError):
    """A bulk export did not complete: kick-off refused, job failed or gone, timed out, or a file unusable.

    A :class:`FhirError` (so a :class:`riskbridge.errors.FhirServerError`) with the HTTP ``status`` and the
    server's ``diagnostics`` where the server answered.
    """


# --- pure parts ---------------------------------------------------------------------------------------------------


def poll_delay(
    retry_after: str | None,
    polls: int,
    *,
    min_s: float = DEFAULT_MIN_POLL_INTERVAL_S,
    max_s: float = DEFAULT_MAX_POLL_INTERVAL_S,
    now: datetime | None = None,
) -> float:
    """Seconds to wait before the next status request, after ``polls`` (1, 2, ...) answered "in progress".

    ``Retry-After`` (delay-seconds or an HTTP-date) is honoured within ``[min_s, max_s]``: never sooner than
    ``min_s`` (a date in the past or ``0`` would make us hammer the server), never later than ``max_s`` (HAPI asks
    for 120 s whatever the job). Without one the wait doubles from ``min_s`` up to ``max_s``. A ``max_s`` below
    ``min_s`` wins.
    """
    _check_intervals(min_s, max_s)
    floor = min(min_s, max_s)
    asked = parse_retry_after(retry_after, now)
    if asked is None:
        asked = floor * 2 ** max(0, polls - 1)
    return min(max_s, max(floor, asked))


def _check_intervals(min_s: float, max_s: float, timeout_s: float = 1.0) -> None:
    """ValueError unless the poll intervals and the timeout are positive."""
    if min_s <= 0 or max_s <= 0 or timeout_s <= 0:
        raise ValueError("poll intervals and timeout must be positive")


def export_parameters(
    resource_types: Sequence[str],
    *,
    patient_ids: Sequence[str] = (),
    since: datetime | str | None = None,
    type_filters: Iterable[str] = (),
) -> dict[str, Any]:
    """The kick-off's ``Parameters`` body: ``_type``, ``_since``, one ``_typeFilter`` and one ``patient`` each.

    Raises ValueError for an empty or malformed type list, a naive ``since`` (it would be read in the server's
    zone), a type filter not of the form ``Type?query`` for a requested type, or a patient id that is not a FHIR id.
    """
    types = list(dict.fromkeys(resource_types))
    if not types:
        raise ValueError("name at least one resource type to export")
    for resource_type in types:
        if not _RESOURCE_TYPE.fullmatch(resource_type):
            raise ValueError(f"not a resource type: {resource_type!r}")
    parameters: list[dict[str, Any]] = [{"name": "_type", "valueString": ",".join(types)}]
    if since is not None:
        if isinstance(since, datetime):
            if since.tzinfo is None or since.utcoffset() is None:
                raise ValueError("since must be timezone-aware")
            since = since.isoformat()
        parameters.append({"name": "_since", "valueInstant": since})
    for type_filter in type_filters:
        filtered_type, _, query = type_filter.partition("?")
        if filtered_type not in types or not query:
            raise ValueError(f"a type filter must read Type?query for a requested type: {type_filter!r}")
        parameters.append({"name": "_typeFilter", "valueString": type_filter})
    for patient_id in dict.fromkeys(patient_ids):
        parameters.append({"name": "patient", "valueReference": {"reference": f"Patient/{check_fhir_id(patient_id)}"}})
    return {"resourceType": "Parameters", "parameter": parameters}


def declares_bulk_export(capability_statement: Mapping[str, Any], level: ExportLevel = "patient") -> bool:
    """True when a CapabilityStatement declares the ``export`` operation at ``level``.

    System level: ``rest.operation``; patient and group level: the operations of the Patient or Group resource.
    An operation counts when its name is ``export`` or its definition is one of the Bulk Data IG's export
    OperationDefinitions.
    """
    for rest in capability_statement.get("rest") or []:
        if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
            continue
        if level == "system":
            operations = rest.get("operation") or []
        else:
            wanted = "Patient" if level == "patient" else "Group"
            operations = [
                operation
                for resource in rest.get("resource") or []
                if isinstance(resource, Mapping) and resource.get("type") == wanted
                for operation in resource.get("operation") or []
            ]
        if any(_is_export_operation(operation) for operation in operations):
            return True
    return False


def _is_export_operation(operation: Any) -> bool:
    """An operation entry of a CapabilityStatement that is Bulk Data's ``$export``."""
    if not isinstance(operation, Mapping):
        return False
    definition = str(operation.get("definition") or "")
    bulk_definition = definition.startswith("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/") and (
        definition.rsplit("/", 1)[-1].split("|")[0] in ("export", "patient-export", "group-export")
    )
    return operation.get("name") == "export" or bulk_definition


@dataclass(frozen=True)
class ExportFile:
    """One file of a completed export: its resource type, URL and (if the server says) resource count."""

    type: str
    url: str
    count: int | None = None


@dataclass(frozen=True)
class ExportManifest:
    """The answer of a completed export: ``output`` files, ``error`` files (OperationOutcomes) and their terms."""

    transaction_time: str | None
    requires_access_token: bool
    output: tuple[ExportFile, ...]
    error: tuple[ExportFile, ...] = ()

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ExportManifest:
        """Read a completion manifest; raises BulkExportError when ``output`` is missing or an entry is malformed."""
        output = body.get("output")
        if not isinstance(output, list):
            raise BulkExportError("bulk export manifest has no output list")
        return cls(
            transaction_time=body.get("transactionTime"),
            # Required by the IG; when missing, assume the files need the token (it then never leaves the server).
            requires_access_token=bool(body.get("requiresAccessToken", True)),
            output=tuple(_export_file(item) for item in output),
            error=tuple(_export_file(item) for item in body.get("error") or []),
        )


def _export_file(item: Any) -> ExportFile:
    """One ``output``/``error`` entry of a manifest."""
    if not isinstance(item, Mapping) or not isinstance(item.get("type"), str) or not isinstance(item.get("url"), str):
        raise BulkExportError("bulk export manifest has an entry without type or url")
    count = item.get("count")
    return ExportFile(item["type"], item["url"], count if isinstance(count, int) else None)


def read_ndjson(paths: Path | Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Yield the resources of NDJSON files (one JSON object a line; blank lines skipped), file by file.

    Raises BulkExportError naming the file and line (never its content) for a line that is not a JSON object.
    """
    for path in [paths] if isinstance(paths, Path) else paths:
        with Path(path).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    resource = json.loads(line)
                except ValueError:
                    raise BulkExportError(f"{Path(path).name} line {number}: not JSON") from None
                if not isinstance(resource, dict):
                    raise BulkExportError(f"{Path(path).name} line {number}: not a JSON object")
                yield resource


# --- the server side ----------------------------------------------------------------------------------------------


def supports_bulk_export(client: FhirClient, level: ExportLevel = "patient") -> bool:
    """True when the server's CapabilityStatement (``/metadata``) declares ``$export`` at ``level``.

    Raises FhirError when ``/metadata`` cannot be read.
    """
    what = "GET /metadata"
    response = client.send("GET", client.url_for("metadata"), what=what)
    return declares_bulk_export(json_object(checked(response, what), what), level)


def _refused(response: requests.Response, message: str) -> BulkExportError:
    """BulkExportError for an unexpected answer: ``message: <status> <diagnostics>``."""
    reason = diagnostics(response)
    return BulkExportError(f"{message}: {response.status_code} {reason}".rstrip(), response.status_code, reason)


def _json(response: requests.Response, what: str) -> dict[str, Any]:
    """The answer's JSON object; BulkExportError when it is none."""
    try:
        return json_object(response, what)
    except FhirError as exc:
        raise BulkExportError(str(exc), exc.status) from None


class BulkExport:
    """One export job on the server, from kick-off to its files: :meth:`start`, :meth:`wait`, :meth:`download`.

    :meth:`cancel` sends ``DELETE`` to the status URL (for a job that is abandoned). ``polls`` counts status
    requests; ``manifest`` is set once the job completed.
    """

    def __init__(self, client: FhirClient, status_url: str, *, what: str = "bulk export") -> None:
        """Follow the job at ``status_url`` (on ``client``'s server); ``what`` names it in messages."""
        self.client = client
        self.status_url = status_url
        self.what = what
        self.polls = 0
        self.manifest: ExportManifest | None = None
        self._ended = False  # completed, failed, gone or cancelled: nothing left to cancel

    def __repr__(self) -> str:
        """The job's status URL (it holds a job id, no PHI)."""
        return f"BulkExport({self.status_url!r})"

    @classmethod
    def start(
        cls,
        client: FhirClient,
        resource_types: Sequence[str],
        *,
        patient_ids: Sequence[str] | None = None,
        group_id: str | None = None,
        since: datetime | str | None = None,
        type_filters: Iterable[str] = (),
        progress: ProgressCallback | None = None,
    ) -> BulkExport:
        """Kick off an export of ``resource_types`` and return the job.

        ``patient_ids`` (non-empty): ``Patient/$export`` for those patients; ``group_id``: ``Group/[id]/$export``;
        neither: system-level ``$export``. ``since`` limits to resources changed after it; ``type_filters`` are
        ``Type?search`` queries (``Condition?code=...``). Raises ValueError for bad arguments and BulkExportError
        when the server refuses (with its OperationOutcome's diagnostics).
        """
        if patient_ids is not None and group_id is not None:
            raise ValueError("give patient_ids or group_id, not both")
        if patient_ids is not None and not patient_ids:
            raise ValueError("patient_ids is empty: a Patient/$export without patients exports every patient")
        if group_id is not None:
            path = f"Group/{check_fhir_id(group_id)}/$export"
        elif patient_ids is not None:
            path = "Patient/$export"
        else:
            path = "$export"
        body = export_parameters(resource_types, patient_ids=patient_ids or (), since=since, type_filters=type_filters)
        what = f"POST {path}"
        scope = f"{len(dict.fromkeys(patient_ids))} patients" if patient_ids is not None else path
        if progress:
            progress("kick-off", f"{what} ({','.join(dict.fromkeys(resource_types))})")
        # Not idempotent: a kick-off the server received starts a job, so a 502/504 is not sent again.
        response = client.send(
            "POST",
            client.url_for(path),
            what=what,
            data=json.dumps(body).encode("utf-8"),
            headers={
                "Content-Type": FHIR_JSON,
                "Accept": FHIR_JSON,
                "Prefer": "respond-async",
                "Cache-Control": "no-cache",
            },
            idempotent=False,
        )
        if response.status_code != 202:
            raise _refused(response, f"bulk export kick-off {what} refused")
        location = response.headers.get("Content-Location")
        if not location:
            raise BulkExportError(f"bulk export kick-off {what}: 202 without a Content-Location", 202)
        try:
            status_url = client.url_for(urljoin(client.base_url + "/", location))
        except FhirError as exc:
            raise BulkExportError(f"bulk export kick-off {what}: status URL rejected: {exc}", 202) from None
        log.info("fhir: bulk export of %s (%s) accepted", ",".join(dict.fromkeys(resource_types)), scope)
        return cls(client, status_url, what=f"bulk export {what}")

    # -- status ----------------------------------------------------------------------------------------------------

    def poll(self) -> tuple[ExportManifest | None, str | None, str]:
        """One status request: ``(manifest, None, "")`` when complete, else ``(None, Retry-After, X-Progress)``.

        Raises BulkExportError when the job failed (the server's diagnostics) or is gone (404: cancelled, expired
        or unknown).
        """
        self.polls += 1
        what = "GET $export-poll-status"
        response = self.client.send("GET", self.status_url, what=what, headers={"Accept": "application/json"})
        status = response.status_code
        if status == 202:
            response.close()
            return None, response.headers.get("Retry-After"), response.headers.get("X-Progress", "")
        self._ended = True
        if status == 200:
            self.manifest = ExportManifest.from_json(_json(response, what))
            return self.manifest, None, ""
        state = "is gone (cancelled, expired or unknown)" if status in (404, 410) else "failed"
        error = _refused(response, f"{self.what}: the job {state}")
        raise BulkExportError(f"{error} (status URL {self.status_url})", error.status, error.diagnostics)

    def wait(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        min_poll_interval_s: float = DEFAULT_MIN_POLL_INTERVAL_S,
        max_poll_interval_s: float = DEFAULT_MAX_POLL_INTERVAL_S,
        progress: ProgressCallback | None = None,
    ) -> ExportManifest:
        """Poll until the job completes and return its manifest; waits follow :func:`poll_delay`.

        Raises BulkExportError when the job failed or is gone, or when it is not complete ``timeout_s`` after this
        call (the job is then cancelled).
        """
        _check_intervals(min_poll_interval_s, max_poll_interval_s, timeout_s)
        clock, sleep = self.client.clock, self.client.sleep
        began = clock()
        deadline = began + timeout_s
        while True:
            manifest, retry_after, note = self.poll()
            if manifest is not None:
                log.info(
                    "fhir: %s complete after %.1f s and %d polls: %d files",
                    self.what,
                    clock() - began,
                    self.polls,
                    len(manifest.output),
                )
                return manifest
            now = clock()
            if now >= deadline:
                self.cancel()
                raise BulkExportError(
                    f"{self.what}: not complete after {timeout_s:.0f} s; cancelled the job "
                    f"(status URL {self.status_url})"
                )
            delay = poll_delay(retry_after, self.polls, min_s=min_poll_interval_s, max_s=max_poll_interval_s)
            if progress:
                progress("waiting", f"{note or 'in progress'} ({now - began:.0f} s)")
            sleep(min(delay, deadline - now))

    def cancel(self) -> bool:
        """Ask the server to stop the job and drop its files (``DELETE`` on the status URL); True when it agreed.

        Does nothing for a job that already ended. Never raises: it runs while another error is on its way.
        """
        if self._ended:
            return False
        self._ended = True
        what = "DELETE $export-poll-status"
        try:
            response = self.client.send("DELETE", self.status_url, what=what)
        except FhirError as exc:
            log.warning("fhir: %s: cancelling the job failed: %s", self.what, exc)
            return False
        response.close()
        if response.status_code in _CANCELLED_STATUSES:
            log.info("fhir: %s: job cancelled", self.what)
            return True
        log.warning("fhir: %s: cancelling the job answered %d", self.what, response.status_code)
        return False

    # -- files -----------------------------------------------------------------------------------------------------

    def download(
        self, out_dir: Path, *, resource_types: Sequence[str] = (), progress: ProgressCallback | None = None
    ) -> dict[str, list[Path]]:
        """Stream the completed job's files to ``out_dir`` as ``<Type>.<n>.ndjson``; return type -> files.

        Every type in ``resource_types`` has an entry (empty when the server exported none of it); the manifest's
        ``error`` files (OperationOutcomes about what could not be exported) come under ``OperationOutcome``.
        Raises BulkExportError before :meth:`wait` completed, for a file URL off the server that needs the access
        token, and for a download that fails.
        """
        if self.manifest is None:
            raise BulkExportError(f"{self.what}: download before the job completed")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, list[Path]] = {resource_type: [] for resource_type in resource_types}
        entries = [*self.manifest.output, *self.manifest.error]
        total_bytes = 0
        for index, entry in enumerate(entries, start=1):
            kind = "OperationOutcome" if index > len(self.manifest.output) else entry.type
            paths = files.setdefault(kind, [])
            target = out_dir / f"{kind}.{len(paths) + 1}.ndjson"
            if progress:
                progress("download", f"{kind} file {len(paths) + 1} ({index} of {len(entries)})")
            total_bytes += self._download_one(entry, target)
            paths.append(target)
        if self.manifest.error:
            log.warning("fhir: %s: the server reported %d error files", self.what, len(self.manifest.error))
        log.info("fhir: %s: %d files, %d bytes written", self.what, len(entries), total_bytes)
        return files

    def _download_one(self, entry: ExportFile, target: Path) -> int:
        """Write one output file to ``target`` (through a ``.part`` file); return its size in bytes."""
        assert self.manifest is not None
        url = urljoin(self.client.base_url + "/", entry.url)
        try:
            url, authorize = self.client.url_for(url), True
        except FhirError:
            if self.manifest.requires_access_token:
                raise BulkExportError(
                    f"{self.what}: a {entry.type} file lies off the FHIR server and needs the access token; "
                    "credentials are only sent to the server"
                ) from None
            authorize = False  # e.g. a pre-signed storage URL: no credentials leave for another host
        what = f"GET {entry.type} export file"
        response = self.client.send("GET", url, what=what, headers={"Accept": NDJSON}, authorize=authorize, stream=True)
        partial = target.with_name(target.name + ".part")
        try:
            if response.status_code != 200:
                raise _refused(response, f"{self.what}: {what}")
            written = 0
            with partial.open("wb") as handle:
                if media_type(response.headers.get("Content-Type")) in (FHIR_JSON, "application/json"):
                    # The Binary resource itself (a server that ignored Accept): its data is the file, in base64.
                    handle.write(data := _binary_data(_json(response, what), f"{self.what}: {what}"))
                    written = len(data)
                else:
                    for chunk in response.iter_content(_CHUNK_BYTES):
                        handle.write(chunk)
                        written += len(chunk)
            os.replace(partial, target)
            return written
        except requests.RequestException as exc:
            raise BulkExportError(f"{self.what}: {what} broke off: {transport_reason(exc)}") from None
        finally:
            response.close()
            partial.unlink(missing_ok=True)


def _binary_data(body: Mapping[str, Any], what: str) -> bytes:
    """The decoded ``data`` of a Binary resource; BulkExportError for anything else."""
    if body.get("resourceType") != "Binary":
        raise BulkExportError(f"{what}: the answer is neither NDJSON nor a Binary")
    try:
        return base64.b64decode(body.get("data") or "", validate=True)
    except (binascii.Error, ValueError):
        raise BulkExportError(f"{what}: Binary.data is not valid base64") from None


def bulk_export(
    client: FhirClient,
    resource_types: Sequence[str],
    *,
    out_dir: Path,
    patient_ids: Iterable[str] | None = None,
    group_id: str | None = None,
    since: datetime | str | None = None,
    type_filters: Iterable[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    min_poll_interval_s: float = DEFAULT_MIN_POLL_INTERVAL_S,
    max_poll_interval_s: float = DEFAULT_MAX_POLL_INTERVAL_S,
    progress: ProgressCallback | None = None,
) -> dict[str, list[Path]]:
    """Export ``resource_types`` and stream the NDJSON files to ``out_dir``; return type -> files.

    The scope is ``patient_ids`` (``Patient/$export`` with one ``patient`` parameter each; an empty list exports
    nothing and sends no request), ``group_id`` (``Group/[id]/$export``) or, with neither, the whole server. Every
    requested type has an entry, empty when the server had none. ``timeout_s`` bounds the wait for the job (not the
    downloads); polls follow ``Retry-After`` within ``[min_poll_interval_s, max_poll_interval_s]``. A job that is
    abandoned (timeout, interrupt, a failed poll) is cancelled with ``DELETE``. Read the files with
    :func:`read_ndjson`. Raises BulkExportError (see :class:`BulkExport`) and ValueError for bad arguments.
    """
    _check_intervals(min_poll_interval_s, max_poll_interval_s, timeout_s)  # before a job exists
    types = list(dict.fromkeys(resource_types))
    patients = list(dict.fromkeys(patient_ids)) if patient_ids is not None else None
    if patients is not None and not patients:
        log.debug("fhir: bulk export for no patients: nothing to export")
        return {resource_type: [] for resource_type in types}
    job = BulkExport.start(
        client,
        types,
        patient_ids=patients,
        group_id=group_id,
        since=since,
        type_filters=type_filters,
        progress=progress,
    )
    try:
        job.wait(
            timeout_s=timeout_s,
            min_poll_interval_s=min_poll_interval_s,
            max_poll_interval_s=max_poll_interval_s,
            progress=progress,
        )
    except BaseException:
        job.cancel()
        raise
    return job.download(out_dir, resource_types=types, progress=progress)
