"""FHIR I/O benchmark: batched searches vs a per-patient loop, and transaction bundles vs single POSTs, same run.

Against one HAPI FHIR server loaded with the FHIR side of a synthetic cohort (default 1,000 patients; no DICOM is
generated), with one :class:`riskbridge.connectors.fhir.FhirClient` (pooled connections) for every arm:

- **reads**: labs (Observation by LOINC codes and a date window) and notes (DocumentReference, DiagnosticReport,
  with their text decoded) for every patient, once batched (``subject=Patient/a,Patient/b,...`` OR-lists by GET,
  and by POST ``_search``) and once naively (three searches per patient). Every arm must return the same
  resources, or the run fails;
- **writes**: RiskAssessments (fhir.resources.R4B, status final, subject, identifier, prediction
  probabilityDecimal) by conditional create, in transaction bundles vs one POST each, each arm with its own
  identifiers; then the bundles again, which must create nothing.

- **client overhead**: the requests of the best batched read arm (same URLs and bodies, same page-following, same
  concurrency), sent once by the riskbridge client and once as raw ``requests`` calls on a plain Session, and the
  same for transaction bundles (the same bundles, each arm with its own identifiers): riskbridge time / raw time;
- **filtered labs**: one OR-list of ``--batch-size`` patients for Observations with no filter, a ``code`` filter,
  and ``code`` + ``date`` (the clinical stage's search), one search each.

By default it starts its own HAPI FHIR (sandbox parts only, own directory and ports 18380 and, for a HAPI on
PostgreSQL, 18381, so a developer's sandbox is untouched; the database is H2 in memory or a PostgreSQL database
recreated empty on every start, so every start loads the cohort again); ``--hapi-database both`` runs everything
once per database. ``--fhir-url`` uses a running server instead (e.g. the sandbox's). Results are printed and
written to docs/benchmarks.md. Usage::

    .venv/bin/python bench/fhir_io.py [--hapi-database h2|postgresql|both] [--patients 1000] [--writes 1000]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from fhir.resources.R4B.riskassessment import RiskAssessment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _latency import delayed_relay
from _report import REPORT, markdown_table, write_section

from riskbridge.connectors.fhir import (
    FHIR_JSON,
    EntryResult,
    FhirClient,
    FhirError,
    capability,
    code_filter,
    date_filter,
    transaction_entry,
)
from riskbridge.connectors.http import new_session
from riskbridge.dev.sandbox import Sandbox
from riskbridge.dev.synth.cohort import LAB_WINDOW, LABS, build_cohort
from riskbridge.dev.synth.fhir import LOINC, bundle_json, patient_bundle
from riskbridge.dev.synth.generate import FHIR_DIR
from riskbridge.dev.synth.load import LoadReport, load_fhir
from riskbridge.settings import FhirSettings, Settings

BENCH_HAPI_PORT = 18380
BENCH_POSTGRES_PORT = 18381
BENCH_JAVA_OPTS = "-Xmx3g -XX:+UseSerialGC"
BENCH_SYSTEM = "urn:riskbridge:bench:fhir-io"
NOTE_TYPES = ("DocumentReference", "DiagnosticReport")


@dataclass
class Measured:
    """One arm: what it moved, in how long, with how many HTTP requests, and the CPU each side spent."""

    arm: str
    resources: int
    seconds: float
    requests: int
    client_cpu: float = 0.0
    server_cpu: float | None = None  # HAPI's and, on PostgreSQL, the database's
    database_cpu: float | None = None  # PostgreSQL's part of server_cpu

    @property
    def per_second(self) -> float:
        """Resources per second."""
        return self.resources / self.seconds if self.seconds else 0.0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads: request handlers, JIT, GC)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_settings(
    root: Path, database: str = "h2", hapi_port: int = BENCH_HAPI_PORT, postgres_port: int = BENCH_POSTGRES_PORT
) -> Settings:
    """Settings for the benchmark's own HAPI FHIR: ports apart from the default sandbox and the test suite.

    Its heap is 3 GB instead of the sandbox's 1 GB: with 1,000 patients loaded and every arm's searches stored,
    a 1 GB heap ran full (35 full collections in a few minutes while probing), which slows whichever arm runs last.
    ``database`` is the sandbox's ``hapi_database``; each database gets its own sandbox directory under ``root``.
    """
    return Settings(
        fhir={"base_url": f"http://127.0.0.1:{hapi_port}/fhir", "timeout_s": 120},
        sandbox={
            "dir": root / ("sandbox" if database == "h2" else f"sandbox-{database}"),
            "hapi_port": hapi_port,
            "hapi_java_opts": BENCH_JAVA_OPTS,
            "hapi_database": database,
            "postgres_port": postgres_port,
        },
    )


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL cluster so far: the postmaster, its live children (backends, background
    workers) and, through the postmaster's child counters, the children that have exited."""
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(rest[1]) == postmaster:
            total += (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass(frozen=True)
class ServerProcesses:
    """The processes serving FHIR, when the benchmark started them: HAPI's JVM and, on PostgreSQL, the postmaster."""

    hapi: int
    postgres: int | None = None

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far of HAPI and of PostgreSQL (0.0 without one)."""
        database = postgres_cpu_seconds(self.postgres) if self.postgres else 0.0
        return process_cpu_seconds(self.hapi), database


@dataclass(frozen=True)
class LabQuery:
    """How labs are selected: search parameters sent to the server, and the LOINC codes every result must carry."""

    params: dict[str, Any]
    codes: frozenset[str]
    description: str

    def wanted(self, observation: dict[str, Any]) -> bool:
        """True for an Observation with one of the lab codes (the server may not have filtered by code)."""
        codings = (observation.get("code") or {}).get("coding") or []
        return any(c.get("system") == LOINC and c.get("code") in self.codes for c in codings)


LAB_FILTERS = ("client", "code", "code+date")


def load_cohort(
    base_url: str, patients: int, seed: int, load: bool = True
) -> tuple[list[str], LoadReport, float, dict[str, LabQuery]]:
    """Put the cohort's FHIR bundles on the server (PUTs: a rerun changes nothing); ``load=False`` only rebuilds them.

    Returns the Patient ids, the load report and seconds, and the lab queries by :data:`LAB_FILTERS`: the cohort's
    LOINC codes filtered on the client ("client"), on the server ("code"), or on the server together with the
    union of every patient's lab window T - 48 h .. T ("code+date", the shape of the clinical stage's search).
    """
    cohort = build_cohort(seed, patients)
    patient_ids = [fp.id for patient in cohort.patients for fp in patient.fhir_patients]
    index_times = [patient.index_study.acquisition for patient in cohort.patients]
    codes = {spec.loinc for spec in LABS.values()} | {code for spec in LABS.values() for code, _ in spec.alt_loinc}
    by_code = {"code": code_filter(LOINC, sorted(codes))}
    dated = {**by_code, "date": date_filter(min(index_times) - LAB_WINDOW, max(index_times))}
    named = f"{len(codes)} LOINC codes"
    queries = {
        "client": LabQuery({}, frozenset(codes), f"{named}, filtered by the client"),
        "code": LabQuery(by_code, frozenset(codes), f"{named}, filtered by the server"),
        "code+date": LabQuery(
            dated,
            frozenset(codes),
            f"{named}, filtered by the server, dated in the union of the patients' T - 48 h .. T windows",
        ),
    }
    report = LoadReport(cohort_id=cohort.cohort_id)
    if not load:
        return patient_ids, report, 0.0, queries
    with tempfile.TemporaryDirectory(prefix="rb-bench-fhir-") as tmp:
        out = Path(tmp)
        (out / FHIR_DIR).mkdir()
        for patient in cohort.patients:
            bundle = patient_bundle(patient, cohort.cohort_id)
            if bundle is not None:
                (out / FHIR_DIR / f"{patient.key}.json").write_text(bundle_json(bundle), encoding="utf-8")
        began = time.perf_counter()
        load_fhir(out, base_url, report, workers=2)
        seconds = time.perf_counter() - began
    return patient_ids, report, seconds, queries


def _consume(client: FhirClient, resources: Iterable[dict[str, Any]], labs: LabQuery, found: set[str]) -> None:
    for resource in resources:
        kind = resource["resourceType"]
        if kind == "Observation" and not labs.wanted(resource):
            continue
        found.add(f"{kind}/{resource['id']}")
        if kind in NOTE_TYPES:
            client.note_texts(resource)


def fetch_batched(
    client: FhirClient, patient_ids: Sequence[str], labs: LabQuery, method: str, workers: int = 1
) -> set[str]:
    """Labs and notes of every patient through OR-list searches, ``workers`` searches at a time."""
    found: set[str] = set()
    lab_results = client.search_by_patients("Observation", patient_ids, labs.params, method=method, workers=workers)
    _consume(client, lab_results, labs, found)
    for resource_type in NOTE_TYPES:
        notes = client.search_by_patients(resource_type, patient_ids, method=method, workers=workers)
        _consume(client, notes, labs, found)
    return found


def fetch_naive(client: FhirClient, patient_ids: Sequence[str], labs: LabQuery) -> set[str]:
    """Labs and notes of every patient, one patient and one resource type per search."""
    found: set[str] = set()
    for patient_id in patient_ids:
        subject = f"Patient/{patient_id}"
        _consume(client, client.search("Observation", {**labs.params, "subject": subject}), labs, found)
        for resource_type in NOTE_TYPES:
            _consume(client, client.search(resource_type, {"subject": subject}), labs, found)
    return found


def timed(
    client: FhirClient | Callable[[], int],
    arm: str,
    run: Callable[[], int],
    server: ServerProcesses | None = None,
) -> Measured:
    """Run one arm and measure it: wall clock, HTTP requests (retries included), this process's CPU and, when the
    server's processes are known, the server's CPU (HAPI plus PostgreSQL). ``client`` is the FhirClient whose
    requests are counted, or a function returning the number of requests sent so far (the raw arms)."""
    sent = client if callable(client) else (lambda: client.stats.requests)
    requests_before = sent()
    hapi_before, database_before = server.cpu_seconds() if server else (0.0, 0.0)
    client_before = time.process_time()
    began = time.perf_counter()
    resources = run()
    seconds = time.perf_counter() - began
    client_cpu = time.process_time() - client_before
    server_cpu = database_cpu = None
    if server:
        hapi_after, database_after = server.cpu_seconds()
        database_cpu = database_after - database_before
        server_cpu = hapi_after - hapi_before + database_cpu
    measured = Measured(arm, resources, seconds, sent() - requests_before, client_cpu, server_cpu, database_cpu)
    server_text = f", server CPU {server_cpu:.2f} s" if server_cpu is not None else ""
    if server and server.postgres:
        server_text += f" (PostgreSQL {database_cpu:.2f} s)"
    print(
        f"{arm}: {resources} resources in {seconds:.2f} s ({measured.per_second:.0f}/s, {measured.requests} "
        f"requests; client CPU {client_cpu:.2f} s{server_text})",
        flush=True,
    )
    return measured


def risk_assessment(system: str, arm: str, patient_id: str, index: int) -> tuple[RiskAssessment, str]:
    """A minimal valid R4 RiskAssessment with a deterministic identifier, and its If-None-Exist query."""
    value = hashlib.sha256(f"{arm}|{patient_id}|{index}".encode()).hexdigest()[:32]
    probability = round(int(value[:8], 16) / 0xFFFFFFFF, 4)
    resource = RiskAssessment.model_validate(
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "identifier": [{"system": system, "value": value}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "prediction": [{"probabilityDecimal": probability}],
        }
    )
    return resource, f"identifier={system}|{value}"


def write_bundled(
    client: FhirClient, items: Sequence[tuple[RiskAssessment, str]], bundle_size: int, workers: int = 1
) -> tuple[int, int]:
    """Conditional creates in transaction bundles, ``workers`` bundles at a time (each with its own identifiers,
    as the pipeline's write-back sends them); returns (created, already existing)."""

    def send(chunk: Sequence[tuple[RiskAssessment, str]]) -> list[EntryResult]:
        return client.transaction([transaction_entry(resource, if_none_exist=query) for resource, query in chunk])

    chunks = [items[start : start + bundle_size] for start in range(0, len(items), bundle_size)]
    with ThreadPoolExecutor(workers) as pool:
        results = [result for answers in pool.map(send, chunks) for result in answers]
    return sum(result.status == 201 for result in results), sum(result.status == 200 for result in results)


def write_single(client: FhirClient, items: Sequence[tuple[RiskAssessment, str]]) -> tuple[int, int]:
    """One conditional-create POST per resource; returns (created, already existing)."""
    results = [client.conditional_create(resource, query) for resource, query in items]
    return sum(r.status == 201 for r in results), sum(r.status == 200 for r in results)


# --- client overhead: the same requests, sent by riskbridge and as raw requests calls ----------------------------


@dataclass(frozen=True)
class RecordedSearch:
    """The first request of one search as the riskbridge client sent it: method, URL, body and headers."""

    resource_type: str
    method: str
    url: str
    body: bytes | None
    headers: dict[str, str]


def recording_session(fhir: FhirSettings) -> tuple[requests.Session, list[RecordedSearch]]:
    """A Session like the client's own that records the first request of every search sent through it (the pages
    after it are followed from ``link[next]``, by the raw arm too)."""
    session = new_session(pool_size=fhir.pool_size)
    recorded: list[RecordedSearch] = []

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        request = response.request
        url = request.url or ""
        if "_getpages=" in url:
            return
        path = urlsplit(url).path.removesuffix("/_search")
        body = request.body.encode() if isinstance(request.body, str) else request.body
        headers = {name: value for name, value in request.headers.items() if name.lower() != "content-length"}
        recorded.append(RecordedSearch(path.rsplit("/", 1)[-1], request.method or "GET", url, body, headers))

    session.hooks["response"].append(record)
    return session, recorded


def client_search_keys(
    client: FhirClient, patient_ids: Sequence[str], labs: LabQuery, method: str, workers: int
) -> list[str]:
    """The riskbridge side of the read overhead pair: the batched searches, every resource kept (``Type/id``)."""
    keys = []
    for resource_type in ("Observation", *NOTE_TYPES):
        params = labs.params if resource_type == "Observation" else None
        for resource in client.search_by_patients(resource_type, patient_ids, params, method=method, workers=workers):
            keys.append(f"{resource_type}/{resource['id']}")
    return keys


class RawRequests:
    """Raw ``requests`` calls on one plain Session, counted: the reference the client's overhead is measured by."""

    def __init__(self, timeout: float) -> None:
        """A fresh Session (requests' own defaults) and a request counter."""
        self.session = requests.Session()
        self.timeout = timeout
        self.sent = 0
        self._lock = threading.Lock()

    def request(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> requests.Response:
        """Send one request and count it; an HTTP error status raises."""
        with self._lock:
            self.sent += 1
        response = self.session.request(method, url, data=body, headers=dict(headers), timeout=self.timeout)
        response.raise_for_status()
        return response

    def search(self, search: RecordedSearch) -> list[str]:
        """One search: its first request as recorded, then ``link[next]`` to the last page; ``Type/id`` of every
        resource."""
        page_headers = {name: value for name, value in search.headers.items() if name.lower() != "content-type"}
        response = self.request(search.method, search.url, search.body, search.headers)
        keys = []
        while True:
            bundle = response.json()
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource")
                if resource is not None:
                    keys.append(f"{resource['resourceType']}/{resource['id']}")
            next_url = next((link["url"] for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
            if next_url is None:
                return keys
            response = self.request("GET", next_url, None, page_headers)

    def searches(self, recorded: Sequence[RecordedSearch], workers: int) -> list[str]:
        """The recorded searches, one resource type after the other as the client runs them, ``workers`` chunk
        searches of a type at a time."""
        keys: list[str] = []
        types = list(dict.fromkeys(search.resource_type for search in recorded))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for resource_type in types:
                mine = [search for search in recorded if search.resource_type == resource_type]
                for found in pool.map(self.search, mine):
                    keys.extend(found)
        return keys

    def transactions(
        self, base_url: str, bundles: Sequence[Sequence[Mapping[str, Any]]], workers: int
    ) -> tuple[int, int]:
        """POST each transaction Bundle as the client does (same body and headers); (created, already existing)."""
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, "Prefer": "return=minimal"}

        def send(entries: Sequence[Mapping[str, Any]]) -> list[int]:
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
            answer = self.request("POST", base_url, json.dumps(bundle).encode("utf-8"), headers).json()
            return [int(entry["response"]["status"].split()[0]) for entry in answer.get("entry") or []]

        with ThreadPoolExecutor(max(1, workers)) as pool:
            statuses = [status for answered in pool.map(send, bundles) for status in answered]
        return statuses.count(201), statuses.count(200)

    def close(self) -> None:
        """Close the Session's connections."""
        self.session.close()


@dataclass
class Overhead:
    """One overhead pair: the same requests sent by the riskbridge client and as raw requests calls."""

    what: str
    client: list[Measured]
    raw: list[Measured]

    @property
    def ratio(self) -> float:
        """riskbridge time / raw time, medians of the repetitions."""
        return median_seconds(self.client) / median_seconds(self.raw)


def median_seconds(runs: Sequence[Measured]) -> float:
    """The median wall time of repeated runs of one arm."""
    return statistics.median(m.seconds for m in runs)


def measure_overhead(
    fhir: FhirSettings,
    patient_ids: Sequence[str],
    labs: LabQuery,
    best: ArmConfig,
    bundle_size: int,
    bundle_workers: int,
    writes: int,
    system: str,
    server: ServerProcesses | None,
    repeats: int,
) -> list[Overhead]:
    """The client-overhead pairs, ``repeats`` times each, riskbridge and raw alternating.

    Reads: the requests of the best batched read arm ``best``, recorded from one untimed run of the client, then
    sent by the client and by :class:`RawRequests` (same URLs, bodies, headers, page-following and concurrency);
    both must find the same resources. Writes: transaction bundles of ``bundle_size`` conditional creates,
    ``bundle_workers`` at a time; the entries are built before the clock starts for both, and each run has its own
    identifiers (a repeat of the same ones would find them all existing).
    """
    arm_fhir = fhir.model_copy(update={"batch_size": best.batch_size})
    session, recorded = recording_session(arm_fhir)
    with FhirClient(arm_fhir, session=session) as recorder:
        expected = sorted(client_search_keys(recorder, patient_ids, labs, best.method, best.workers))
    raw = RawRequests(fhir.timeout_s)

    def raw_count() -> int:
        return raw.sent

    read_pair = Overhead(f"reads: {best.arm}", [], [])
    write_pair = Overhead(f"writes: transactions of {bundle_size}, {bundle_workers} at a time", [], [])
    subjects = [patient_ids[i % len(patient_ids)] for i in range(writes)]

    def bundles(label: str) -> list[list[dict[str, Any]]]:
        entries = [
            transaction_entry(resource, if_none_exist=query)
            for resource, query in (risk_assessment(system, label, pid, i) for i, pid in enumerate(subjects))
        ]
        return [entries[start : start + bundle_size] for start in range(0, len(entries), bundle_size)]

    try:
        with FhirClient(arm_fhir) as client:

            def client_reads() -> int:
                found = sorted(client_search_keys(client, patient_ids, labs, best.method, best.workers))
                if found != expected:
                    raise SystemExit(f"client overhead arm: {len(found)} resources, the recorded run {len(expected)}")
                return len(found)

            def raw_reads() -> int:
                found = sorted(raw.searches(recorded, best.workers))
                if found != expected:
                    raise SystemExit(f"raw requests arm: {len(found)} resources, the client {len(expected)}")
                return len(found)

            def client_writes(batches: list[list[dict[str, Any]]]) -> int:
                def send(entries: list[dict[str, Any]]) -> list[EntryResult]:
                    return client.transaction(entries)

                with ThreadPoolExecutor(bundle_workers) as pool:
                    results = [result for answered in pool.map(send, batches) for result in answered]
                created = sum(result.status == 201 for result in results)
                if created != writes:
                    raise SystemExit(f"client overhead arm created {created} of {writes}")
                return created

            def raw_writes(batches: list[list[dict[str, Any]]]) -> int:
                created, _existing = raw.transactions(fhir.base_url, batches, bundle_workers)
                if created != writes:
                    raise SystemExit(f"raw requests arm created {created} of {writes}")
                return created

            for repeat in range(repeats):
                mine, theirs = bundles(f"overhead-client-{repeat}"), bundles(f"overhead-raw-{repeat}")
                arms: list[tuple[list[Measured], FhirClient | Callable[[], int], str, Callable[[], int]]] = [
                    (read_pair.client, client, f"riskbridge client, {read_pair.what}", client_reads),
                    (read_pair.raw, raw_count, f"raw requests, {read_pair.what}", raw_reads),
                    (
                        write_pair.client,
                        client,
                        f"riskbridge client, {write_pair.what}",
                        functools.partial(client_writes, mine),
                    ),
                    (
                        write_pair.raw,
                        raw_count,
                        f"raw requests, {write_pair.what}",
                        functools.partial(raw_writes, theirs),
                    ),
                ]
                if repeat % 2:  # alternate which side goes first, so that neither always follows the other
                    arms = [arms[1], arms[0], arms[3], arms[2]]
                for runs, counter, arm, run in arms:
                    runs.append(timed(counter, arm, run, server))
    finally:
        raw.close()
    return [read_pair, write_pair]


# --- filtered labs: the clinical stage's search shape ----------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One lab search of one OR-list: the filter, seconds (None: it outlasted the timeout), resources, requests."""

    lab_filter: str
    seconds: float | None
    resources: int
    requests: int


def probe_lab_filters(
    fhir: FhirSettings, patient_ids: Sequence[str], queries: Mapping[str, LabQuery], timeout_s: float
) -> list[Probe]:
    """One Observation search of the first ``fhir.batch_size`` patients per lab filter (none, code, code + date),
    each within ``timeout_s`` and sent once (no retry): how the server answers the clinical stage's search shape."""
    probe_fhir = fhir.model_copy(
        update={"timeout_s": timeout_s, "retry": fhir.retry.model_copy(update={"max_attempts": 1})}
    )
    subjects = ",".join(f"Patient/{pid}" for pid in patient_ids[: fhir.batch_size])
    probes = []
    with FhirClient(probe_fhir) as client:
        for name in LAB_FILTERS:
            query = queries[name]
            before = client.stats.requests
            began = time.perf_counter()
            try:
                found = [
                    o for o in client.search("Observation", {**query.params, "subject": subjects}) if query.wanted(o)
                ]
            except FhirError as exc:
                print(f"labs filtered by {name}: {exc}", flush=True)
                probes.append(Probe(name, None, 0, client.stats.requests - before))
                continue
            seconds = time.perf_counter() - began
            probes.append(Probe(name, seconds, len(found), client.stats.requests - before))
            print(f"labs filtered by {name}: {len(found)} Observations in {seconds:.2f} s", flush=True)
    return probes


# --- the report ------------------------------------------------------------------------------------------------


def arm_rows(reads: list[Measured], writes: list[Measured]) -> list[list[str]]:
    """Table rows: reads against the naive loop, writes against single POSTs; "requests saved" is the reference's
    requests less the arm's."""
    naive = next(m for m in reads if m.arm.startswith("naive"))
    single = next(m for m in writes if m.arm.startswith("single"))
    return [
        [
            m.arm,
            str(m.resources),
            str(m.requests),
            f"{reference.requests - m.requests:,}",
            f"{m.seconds:.2f}",
            f"{m.per_second:,.0f}",
            f"{m.client_cpu:.2f}",
            f"{m.server_cpu:.2f}" if m.server_cpu is not None else "-",
            f"{m.per_second / reference.per_second:.1f}x",
        ]
        for group, reference in ((reads, naive), (writes, single))
        for m in group
    ]


HEADER = [
    "arm",
    "resources",
    "HTTP requests",
    "requests saved",
    "seconds",
    "resources/s",
    "client CPU s",
    "server CPU s",
    "vs reference",
]
DATABASE_NAMES = {"h2": "H2 in memory", "postgresql": "PostgreSQL 15 (the sandbox's own cluster)"}


@dataclass(frozen=True)
class ArmConfig:
    """How a batched read arm searches: its name, method, patients per search and searches at once."""

    arm: str
    method: str
    batch_size: int
    workers: int


@dataclass
class DatabaseRun:
    """Everything measured against one server."""

    database: str  # "h2", "postgresql", or "" for a server the benchmark did not start
    server: str
    start_seconds: float | None
    loaded: int
    load_seconds: float
    lab_query: LabQuery
    reads: list[Measured]
    writes: list[Measured]
    distant: tuple[list[Measured], list[Measured], float] | None
    overhead: list[Overhead]
    probes: list[Probe]
    load_average: tuple[float, float]

    @property
    def title(self) -> str:
        """The database in words."""
        return DATABASE_NAMES.get(self.database, "a running server")


def report(runs: Sequence[DatabaseRun], args: argparse.Namespace) -> str:
    """The markdown section for docs/benchmarks.md: one part per database, then the comparison."""
    note = f" ({args.server_note})" if args.server_note else ""
    first = runs[0]
    text = (
        f"Server: {first.server}{note}, on "
        + " and on ".join(run.title for run in runs)
        + f". Cohort: {args.patients} synthetic patients (seed {args.seed}), loaded as one transaction of PUTs per "
        f"patient, 2 at a time. Reads fetch labs (Observation: {first.lab_query.description}) and notes "
        "(DocumentReference, DiagnosticReport; note text decoded) for every patient; patients per OR-list "
        f"{args.batch_size}, page size {args.page_size}; every arm returned the same resources. Writes are "
        f"{args.writes} RiskAssessments by conditional create (If-None-Exist on the identifier); bundles of "
        f'{args.bundle_size}. The reference ("vs reference") is the naive per-patient loop for reads and single '
        "POSTs for writes; \"requests saved\" is the reference's HTTP requests less the arm's. Client CPU is the "
        "benchmark process's; server CPU is the HAPI process's (all its threads) plus, on PostgreSQL, the "
        "database's (postmaster and backends), when the benchmark started the server. Targets: batched reads >= "
        "10x, bundled writes >= 5x, client overhead (riskbridge time / raw requests time) <= 1.2x."
    )
    for run in runs:
        text += "\n\n" + database_part(run, args)
    if len(runs) > 1:
        text += "\n\n" + comparison_paragraph(runs)
    rerun = (
        "\n\nRerun: `flock /tmp/rb-bench.lock .venv/bin/python bench/fhir_io.py --hapi-database both` (starts its own "
        f"HAPI FHIR on port {BENCH_HAPI_PORT}, on PostgreSQL with its own cluster on port {BENCH_POSTGRES_PORT}), or "
        "`--fhir-url` for a running server; `--round-trip-ms 0` skips the relay."
    )
    return text + rerun


def database_part(run: DatabaseRun, args: argparse.Namespace) -> str:
    """One database's tables and paragraphs."""
    started = f"HAPI answered {run.start_seconds:.0f} s after the start. " if run.start_seconds is not None else ""
    text = (
        f"### HAPI FHIR on {run.title}\n\n{started}Loading the cohort's {run.loaded:,} FHIR resources took "
        f"{run.load_seconds:.1f} s. One-minute load average {run.load_average[0]:.1f} before and "
        f"{run.load_average[1]:.1f} after this part on {os.cpu_count()} cores (other people's jobs share them: "
        "compare rows of one table, not figures of separate runs).\n\n"
        "#### Loopback\n\n"
        + markdown_table(HEADER, arm_rows(run.reads, run.writes))
        + "\n\n"
        + targets_paragraph(run.reads, run.writes, run.database)
    )
    if run.distant is not None:
        far_reads, far_writes, added = run.distant
        text += (
            f"\n\n#### Across an emulated network: {1000 * added:.1f} ms more per request\n\n"
            "The same server and client through a relay that holds every chunk of bytes for half of "
            f"`--round-trip-ms {args.round_trip_ms:g}` in each direction (bench/_latency.py; this kernel has no "
            "netem), as when the FHIR server sits on another machine of the hospital network. A read of one Patient "
            f"took {1000 * added:.1f} ms longer through the relay than directly (median of 50; the relay's own "
            "scheduling on the shared cores adds to the configured delay).\n\n"
            + markdown_table(HEADER, arm_rows(far_reads, far_writes))
            + "\n\n"
            + distant_paragraph(far_reads, far_writes, added)
        )
    if run.overhead:
        text += "\n\n#### Client overhead\n\n" + overhead_part(run.overhead)
    if run.probes:
        text += "\n\n#### Labs filtered on the server\n\n" + probe_part(run.probes, args)
    return text


def overhead_part(pairs: Sequence[Overhead]) -> str:
    """The overhead table and its verdict."""
    rows = []
    for pair in pairs:
        client = pair.client[0]
        rows.append(
            [
                pair.what,
                str(client.requests),
                f"{median_seconds(pair.client):.2f}",
                f"{median_seconds(pair.raw):.2f}",
                f"{statistics.median(m.client_cpu for m in pair.client):.2f}",
                f"{statistics.median(m.client_cpu for m in pair.raw):.2f}",
                f"{pair.ratio:.2f}x",
            ]
        )
    header = [
        "requests",
        "HTTP requests",
        "riskbridge s",
        "raw requests s",
        "riskbridge client CPU s",
        "raw client CPU s",
        "client overhead",
    ]
    worst = max(pair.ratio for pair in pairs)
    repeats = len(pairs[0].client)
    return (
        "The requests of the best batched read arm, recorded from the riskbridge client, sent again by the client "
        "and as raw `requests` calls on a plain Session (same URLs, form bodies and headers, `link[next]` followed "
        "to the end, the same searches at once), and transaction bundles of the same entries POSTed by "
        "`FhirClient.transaction` and raw (entries built before the clock starts for both; each run its own "
        f"identifiers). Median of {repeats} runs each, alternating.\n\n"
        + markdown_table(header, rows)
        + f"\n\nClient overhead at most {worst:.2f}x (target <= 1.2x): "
        + ("met." if worst <= 1.2 else "not met.")
    )


def probe_part(probes: Sequence[Probe], args: argparse.Namespace) -> str:
    """The filtered-labs table."""
    rows = [
        [
            probe.lab_filter,
            f"{probe.seconds:.2f}" if probe.seconds is not None else f"> {args.probe_timeout_s:g} (timed out)",
            str(probe.resources) if probe.seconds is not None else "-",
            str(probe.requests),
        ]
        for probe in probes
    ]
    return (
        f"One Observation search of {args.batch_size} patients (an OR-list on `subject`) with the labs' LOINC codes "
        "selected by the client (no filter), by the server (`code`), and by the server with the union of the "
        "patients' lab windows (`code` + `date`, the clinical stage's search); each sent once, within "
        f"{args.probe_timeout_s:g} s.\n\n"
        + markdown_table(["labs selected by", "seconds", "lab Observations", "HTTP requests"], rows)
    )


def ratios(reads: list[Measured], writes: list[Measured]) -> tuple[Measured, Measured, float, float]:
    """The best batched read arm, the naive loop, the read ratio and the best bundled write arm's ratio."""
    naive = next(m for m in reads if m.arm.startswith("naive"))
    best = max((m for m in reads if m is not naive), key=lambda m: m.per_second)
    single = next(m for m in writes if m.arm.startswith("single"))
    bundled = max((m for m in writes if m.arm.startswith("bundled conditional")), key=lambda m: m.per_second)
    return best, naive, best.per_second / naive.per_second, bundled.per_second / single.per_second


def total_cpu(m: Measured) -> float:
    """Client plus server CPU seconds of one arm (the server's when known)."""
    return m.client_cpu + (m.server_cpu or 0.0)


def cpu_bound(best: Measured, naive: Measured) -> str:
    """What bounds batched reads against the naive loop: the CPU each needs per resource (client + server), which
    sets the ratio when the cores are saturated, and the server's CPU spread over every core, which caps it with the
    cores to spare."""
    assert best.server_cpu is not None and naive.server_cpu is not None
    cores = os.cpu_count() or 1
    database = ""
    if best.database_cpu:
        database = f", {best.database_cpu:.1f} s of it PostgreSQL's"
    return (
        f"the best batched arm needed {1000 * total_cpu(best) / best.resources:.2f} ms of CPU per resource, client and "
        f"server together (server {best.server_cpu:.1f} s{database}), against "
        f"{1000 * total_cpu(naive) / naive.resources:.2f} ms in the naive loop (server {naive.server_cpu:.1f} s): "
        f"a CPU ratio of {total_cpu(naive) / total_cpu(best):.1f}x. On saturated cores time follows CPU, so that "
        f"ratio is about what batching can gain; the arms kept {total_cpu(best) / best.seconds:.2f} and "
        f"{total_cpu(naive) / naive.seconds:.2f} of the {cores} cores busy on average. Even "
        f"with all {cores} cores serving it and no client work at all, the batched reads cannot beat "
        f"{best.server_cpu / cores:.1f} s, {naive.seconds * cores / best.server_cpu:.1f}x the naive loop's "
        f"{naive.seconds:.1f} s"
    )


def write_bound(bundled: Measured, single: Measured) -> str:
    """What bounds bundled writes against single POSTs, in the same two terms as :func:`cpu_bound`."""
    assert bundled.server_cpu is not None and single.server_cpu is not None
    cores = os.cpu_count() or 1
    return (
        f"a conditional create needed {1000 * total_cpu(bundled) / bundled.resources:.1f} ms of CPU, client and "
        f"server, inside a bundle (server {1000 * bundled.server_cpu / bundled.resources:.1f} ms) against "
        f"{1000 * total_cpu(single) / single.resources:.1f} ms as its own POST (server "
        f"{1000 * single.server_cpu / single.resources:.1f} ms; match-URL search, search-parameter extraction and "
        f"index rows are the same either way): a CPU ratio of {total_cpu(single) / total_cpu(bundled):.1f}x; the "
        "bundles kept "
        f"{total_cpu(bundled) / bundled.seconds:.2f} of the {cores} cores busy, the single POSTs "
        f"{total_cpu(single) / single.seconds:.2f}. With all {cores} cores serving them the bundles cannot beat "
        f"{bundled.server_cpu / cores:.2f} s, {single.seconds * cores / bundled.server_cpu:.1f}x the single POSTs' "
        f"{single.seconds:.1f} s"
    )


def targets_paragraph(reads: list[Measured], writes: list[Measured], database: str = "h2") -> str:
    """Whether the targets were met on loopback, and what bounds the ratios, in the run's own figures."""
    best, naive, read_ratio, write_ratio = ratios(reads, writes)
    single = next(m for m in writes if m.arm.startswith("single"))
    bundled = max((m for m in writes if m.arm.startswith("bundled conditional")), key=lambda m: m.per_second)
    verdict = "met" if read_ratio >= 10 and write_ratio >= 5 else "not met"
    text = (
        f"**Targets {verdict} on loopback** (reads {read_ratio:.1f}x of 10x, writes {write_ratio:.1f}x of 5x). "
        f"A naive search took {1000 * naive.seconds / naive.requests:.1f} ms for about "
        f"{naive.resources / naive.requests:.0f} resources; the best batched arm "
        f"{1000 * best.seconds / best.resources:.2f} ms per resource. "
    )
    if best.server_cpu is not None and naive.server_cpu is not None and bundled.server_cpu and single.server_cpu:
        text += (
            f"What bounds it is CPU per resource, which batching does not remove. Reads: {cpu_bound(best, naive)}. "
            f"Writes: {write_bound(bundled, single)}. "
        )
    if database == "h2":
        text += (
            "Labs are selected by code on the client because OR-lists combined with code or date filters hit a slow "
            "plan on H2 (below, and docs/fhir-client.md)."
        )
    return text


def distant_paragraph(reads: list[Measured], writes: list[Measured], added: float) -> str:
    """The ratios across the emulated network, and what bounds a target not met."""
    best, naive, read_ratio, write_ratio = ratios(reads, writes)
    met = [name for name, ok in (("reads", read_ratio >= 10), ("writes", write_ratio >= 5)) if ok]
    text = (
        f"Best batched reads {read_ratio:.1f}x the naive loop ({best.arm}), best bundled writes {write_ratio:.1f}x "
        f"single POSTs: every request saved also saves a round trip ({naive.requests - best.requests:,} round trips "
        f"of {1000 * added:.1f} ms for the reads). Targets met here: {', '.join(met) or 'none'}."
    )
    if read_ratio < 10 and best.server_cpu is not None and naive.server_cpu is not None:
        text += f" Reads: {cpu_bound(best, naive)}."
    if write_ratio < 5:
        single = next(m for m in writes if m.arm.startswith("single"))
        bundled = max((m for m in writes if m.arm.startswith("bundled conditional")), key=lambda m: m.per_second)
        if single.server_cpu and bundled.server_cpu:
            text += f" Writes: {write_bound(bundled, single)}."
    return text


def comparison_paragraph(runs: Sequence[DatabaseRun]) -> str:
    """H2 against PostgreSQL in one paragraph: start, load, the ratios, the filtered searches."""
    parts = []
    for run in runs:
        _, _, read_ratio, write_ratio = ratios(run.reads, run.writes)
        dated = next((p for p in run.probes if p.lab_filter == "code+date"), None)
        dated_text = (
            "not measured"
            if dated is None
            else (f"{dated.seconds:.2f} s" if dated.seconds is not None else "timed out")
        )
        started = f"started in {run.start_seconds:.0f} s, " if run.start_seconds is not None else ""
        far = ""
        if run.distant is not None:
            _, _, far_reads, far_writes = ratios(run.distant[0], run.distant[1])
            far = f" ({far_reads:.1f}x and {far_writes:.1f}x across the emulated network)"
        overhead = max((pair.ratio for pair in run.overhead), default=None)
        overhead_text = f", client overhead at most {overhead:.2f}x" if overhead is not None else ""
        parts.append(
            f"{run.title}: {started}loaded in {run.load_seconds:.0f} s, reads {read_ratio:.1f}x and writes "
            f"{write_ratio:.1f}x on loopback{far}{overhead_text}, one OR-list's code + date search (the clinical "
            f"stage's) {dated_text}"
        )
    return "### H2 and PostgreSQL compared\n\n" + "; ".join(parts) + "."


# --- the run ---------------------------------------------------------------------------------------------------


def run_database(args: argparse.Namespace, database: str) -> DatabaseRun:
    """Start the server (unless ``--fhir-url``), load the cohort and run every arm against it."""
    load_before = os.getloadavg()[0]
    box: Sandbox | None = None
    server: ServerProcesses | None = None
    start_seconds: float | None = None
    if args.fhir_url:
        base_url = args.fhir_url.rstrip("/")
    else:
        settings = bench_settings(args.root.resolve(), database, args.hapi_port, args.postgres_port)
        base_url = settings.fhir.base_url
        box = Sandbox(settings)
        began = time.perf_counter()
        box.up(lambda part, state: print(f"{part}: {state}", flush=True), only=["hapi-fhir"])
        start_seconds = time.perf_counter() - began
        pids = {part.name: part.pid for part in box.status()}
        hapi_pid = pids["hapi-fhir"]
        assert hapi_pid is not None
        server = ServerProcesses(hapi_pid, pids.get("postgres") if database == "postgresql" else None)
        print(f"HAPI FHIR on {database} answered {start_seconds:.1f} s after the start", flush=True)
    try:
        patient_ids, loaded, load_seconds, queries = load_cohort(
            base_url, args.patients, args.seed, load=not args.skip_load
        )
        lab_query = queries[args.lab_filter]
        resources_loaded = loaded.fhir_resources_sent
        print(f"loaded {len(patient_ids)} FHIR Patients, {resources_loaded} resources in {load_seconds:.1f} s")
        fhir = FhirSettings(base_url=base_url, page_size=args.page_size, batch_size=args.batch_size, timeout_s=120)
        with FhirClient(fhir) as client:
            # Warm-up of both read paths and the write path, long enough for the JIT to have compiled them
            # (a short one left the first measured arms paying for compilation), so no measured arm pays for it.
            fetch_batched(client, patient_ids, lab_query, "post")
            fetch_naive(client, patient_ids[:200], lab_query)
            system = f"{BENCH_SYSTEM}:{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
            warm_up = [risk_assessment(system, "warm-up", pid, i) for i, pid in enumerate(patient_ids[:600])]
            write_bundled(client, warm_up[:300], args.bundle_size)
            write_single(client, warm_up[300:])
        reads, writes, configs = run_arms(fhir, patient_ids, lab_query, args, server, system, "")
        best = max((m for m in reads if m.arm in configs), key=lambda m: m.per_second)
        overhead = []
        if args.overhead_repeats > 0:
            overhead = measure_overhead(
                fhir,
                patient_ids,
                lab_query,
                configs[best.arm],
                args.bundle_size,
                args.bundle_workers,
                args.writes,
                system,
                server,
                args.overhead_repeats,
            )
        distant: tuple[list[Measured], list[Measured], float] | None = None
        if args.round_trip_ms > 0:
            port = urlsplit(base_url).port or 80
            with delayed_relay(port, args.round_trip_ms / 1000) as relay_port:
                relayed = fhir.model_copy(update={"base_url": base_url.replace(f":{port}/", f":{relay_port}/", 1)})
                added = added_round_trip(relayed, fhir, patient_ids[0])
                print(f"through the relay: {1000 * added:.2f} ms added per request (median of 50 reads)")
                far_reads, far_writes, _ = run_arms(
                    relayed, patient_ids, lab_query, args, server, system, "relay-", reads=2
                )
                distant = (far_reads, far_writes, added)
        probes = probe_lab_filters(fhir, patient_ids, queries, args.probe_timeout_s) if args.probe_timeout_s else []
        info = capability(fhir)
        server_name = f"{info.name} {info.version} (FHIR {info.fhir_version})"
    finally:
        if box is not None and not args.keep_running:
            box.down()
    load_after = os.getloadavg()[0]
    print(f"one-minute load average {load_before:.1f} before and {load_after:.1f} after ({database})", flush=True)
    return DatabaseRun(
        database if not args.fhir_url else "",
        server_name,
        start_seconds,
        resources_loaded,
        load_seconds,
        lab_query,
        reads,
        writes,
        distant,
        overhead,
        probes,
        (load_before, load_after),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--bundle-size", type=int, default=50)
    parser.add_argument("--bundle-workers", type=int, default=2, help="bundles at a time in the concurrent write arm")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200, help="patients per OR-list search")
    parser.add_argument("--workers", type=int, default=4, help="concurrent OR-list searches in the concurrent arm")
    parser.add_argument("--concurrent-batch-size", type=int, default=100, help="patients per search, concurrent arm")
    parser.add_argument(
        "--lab-filter",
        choices=list(LAB_FILTERS),
        default="client",
        help="where the read arms select labs by code (and date): OR-lists with filters are slow on H2",
    )
    parser.add_argument(
        "--hapi-database",
        choices=["h2", "postgresql", "both"],
        default="h2",
        help="the database of the HAPI FHIR the benchmark starts (both: the whole benchmark once on each)",
    )
    parser.add_argument("--hapi-port", type=int, default=BENCH_HAPI_PORT)
    parser.add_argument("--postgres-port", type=int, default=BENCH_POSTGRES_PORT, help="for --hapi-database postgresql")
    parser.add_argument("--fhir-url", help="use this running FHIR server instead of starting one")
    parser.add_argument("--server-note", default="", help="how the server was configured, for the report")
    parser.add_argument("--root", type=Path, default=Path(".riskbridge/bench-fhir"))
    parser.add_argument("--keep-running", action="store_true", help="leave the benchmark's HAPI FHIR running")
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--report-file", type=Path, default=REPORT, help="the markdown file of the section")
    parser.add_argument(
        "--skip-load", action="store_true", help="the cohort is on the server already (same --patients and --seed)"
    )
    parser.add_argument(
        "--round-trip-ms",
        type=float,
        default=2.0,
        help="also run the arms through a relay adding this round trip (0: loopback only)",
    )
    parser.add_argument(
        "--overhead-repeats", type=int, default=3, help="runs of each client-overhead arm (0: skip them)"
    )
    parser.add_argument(
        "--probe-timeout-s",
        type=float,
        default=60.0,
        help="time allowed to each filtered-labs search (0: skip them)",
    )
    args = parser.parse_args(argv)
    if args.fhir_url and args.hapi_database == "both":
        parser.error("--hapi-database both needs the benchmark's own servers, not --fhir-url")

    databases = ["h2", "postgresql"] if args.hapi_database == "both" else [args.hapi_database]
    runs = [run_database(args, database) for database in databases]
    for run in runs:
        labels = [("loopback", (run.reads, run.writes))]
        if run.distant:
            labels.append((f"{args.round_trip_ms:g} ms round trip", (run.distant[0], run.distant[1])))
        for label, (arm_reads, arm_writes) in labels:
            _, _, batched, bundled = ratios(arm_reads, arm_writes)
            print(
                f"{run.title}, {label}: batched reads {batched:.1f}x the naive loop (target 10x); "
                f"bundled writes {bundled:.1f}x (5x)"
            )
        for pair in run.overhead:
            print(f"{run.title}: client overhead {pair.ratio:.2f}x ({pair.what}; target <= 1.2x)")
    body = report(runs, args)
    if not args.no_report:
        print(f"written to {write_section('fhir-io', 'FHIR I/O (bench/fhir_io.py)', body, args.report_file)}")
    return 0


def run_arms(
    fhir: FhirSettings,
    patient_ids: Sequence[str],
    lab_query: LabQuery,
    args: argparse.Namespace,
    server: ServerProcesses | None,
    system: str,
    prefix: str,
    reads: int = 3,
) -> tuple[list[Measured], list[Measured], dict[str, ArmConfig]]:
    """The read arms (the first ``reads`` batched ones, then the naive loop) and the write arms, in that order, and
    how each batched read arm searched.

    Every read arm must return what the naive loop returned, and the write arms must create (then find) exactly
    their resources, or the run fails. ``prefix`` keeps the identifiers of one call's writes apart from another's.
    """
    concurrent_fhir = fhir.model_copy(update={"batch_size": args.concurrent_batch_size})
    with FhirClient(fhir) as client, FhirClient(concurrent_fhir) as concurrent_client:
        results: dict[str, set[str]] = {}

        def run_read(arm: str, fetch: Callable[[], set[str]], by: FhirClient = client) -> Measured:
            def counted() -> int:
                results[arm] = fetch()
                return len(results[arm])

            return timed(by, arm, counted, server)

        concurrent_arm = f"batched GET, {args.concurrent_batch_size} patients/search, {args.workers} searches at once"
        configs = {
            "batched POST _search": ArmConfig("batched POST _search", "post", args.batch_size, 1),
            concurrent_arm: ArmConfig(concurrent_arm, "get", args.concurrent_batch_size, args.workers),
            "batched GET (OR-lists)": ArmConfig("batched GET (OR-lists)", "get", args.batch_size, 1),
        }
        configs = dict(list(configs.items())[:reads])
        read_arms = []
        for config in configs.values():
            by = concurrent_client if config.workers > 1 else client

            def fetch(config: ArmConfig = config, by: FhirClient = by) -> set[str]:
                return fetch_batched(by, patient_ids, lab_query, config.method, config.workers)

            read_arms.append(run_read(config.arm, fetch, by))
        read_arms.append(run_read("naive per-patient loop", lambda: fetch_naive(client, patient_ids, lab_query)))
        reference = results["naive per-patient loop"]
        for arm, found in results.items():
            if found != reference:
                raise SystemExit(f"{arm} returned {len(found)} resources, the naive loop {len(reference)}")

        subjects = [patient_ids[i % len(patient_ids)] for i in range(args.writes)]
        arms = {
            f"bundled conditional creates ({args.bundle_size}/transaction)": 1,
            f"bundled conditional creates ({args.bundle_size}/transaction, {args.bundle_workers} at a time)": (
                args.bundle_workers
            ),
        }
        items = {
            arm: [risk_assessment(system, f"{prefix}bundled-{workers}", pid, i) for i, pid in enumerate(subjects)]
            for arm, workers in arms.items()
        }
        single_items = [risk_assessment(system, f"{prefix}single", pid, i) for i, pid in enumerate(subjects)]
        outcomes: dict[str, tuple[int, int]] = {}

        def run_write(arm: str, write: Callable[[], tuple[int, int]]) -> Measured:
            def counted() -> int:
                outcomes[arm] = write()
                return sum(outcomes[arm])

            return timed(client, arm, counted, server)

        rerun_arm = "bundled again (all exist)"
        single_arm = "single conditional POSTs"
        write_arms = [
            run_write(arm, functools.partial(write_bundled, client, items[arm], args.bundle_size, workers))
            for arm, workers in arms.items()
        ]
        write_arms.append(run_write(single_arm, lambda: write_single(client, single_items)))
        first = next(iter(arms))
        write_arms.append(run_write(rerun_arm, lambda: write_bundled(client, items[first], args.bundle_size)))
        expected = {arm: (args.writes, 0) for arm in arms} | {single_arm: (args.writes, 0), rerun_arm: (0, args.writes)}
        if outcomes != expected:
            raise SystemExit(f"write outcomes (created, existing) {outcomes} differ from {expected}")
    return read_arms, write_arms, configs


def added_round_trip(relayed: FhirSettings, direct: FhirSettings, patient_id: str) -> float:
    """Median extra seconds per request through the relay: 50 reads of one Patient each way."""

    def median_read(fhir: FhirSettings) -> float:
        with FhirClient(fhir) as client:
            times = []
            for _ in range(50):
                began = time.perf_counter()
                client.read("Patient", patient_id)
                times.append(time.perf_counter() - began)
        return statistics.median(times)

    return median_read(relayed) - median_read(direct)


if __name__ == "__main__":
    raise SystemExit(main())
