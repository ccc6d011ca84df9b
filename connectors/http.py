"""The one HTTP layer of riskbridge's connectors: a pooled requests Session, retries, TLS and auth headers.

Both HTTP connectors (:mod:`riskbridge.connectors.fhir` and :mod:`riskbridge.connectors.dicomweb`) send through an
:class:`HttpTransport`: one pooled :class:`requests.Session` (urllib3's own retries off, :func:`new_session`), TLS
verification against the system or a site CA bundle and an optional client certificate, an ``Authorization``
header from an :class:`Authorizer` (renewed once on a 401 when it holds a token), and retries with backoff that
honour ``Retry-After``.

Authentication is shared too: :func:`authorizer_for` turns an auth section (``fhir.auth``, ``pacs.dicomweb.auth``: a
:class:`~riskbridge.settings.FhirAuth`) into the :class:`Authorizer` of a transport: none, basic or bearer as they
are; ``oauth2`` (client secret, ``client_secret_basic``) and ``smart`` (a ``private_key_jwt`` client assertion signed
with :func:`smart_client_assertion`, RS384 or ES384, freshly for every attempt) fetch an access token from the token
endpoint through the same transport and cache it until shortly before it expires (:class:`TokenAuthorizer`).
:func:`check_credentials_url` refuses credentials that would travel over plain ``http://`` to a host other than
loopback; :func:`tls_files` turns a :class:`~riskbridge.settings.HttpTlsSettings` into the ``verify`` and
``client_cert`` of :func:`new_session`.

What is retried is a :class:`RetryPolicy`, not code: which statuses are retried at all (``retry_statuses``) and
which of those mean the server did not process the request (``not_processed_statuses``, retried even for requests
that are not idempotent); connection failures are retried for idempotent requests, a connect timeout always, a TLS
failure never. The wait is ``Retry-After`` when the server sends one (up to ``max_retry_after_s``; a longer one is
not waited for) and otherwise exponential backoff with jitter (:func:`backoff_delay`). After the last attempt the
final answer is returned whatever its status; a failure below HTTP becomes the caller's own exception
(``error``), so each connector keeps its messages. Log lines name the request as the caller describes it
(``what``), never a query string, a token or a secret.
"""

from __future__ import annotations

import base64
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, urlsplit

import requests
from requests.adapters import HTTPAdapter

from riskbridge.errors import ConfigurationError
from riskbridge.hosts import is_loopback_host

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from riskbridge.settings import FhirAuth, HttpTlsSettings

    PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

__all__ = [
    "CLIENT_ASSERTION_LIFETIME_S",
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_TOKEN_LIFETIME_S",
    "FORM_CONTENT_TYPE",
    "NOT_PROCESSED_STATUSES",
    "RETRY_STATUSES",
    "TRANSIENT_STATUSES",
    "Authorizer",
    "HttpTransport",
    "RetryPolicy",
    "TokenAuthorizer",
    "authorizer_for",
    "backoff_delay",
    "basic_authorization",
    "bearer_authorization",
    "check_credentials_url",
    "is_loopback_host",
    "load_private_key",
    "new_session",
    "oauth_error_reason",
    "parse_retry_after",
    "root_cause",
    "smart_client_assertion",
    "static_authorization",
    "tls_files",
    "transport_reason",
]

LOG = logging.getLogger(__name__)

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# 429 and 503 mean the server did not process the request; 502 and 504 (a gateway gave up) may hide a request the
# server did process, so those are retried only for idempotent requests.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOT_PROCESSED_STATUSES = frozenset({429, 503})
# Statuses after which trying the same request later may help (a caller's own, coarser retry: e.g. a DICOMweb
# series fetched again for what is still missing).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

CertificateFiles = tuple[str | Path, str | Path]
Timeout = float | tuple[float, float]
TransportErrorFactory = Callable[[str, requests.RequestException, int], Exception]
# (message, HTTP status or None, reason): the connector's own exception for a token endpoint that gave no token.
TokenErrorFactory = Callable[[str, int | None, str], Exception]

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp must be no more than five minutes ahead; stay clear of that limit so
# a server clock a little ahead of ours still accepts it.
CLIENT_ASSERTION_LIFETIME_S = 240
DEFAULT_TOKEN_LIFETIME_S = 300.0


