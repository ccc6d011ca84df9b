"""Unit tests of the one HTTP layer (riskbridge.connectors.http) without a server: which answers and failures a
RetryPolicy retries, Retry-After, the 401 token renewal, the caller's transport error, pooled sessions with TLS
settings (a site CA bundle the environment cannot override), the shared credential rules and token authorizer; and
of the connectors package itself: every public exception sits on its riskbridge.errors branch, and names resolve
lazily so one connector does not import another's libraries."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from riskbridge.connectors.http import (
    TRANSIENT_STATUSES,
    Authorizer,
    HttpTransport,
    RetryPolicy,
    authorizer_for,
    backoff_delay,
    basic_authorization,
    check_credentials_url,
    is_loopback_host,
    new_session,
    parse_retry_after,
    root_cause,
    tls_files,
)
from riskbridge.errors import ConfigurationError, DataError, FhirServerError, LedgerError, PacsError, RiskbridgeError
from riskbridge.settings import FhirAuth, HttpTlsSettings

URL = "http://server.test/api/thing"


def answer(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    """A requests.Response with an empty JSON body, as the transport would return it."""
    response = requests.Response()
    response.status_code = status
    response.headers = CaseInsensitiveDict(headers or {})
    response._content = json.dumps({}).encode()
    response._content_consumed = True  # type: ignore[attr-defined]  # private attribute the requests stubs omit
    return response


class Scripted(requests.Session):
    """Answers each request with the next item of ``script`` (a Response, or an exception to raise)."""

    def __init__(self, script: list[requests.Response | Exception]) -> None:
        super().__init__()
        self.script = script
        self.calls: list[dict[str, str]] = []

    def request(self, method, url, params=None, data=None, headers=None, **kwargs):  # type: ignore[override]
        self.calls.append(dict(headers or {}))
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


class TransportFailed(Exception):
    """The test's own transport error, to see that the layer raises what the caller builds."""


def transport(
    script: list[requests.Response | Exception], policy: RetryPolicy | None = None, **options: Any
) -> tuple[HttpTransport, Scripted, list[float], list[str]]:
    """An HttpTransport over a Scripted session; sleeps and counted events are recorded."""
    session = Scripted(script)
    sleeps: list[float] = []
    events: list[str] = []

    def error(what: str, exc: requests.RequestException, attempts: int) -> Exception:
        return TransportFailed(f"{what}: {type(exc).__name__} after {attempts}")

    http = HttpTransport(
        policy or RetryPolicy(),
        error=error,
        session=session,
        sleep=sleeps.append,
        rng=random.Random(3),
        count=events.append,
        **options,
    )
    return http, session, sleeps, events


