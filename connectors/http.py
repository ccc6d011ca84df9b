"""The one HTTP layer of riskbridge's connectors: a pooled requests Session, retries, TLS and auth headers.

Both HTTP connectors (:mod:`riskbridge.connectors.fhir` and :mod:`riskbridge.connectors.dicomweb`) send through an
:class:`HttpTransport`: one pooled :class:`requests.Session` (urllib3's own retries off, :func:`new_session`), TLS
verification against the system or a site CA bundle and an optional client certificate, an ``Authorization``
header from an :class:`Authorizer` (renewed once on a 401 when it holds a token), and retries with backoff that
honour ``Retry-After``.

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

__all__ = [
    "FORM_CONTENT_TYPE",
    "NOT_PROCESSED_STATUSES",
    "RETRY_STATUSES",
    "TRANSIENT_STATUSES",
    "Authorizer",
    "HttpTransport",
    "RetryPolicy",
    "backoff_delay",
    "basic_authorization",
    "bearer_authorization",
    "new_session",
    "parse_retry_after",
    "root_cause",
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
        connection failures and read timeouts only when ``idempotent``; a TLS failure never (it will not heal).
        """
        return isinstance(exc, requests.ConnectTimeout) or (
            idempotent
            and isinstance(exc, requests.ConnectionError | requests.Timeout)
            and not isinstance(exc, requests.exceptions.SSLError)
        )


# --- reasons -----------------------------------------------------------------------------------------------------


def transport_reason(exc: requests.RequestException) -> str:
    """Return a one-line reason for a failure below HTTP (refused, DNS, timeout, TLS)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
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