# --- waits -------------------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP-date); None when absent or unreadable.

    A date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # HTTP-dates are GMT; parsedate_to_datetime leaves "-0000" naive
        moment = moment.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (moment - reference).total_seconds())


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): exponential with jitter ("equal jitter").

    The ceiling doubles per attempt from ``base_s`` up to ``max_s``; the delay lies in [ceiling / 2, ceiling], so
    clients that failed together do not retry together, yet none retries immediately.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class RetryPolicy:
    """What an :class:`HttpTransport` retries and how long it waits (see the module docstring).

    ``max_attempts`` counts the first try. A connector whose statuses are retried by its caller (not here) gives
    empty ``retry_statuses``; connection failures are still retried.
    """

    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0
    retry_statuses: frozenset[int] = RETRY_STATUSES
    not_processed_statuses: frozenset[int] = NOT_PROCESSED_STATUSES

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The backoff before retry number ``attempt`` (1, 2, ...) when the server asked for no particular wait."""
        return backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, rng)

    def retries_status(self, status: int, idempotent: bool) -> bool:
        """True when an answer with ``status`` is retried: a retry status the server did not process, or any retry
        status of an idempotent request."""
        return status in self.retry_statuses and (idempotent or status in self.not_processed_statuses)

    @staticmethod
    def retries_exception(exc: requests.RequestException, idempotent: bool) -> bool:
        """True when a failure below HTTP is retried.

        A connect timeout never reached the server, so even a request that is not idempotent may be resent; other
        connection failures and read timeouts only when ``idempotent``; a TLS failure never (it will not heal). A
        connection reset or closed while the body is read (requests raises ChunkedEncodingError, which is not a
        ConnectionError) is a connection failure too.
        """
        return isinstance(exc, requests.ConnectTimeout) or (
            idempotent
            and isinstance(exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError)
            and not isinstance(exc, requests.exceptions.SSLError)
        )


# --- reasons -----------------------------------------------------------------------------------------------------


def transport_reason(exc: requests.RequestException) -> str:
    """Return a one-line reason for a failure below HTTP (refused, DNS, timeout, TLS)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection lost mid-response"
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    if errno:
        return f"cannot connect: {errno.group(0)}"
    return f"cannot connect: {type(exc).__name__}"


def root_cause(exc: BaseException) -> str:
    """A short, PHI-free name for the root cause of a requests exception (``ConnectionRefusedError``, ...)."""
    cause: BaseException = exc
    for _ in range(8):
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    return type(cause).__name__


# --- authentication ----------------------------------------------------------------------------------------------