def test_retry_after_in_seconds_and_as_http_date() -> None:
    now = datetime(2024, 1, 15, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after("Mon, 15 Jan 2024 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("  ") is None


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_stays_within_its_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(8.0, 0.25 * 2 ** (attempt - 1))
    delays = [backoff_delay(attempt, 0.25, 8.0, rng) for _ in range(200)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 100  # jittered, not a constant


def test_backoff_attempts_count_from_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 2.0, random.Random(0))


def test_not_processed_statuses_are_retried_even_for_requests_that_are_not_idempotent() -> None:
    http, session, sleeps, events = transport([answer(503), answer(429, {"Retry-After": "2"}), answer(201)])
    assert http.send("POST", URL, what="POST thing", idempotent=False).status_code == 201
    assert len(session.calls) == 3 and sleeps[1] == 2.0 and 0.25 <= sleeps[0] <= 0.5
    assert events.count("requests") == 3 and events.count("retries") == 2


def test_gateway_errors_are_retried_only_for_idempotent_requests() -> None:
    http, session, _, _ = transport([answer(502)])
    assert http.send("POST", URL, what="POST thing", idempotent=False).status_code == 502
    assert len(session.calls) == 1
    http, session, _, _ = transport([answer(504), answer(200)])
    assert http.send("GET", URL, what="GET thing").status_code == 200
    assert len(session.calls) == 2


def test_the_last_answer_stands_after_max_attempts_and_a_long_retry_after_is_not_waited_for() -> None:
    http, session, sleeps, _ = transport([answer(503)] * 3, RetryPolicy(max_attempts=3))
    assert http.send("GET", URL, what="GET thing").status_code == 503
    assert len(session.calls) == 3 and len(sleeps) == 2
    http, session, sleeps, _ = transport([answer(503, {"Retry-After": "600"})], RetryPolicy(max_retry_after_s=60))
    assert http.send("GET", URL, what="GET thing").status_code == 503
    assert len(session.calls) == 1 and sleeps == []


def test_a_policy_without_retry_statuses_returns_the_first_answer_but_retries_connection_failures() -> None:
    policy = RetryPolicy(max_attempts=3, retry_statuses=frozenset(), not_processed_statuses=frozenset())
    http, session, _, _ = transport([answer(503)], policy)
    assert http.send("GET", URL, what="GET thing").status_code == 503 and len(session.calls) == 1
    assert 503 in TRANSIENT_STATUSES and 404 not in TRANSIENT_STATUSES  # for the caller's own, later retry
    http, session, sleeps, _ = transport([requests.ConnectionError("reset"), answer(200)], policy)
    assert http.send("GET", URL, what="GET thing").status_code == 200 and len(sleeps) == 1


def test_connection_failures_become_the_callers_error_when_not_retried_or_exhausted() -> None:
    http, *_ = transport([requests.ReadTimeout("slow")])
    with pytest.raises(TransportFailed, match="POST thing: ReadTimeout after 1"):
        http.send("POST", URL, what="POST thing", idempotent=False)
    http, *_ = transport([requests.ConnectTimeout("x"), answer(200)])
    assert http.send("POST", URL, what="POST thing", idempotent=False).status_code == 200  # never reached it
    http, *_ = transport([requests.exceptions.SSLError("bad certificate")])
    with pytest.raises(TransportFailed, match="SSLError after 1"):
        http.send("GET", URL, what="GET thing")  # a TLS failure will not heal
    http, session, sleeps, _ = transport([requests.ConnectionError("refused")] * 2, RetryPolicy(max_attempts=2))
    with pytest.raises(TransportFailed, match="ConnectionError after 2"):
        http.send("GET", URL, what="GET thing")
    assert len(session.calls) == 2 and len(sleeps) == 1


class RenewableToken(Authorizer):
    """Hands out t1, t2, ... and forgets the current token when invalidated."""

    renewable = True

    def __init__(self) -> None:
        super().__init__()
        self.issued = 0
        self.current: str | None = None

    def headers(self) -> dict[str, str]:
        if self.current is None:
            self.issued += 1
            self.current = f"t{self.issued}"
        return {"Authorization": f"Bearer {self.current}"}

    def invalidate(self) -> None:
        self.current = None


def test_a_401_renews_a_renewable_token_once_and_is_not_an_attempt() -> None:
    token = RenewableToken()
    http, session, _, events = transport([answer(401), answer(200)], RetryPolicy(max_attempts=1), authorizer=token)
    assert http.send("GET", URL, what="GET thing").status_code == 200
    assert [call["Authorization"] for call in session.calls] == ["Bearer t1", "Bearer t2"]
    assert events.count("token_renewals_on_401") == 1
    http, session, _, _ = transport([answer(401), answer(401)], authorizer=RenewableToken())
    assert http.send("GET", URL, what="GET thing").status_code == 401 and len(session.calls) == 2
    static = Authorizer(basic_authorization("user", "pw"))
    http, session, _, _ = transport([answer(401)], authorizer=static)
    assert http.send("GET", URL, what="GET thing").status_code == 401 and len(session.calls) == 1
    assert session.calls[0]["Authorization"] == "Basic dXNlcjpwdw=="
    http, session, _, _ = transport([answer(200)], authorizer=static)
    http.send("POST", URL, what="POST token", authorize=False)
    assert "Authorization" not in session.calls[0]


def test_new_sessions_pool_connections_without_urllib3_retries_and_carry_tls_settings(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    session = new_session(
        pool_size=5,
        headers={"Accept": "application/fhir+json"},
        authorization="Bearer x",
        verify=ca,
        client_cert=(tmp_path / "c.pem", tmp_path / "k.pem"),
    )
    adapter = session.get_adapter("https://pacs.test/")
    assert adapter.max_retries.total == 0  # type: ignore[attr-defined]
    assert adapter._pool_maxsize == 5  # type: ignore[attr-defined]
    assert session.verify == str(ca) and session.cert == (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert session.headers["Accept"] == "application/fhir+json" and session.headers["Authorization"] == "Bearer x"
    assert new_session().verify is True


class Recording(BaseAdapter):
    """An adapter that answers 200 and keeps the TLS arguments requests hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.tls: list[tuple[Any, Any]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.tls.append((kwargs.get("verify"), kwargs.get("cert")))
        response = answer(200)
        response.request = request
        return response

    def close(self) -> None:
        pass


def test_a_site_ca_bundle_is_not_overridden_by_the_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE replace a session's own verify; the transport passes it per request."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    ca, cert, key = tmp_path / "site-ca.pem", tmp_path / "c.pem", tmp_path / "k.pem"
    for verify, expected in ((ca, str(ca)), (True, "/etc/ssl/certs/ca-certificates.crt")):
        adapter = Recording()
        http = HttpTransport(RetryPolicy(), error=lambda *a: TransportFailed(), verify=verify, client_cert=(cert, key))
        http.session.mount("https://", adapter)
        http.send("GET", "https://pacs.test/x", what="GET x")
        assert adapter.tls == [(expected, (str(cert), str(key)))]  # True: the system (or environment) CAs


def test_tls_files_of_a_tls_section(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    assert tls_files(None) == (True, None) and tls_files(HttpTlsSettings()) == (True, None)
    full = HttpTlsSettings(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem")
    assert tls_files(full) == (tmp_path / "ca.pem", (tmp_path / "c.pem", tmp_path / "k.pem"))


def test_the_plain_http_rule_names_the_settings_it_checks() -> None:
    bearer = FhirAuth(type="bearer", token="not-a-default-token")
    check_credentials_url(bearer, "http://127.0.0.2/x", base_key="a.url", auth_key="a.auth")
    check_credentials_url(FhirAuth(), "http://remote.test/x", base_key="a.url", auth_key="a.auth")
    with pytest.raises(ConfigurationError, match=r"^a\.url: a\.auth type 'bearer' would send credentials over plain"):
        check_credentials_url(bearer, "http://remote.test/x", base_key="a.url", auth_key="a.auth")
    oauth2 = FhirAuth(type="oauth2", token_url="http://idp.test/token", client_id="c", client_secret="not-a-default")
    with pytest.raises(ConfigurationError, match=r"^a\.auth\.token_url: a\.auth type 'oauth2'"):
        check_credentials_url(oauth2, "https://remote.test/x", base_key="a.url", auth_key="a.auth")
    assert [
        is_loopback_host(h) for h in ("127.1.2.3", "[::1]", "LOCALHOST.", "::ffff:127.0.0.1", "10.0.0.1", None)
    ] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_a_token_authorizer_raises_its_connectors_own_error() -> None:
    class TokenRefused(Exception):
        pass

    auth = FhirAuth(type="oauth2", token_url="https://idp.test/token", client_id="c", client_secret="s3cr3t-value")
    http, session, _, events = transport([answer(400)])
    http.authorizer = authorizer_for(
        auth, http, error=lambda message, status, reason: TokenRefused(message, status), setting="x.auth"
    )
    with pytest.raises(TokenRefused) as caught:
        http.send("GET", URL, what="GET thing")
    assert caught.value.args == ("POST token endpoint idp.test: 400", 400)
    assert events == ["token_requests", "requests"] and "Authorization" in session.calls[0]  # client_secret_basic
    assert "s3cr3t-value" not in str(caught.value)


def test_a_given_session_is_closed_only_when_the_transport_owns_it() -> None:
    closed: list[bool] = []

    class Tracked(Scripted):
        def close(self) -> None:
            closed.append(True)

    HttpTransport(RetryPolicy(), error=lambda *a: TransportFailed(), session=Tracked([])).close()
    assert closed == []
    HttpTransport(RetryPolicy(), error=lambda *a: TransportFailed(), session=Tracked([]), owns_session=True).close()
    assert closed == [True]


def test_root_cause_names_the_innermost_exception() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError as inner:
            raise requests.ConnectionError("wrapped") from inner
    except requests.ConnectionError as exc:
        assert root_cause(exc) == "ConnectionRefusedError"


# --- the connectors package --------------------------------------------------------------------------------------


def _exception(module: str, name: str) -> type[BaseException]:
    """The exception class ``name`` of ``riskbridge.connectors.<module>``."""
    imported = __import__(f"riskbridge.connectors.{module}", fromlist=[name])
    found: type[BaseException] = getattr(imported, name)
    return found


@pytest.mark.parametrize(
    ("module", "name", "branch", "also"),
    [
        ("fhir", "FhirError", FhirServerError, None),
        ("fhir", "AttachmentError", FhirServerError, None),
        ("fhir", "AttachmentTooLargeError", FhirServerError, None),
        ("dicom", "DicomError", PacsError, None),
        ("dicomweb", "DicomwebError", PacsError, None),
        ("multipart", "MultipartError", PacsError, ValueError),
        ("multipart", "RejectedPartError", PacsError, ValueError),
        ("part10", "Part10Error", DataError, ValueError),
        ("staging", "StagingError", DataError, None),
        ("db", "DatabaseError", LedgerError, None),
    ],
)
def test_every_public_connector_exception_is_on_its_riskbridge_branch(
    module: str, name: str, branch: type[RiskbridgeError], also: type[Exception] | None
) -> None:
    exception = _exception(module, name)
    assert issubclass(exception, RiskbridgeError) and issubclass(exception, branch)
    if also is not None:
        assert issubclass(exception, also)
    others = {FhirServerError, PacsError, DataError, LedgerError} - {branch}
    assert not any(issubclass(exception, other) for other in others)


def test_old_import_paths_still_resolve() -> None:
    from riskbridge import connectors
    from riskbridge.connectors.dicomweb import MultipartError as from_dicomweb
    from riskbridge.connectors.fhir import backoff_delay, parse_retry_after
    from riskbridge.connectors.multipart import MultipartError

    assert from_dicomweb is MultipartError and connectors.MultipartError is MultipartError
    assert callable(backoff_delay) and callable(parse_retry_after)
    assert connectors.FhirClient.__name__ == "FhirClient" and connectors.dicom.DicomError is connectors.DicomError
    assert set(connectors.__all__) <= set(dir(connectors))
    with pytest.raises(AttributeError):
        connectors.NoSuchThing  # noqa: B018


def _modules_after(statement: str) -> set[str]:
    """The top-level modules a fresh interpreter has imported after ``statement``."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(result.stdout.split())


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import riskbridge.connectors", {"pynetdicom", "requests", "jwt", "psycopg2"}),
        ("from riskbridge.connectors.fhir import FhirClient", {"pynetdicom", "jwt", "psycopg2"}),
        ("from riskbridge.connectors import FhirError", {"pynetdicom", "jwt", "psycopg2"}),
        ("from riskbridge.connectors.dicom import DicomError", {"jwt", "psycopg2"}),
        ("from riskbridge.connectors.db import DatabaseError", {"pynetdicom", "requests", "jwt"}),
    ],
)
def test_importing_one_connector_does_not_import_the_others(statement: str, absent: set[str]) -> None:
    assert not _modules_after(statement) & absent
