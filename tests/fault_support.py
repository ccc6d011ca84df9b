"""Support for the fault suite (tests/integration/test_faults.py): a second sandbox of the test's own, a FHIR fault
proxy, and the checks of a resumed run against the synthetic cohort's truth.

The faults are real wherever a real server can be made to fail on demand: the test's own Orthanc and PostgreSQL
are killed or restarted through the sandbox code, the staging filesystem is a small tmpfs, the ``riskbridge run``
process is SIGKILLed. HAPI FHIR cannot be told to answer 503, to stall or to drop a connection half-way through a
response, so for those faults (and only those) :class:`FhirFaultProxy` sits between riskbridge and the real HAPI:
it forwards every request to HAPI unchanged and, while armed, answers the requests its rule picks with the fault.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from pydantic import SecretStr

from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.sandbox import Sandbox
from riskbridge.ledger import Ledger
from riskbridge.settings import DatabaseSettings, Settings
from riskbridge.stages import report as report_stage

# The fault sandbox's ports: beside the shared sandbox's defaults (14242, 18042, 18080, 15432, 14243, SCP 11113+).
PORTS = {
    "pacs": 24242,
    "scp": 21113,
    "orthanc_http": 28042,
    "hapi": 28080,
    "postgres": 25432,
    "dcmqrscp": 24243,
}
PARTS = ("orthanc", "hapi-fhir", "postgres")  # the dcmqrscp is not needed by any fault


def fault_sandbox_settings(base: Settings, directory: Path) -> Settings:
    """``base`` with a sandbox of its own under ``directory`` on :data:`PORTS`, and the PACS, FHIR and database
    settings that reach it (the sandbox derives none of them: they are set here as ``riskbridge sandbox up``'s
    environment would set them, e.g. RISKBRIDGE_PACS__PORT and RISKBRIDGE_FHIR__BASE_URL)."""
    sandbox = base.sandbox.model_copy(
        update={
            "dir": directory,
            "orthanc_http_port": PORTS["orthanc_http"],
            "hapi_port": PORTS["hapi"],
            "postgres_port": PORTS["postgres"],
            "dcmqrscp_port": PORTS["dcmqrscp"],
        }
    )
    pacs = base.pacs.model_copy(
        update={
            "host": "127.0.0.1",
            "port": PORTS["pacs"],
            "scp_port": PORTS["scp"],
            "dicomweb_url": f"http://127.0.0.1:{PORTS['orthanc_http']}/dicom-web",
        }
    )
    fhir = base.fhir.model_copy(update={"base_url": f"http://127.0.0.1:{PORTS['hapi']}/fhir"})
    database = DatabaseSettings(dsn=SecretStr(f"postgresql://riskbridge@127.0.0.1:{PORTS['postgres']}/riskbridge"))
    return base.model_copy(update={"sandbox": sandbox, "pacs": pacs, "fhir": fhir, "database": database})


class FaultSandbox:
    """The test's own Orthanc, HAPI FHIR and PostgreSQL (started by :class:`riskbridge.dev.sandbox.Sandbox`), which
    the faults kill and restart. Nothing here touches another sandbox's processes: every PID comes from this
    sandbox's own PID files."""

    def __init__(self, base: Settings) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="riskbridge-faults-"))
        self.directory.chmod(0o755)  # the 'postgres' account must traverse it
        self.settings = fault_sandbox_settings(base, self.directory / "sandbox")
        self.box = Sandbox(self.settings)

    def up(self) -> None:
        self.box.up(only=PARTS)

    def down(self) -> None:
        for part in self.box.select(PARTS):
            part.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self, part_name: str) -> int:
        """SIGKILL the process of this sandbox's part (a crash: no shutdown); return its PID."""
        part = self.box.select([part_name])[0]
        pid = part.running_pid()
        assert pid is not None, f"{part_name} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while part.running_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid

    def stop(self, part_name: str) -> None:
        """Stop the part as ``sandbox down`` does (PostgreSQL: fast shutdown, clients disconnected)."""
        self.box.select([part_name])[0].stop()

    def start(self, part_name: str) -> float:
        """Start the part again through the sandbox code and wait until it answers; return the seconds taken."""
        began = time.perf_counter()
        self.box.up(only=[part_name])
        return time.perf_counter() - began

    def create_database(self, prefix: str) -> DatabaseSettings:
        """An empty database in this sandbox's PostgreSQL, migrated as a ledger."""
        name = f"{prefix}_{os.urandom(6).hex()}"
        connection = psycopg2.connect(self.settings.database.dsn.get_secret_value())
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        dsn = psycopg2.extensions.make_dsn(self.settings.database.dsn.get_secret_value(), dbname=name)
        database = DatabaseSettings(dsn=SecretStr(dsn))
        with Ledger.connect(database) as ledger:
            ledger.upgrade()
        return database