def basic_authorization(username: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def bearer_authorization(token: str) -> str:
    """An HTTP Bearer ``Authorization`` value."""
    return f"Bearer {token}"


class Authorizer:
    """Supplies the Authorization header of each request; static by default (none, basic, bearer).

    A subclass holding a token that can be renewed (OAuth2) sets ``renewable`` and forgets its token in
    :meth:`invalidate`; the transport then retries a 401 once with a fresh one.
    """

    renewable = False

    def __init__(self, header: str | None = None) -> None:
        """Use ``header`` as the Authorization value of every request (None: send none)."""
        self._header = header

    def headers(self) -> dict[str, str]:
        """The headers to add to a request: ``Authorization`` or nothing."""
        return {"Authorization": self._header} if self._header else {}

    def invalidate(self) -> None:
        """Forget a cached token (a static credential has none)."""


# --- sessions ----------------------------------------------------------------------------------------------------


def new_session(
    *,
    pool_size: int = 8,
    pool_connections: int = 2,
    headers: Mapping[str, str] | None = None,
    authorization: str | None = None,
    verify: bool | str | Path = True,
    client_cert: CertificateFiles | None = None,
) -> requests.Session:
    """Return a requests Session with a connection pool of ``pool_size`` per host and urllib3's retries off.

    Retries belong to :class:`HttpTransport` (they honour ``Retry-After`` and know which requests are idempotent).
    ``headers`` and ``authorization`` are sent with every request; ``verify`` is True (the system CAs), a CA bundle
    file, or False; ``client_cert`` is a ``(certificate, key)`` pair of PEM files for mutual TLS.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=pool_connections, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(dict(headers or {}))
    if authorization:
        session.headers["Authorization"] = authorization
    session.verify = str(verify) if isinstance(verify, Path) else verify
    if client_cert is not None:
        session.cert = (str(client_cert[0]), str(client_cert[1]))
    return session


def tls_files(tls: HttpTlsSettings | None) -> tuple[bool | Path, CertificateFiles | None]:
    """The ``verify`` and ``client_cert`` of :func:`new_session` for a TLS section: the site CA bundle (else the
    system CAs) and the client certificate with its key (else none). Verification is never turned off here."""
    if tls is None:
        return True, None
    client_cert = (tls.cert_file, tls.key_file) if tls.cert_file is not None and tls.key_file is not None else None
    return (tls.ca_file if tls.ca_file is not None else True), client_cert


class HttpTransport:
    """Sends requests through one pooled Session with a :class:`RetryPolicy` and an :class:`Authorizer`.

    Threads may share it (requests Sessions are used that way widely). ``count`` is told ``"requests"`` for every
    attempt, ``"retries"`` for every wait and ``"token_renewals_on_401"`` for every renewal, for the connector's
    statistics. ``error(what, exc, attempts)`` builds the exception raised for a failure below HTTP that outlasts
    the attempts (or is not retried). ``log`` and ``label`` name the connector in log lines (``fhir: ...``).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        error: TransportErrorFactory,
        timeout: Timeout = 30.0,
        session: requests.Session | None = None,
        owns_session: bool | None = None,
        pool_size: int = 8,
        pool_connections: int = 2,
        headers: Mapping[str, str] | None = None,
        authorizer: Authorizer | None = None,
        verify: bool | str | Path = True,
        client_cert: CertificateFiles | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        count: Callable[[str], None] | None = None,
        log: logging.Logger = LOG,
        label: str = "http",
    ) -> None:
        """Wrap ``session`` (used as it is, e.g. with a site's TLS adapter) or a new pooled one.

        ``headers`` are added to the session either way. ``owns_session`` (default: True when the session is made
        here) says whether :meth:`close` closes it. ``sleep`` and ``rng`` are replaceable for tests.
        """
        if session is None:
            session = new_session(
                pool_size=pool_size, pool_connections=pool_connections, verify=verify, client_cert=client_cert
            )
            owns_session = True if owns_session is None else owns_session
        if headers:
            session.headers.update(dict(headers))
        self.session = session
        self.policy = policy
        self.timeout = timeout
        self.authorizer = authorizer or Authorizer()
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._owns_session = bool(owns_session)
        self._error = error
        self._count = count or (lambda _counter: None)
        self._log = log
        self._label = label

    def close(self) -> None:
        """Close the pooled connections if the session is this transport's."""
        if self._owns_session:
            self.session.close()

    def send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: Sequence[tuple[str, str]] | Mapping[str, str | int] | None = None,
        data: bytes | Mapping[str, str] | Callable[[], bytes | Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        authorize: bool = True,
        idempotent: bool = True,
        stream: bool = False,
    ) -> requests.Response:
        """Send one request with retries; return the final response whatever its status (callers check it).

        What is retried and how long is waited is the :class:`RetryPolicy`'s. A 401 renews a renewable
        authorizer's token once (not counted as an attempt). Raises ``error(what, exc, attempts)`` for a failure
        below HTTP that is not retried or outlasts the attempts. ``data`` may be a callable, called for the body of
        each attempt (a body that must differ per attempt: a signed assertion with its own ``jti``).
        """
        policy = self.policy
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            request_headers = dict(headers or {})
            if authorize:
                request_headers.update(self.authorizer.headers())
            self._count("requests")
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    data=data() if callable(data) else data,
                    headers=request_headers,
                    timeout=self.timeout,
                    stream=stream,
                    # Passed per request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override the session's
                    # own verify, which would silently drop a site CA bundle (True still means the system CAs).
                    verify=self.session.verify,
                )
            except requests.RequestException as exc:
                if not policy.retries_exception(exc, idempotent) or attempt >= policy.max_attempts:
                    raise self._error(what, exc, attempt) from None
                delay = policy.delay(attempt, self.rng)
                self._log.warning(
                    "%s: %s: %s; retry %d in %.2f s", self._label, what, transport_reason(exc), attempt, delay
                )
                self._count("retries")
                self.sleep(delay)
                continue
            status = response.status_code
            if status == 401 and authorize and self.authorizer.renewable and not renewed:
                renewed = True
                attempt -= 1  # renewing an expired token is not a failed attempt
                self._count("token_renewals_on_401")
                self._log.info("%s: %s: 401, renewing the access token once", self._label, what)
                response.close()
                self.authorizer.invalidate()
                continue
            if policy.retries_status(status, idempotent):
                if attempt >= policy.max_attempts:
                    return response
                asked = parse_retry_after(response.headers.get("Retry-After"))
                if asked is not None and asked > policy.max_retry_after_s:
                    self._log.warning(
                        "%s: %s: %d with Retry-After %.0f s, longer than allowed; giving up",
                        self._label,
                        what,
                        status,
                        asked,
                    )
                    return response
                delay = asked if asked is not None else policy.delay(attempt, self.rng)
                self._log.warning("%s: %s: %d; retry %d in %.2f s", self._label, what, status, attempt, delay)
                self._count("retries")
                response.close()
                self.sleep(delay)
                continue
            return response


