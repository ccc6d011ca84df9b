"""Unit tests of the Bulk Data export client without a server: Retry-After waits, the kick-off's Parameters,
capability detection from a CapabilityStatement, NDJSON reading, error messages, and a whole export (kick-off,
polls, downloads, cancel) driven through a scripted in-memory Session with a fake clock."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir_responses import ScriptedSession, make_response
from pydantic import SecretStr

from riskbridge.connectors.fhir import FhirClient, FhirError
from riskbridge.connectors.fhir.bulk import (
    NDJSON,
    BulkExport,
    BulkExportError,
    ExportManifest,
    bulk_export,
    declares_bulk_export,
    export_parameters,
    poll_delay,
    read_ndjson,
    supports_bulk_export,
)
from riskbridge.errors import FhirServerError
from riskbridge.settings import FhirAuth, FhirRetry, FhirSettings

BASE = "https://fhir.test/fhir"  # https: credentials are refused over plain http to a remote host
STATUS_URL = f"{BASE}/$export-poll-status?_jobId=5a53cfad-5615-4f56-87b6-af4bc7bf5515"
PATIENTS = ["rb-cafe0123-p0001", "rb-cafe0123-p0002"]

Handler = Callable[[str, str, dict[str, str], Any], requests.Response]


# --- a scripted Session and a fake clock -------------------------------------------------------------------------


def outcome(status: int, text: str) -> requests.Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }
    return make_response(status, body)


class FakeTime:
    """A clock that only sleeping advances; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_client(handler: Handler, auth: FhirAuth | None = None) -> tuple[FhirClient, ScriptedSession, FakeTime]:
    session = ScriptedSession(handler)
    fake = FakeTime()
    settings = FhirSettings(base_url=BASE, auth=auth or FhirAuth(), retry=FhirRetry(max_attempts=2))
    return FhirClient(settings, sleep=fake.sleep, clock=fake.clock, session=session), session, fake


def ndjson(*resources: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(resource).encode() + b"\n" for resource in resources)


def condition(n: int, patient: str = PATIENTS[0]) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": f"c{n}", "subject": {"reference": f"Patient/{patient}"}}


def manifest(output: list[dict[str, Any]], *, requires_token: bool = True, error: list | None = None) -> dict:
    return {
        "transactionTime": "2026-12-07T05:36:47.340+00:00",
        "request": f"{BASE}/Patient/$export",
        "requiresAccessToken": requires_token,
        "output": output,
        "error": error or [],
    }


class FakeServer:
    """A bulk export server: kick-off 202, ``running`` polls answering 202, then the manifest and its files."""

    def __init__(self, running: int = 2, retry_after: str | None = "120") -> None:
        self.running = running
        self.retry_after = retry_after
        self.files: dict[str, tuple[bytes, str]] = {
            f"{BASE}/Binary/cond1": (ndjson(condition(1), condition(2)), NDJSON),
            f"{BASE}/Binary/cond2": (ndjson(condition(3, PATIENTS[1])), NDJSON),
            f"{BASE}/Binary/enc1": (ndjson({"resourceType": "Encounter", "id": "e1"}), NDJSON),
        }
        self.output = [
            {"type": "Condition", "url": f"{BASE}/Binary/cond1"},
            {"type": "Encounter", "url": f"{BASE}/Binary/enc1"},
            {"type": "Condition", "url": f"{BASE}/Binary/cond2"},
        ]
        self.deleted = 0

    def __call__(self, method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        if method == "POST" and url.endswith("$export"):
            return make_response(202, headers={"Content-Location": STATUS_URL})
        if url == STATUS_URL and method == "DELETE":
            self.deleted += 1
            return outcome(202, "Job instance <5a53cfad> successfully cancelled.")
        if url == STATUS_URL:
            if self.running > 0:
                self.running -= 1
                extra = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
                return make_response(202, headers={"X-Progress": "Build in progress", **extra})
            return make_response(200, manifest(self.output), {"Content-Type": "application/json"})
        if url in self.files:
            content, content_type = self.files[url]
            return make_response(200, raw=content, headers={"Content-Type": content_type})
        return outcome(404, f"unexpected {method} {url}")


# --- waits -------------------------------------------------------------------------------------------------------


def test_poll_delay_honours_retry_after_within_bounds() -> None:
    assert poll_delay("5", 1) == 5.0
    assert poll_delay("120", 1) == 30.0  # HAPI always asks for 120 s: capped
    assert poll_delay("120", 1, max_s=2.0) == 2.0
    assert poll_delay("0", 1) == 1.0  # never hammer the server
    assert poll_delay("0", 1, min_s=0.25) == 0.25


def test_poll_delay_reads_an_http_date() -> None:
    now = datetime(2026, 12, 7, 5, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=12), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=12), usegmt=True)
    assert poll_delay(later, 1, now=now) == pytest.approx(12.0)
    assert poll_delay(earlier, 1, now=now) == 1.0