# --- the FHIR fault proxy --------------------------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class FhirFaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of the real HAPI FHIR server (a fault proxy: HAPI cannot be made to
    fail on demand). Every request is forwarded to ``upstream`` with its Host header unchanged, so HAPI's paging
    links point back at the proxy. While armed, a request ``rule`` picks gets the ``mode``:

    - ``"503"``: answered 503 Service Unavailable by the proxy; HAPI never sees it;
    - ``"timeout"``: forwarded (HAPI processes it), and the answer is held back until the proxy is disarmed or
      ``hold_s`` passes, longer than the client's timeout;
    - ``"reset"``: forwarded (HAPI processes it), then the status line, the headers and half of the body are sent
      and the connection is reset (RST) mid-response.

    The fault stays on for every matching request (retries included) until :meth:`disarm`.
    """

    upstream_port: int
    mode: str = "503"
    rule: Callable[[Request], bool] = lambda request: True
    hold_s: float = 15.0
    port: int = 0
    requests: int = 0
    faulted: int = 0
    _armed: threading.Event = field(default_factory=threading.Event)
    _release: threading.Event = field(default_factory=threading.Event)
    _server: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FhirFaultProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        self.port = server.getsockname()[1]
        self._server = server
        threading.Thread(target=self._accept, name="fhir-fault-proxy", daemon=True).start()
        return self

    def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def arm(self, mode: str, rule: Callable[[Request], bool]) -> None:
        self.mode, self.rule, self.faulted = mode, rule, 0
        self._release.clear()
        self._armed.set()

    def disarm(self) -> None:
        self._armed.clear()
        self._release.set()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        try:
            while True:
                request = _read_request(reader)
                if request is None:
                    return
                with self._lock:
                    self.requests += 1
                    fault = self._armed.is_set() and self.rule(request)
                    if fault:
                        self.faulted += 1
                if fault and self.mode == "503":
                    body = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}'
                    client.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/fhir+json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    continue
                status, reason, headers, body = _forward(upstream, request)
                head = f"HTTP/1.1 {status} {reason}\r\n".encode()
                head += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers if k.lower() not in HOP_BY_HOP)
                head += f"Content-Length: {len(body)}\r\n\r\n".encode()
                if fault and self.mode == "timeout":
                    self._release.wait(self.hold_s)
                    return  # the client gave up long ago; the held answer is dropped with the connection
                if fault and self.mode == "reset":
                    client.sendall(head + body[: len(body) // 2])
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # close() with SO_LINGER 0: the kernel sends RST
                client.sendall(head + body)
        except OSError:
            return
        finally:
            upstream.close()
            reader.close()
            client.close()


def _read_request(reader: Any) -> Request | None:
    line = reader.readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        raw = reader.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lengths = [int(v) for k, v in headers if k.lower() == "content-length"]
    chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
    if chunked:
        body = b""
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                reader.readline()
                break
            body += reader.read(size)
            reader.readline()
        headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
    else:
        body = reader.read(lengths[0]) if lengths else b""
    return Request(method, target, headers, body)


def _forward(upstream: http.client.HTTPConnection, request: Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
    upstream.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
    for name, value in request.headers:
        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
            upstream.putheader(name, value)
    upstream.putheader("Content-Length", str(len(request.body)))
    upstream.endheaders(request.body or None)
    response = upstream.getresponse()
    body = response.read()
    return response.status, response.reason, response.getheaders(), body


# --- checks ----------------------------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def staged_files(staging_dir: Path) -> int:
    """Instances staged complete under ``staging_dir`` (renamed into place: ``*.dcm``)."""
    return sum(1 for _ in staging_dir.rglob("*.dcm")) if staging_dir.is_dir() else 0


@contextmanager
def ledger_cursor(database: DatabaseSettings) -> Iterator[Any]:
    connection = psycopg2.connect(database.dsn.get_secret_value(), connect_timeout=2)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def ledger_count(database: DatabaseSettings, query: str, *args: Any) -> int:
    """One count from the ledger on a connection of its own (0 while the server does not answer)."""
    try:
        with ledger_cursor(database) as cursor:
            cursor.execute(query, args)
            row = cursor.fetchone()
            return int(row[0]) if row else 0
    except psycopg2.OperationalError:
        return 0


@dataclass(frozen=True)
class Outcome:
    """What a resumed run left, checked against the cohort's truth."""

    scored: frozenset[str]
    lost: list[str]  # cohort studies neither scored nor quarantined with their truth (or a policy) reason
    duplicated: int  # RiskAssessments beyond one per key on the FHIR server
    assessments: int
    writeback_status: dict[str, int]
    run_status: str