# --- credentials -------------------------------------------------------------------------------------------------


def check_credentials_url(auth: FhirAuth, base_url: str, *, base_key: str, auth_key: str) -> None:
    """Raise ConfigurationError when credentials would travel over plain ``http://`` to a host that is not loopback.

    With any ``auth`` other than ``none``, ``base_url`` (every request's Authorization header) and, for oauth2 and
    smart, the token URL (the client secret or signed assertion) must be ``https://`` unless their host is loopback
    (127.0.0.0/8, ``::1``, ``localhost``: the sandbox). Without credentials plain http stays allowed. ``base_key``
    and ``auth_key`` name the settings in the message (``fhir.base_url``, ``fhir.auth``).
    """
    if auth.type == "none":
        return
    urls = [(base_key, base_url)]
    if auth.type in ("oauth2", "smart") and auth.token_url is not None:
        urls.append((f"{auth_key}.token_url", auth.token_url))
    for key, url in urls:
        parts = urlsplit(url)
        if parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname):
            raise ConfigurationError(
                f"{key}: {auth_key} type {auth.type!r} would send credentials over plain http:// to {parts.hostname}; "
                "use https:// (plain http with credentials is allowed only to loopback: 127.0.0.0/8, ::1, localhost)"
            )


def static_authorization(auth: FhirAuth) -> str | None:
    """The fixed ``Authorization`` value of ``basic`` and ``bearer`` authentication; None for the other types."""
    if auth.type == "basic":
        assert auth.username is not None and auth.password is not None  # enforced by FhirAuth
        return basic_authorization(auth.username, auth.password.get_secret_value())
    if auth.type == "bearer":
        assert auth.token is not None  # enforced by FhirAuth
        return bearer_authorization(auth.token.get_secret_value())
    return None


def load_private_key(
    path: Path,
    algorithm: str,
    *,
    setting: str = "auth.private_key_file",
    error: Callable[[str], Exception] = ValueError,
) -> PrivateKey:
    """Read a PEM private key for SMART client assertions; check it fits ``algorithm`` (RS384: RSA, ES384: P-384).

    A problem raises ``error(message)``, the message naming ``setting`` and the file, never the key material.
    """
    from cryptography.hazmat.primitives import serialization  # only SMART needs it
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        # The exception text says nothing about the key material; a passphrase-protected key is a TypeError.
        raise error(f"{setting}: {path} is not an unencrypted PEM private key ({exc})") from None
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise error(f"{setting}: algorithm RS384 needs an RSA key, {path} is not one")
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise error(f"{setting}: algorithm ES384 needs an EC P-384 key, {path} is not one")
    return key