def test_poll_delay_without_retry_after_doubles_up_to_the_cap() -> None:
    assert [poll_delay(None, n, max_s=10.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert poll_delay("soon", 3, max_s=10.0) == 4.0  # unreadable: as if absent
    assert poll_delay("120", 1, max_s=0.5) == poll_delay(None, 4, max_s=0.5) == 0.5  # a cap below min_s wins
    with pytest.raises(ValueError, match="positive"):
        poll_delay(None, 1, min_s=0.0)


def test_bad_intervals_are_refused_before_a_job_starts(tmp_path: Path) -> None:
    client, session, _ = make_client(FakeServer())
    with pytest.raises(ValueError, match="positive"):
        bulk_export(client, ["Condition"], out_dir=tmp_path, timeout_s=0)
    assert session.calls == []


# --- the kick-off's parameters -----------------------------------------------------------------------------------


def test_export_parameters_carry_types_since_filters_and_patients() -> None:
    since = datetime(2024, 1, 1, 8, 30, tzinfo=timezone(timedelta(hours=1)))
    body = export_parameters(
        ["Condition", "Encounter", "Condition"],
        patient_ids=[PATIENTS[0], PATIENTS[1], PATIENTS[0]],
        since=since,
        type_filters=["Condition?code=http://snomed.info/sct|363358000"],
    )
    assert body["resourceType"] == "Parameters"
    assert body["parameter"] == [
        {"name": "_type", "valueString": "Condition,Encounter"},
        {"name": "_since", "valueInstant": "2024-01-01T08:30:00+01:00"},
        {"name": "_typeFilter", "valueString": "Condition?code=http://snomed.info/sct|363358000"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{PATIENTS[0]}"}},
        {"name": "patient", "valueReference": {"reference": f"Patient/{PATIENTS[1]}"}},
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resource_types": []}, "at least one resource type"),
        ({"resource_types": ["condition"]}, "not a resource type"),
        ({"since": datetime(2024, 1, 1)}, "timezone-aware"),
        ({"type_filters": ["Observation?code=x"]}, "requested type"),
        ({"type_filters": ["Condition"]}, "requested type"),
        ({"patient_ids": ["a,b"]}, "not a valid FHIR id"),
    ],
)
def test_export_parameters_refuse_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"resource_types": ["Condition"], **kwargs}
    types = arguments.pop("resource_types")
    with pytest.raises(ValueError, match=message):
        export_parameters(types, **arguments)


# --- capability detection ----------------------------------------------------------------------------------------


def capability_statement(system: bool = True, patient: bool = True, group: bool = True) -> dict[str, Any]:
    """Shaped like HAPI 8.8.0's answer with the Bulk Data provider registered."""
    return {
        "resourceType": "CapabilityStatement",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "rest": [
            {
                "mode": "server",
                "operation": [{"name": "meta", "definition": f"{BASE}/OperationDefinition/Multi-its-meta"}]
                + (
                    [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]
                    if system
                    else []
                ),
                "resource": [
                    {
                        "type": "Patient",
                        "operation": [
                            {"name": "export", "definition": f"{BASE}/OperationDefinition/GroupPatient-its-export"}
                        ]
                        if patient
                        else [],
                    },
                    {
                        "type": "Group",
                        "operation": [
                            {
                                "name": "group-export",
                                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export|2.0.0",
                            }
                        ]
                        if group
                        else [],
                    },
                    {"type": "Observation", "operation": [{"name": "lastn"}]},
                ],
            }
        ],
    }


def test_declares_bulk_export_per_level() -> None:
    full = capability_statement()
    assert all(declares_bulk_export(full, level) for level in ("system", "patient", "group"))
    assert not declares_bulk_export(capability_statement(system=False), "system")
    assert not declares_bulk_export(capability_statement(patient=False), "patient")
    assert declares_bulk_export(capability_statement(patient=False), "group")  # by its definition URL
    assert not declares_bulk_export(capability_statement(group=False), "group")
    assert not declares_bulk_export({"resourceType": "CapabilityStatement"})
    client_only = {"rest": [{**capability_statement()["rest"][0], "mode": "client"}]}
    assert not declares_bulk_export(client_only, "system")


def test_supports_bulk_export_reads_metadata() -> None:
    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        assert (method, url) == ("GET", f"{BASE}/metadata")
        return make_response(200, capability_statement(patient=False))

    client, _, _ = make_client(handler)
    assert supports_bulk_export(client, "system")
    assert not supports_bulk_export(client, "patient")


# --- NDJSON ------------------------------------------------------------------------------------------------------


def test_read_ndjson_yields_every_resource_file_by_file(tmp_path: Path) -> None:
    first, second = tmp_path / "Condition.1.ndjson", tmp_path / "Condition.2.ndjson"
    first.write_bytes(ndjson(condition(1)) + b"\n  \n" + ndjson(condition(2)).rstrip(b"\n"))  # blank lines, no final \n
    second.write_bytes(ndjson(condition(3)))
    assert [r["id"] for r in read_ndjson([first, second])] == ["c1", "c2", "c3"]
    assert [r["id"] for r in read_ndjson(second)] == ["c3"]


@pytest.mark.parametrize(
    ("line", "problem"), [(b'{"id": "Jane Doe"', "not JSON"), (b'["Jane Doe"]', "not a JSON object")]
)
def test_read_ndjson_names_file_and_line_never_content(tmp_path: Path, line: bytes, problem: str) -> None:
    path = tmp_path / "Patient.1.ndjson"
    path.write_bytes(ndjson({"resourceType": "Patient", "id": "p1"}) + line + b"\n")
    with pytest.raises(BulkExportError) as caught:
        list(read_ndjson([path]))
    assert str(caught.value) == f"Patient.1.ndjson line 2: {problem}"
    assert "Jane" not in str(caught.value)


def test_manifest_needs_an_output_list() -> None:
    with pytest.raises(BulkExportError, match="no output list"):
        ExportManifest.from_json({"transactionTime": "2026-01-01T00:00:00Z"})
    with pytest.raises(BulkExportError, match="without type or url"):
        ExportManifest.from_json({"output": [{"type": "Condition"}]})
    assert ExportManifest.from_json({"output": []}).requires_access_token  # required by the IG; assume the token


# --- a whole export ----------------------------------------------------------------------------------------------


def test_bulk_export_kicks_off_polls_and_streams_files(tmp_path: Path) -> None:
    server = FakeServer(running=2)
    client, session, fake = make_client(server)
    stages: list[str] = []
    files = bulk_export(
        client,
        ["Condition", "Encounter", "Observation"],
        patient_ids=PATIENTS,
        out_dir=tmp_path / "export",
        max_poll_interval_s=2.0,
        progress=lambda stage, message: stages.append(stage),
    )
    out = tmp_path / "export"
    assert files == {
        "Condition": [out / "Condition.1.ndjson", out / "Condition.2.ndjson"],
        "Encounter": [out / "Encounter.1.ndjson"],
        "Observation": [],  # requested, nothing exported
    }
    assert [r["id"] for r in read_ndjson(files["Condition"])] == ["c1", "c2", "c3"]
    assert sorted(p.name for p in out.iterdir()) == ["Condition.1.ndjson", "Condition.2.ndjson", "Encounter.1.ndjson"]

    method, url, headers, data = session.calls[0]
    assert (method, url) == ("POST", f"{BASE}/Patient/$export")
    assert headers["Prefer"] == "respond-async"
    assert headers["Cache-Control"] == "no-cache"  # never handed another client's running job
    assert headers["Content-Type"] == "application/fhir+json"
    sent = json.loads(data)
    assert [p["valueReference"]["reference"] for p in sent["parameter"] if p["name"] == "patient"] == [
        f"Patient/{pid}" for pid in PATIENTS
    ]
    assert all(pid not in url for _, url, _, _ in session.calls for pid in PATIENTS)  # ids only in bodies
    polls = [call for call in session.calls if call[1] == STATUS_URL]
    assert len(polls) == 3
    assert all(call[2]["Accept"] == "application/json" for call in polls)
    downloads = [call for call in session.calls if "/Binary/" in call[1]]
    assert all(call[2]["Accept"] == NDJSON for call in downloads)
    assert fake.sleeps == [2.0, 2.0]  # Retry-After 120 capped
    assert server.deleted == 0  # a completed job is not cancelled
    assert stages[0] == "kick-off" and "waiting" in stages and stages[-1] == "download"


def test_group_and_system_exports_use_their_endpoints(tmp_path: Path) -> None:
    server = FakeServer(running=0)
    client, session, _ = make_client(server)
    bulk_export(client, ["Condition"], group_id="cohort-1", out_dir=tmp_path / "g")
    bulk_export(client, ["Condition"], out_dir=tmp_path / "s", since="2024-01-01T00:00:00Z")
    kick_offs = [(method, url) for method, url, _, _ in session.calls if method == "POST"]
    assert kick_offs == [("POST", f"{BASE}/Group/cohort-1/$export"), ("POST", f"{BASE}/$export")]
    with pytest.raises(ValueError, match="not both"):
        bulk_export(client, ["Condition"], patient_ids=PATIENTS, group_id="g", out_dir=tmp_path)


def test_no_patients_exports_nothing_and_sends_nothing(tmp_path: Path) -> None:
    client, session, _ = make_client(FakeServer())
    assert bulk_export(client, ["Condition", "Encounter"], patient_ids=[], out_dir=tmp_path) == {
        "Condition": [],
        "Encounter": [],
    }
    assert session.calls == []
    with pytest.raises(ValueError, match="every patient"):
        BulkExport.start(client, ["Condition"], patient_ids=[])


def test_kick_off_refused_gives_the_diagnostics() -> None:
    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        return outcome(400, "HAPI-0512: Resource types [Medication] are invalid for this type of export")

    client, session, _ = make_client(handler)
    with pytest.raises(BulkExportError) as caught:
        bulk_export(client, ["Medication"], patient_ids=PATIENTS, out_dir=Path("unused"))
    error = caught.value
    assert str(error) == (
        "bulk export kick-off POST Patient/$export refused: 400 "
        "HAPI-0512: Resource types [Medication] are invalid for this type of export"
    )
    assert (error.status, error.diagnostics) == (
        400,
        "HAPI-0512: Resource types [Medication] are invalid for this type of export",
    )
    assert isinstance(error, FhirError) and isinstance(error, FhirServerError)
    assert len(session.calls) == 1  # neither retried nor cancelled


def test_kick_off_without_status_url_or_with_one_off_the_server() -> None:
    answers = iter([make_response(202), make_response(202, headers={"Content-Location": "http://evil.test/status"})])
    client, _, _ = make_client(lambda *args: next(answers))
    with pytest.raises(BulkExportError, match="202 without a Content-Location"):
        BulkExport.start(client, ["Condition"])
    with pytest.raises(BulkExportError, match="status URL rejected"):
        BulkExport.start(client, ["Condition"])


def test_failed_job_is_reported_with_diagnostics_and_status_url(tmp_path: Path) -> None:
    server = FakeServer(running=1)

    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        if url == STATUS_URL and method == "GET" and server.running == 0:
            return outcome(500, "HAPI-0488: Failed to parse match URL[Condition?foo=bar]")
        return server(method, url, headers, data)

    client, _, _ = make_client(handler)
    with pytest.raises(BulkExportError) as caught:
        bulk_export(client, ["Condition"], type_filters=["Condition?foo=bar"], out_dir=tmp_path)
    assert str(caught.value) == (
        "bulk export POST $export: the job failed: 500 HAPI-0488: Failed to parse match URL[Condition?foo=bar] "
        f"(status URL {STATUS_URL})"
    )
    assert caught.value.status == 500
    assert server.deleted == 0  # a failed job has nothing to cancel


def test_a_job_gone_from_the_server_says_so(tmp_path: Path) -> None:
    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        if url == STATUS_URL:
            return outcome(404, "Job instance <5a53cfad> was cancelled.  No status to report.")
        return FakeServer()(method, url, headers, data)

    client, _, _ = make_client(handler)
    with pytest.raises(BulkExportError, match=r"the job is gone \(cancelled, expired or unknown\): 404 Job instance"):
        bulk_export(client, ["Condition"], out_dir=tmp_path)


def test_timeout_cancels_the_job_and_names_only_the_status_url(tmp_path: Path) -> None:
    server = FakeServer(running=10**6, retry_after="3")
    client, session, fake = make_client(server)
    with pytest.raises(BulkExportError) as caught:
        bulk_export(client, ["Condition"], patient_ids=PATIENTS, out_dir=tmp_path, timeout_s=10.0)
    message = str(caught.value)
    assert message == (
        f"bulk export POST Patient/$export: not complete after 10 s; cancelled the job (status URL {STATUS_URL})"
    )
    assert all(pid not in message for pid in PATIENTS)
    assert server.deleted == 1
    assert sum(fake.sleeps) == pytest.approx(10.0)  # the last wait is cut to the deadline
    assert fake.sleeps == [3.0, 3.0, 3.0, 1.0]
    assert session.calls[-1][0] == "DELETE"


def test_an_interrupted_wait_cancels_the_job(tmp_path: Path) -> None:
    server = FakeServer(running=5)
    client, _, _ = make_client(server)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    client.sleep = interrupted
    with pytest.raises(KeyboardInterrupt):
        bulk_export(client, ["Condition"], out_dir=tmp_path)
    assert server.deleted == 1


def test_cancel_never_raises_and_runs_once() -> None:
    answers = iter([make_response(202, headers={"Content-Location": STATUS_URL}), outcome(404, "gone")])
    client, session, _ = make_client(lambda *args: next(answers))
    job = BulkExport.start(client, ["Condition"])
    assert not job.cancel()  # the server said 404: logged, not raised
    assert not job.cancel()  # nothing sent the second time
    assert [call[0] for call in session.calls] == ["POST", "DELETE"]


def test_download_before_completion_is_refused(tmp_path: Path) -> None:
    client, _, _ = make_client(FakeServer())
    with pytest.raises(BulkExportError, match="before the job completed"):
        BulkExport(client, STATUS_URL).download(tmp_path)


def test_files_off_the_server_get_no_credentials(tmp_path: Path) -> None:
    storage = "https://storage.test/exports/cond1.ndjson?sig=abc"
    server = FakeServer(running=0)
    server.files[storage] = (ndjson(condition(9)), "application/octet-stream")
    server.output = [{"type": "Condition", "url": storage}]
    auth = FhirAuth(type="bearer", token=SecretStr("t0ken"))

    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        if url == STATUS_URL and method == "GET":
            return make_response(200, manifest(server.output, requires_token=requires_token))
        return server(method, url, headers, data)

    requires_token = True
    client, session, _ = make_client(handler, auth=auth)
    with pytest.raises(BulkExportError, match="needs the access token; credentials are only sent to the server"):
        bulk_export(client, ["Condition"], out_dir=tmp_path / "a")
    assert all(call[1] != storage for call in session.calls)

    requires_token = False
    client, session, _ = make_client(handler, auth=auth)
    files = bulk_export(client, ["Condition"], out_dir=tmp_path / "b")
    assert [r["id"] for r in read_ndjson(files["Condition"])] == ["c9"]
    download = next(call for call in session.calls if call[1] == storage)
    assert "Authorization" not in download[2]
    assert session.calls[0][2]["Authorization"] == "Bearer t0ken"


def test_a_binary_resource_answer_is_decoded_and_error_files_are_kept(tmp_path: Path) -> None:
    server = FakeServer(running=0)
    content = ndjson(condition(1))
    binary = {"resourceType": "Binary", "contentType": NDJSON, "data": base64.b64encode(content).decode()}
    server.files[f"{BASE}/Binary/cond1"] = (json.dumps(binary).encode(), "application/fhir+json;charset=UTF-8")
    server.files[f"{BASE}/Binary/oo1"] = (ndjson({"resourceType": "OperationOutcome", "id": "x"}), NDJSON)
    server.output = [{"type": "Condition", "url": f"{BASE}/Binary/cond1"}]

    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        if url == STATUS_URL and method == "GET":
            errors = [{"type": "OperationOutcome", "url": f"{BASE}/Binary/oo1"}]
            return make_response(200, manifest(server.output, error=errors))
        return server(method, url, headers, data)

    client, _, _ = make_client(handler)
    files = bulk_export(client, ["Condition"], out_dir=tmp_path)
    assert files["Condition"][0].read_bytes() == content
    assert [r["resourceType"] for r in read_ndjson(files["OperationOutcome"])] == ["OperationOutcome"]


def test_a_failed_download_leaves_no_partial_file(tmp_path: Path) -> None:
    server = FakeServer(running=0)
    server.files[f"{BASE}/Binary/enc1"] = (json.dumps({"resourceType": "Bundle"}).encode(), "application/fhir+json")
    client, _, _ = make_client(server)
    with pytest.raises(BulkExportError, match="GET Encounter export file: the answer is neither NDJSON nor a Binary"):
        bulk_export(client, ["Condition", "Encounter"], out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Condition.1.ndjson"]

    del server.files[f"{BASE}/Binary/enc1"]
    with pytest.raises(BulkExportError, match=r"GET Encounter export file: 404 unexpected GET"):
        bulk_export(client, ["Condition", "Encounter"], out_dir=tmp_path / "again")