POLICY_REASONS = ("pattern_not_validated", "pattern_below_floor", "too_much_missing", "missing_required")


def outcome(settings: Settings, fhir_url: str, run_id: int, truth: list[dict[str, Any]]) -> Outcome:
    """Studies lost and RiskAssessments duplicated by the run ``run_id`` of ``settings``' ledger.

    A cohort study is lost unless it is scored with exactly its one RiskAssessment key answered on the server, or
    quarantined with its truth reason, or (a clean study) stopped at harmonize by the minimum-data policy with a
    reason. Duplicates count every RiskAssessment of the run's identifier system past the first per identifier,
    read from the real HAPI (``fhir_url``), not through any proxy."""
    with Ledger.connect(settings.database) as ledger:
        quarantined = ledger.quarantined(run_id)
        summary = report_stage.run_summary(ledger, run_id)
        writebacks = {w.study_uid: w for w in ledger.writebacks(run_id)}
        run_status = ledger.run(run_id).status
    scored = {uid for uid, _, _ in summary.scores}
    by_identifier: dict[str, list[dict[str, Any]]] = {}
    system = settings.writeback.identifier_system
    with FhirClient(settings.fhir.model_copy(update={"base_url": fhir_url})) as client:
        for resource in client.search("RiskAssessment", {"identifier": f"{system}|"}):
            for identifier in resource.get("identifier", []):
                if identifier.get("system") == system:
                    by_identifier.setdefault(identifier["value"], []).append(resource)
    ids = {resource["id"] for found in by_identifier.values() for resource in found}
    lost = []
    for record in truth:
        uid = record["index_study"]["study_uid"]
        if record["quarantine"] is not None:
            if quarantined.get(uid, ("", "", ""))[1] != record["quarantine"] or uid in scored:
                lost.append(uid)
        elif uid in scored:
            written = writebacks.get(uid)
            if written is None or written.status not in ("created", "exists") or written.fhir_id not in ids:
                lost.append(uid)
        elif uid in quarantined:
            stage, reason, _ = quarantined[uid]
            if stage != "harmonize" or reason not in POLICY_REASONS:
                lost.append(uid)
        else:
            lost.append(uid)
    statuses: dict[str, int] = {}
    for written in writebacks.values():
        statuses[written.status] = statuses.get(written.status, 0) + 1
    return Outcome(
        scored=frozenset(scored & {r["index_study"]["study_uid"] for r in truth}),
        lost=lost,
        duplicated=sum(len(found) - 1 for found in by_identifier.values()),
        assessments=len(ids),
        writeback_status=statuses,
        run_status=run_status,
    )


def run_cli(config: Path, args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``riskbridge run`` with ``config`` in a process of its own (so that it can be SIGKILLed)."""
    executable = Path(sys.executable).parent / "riskbridge"
    command = [str(executable)] if executable.is_file() else [shutil.which("riskbridge") or "riskbridge"]
    return subprocess.Popen([*command, "--config", str(config), "run", *args], **popen)