def smart_client_assertion(
    client_id: str,
    token_url: str,
    private_key: PrivateKey,
    key_id: str,
    algorithm: str,
    now: float | None = None,
    lifetime_s: int = CLIENT_ASSERTION_LIFETIME_S,
) -> str:
    """A signed SMART Backend Services client assertion: iss = sub = client_id, aud = token URL, unique jti, exp."""
    import jwt  # only SMART needs it

    issued = int(now if now is not None else time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": issued + lifetime_s, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, private_key, algorithm=algorithm, headers={"kid": key_id, "typ": "JWT"})


def oauth_error_reason(response: requests.Response, fallback: Callable[[requests.Response], str] | None = None) -> str:
    """``error: error_description`` of an OAuth2 error answer (RFC 6749 5.2); else ``fallback(response)`` for other
    JSON, or the first 200 characters of a body that is not JSON."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and "error" in body:
        description = body.get("error_description")
        return f"{body['error']}: {description}" if description else str(body["error"])
    return fallback(response) if fallback is not None else ""


def _positive_float(value: Any, default: float) -> float:
    """``value`` as a positive number of seconds, else ``default``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


class TokenAuthorizer(Authorizer):
    """OAuth2 client credentials (client secret or SMART private_key_jwt); the access token is cached until expiry.

    Token requests go through ``transport`` (its retries, statistics and log label) without an Authorization header
    of their own kind; ``transport`` is told ``"token_requests"`` for each. A token endpoint that gives no usable
    token raises ``error(message, status, reason)``; ``describe`` gives the reason of its error answers. ``clock``
    is monotonic seconds (replaceable for tests). ``setting`` names the auth section in messages (``fhir.auth``).
    """

    renewable = True

    def __init__(
        self,
        auth: FhirAuth,
        transport: HttpTransport,
        *,
        error: TokenErrorFactory,
        setting: str = "auth",
        clock: Callable[[], float] = time.monotonic,
        describe: Callable[[requests.Response], str] = oauth_error_reason,
        key_error: Callable[[str], Exception] | None = None,
    ) -> None:
        """Prepare token requests for ``auth`` (oauth2 or smart); a SMART key is read now, so a bad one fails early
        with ``key_error(message)`` (default: ``error(message, None, message)``)."""
        super().__init__()
        assert auth.token_url is not None and auth.client_id is not None  # enforced by FhirAuth
        self._auth = auth
        self._transport = transport
        self._error = error
        self._clock = clock
        self._describe = describe
        self._token_url = auth.token_url
        self._client_id = auth.client_id
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._private_key: PrivateKey | None = None
        if auth.type == "smart":
            assert auth.private_key_file is not None  # enforced by FhirAuth
            self._private_key = load_private_key(
                auth.private_key_file,
                auth.algorithm,
                setting=f"{setting}.private_key_file",
                error=key_error or (lambda message: error(message, None, message)),
            )

    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <token>``, fetching a token first when none is cached or it expired."""
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at:
                self._token, self._expires_at = self._fetch()
            return {"Authorization": bearer_authorization(self._token)}

    def invalidate(self) -> None:
        """Forget the cached token; the next request fetches a new one."""
        with self._lock:
            self._token = None

    def _request(self) -> tuple[Callable[[], dict[str, str]], dict[str, str]]:
        """The form (built anew for each attempt) and headers of a token request: a client assertion (SMART, signed
        for every attempt, retries included, with its own ``jti`` and ``exp``: a token endpoint may refuse a
        ``jti`` it has seen) or client_secret_basic."""
        fixed = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json", "Content-Type": FORM_CONTENT_TYPE}
        if self._auth.scope:
            fixed["scope"] = self._auth.scope
        if self._private_key is not None:
            key_id, private_key = self._auth.key_id, self._private_key
            assert key_id is not None  # enforced by FhirAuth

            def signed_form() -> dict[str, str]:
                assertion = smart_client_assertion(
                    self._client_id, self._token_url, private_key, key_id, self._auth.algorithm
                )
                return {**fixed, "client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}

            return signed_form, headers
        assert self._auth.client_secret is not None  # enforced by FhirAuth
        # client_secret_basic (RFC 6749 2.3.1): both parts form-encoded, then HTTP Basic.
        secret = self._auth.client_secret.get_secret_value()
        headers["Authorization"] = basic_authorization(quote_plus(self._client_id), quote_plus(secret))
        return lambda: dict(fixed), headers

    def _fetch(self) -> tuple[str, float]:
        """Ask the token endpoint for a token; return it and the clock reading at which to renew it."""
        form, headers = self._request()
        transport = self._transport
        transport._count("token_requests")
        host = urlsplit(self._token_url).netloc
        what = f"POST token endpoint {host}"
        response = transport.send(
            "POST", self._token_url, data=form, headers=headers, what=what, authorize=False, idempotent=True
        )
        if response.status_code != 200:
            reason = self._describe(response)
            raise self._error(f"{what}: {response.status_code} {reason}".rstrip(), response.status_code, reason)
        try:
            body = response.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            reason = "the answer holds no access_token"
            raise self._error(f"{what}: {reason}", response.status_code, reason) from None
        token_type = str(body.get("token_type", "bearer"))
        if token_type.lower() != "bearer":
            reason = f"token_type {token_type[:40]!r} is not supported (bearer only)"
            raise self._error(f"{what}: {reason}", response.status_code, reason)
        lifetime = _positive_float(body.get("expires_in"), DEFAULT_TOKEN_LIFETIME_S)
        skew = min(self._auth.refresh_skew_s, lifetime / 2)
        transport._log.info("%s: access token obtained from %s, expires in %.0f s", transport._label, host, lifetime)
        return token, self._clock() + lifetime - skew


def authorizer_for(
    auth: FhirAuth,
    transport: HttpTransport,
    *,
    error: TokenErrorFactory,
    setting: str = "auth",
    clock: Callable[[], float] = time.monotonic,
    describe: Callable[[requests.Response], str] = oauth_error_reason,
    key_error: Callable[[str], Exception] | None = None,
) -> Authorizer:
    """The authorizer of an auth section: a :class:`TokenAuthorizer` for oauth2 and smart (token requests sent
    through ``transport``), a static one (none, basic, bearer) otherwise."""
    if auth.type in ("oauth2", "smart"):
        return TokenAuthorizer(
            auth, transport, error=error, setting=setting, clock=clock, describe=describe, key_error=key_error
        )
    return Authorizer(static_authorization(auth))
