"""The FHIR client against the sandbox HAPI FHIR server loaded with a synthetic cohort.

Batched fetches equal per-patient fetches (and the ground truth); paging runs across many pages; an expired page
and bursts of 503/429 are survived with nothing lost; OAuth2 client credentials and SMART Backend Services work
against a token endpoint started here; note text comes from inline data and from a Binary url.

Faults are injected by a small HTTP proxy in front of HAPI (stdlib http.server in a thread): HAPI cannot be made
to expire a search page or to answer 503 on demand. The same proxy enforces bearer tokens for the OAuth2 tests.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.riskassessment import RiskAssessment
from pydantic import SecretStr

from riskbridge.connectors.fhir import (
    FhirClient,
    FhirError,
    code_filter,
    date_filter,
    subject_patient_id,
    transaction_entry,
)
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.synth.cohort import ANCHOR, LABS
from riskbridge.settings import FhirAuth, FhirRetry, FhirSettings, Settings

pytestmark = pytest.mark.integration

LOINC = "http://loinc.org"
FAST_RETRY = FhirRetry(max_attempts=6, backoff_base_s=0.05, backoff_max_s=0.5)
Fault = tuple[int, dict[str, str], bytes]


# --- the cohort --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCohort:
    patient_ids: list[str]  # every FHIR Patient of the cohort
    observation_ids: set[str]
    note_ids: dict[str, set[str]]  # resource type -> ids


@pytest.fixture(scope="module")
def cohort(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> LoadedCohort:
    out = tmp_path_factory.mktemp("fhir-client") / "cohort"
    generate(out, patients=20, seed=4711)
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    truth = read_truth(out)
    patient_ids = sorted({pid for record in truth for pid in record["identity"]["candidate_fhir_patient_ids"]})
    notes: dict[str, set[str]] = {"DocumentReference": set(), "DiagnosticReport": set()}
    for record in truth:
        for note in record["notes"]:
            notes[note["resource_type"]].add(note["id"])
    observations = {obs["id"] for record in truth for obs in record["lab_observations"]}
    return LoadedCohort(patient_ids, observations, notes)


def settings_for(base_url: str, **overrides: Any) -> FhirSettings:
    return FhirSettings(base_url=base_url, retry=FAST_RETRY, **overrides)


def lab_filter() -> dict[str, Any]:
    codes = sorted(
        {spec.loinc for spec in LABS.values()} | {code for spec in LABS.values() for code, _ in spec.alt_loinc}
    )
    return {
        "code": code_filter(LOINC, codes),
        "date": date_filter(ANCHOR.replace(year=2023), ANCHOR.replace(year=2025)),
    }


# --- a fault-injecting, token-checking proxy in front of HAPI ----------------------------------------------------


@dataclass
class ProxyState:
    """What the proxy does: ``fault(method, path)`` may answer instead of HAPI; tokens, when set, are required."""

    upstream: str  # host:port of HAPI
    fault: Callable[[str, str], Fault | None] | None = None
    accepted_tokens: set[str] | None = None
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status answered
    authorizations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def outcome(status: int, text: str) -> Fault:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "transient", "diagnostics": text}],
    }
    return status, {"Content-Type": "application/fhir+json"}, json.dumps(body).encode()


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ProxyState

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        return

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.state.lock:
            self.state.seen.append((self.command, self.path, status))

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        state = self.state
        with state.lock:
            state.authorizations.append(self.headers.get("Authorization", ""))
        if state.accepted_tokens is not None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in state.accepted_tokens:
                self._answer(*outcome(401, "missing or unknown bearer token"))
                return
        injected = state.fault(self.command, self.path) if state.fault else None
        if injected is not None:
            self._answer(*injected)
            return
        # Forward with the client's Host header, so HAPI writes its paging links back through the proxy.
        forwarded = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "connection")}
        connection = http.client.HTTPConnection(state.upstream, timeout=60)
        try:
            connection.request(self.command, self.path, body=body or None, headers=forwarded)
            upstream = connection.getresponse()
            payload = upstream.read()
            skip = ("transfer-encoding", "connection", "keep-alive", "content-length")
            headers = {k: v for k, v in upstream.getheaders() if k.lower() not in skip}
            self._answer(upstream.status, headers, payload)
        finally:
            connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = _handle


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run ``handler`` on a free loopback port in a thread; yield its base address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def proxy(sandbox: Settings) -> Iterator[tuple[str, ProxyState]]:
    """A proxy in front of HAPI; yields the FHIR base URL through it and its state."""
    upstream = urlsplit(sandbox.fhir.base_url)
    state = ProxyState(upstream=upstream.netloc)
    handler = type("BoundProxyHandler", (ProxyHandler,), {"state": state})
    with serve(handler) as address:
        yield f"{address}{upstream.path}", state


# --- a token endpoint --------------------------------------------------------------------------------------------


@dataclass
class TokenEndpointState:
    """Clients it knows: client_id -> secret (OAuth2) or (public key, algorithm, kid) (SMART)."""

    url: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    public_keys: dict[str, tuple[Any, str, str]] = field(default_factory=dict)
    expires_in: int = 300
    issued: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    jtis: set[str] = field(default_factory=set)
    proxy: ProxyState | None = None


class TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: TokenEndpointState

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _client_from_secret(self) -> str:
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            raise PermissionError("client authentication missing")
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        client_id, secret = unquote_plus(user), unquote_plus(password)  # RFC 6749 2.3.1
        if self.state.secrets.get(client_id) != secret:
            raise PermissionError("wrong client secret")
        return client_id

    def _client_from_assertion(self, form: dict[str, str]) -> str:
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            raise PermissionError("client_assertion_type")
        assertion = form.get("client_assertion", "")
        client_id = jwt.decode(assertion, options={"verify_signature": False}).get("iss", "")
        if client_id not in self.state.public_keys:
            raise PermissionError("unknown client")
        public_key, algorithm, kid = self.state.public_keys[client_id]
        if jwt.get_unverified_header(assertion).get("kid") != kid:
            raise PermissionError("unknown kid")
        try:
            claims = jwt.decode(
                assertion,
                public_key,
                algorithms=[algorithm],
                audience=self.state.url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise PermissionError(f"assertion: {exc}") from None
        if claims["sub"] != client_id or claims["exp"] > time.time() + 300:
            raise PermissionError("sub or exp")
        if claims["jti"] in self.state.jtis:
            raise PermissionError("jti replayed")
        self.state.jtis.add(claims["jti"])
        return client_id

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        form = {key: values[0] for key, values in parse_qs(raw).items()}
        try:
            if form.get("grant_type") != "client_credentials":
                raise PermissionError("grant_type")
            if "client_assertion" in form:
                self._client_from_assertion(form)
            else:
                self._client_from_secret()
        except PermissionError as exc:
            self.state.refused.append(str(exc))
            self._json(401, {"error": "invalid_client", "error_description": str(exc)})
            return
        token = uuid.uuid4().hex
        self.state.issued.append(token)
        if self.state.proxy is not None and self.state.proxy.accepted_tokens is not None:
            self.state.proxy.accepted_tokens.add(token)
        self._json(200, {"access_token": token, "token_type": "bearer", "expires_in": self.state.expires_in})


@pytest.fixture()
def token_endpoint(proxy: tuple[str, ProxyState]) -> Iterator[TokenEndpointState]:
    state = TokenEndpointState(proxy=proxy[1])
    proxy[1].accepted_tokens = set()
    handler = type("BoundTokenHandler", (TokenHandler,), {"state": state})
    with serve(handler) as address:
        state.url = f"{address}/token"
        yield state


# --- searches ----------------------------------------------------------------------------------------------------


def ids_by_patient(resources: Iterator[dict[str, Any]]) -> dict[str, set[str]]:
    grouped: dict[str, set[str]] = {}
    for resource in resources:
        grouped.setdefault(subject_patient_id(resource) or "?", set()).add(
            f"{resource['resourceType']}/{resource['id']}"
        )
    return grouped


@pytest.mark.parametrize(("method", "workers"), [("get", 1), ("post", 1), ("get", 3)])
def test_batched_fetch_returns_exactly_what_per_patient_fetch_returns(
    sandbox: Settings, cohort: LoadedCohort, method: str, workers: int
) -> None:
    # A short URL limit forces several OR-list chunks out of 20-odd patients.
    settings = settings_for(
        sandbox.fhir.base_url, max_url_length=700, batch_size=7, search_method=method, search_workers=workers
    )
    with FhirClient(settings) as client:
        for resource_type, params in [
            ("Observation", lab_filter()),
            ("DocumentReference", {}),
            ("DiagnosticReport", {}),
        ]:
            searches_before = client.stats.requests
            batched = ids_by_patient(client.search_by_patients(resource_type, cohort.patient_ids, params))
            batched_requests = client.stats.requests - searches_before
            single: dict[str, set[str]] = {}
            for patient_id in cohort.patient_ids:
                found = ids_by_patient(client.search(resource_type, {**params, "subject": f"Patient/{patient_id}"}))
                for key, ids in found.items():
                    single.setdefault(key, set()).update(ids)
            assert batched == single, resource_type
            assert batched_requests < len(cohort.patient_ids)
            everything = {rid.split("/")[1] for ids in batched.values() for rid in ids}
            expected = cohort.observation_ids if resource_type == "Observation" else cohort.note_ids[resource_type]
            assert everything == expected, resource_type


def test_paging_runs_across_more_than_three_pages(sandbox: Settings, cohort: LoadedCohort) -> None:
    with FhirClient(settings_for(sandbox.fhir.base_url)) as client:
        whole = [r["id"] for r in client.search_by_patients("Observation", cohort.patient_ids, lab_filter())]
        pages_before = client.stats.pages
        paged = [
            r["id"] for r in client.search_by_patients("Observation", cohort.patient_ids, lab_filter(), page_size=7)
        ]
        pages = client.stats.pages - pages_before
    assert len(paged) == len(set(paged)) == len(whole)
    assert set(paged) == set(whole)
    assert pages >= len(whole) // 7 > 3


def test_expired_page_restarts_the_search_fault_injection(cohort: LoadedCohort, proxy: tuple[str, ProxyState]) -> None:
    """FAULT INJECTION: the proxy answers 410 Gone once for the third page, as HAPI does for an expired search."""
    base_url, state = proxy
    answered_410: list[str] = []

    def expire_third_page_once(method: str, path: str) -> Fault | None:
        if not answered_410 and "_getpagesoffset=10" in path:
            answered_410.append(path)
            return outcome(410, "HAPI-0417: Search ID does not exist and may have expired")
        return None

    with FhirClient(settings_for(base_url)) as client:
        expected = {r["id"] for r in client.search_by_patients("Observation", cohort.patient_ids, lab_filter())}
        state.fault = expire_third_page_once
        got = [r["id"] for r in client.search_by_patients("Observation", cohort.patient_ids, lab_filter(), page_size=5)]
        assert client.stats.search_restarts == 1
    assert answered_410, "the fault was never injected: no page link went through the proxy"
    assert len(got) == len(set(got))
    assert set(got) == expected


def test_burst_of_503_and_429_is_survived_with_nothing_lost(
    sandbox: Settings, cohort: LoadedCohort, proxy: tuple[str, ProxyState]
) -> None:
    """FAULT INJECTION: every 2nd and 3rd request gets 503 (with or without Retry-After) or 429; reads and writes
    still deliver everything, exactly once."""
    base_url, state = proxy
    counter = {"n": 0}

    def burst(method: str, path: str) -> Fault | None:
        counter["n"] += 1
        phase = counter["n"] % 3
        if phase == 1:
            return None
        status, headers, body = outcome(503 if counter["n"] % 2 else 429, "HAPI-9999: overloaded (injected)")
        if counter["n"] % 4 == 0:
            headers["Retry-After"] = "0"
        elif counter["n"] % 5 == 0:
            headers["Retry-After"] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() - 5))
        return status, headers, body

    with FhirClient(settings_for(base_url)) as client:
        with FhirClient(settings_for(sandbox.fhir.base_url)) as direct:
            expected = {r["id"] for r in direct.search_by_patients("Observation", cohort.patient_ids, lab_filter())}
        state.fault = burst
        got = [
            r["id"] for r in client.search_by_patients("Observation", cohort.patient_ids, lab_filter(), page_size=50)
        ]
        assert len(got) == len(set(got)) and set(got) == expected

        system = f"urn:riskbridge:test:fhir-client:{uuid.uuid4().hex}"
        entries = [
            transaction_entry(
                risk_assessment(patient_id, system, patient_id), if_none_exist=f"identifier={system}|{patient_id}"
            )
            for patient_id in cohort.patient_ids
        ]
        results = [result for i in range(0, len(entries), 5) for result in client.transaction(entries[i : i + 5])]
        assert all(result.status == 201 for result in results)
        assert client.stats.retries > 5
    injected = [s for _, _, s in state.seen if s in (503, 429)]
    assert len(injected) > 5
    state.fault = None
    with FhirClient(settings_for(base_url)) as client:
        stored = list(client.search("RiskAssessment", {"identifier": f"{system}|"}))
    assert sorted(subject_patient_id(r) or "" for r in stored) == sorted(cohort.patient_ids)


def risk_assessment(patient_id: str, system: str, value: str) -> RiskAssessment:
    return RiskAssessment.model_validate(
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "identifier": [{"system": system, "value": value}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "prediction": [{"probabilityDecimal": 0.5}],
        }
    )


def test_conditional_create_is_idempotent(sandbox: Settings, cohort: LoadedCohort) -> None:
    system = f"urn:riskbridge:test:fhir-client:{uuid.uuid4().hex}"
    patient = cohort.patient_ids[0]
    with FhirClient(settings_for(sandbox.fhir.base_url)) as client:
        first = client.conditional_create(risk_assessment(patient, system, "k"), f"identifier={system}|k")
        second = client.conditional_create(risk_assessment(patient, system, "k"), f"identifier={system}|k")
        entry = transaction_entry(risk_assessment(patient, system, "k"), if_none_exist=f"identifier={system}|k")
        (third,) = client.transaction([entry])
    assert (first.status, second.status, third.status) == (201, 200, 200)
    assert first.resource_id == second.resource_id == third.resource_id


def test_a_transaction_resolves_every_reference_to_its_own_patient(sandbox: Settings, cohort: LoadedCohort) -> None:
    """HAPI looks up all of a bundle's referenced ids in one statement (on the sandbox, rewritten for H2's index)."""
    system = f"urn:riskbridge:test:fhir-client:{uuid.uuid4().hex}"
    patients = list(reversed(cohort.patient_ids))  # not in the order the server stored them
    entries = [
        transaction_entry(risk_assessment(pid, system, pid), if_none_exist=f"identifier={system}|{pid}")
        for pid in patients
    ]
    with FhirClient(settings_for(sandbox.fhir.base_url)) as client:
        results = client.transaction(entries)
        stored = list(client.search("RiskAssessment", {"identifier": f"{system}|"}))
    assert [result.status for result in results] == [201] * len(patients)
    assert {r["identifier"][0]["value"]: subject_patient_id(r) for r in stored} == {pid: pid for pid in patients}


def test_a_transaction_referencing_one_unknown_patient_among_many_is_refused(
    sandbox: Settings, cohort: LoadedCohort
) -> None:
    system = f"urn:riskbridge:test:fhir-client:{uuid.uuid4().hex}"
    patients = [*cohort.patient_ids[:5], "rb-no-such-patient", *cohort.patient_ids[5:10]]
    entries = [
        transaction_entry(risk_assessment(pid, system, pid), if_none_exist=f"identifier={system}|{pid}")
        for pid in patients
    ]
    with FhirClient(settings_for(sandbox.fhir.base_url)) as client:
        with pytest.raises(FhirError) as refused:
            client.transaction(entries)
        assert list(client.search("RiskAssessment", {"identifier": f"{system}|"})) == []
    assert refused.value.status in (400, 404, 422)


# --- authentication ----------------------------------------------------------------------------------------------


def test_oauth2_client_credentials_token_is_reused_until_expiry(
    cohort: LoadedCohort, proxy: tuple[str, ProxyState], token_endpoint: TokenEndpointState
) -> None:
    base_url, state = proxy
    token_endpoint.secrets["riskbridge"] = "correct horse battery staple"
    token_endpoint.expires_in = 8  # renewed 4 s after issue (skew = min(refresh_skew_s, lifetime / 2))
    auth = FhirAuth(
        type="oauth2",
        token_url=token_endpoint.url,
        client_id="riskbridge",
        client_secret="correct horse battery staple",
    )
    with FhirClient(settings_for(base_url, auth=auth)) as client:
        for patient_id in cohort.patient_ids[:8]:
            assert client.read("Patient", patient_id)["id"] == patient_id
        assert len(token_endpoint.issued) == 1
        time.sleep(4.2)
        client.read("Patient", cohort.patient_ids[0])
        assert len(token_endpoint.issued) == 2
        assert client.stats.token_renewals_on_401 == 0  # renewed before expiry, not after a refusal
        assert state.accepted_tokens is not None
        state.accepted_tokens.clear()  # the server revokes every token
        client.read("Patient", cohort.patient_ids[0])
        assert client.stats.token_renewals_on_401 == 1 and len(token_endpoint.issued) == 3
    assert {a.removeprefix("Bearer ") for a in state.authorizations} <= set(token_endpoint.issued)

    wrong = auth.model_copy(update={"client_secret": SecretStr("tr0ub4dor&3")})
    with FhirClient(settings_for(base_url, auth=wrong)) as client, pytest.raises(FhirError) as caught:
        client.read("Patient", cohort.patient_ids[0])
    assert caught.value.status == 401 and "invalid_client" in str(caught.value)
    assert "tr0ub4dor" not in str(caught.value) and "tr0ub4dor" not in repr(client)


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_backend_services_against_a_verifying_token_endpoint(
    tmp_path: Path,
    cohort: LoadedCohort,
    proxy: tuple[str, ProxyState],
    token_endpoint: TokenEndpointState,
    algorithm: str,
) -> None:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    key_file = tmp_path / "client.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    token_endpoint.public_keys["rb-backend"] = (key.public_key(), algorithm, "kid-1")
    base_url, _ = proxy
    auth = FhirAuth(
        type="smart",
        token_url=token_endpoint.url,
        client_id="rb-backend",
        private_key_file=key_file,
        key_id="kid-1",
        algorithm=algorithm,
        scope="system/Patient.rs system/Observation.rs",
    )
    with FhirClient(settings_for(base_url, auth=auth)) as client:
        resources = list(client.search_by_patients("Observation", cohort.patient_ids[:5], lab_filter()))
        for patient_id in cohort.patient_ids[:5]:
            client.read("Patient", patient_id)
    assert resources
    assert len(token_endpoint.issued) == 1 and token_endpoint.refused == []

    # A key the endpoint does not know for this kid is refused with the endpoint's reason.
    other: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    key_file.write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with FhirClient(settings_for(base_url, auth=auth)) as client, pytest.raises(FhirError, match="invalid_client"):
        client.read("Patient", cohort.patient_ids[0])


# --- note text ---------------------------------------------------------------------------------------------------


def test_note_text_from_inline_data_honours_the_charset(sandbox: Settings, cohort: LoadedCohort) -> None:
    with FhirClient(settings_for(sandbox.fhir.base_url)) as client:
        notes = [
            *client.search_by_patients("DocumentReference", cohort.patient_ids),
            *client.search_by_patients("DiagnosticReport", cohort.patient_ids),
        ]
        texts = [text for note in notes for text in client.note_texts(note)]
    assert len(texts) == len(notes) > 0
    assert all(text.origin == "data" for text in texts)
    # Every synthetic note contains "°C"; a wrong charset would show "Â°C" or U+FFFD.
    assert all("°C" in text.text and "Â" not in text.text and "\ufffd" not in text.text for text in texts)
    charsets = {text.content_type.split("=")[-1].lower() for text in texts}
    assert "utf-8" in charsets


def test_note_text_from_a_binary_url(sandbox: Settings, cohort: LoadedCohort) -> None:
    html = "<html><body><h2>Assessment</h2><p>Temp 38.4 °C &amp; COPD exacerbation.</p><p>Denies diabetes.</p>"
    binary_id, document_id = f"rb-test-bin-{uuid.uuid4().hex[:12]}", f"rb-test-doc-{uuid.uuid4().hex[:12]}"
    binary = Binary.model_validate(
        {
            "resourceType": "Binary",
            "id": binary_id,
            "contentType": "text/html; charset=ISO-8859-1",
            "data": base64.b64encode(html.encode("latin-1")).decode(),
        }
    )
    document = DocumentReference.model_validate(
        {
            "resourceType": "DocumentReference",
            "id": document_id,
            "status": "current",
            "subject": {"reference": f"Patient/{cohort.patient_ids[0]}"},
            "content": [{"attachment": {"contentType": "text/html; charset=ISO-8859-1", "url": f"Binary/{binary_id}"}}],
        }
    )
    with FhirClient(settings_for(sandbox.fhir.base_url)) as client:
        results = client.transaction(
            [
                transaction_entry(binary, method="PUT", url=f"Binary/{binary_id}"),
                transaction_entry(document, method="PUT", url=f"DocumentReference/{document_id}"),
            ]
        )
        assert [r.status for r in results] == [201, 201]
        (text,) = client.note_texts(client.read("DocumentReference", document_id))
    assert text.origin == "url"
    assert text.text == "Assessment\nTemp 38.4 °C & COPD exacerbation.\nDenies diabetes."
