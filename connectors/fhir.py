"""FHIR R4 server I/O through a pooled requests Session: authentication and the REST interactions riskbridge uses.

:class:`FhirClient` is what the pipeline uses: searches that follow ``link[next]`` to the end (restarting a search
whose page expired), batched across patients with OR-lists, retries with backoff that honour ``Retry-After``,
OAuth2 client credentials and SMART Backend Services tokens cached until they expire, transaction bundles and
conditional creates for write-back, and note text from DocumentReference / DiagnosticReport attachments.
Resources are read as plain dicts (validating them with fhir.resources costs ~100x more); resources sent to the
server are built with ``fhir.resources.R4B`` models (the package's default models are R5) and serialized with
:func:`resource_json`.

Errors are :class:`FhirError` carrying the HTTP status and the OperationOutcome's diagnostics, so a message
reads like ``GET /metadata: 503 HAPI-1234: ...``. Log lines and error messages name resource types, ids, counts
and statuses only: never a query string (it can hold an MRN), a token or a secret.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.adapters import HTTPAdapter

from riskbridge.settings import FhirAuth, FhirSettings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# 429 and 503 mean the server did not process the request; 502 and 504 (a gateway gave up) may hide a request the
# server did process, so those are retried only for idempotent requests.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOT_PROCESSED_STATUSES = frozenset({429, 503})
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp must be no more than five minutes ahead; stay clear of that limit so
# a server clock a little ahead of ours still accepts it.
CLIENT_ASSERTION_LIFETIME_S = 240
DEFAULT_TOKEN_LIFETIME_S = 300.0
MAX_SEARCH_RESTARTS = 3
# Characters left unescaped in search query strings: ',' separates OR values, ':' and '/' appear in system URIs and
# references. '|' is escaped (%7C) because strict servlet containers refuse it raw.
QUERY_SAFE = ",/:"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

SearchParams = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]


class FhirError(Exception):
    """A FHIR interaction failed; the message names the request, the HTTP status and the server's diagnostics."""

    def __init__(self, message: str, status: int | None = None, diagnostics: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.diagnostics = diagnostics


@dataclass(frozen=True)
class ServerInfo:
    """Who a FHIR server says it is, from its CapabilityStatement."""

    name: str
    version: str
    fhir_version: str


def diagnostics(response: requests.Response) -> str:
    """Return the OperationOutcome diagnostics of an error response, or a short excerpt of its body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        texts = [issue.get("diagnostics") or issue.get("code", "") for issue in issues]
        return "; ".join(text for text in texts if text)
    return ""


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


def session_for(fhir: FhirSettings) -> requests.Session:
    """Return a requests Session with static authentication (none, basic, bearer) and FHIR JSON headers.

    Token-based authentication (oauth2, smart) needs a token endpoint round trip: use :class:`FhirClient`.
    """
    session = requests.Session()
    session.headers.update({"Accept": FHIR_JSON})
    auth = fhir.auth
    if auth.type == "basic":
        assert auth.username is not None and auth.password is not None  # enforced by FhirAuth
        session.auth = (auth.username, auth.password.get_secret_value())
    elif auth.type == "bearer":
        assert auth.token is not None  # enforced by FhirAuth
        session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    return session


def capability(fhir: FhirSettings, session: requests.Session | None = None) -> ServerInfo:
    """Read ``/metadata`` and return the server's software name, version and FHIR version."""
    session = session or session_for(fhir)
    url = f"{fhir.base_url}/metadata"
    try:
        response = session.get(url, timeout=fhir.timeout_s)
    except requests.RequestException as exc:
        raise FhirError(f"GET {url}: {transport_reason(exc)}") from exc
    if response.status_code != 200:
        raise FhirError(
            f"GET {url}: {response.status_code} {diagnostics(response)}".rstrip(),
            status=response.status_code,
            diagnostics=diagnostics(response),
        )
    body: dict[str, Any] = response.json()
    software = body.get("software") or {}
    return ServerInfo(
        name=software.get("name", "unknown"),
        version=software.get("version", "unknown"),
        fhir_version=body.get("fhirVersion", "unknown"),
    )


# --- retries -----------------------------------------------------------------------------------------------------


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


# --- search URLs -------------------------------------------------------------------------------------------------


def search_pairs(params: SearchParams | None) -> list[tuple[str, str]]:
    """Flatten search parameters to ``(name, value)`` pairs; a sequence value repeats the parameter (AND)."""
    if params is None:
        return []
    if isinstance(params, Mapping):
        pairs: list[tuple[str, str]] = []
        for name, value in params.items():
            if isinstance(value, str):
                pairs.append((name, value))
            else:
                pairs.extend((name, item) for item in value)
        return pairs
    return [(str(name), str(value)) for name, value in params]


def encode_query(pairs: Sequence[tuple[str, str]]) -> str:
    """Encode search parameters as a query string, leaving ``,`` ``/`` ``:`` readable and escaping the rest."""
    return urlencode(list(pairs), safe=QUERY_SAFE, quote_via=quote)


def code_filter(system: str, codes: Iterable[str]) -> str:
    """A token OR-list for ``code``: ``http://loinc.org|2160-0,http://loinc.org|718-7``."""
    return ",".join(f"{system}|{code}" for code in codes)


def date_filter(start: datetime | None = None, end: datetime | None = None) -> list[str]:
    """Values for a ``date`` parameter bounding a window: ``["ge<start>", "le<end>"]`` (either may be omitted).

    Pass timezone-aware datetimes; a naive one would be read in the server's zone.
    """
    values = []
    if start is not None:
        values.append(f"ge{start.isoformat()}")
    if end is not None:
        values.append(f"le{end.isoformat()}")
    return values


def check_fhir_id(resource_id: str) -> str:
    """Return ``resource_id`` if it is a valid FHIR id (so it cannot break an OR-list or a URL), else raise."""
    if not _FHIR_ID.fullmatch(resource_id):
        raise ValueError(f"not a valid FHIR id: {resource_id!r}")
    return resource_id


def or_list_chunks(
    url_without_value: str, values: Sequence[str], max_url_length: int, max_values: int
) -> list[list[str]]:
    """Split ``values`` into OR-lists so that ``url_without_value + ",".join(chunk)`` (encoded) fits the limit.

    ``url_without_value`` is the full request URL up to and including ``name=`` of the OR-list parameter. Each
    chunk holds at most ``max_values`` values; order is kept. Raises ValueError if one value alone cannot fit.
    """
    if max_values < 1:
        raise ValueError("max_values must be at least 1")
    budget = max_url_length - len(url_without_value)
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 0
    for value in values:
        size = len(quote(value, safe=QUERY_SAFE))
        if size > budget:
            raise ValueError(f"a URL with one value of {size} characters exceeds the limit of {max_url_length}")
        extra = size if not current else size + 1  # the ',' separator
        if current and (used + extra > budget or len(current) >= max_values):
            chunks.append(current)
            current, used, extra = [], 0, size
        current.append(value)
        used += extra
    if current:
        chunks.append(current)
    return chunks


def referenced_id(reference: str | None, resource_type: str = "Patient") -> str | None:
    """The id in a reference like ``Patient/123`` (or an absolute URL ending so); None for other types."""
    if not reference:
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == resource_type:
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == resource_type and parts[-2] == "_history":
        return parts[-3]
    return None


def subject_patient_id(resource: Mapping[str, Any]) -> str | None:
    """The Patient id a resource is about (``subject``, else ``patient``), or None."""
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, Mapping):
            found = referenced_id(ref.get("reference"))
            if found:
                return found
    return None


# --- outgoing resources ------------------------------------------------------------------------------------------


def resource_json(resource: Any) -> dict[str, Any]:
    """Serialize an outgoing resource built with a ``fhir.resources.R4B`` model to a JSON-ready dict.

    Raises TypeError for anything else, notably the package's default (R5) models, which would send non-R4
    content to an R4 server.
    """
    from fhir.resources.R4B.resource import Resource as R4BResource

    if not isinstance(resource, R4BResource):
        module = type(resource).__module__
        raise TypeError(f"build resources sent to the FHIR server with fhir.resources.R4B models (got {module})")
    result: dict[str, Any] = json.loads(resource.model_dump_json(exclude_none=True))
    return result


def transaction_entry(
    resource: Any, *, if_none_exist: str | None = None, method: str = "POST", url: str | None = None
) -> dict[str, Any]:
    """A transaction Bundle entry for an R4B resource: a create (conditional with ``if_none_exist``) by default.

    ``if_none_exist`` is a search query without the type, e.g. ``identifier=urn:x|abc``; ``method="PUT"`` with
    ``url="Type/id"`` gives an update-as-create. Each entry gets a ``urn:uuid`` fullUrl so other entries of the
    same Bundle can reference it.
    """
    body = resource_json(resource)
    request: dict[str, str] = {"method": method, "url": url or body["resourceType"]}
    if if_none_exist is not None:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": body, "request": request}


@dataclass(frozen=True)
class EntryResult:
    """The server's answer to one write: HTTP status, Location (``Type/id/_history/n``), ETag, any diagnostics."""

    status: int
    location: str | None
    etag: str | None = None
    diagnostics: str = ""

    @property
    def created(self) -> bool:
        """True when the server created a resource (201); a conditional create that matched answers 200."""
        return self.status == 201

    @property
    def resource_id(self) -> str | None:
        """The id in the Location, e.g. ``123`` from ``RiskAssessment/123/_history/1``."""
        if not self.location:
            return None
        parts = self.location.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        return parts[-1] if parts else None


def _status_code(status: str) -> int:
    match = re.match(r"\s*(\d{3})", status or "")
    return int(match.group(1)) if match else 0


# --- note text ---------------------------------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type / attachment contentType, lower case, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def content_type_charset(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a contentType (``text/plain; charset=ISO-8859-1`` -> ``ISO-8859-1``), or None."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"').strip("'")
    return None


_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "section", "pre", "hr"}
)
_SKIPPED_TAGS = frozenset({"script", "style", "head", "title"})


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML document; block elements become line breaks, script/style is dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities (&amp; &deg; &#176;) arrive unescaped in handle_data
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML note: tags removed, entities unescaped, one line per block, blank lines dropped."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).splitlines())
    return "\n".join(line for line in lines if line)


def decode_text(raw: bytes, content_type: str | None) -> str:
    """Decode note bytes with the contentType's charset (UTF-8 when none is given or it is unknown)."""
    charset = content_type_charset(content_type) or "utf-8"
    try:
        return raw.decode(charset)
    except LookupError:
        log.warning("fhir: unknown charset %r in a note's contentType; decoding as UTF-8", charset)
        return raw.decode("utf-8", errors="replace")
    except UnicodeDecodeError:
        log.warning("fhir: note bytes are not valid %s; undecodable bytes replaced", charset)
        return raw.decode(charset, errors="replace")


TEXT_MEDIA_TYPES = frozenset({"text/plain", "text/html", "application/xhtml+xml"})


def attachment_text(raw: bytes, content_type: str | None) -> str | None:
    """The plain text of attachment bytes for text/plain and text/html; None for other media types (PDF, ...)."""
    kind = media_type(content_type) or "text/plain"  # contentType is optional; notes without one are text
    if kind not in TEXT_MEDIA_TYPES:
        return None
    text = decode_text(raw, content_type)
    return text if kind == "text/plain" else html_to_text(text)


@dataclass(frozen=True)
class NoteText:
    """The text of one note attachment (or a DiagnosticReport's conclusion) and where it came from."""

    resource_type: str
    resource_id: str
    text: str
    content_type: str
    origin: str  # "data" (inline base64), "url" (a Binary read), or "conclusion"


# --- authentication ----------------------------------------------------------------------------------------------


def load_private_key(path: Path, algorithm: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """Read a PEM private key for SMART client assertions; check it fits ``algorithm`` (RS384: RSA, ES384: P-384)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        # The exception text says nothing about the key material; a passphrase-protected key is a TypeError.
        raise FhirError(f"fhir.auth.private_key_file: {path} is not an unencrypted PEM private key ({exc})") from None
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise FhirError(f"fhir.auth.private_key_file: algorithm RS384 needs an RSA key, {path} is not one")
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FhirError(f"fhir.auth.private_key_file: algorithm ES384 needs an EC P-384 key, {path} is not one")
    return key


def smart_client_assertion(
    client_id: str,
    token_url: str,
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    key_id: str,
    algorithm: str,
    now: float | None = None,
    lifetime_s: int = CLIENT_ASSERTION_LIFETIME_S,
) -> str:
    """A signed SMART Backend Services client assertion: iss = sub = client_id, aud = token URL, unique jti, exp."""
    issued = int(now if now is not None else time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": issued + lifetime_s, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, private_key, algorithm=algorithm, headers={"kid": key_id, "typ": "JWT"})


def basic_authorization(username: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class _Authorizer:
    """Supplies the Authorization header; static by default (none, basic, bearer)."""

    renewable = False

    def __init__(self, header: str | None = None) -> None:
        self._header = header

    def headers(self) -> dict[str, str]:
        return {"Authorization": self._header} if self._header else {}

    def invalidate(self) -> None:
        """Forget a cached token (a static credential has none)."""


class _TokenAuthorizer(_Authorizer):
    """OAuth2 client credentials (client secret or SMART private_key_jwt); the access token is cached until expiry."""

    renewable = True

    def __init__(self, client: FhirClient, auth: FhirAuth) -> None:
        super().__init__()
        assert auth.token_url is not None and auth.client_id is not None  # enforced by FhirAuth
        self._client = client
        self._auth = auth
        self._token_url = auth.token_url
        self._client_id = auth.client_id
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None
        if auth.type == "smart":
            assert auth.private_key_file is not None  # enforced by FhirAuth
            self._private_key = load_private_key(auth.private_key_file, auth.algorithm)

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._client.clock() >= self._expires_at:
                self._token, self._expires_at = self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def _request(self) -> tuple[dict[str, str], dict[str, str]]:
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json", "Content-Type": FORM_CONTENT_TYPE}
        if self._auth.scope:
            form["scope"] = self._auth.scope
        if self._private_key is not None:
            assert self._auth.key_id is not None  # enforced by FhirAuth
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = smart_client_assertion(
                self._client_id, self._token_url, self._private_key, self._auth.key_id, self._auth.algorithm
            )
        else:
            assert self._auth.client_secret is not None  # enforced by FhirAuth
            # client_secret_basic (RFC 6749 2.3.1): both parts form-encoded, then HTTP Basic.
            secret = self._auth.client_secret.get_secret_value()
            headers["Authorization"] = basic_authorization(quote_plus(self._client_id), quote_plus(secret))
        return form, headers

    def _fetch(self) -> tuple[str, float]:
        form, headers = self._request()
        self._client.stats.add("token_requests")
        what = f"POST token endpoint {urlsplit(self._token_url).netloc}"
        response = self._client.send(
            "POST", self._token_url, data=form, headers=headers, what=what, authorize=False, idempotent=True
        )
        if response.status_code != 200:
            reason = _oauth_error(response)
            raise FhirError(f"{what}: {response.status_code} {reason}".rstrip(), response.status_code, reason)
        try:
            body = response.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            raise FhirError(f"{what}: the answer holds no access_token", response.status_code) from None
        token_type = str(body.get("token_type", "bearer"))
        if token_type.lower() != "bearer":
            raise FhirError(f"{what}: token_type {token_type!r} is not supported (bearer only)")
        lifetime = _positive_float(body.get("expires_in"), DEFAULT_TOKEN_LIFETIME_S)
        skew = min(self._auth.refresh_skew_s, lifetime / 2)
        log.info("fhir: access token obtained from %s, expires in %.0f s", urlsplit(self._token_url).netloc, lifetime)
        return token, self._client.clock() + lifetime - skew


def _positive_float(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def _oauth_error(response: requests.Response) -> str:
    """``error: error_description`` of an OAuth2 error answer (RFC 6749 5.2), else the FHIR diagnostics."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and "error" in body:
        description = body.get("error_description")
        return f"{body['error']}: {description}" if description else str(body["error"])
    return diagnostics(response)


# --- the client --------------------------------------------------------------------------------------------------


@dataclass
class ClientStats:
    """Counters of what a :class:`FhirClient` did (for logs, tests and benchmarks)."""

    requests: int = 0
    retries: int = 0
    pages: int = 0
    search_restarts: int = 0
    token_requests: int = 0
    token_renewals_on_401: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, counter: str, amount: int = 1) -> None:
        """Increase one counter; safe when searches run in several threads."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + amount)


class _PageExpired(Exception):
    """A next-page link answered 410 Gone: the server dropped the search's cached results."""


class FhirClient:
    """A FHIR R4 REST client over one pooled requests Session (see the module docstring).

    Use it as a context manager or call :meth:`close`. Not meant to be shared between processes; threads may share
    it (requests Sessions are used that way widely, and the token cache is locked).
    """

    def __init__(
        self,
        settings: FhirSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
    ) -> None:
        """Build a client for ``settings``; ``sleep``, ``clock``, ``rng`` and ``session`` are replaceable for tests.

        A given ``session`` (e.g. with a site's TLS adapter) is used as it is; otherwise a pooled one is made.
        """
        self.settings = settings
        self.base_url = settings.base_url
        self.stats = ClientStats()
        self.clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        if session is None:
            session = requests.Session()
            # Retries are ours (they honour Retry-After and know which requests are idempotent): urllib3's stay off.
            adapter = HTTPAdapter(pool_connections=2, pool_maxsize=settings.pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._session = session
        self._session.headers.update({"Accept": FHIR_JSON})
        self._authorizer = self._make_authorizer(settings.auth)

    def _make_authorizer(self, auth: FhirAuth) -> _Authorizer:
        if auth.type == "basic":
            assert auth.username is not None and auth.password is not None  # enforced by FhirAuth
            return _Authorizer(basic_authorization(auth.username, auth.password.get_secret_value()))
        if auth.type == "bearer":
            assert auth.token is not None  # enforced by FhirAuth
            return _Authorizer(f"Bearer {auth.token.get_secret_value()}")
        if auth.type in ("oauth2", "smart"):
            return _TokenAuthorizer(self, auth)
        return _Authorizer()

    def __repr__(self) -> str:
        return f"FhirClient(base_url={self.base_url!r}, auth={self.settings.auth.type!r})"

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    # -- transport -------------------------------------------------------------------------------------------------

    def url_for(self, path: str) -> str:
        """The absolute URL of ``path`` (``Observation``, ``Binary/1``) or ``path`` itself if it is absolute.

        Raises FhirError for an absolute URL outside ``base_url``: credentials are only ever sent to the server.
        """
        if path.startswith(("http://", "https://")):
            if (
                path != self.base_url
                and not path.startswith(self.base_url + "/")
                and not path.startswith(self.base_url + "?")
            ):
                raise FhirError(
                    f"refusing a URL outside the FHIR server {self.base_url} (host {urlsplit(path).netloc})"
                )
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def _describe(self, method: str, url: str) -> str:
        """``METHOD path`` relative to the base, without the query string (it may hold identifiers)."""
        path = urlsplit(url).path
        base_path = urlsplit(self.base_url).path
        relative = path[len(base_path) :] if path.startswith(base_path) else path
        return f"{method} {relative or '/'}"

    def send(
        self,
        method: str,
        url: str,
        *,
        what: str | None = None,
        params: Sequence[tuple[str, str]] | None = None,
        data: bytes | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        authorize: bool = True,
        idempotent: bool = True,
    ) -> requests.Response:
        """Send one request with retries; return the final response whatever its status (callers check it).

        Retried: 429 and 503 always; 502, 504 and connection errors only when ``idempotent`` (the server may have
        processed the request). ``Retry-After`` is honoured up to ``retry.max_retry_after_s``; otherwise the wait
        is exponential backoff with jitter. A 401 renews an OAuth2/SMART token once. Raises FhirError for
        transport failures that outlast the attempts.
        """
        retry = self.settings.retry
        what = what or self._describe(method, url)
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            request_headers = dict(headers or {})
            if authorize:
                request_headers.update(self._authorizer.headers())
            self.stats.add("requests")
            try:
                response = self._session.request(
                    method, url, params=params, data=data, headers=request_headers, timeout=self.settings.timeout_s
                )
            except requests.RequestException as exc:
                # A connect timeout never reached the server, so even a non-idempotent request may be resent.
                retryable = isinstance(exc, requests.ConnectTimeout) or (
                    idempotent
                    and isinstance(exc, requests.ConnectionError | requests.Timeout)
                    and not isinstance(exc, requests.exceptions.SSLError)
                )
                if not retryable or attempt >= retry.max_attempts:
                    raise FhirError(f"{what}: {transport_reason(exc)} (attempt {attempt})") from None
                delay = backoff_delay(attempt, retry.backoff_base_s, retry.backoff_max_s, self._rng)
                log.warning("fhir: %s: %s; retry %d in %.2f s", what, transport_reason(exc), attempt, delay)
                self.stats.add("retries")
                self._sleep(delay)
                continue
            status = response.status_code
            if status == 401 and authorize and self._authorizer.renewable and not renewed:
                renewed = True
                attempt -= 1  # renewing an expired token is not a failed attempt
                self.stats.add("token_renewals_on_401")
                log.info("fhir: %s: 401, renewing the access token once", what)
                response.close()
                self._authorizer.invalidate()
                continue
            if status in RETRY_STATUSES and (idempotent or status in NOT_PROCESSED_STATUSES):
                if attempt >= retry.max_attempts:
                    return response
                asked = parse_retry_after(response.headers.get("Retry-After"))
                if asked is not None and asked > retry.max_retry_after_s:
                    log.warning(
                        "fhir: %s: %d with Retry-After %.0f s, longer than allowed; giving up", what, status, asked
                    )
                    return response
                delay = (
                    asked
                    if asked is not None
                    else backoff_delay(attempt, retry.backoff_base_s, retry.backoff_max_s, self._rng)
                )
                log.warning("fhir: %s: %d; retry %d in %.2f s", what, status, attempt, delay)
                self.stats.add("retries")
                response.close()
                self._sleep(delay)
                continue
            return response

    def _checked(self, response: requests.Response, what: str, expected: Iterable[int] = (200,)) -> requests.Response:
        if response.status_code not in set(expected):
            reason = diagnostics(response)
            raise FhirError(f"{what}: {response.status_code} {reason}".rstrip(), response.status_code, reason)
        return response

    def _json(self, response: requests.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise FhirError(f"{what}: the answer is not JSON", response.status_code) from None
        if not isinstance(body, dict):
            raise FhirError(f"{what}: the answer is not a JSON object", response.status_code)
        return body

    # -- reads and searches ----------------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource as a dict."""
        url = self.url_for(f"{resource_type}/{check_fhir_id(resource_id)}")
        what = f"GET {resource_type}/{resource_id}"
        return self._json(self._checked(self.send("GET", url, what=what), what), what)

    def search(
        self,
        resource_type: str,
        params: SearchParams | None = None,
        *,
        page_size: int | None = None,
        method: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield every resource a search matches (dicts), following ``link[next]`` to the last page.

        ``_count`` is ``page_size`` (default ``settings.page_size``); ``method`` is "get" or "post" (``_search``
        with a form body; default ``settings.search_method``). Every request carries ``Cache-Control: no-cache`` so
        HAPI does not answer from a cached identical search. A page that answers 410 Gone (the server dropped the
        search) restarts the search from its first page; resources already yielded are skipped (by type and id).
        Entries with search mode ``outcome`` are not yielded.
        """
        pairs = [pair for pair in search_pairs(params) if pair[0] != "_count"]
        pairs.append(("_count", str(page_size or self.settings.page_size)))
        use_post = (method or self.settings.search_method).lower() == "post"
        seen: set[str] = set()  # type/id of every resource yielded, across restarts
        began = time.perf_counter()
        restarts = 0
        while True:
            try:
                yield from self._search_once(resource_type, pairs, use_post, seen)
                break
            except _PageExpired:
                restarts += 1
                self.stats.add("search_restarts")
                if restarts > MAX_SEARCH_RESTARTS:
                    raise FhirError(
                        f"{resource_type} search: pages kept expiring (410 Gone) after {MAX_SEARCH_RESTARTS} restarts",
                        410,
                    ) from None
                log.warning(
                    "fhir: %s search: a page expired (410 Gone); restarting it, %d resources already read",
                    resource_type,
                    len(seen),
                )
        log.debug("fhir: %s search: %d resources in %.2f s", resource_type, len(seen), time.perf_counter() - began)

    def _search_once(
        self, resource_type: str, pairs: list[tuple[str, str]], use_post: bool, seen: set[str]
    ) -> Iterator[dict[str, Any]]:
        headers = {"Cache-Control": "no-cache"}
        if use_post:
            what = f"POST {resource_type}/_search"
            body = encode_query(pairs).encode("ascii")
            response = self.send(
                "POST",
                self.url_for(f"{resource_type}/_search"),
                what=what,
                data=body,
                headers={**headers, "Content-Type": FORM_CONTENT_TYPE},
            )
        else:
            what = f"GET {resource_type}"
            url = f"{self.url_for(resource_type)}?{encode_query(pairs)}"
            response = self.send("GET", url, what=what, headers=headers)
        page = 1
        while True:
            bundle = self._json(self._checked(response, what), what)
            self.stats.add("pages")
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource")
                if not isinstance(resource, dict) or (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                key = f"{resource.get('resourceType')}/{resource.get('id')}"
                if key in seen:
                    continue
                seen.add(key)
                yield resource
            next_url = next(
                (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
            )
            if not next_url:
                return
            page += 1
            what = f"GET {resource_type} search page {page}"
            response = self.send("GET", self.url_for(next_url), what=what, headers=headers)
            if response.status_code == 410:
                response.close()
                raise _PageExpired

    def search_by_patients(
        self,
        resource_type: str,
        patient_ids: Iterable[str],
        params: SearchParams | None = None,
        *,
        patient_param: str = "subject",
        page_size: int | None = None,
        method: str | None = None,
        workers: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield the resources of many patients with few searches: ``subject=Patient/a,Patient/b,...`` OR-lists.

        Patients are chunked by ``settings.batch_size`` and, for GET, so the URL stays under
        ``settings.max_url_length``; each chunk is one :meth:`search` (paged to the end). With ``workers`` > 1
        (default ``settings.search_workers``) that many chunks are searched at once in threads, and each chunk's
        resources are yielded, in chunk order, once its search is complete. Group the results with
        :func:`subject_patient_id`.
        """
        references = [f"Patient/{check_fhir_id(pid)}" for pid in dict.fromkeys(patient_ids)]
        if not references:
            return
        pairs = [pair for pair in search_pairs(params) if pair[0] not in (patient_param, "_count")]
        pairs.append(("_count", str(page_size or self.settings.page_size)))
        use_post = (method or self.settings.search_method).lower() == "post"
        if use_post:
            limit = self.settings.batch_size
            chunks = [references[i : i + limit] for i in range(0, len(references), limit)]
        else:
            prefix = f"{self.url_for(resource_type)}?{encode_query(pairs)}&{patient_param}="
            try:
                chunks = or_list_chunks(prefix, references, self.settings.max_url_length, self.settings.batch_size)
            except ValueError as exc:
                raise FhirError(f"{resource_type} search: {exc}; raise fhir.max_url_length or use POST") from None
        log.debug("fhir: %s for %d patients in %d searches", resource_type, len(references), len(chunks))
        searches = [[*pairs, (patient_param, ",".join(chunk))] for chunk in chunks]
        parallel = min(workers or self.settings.search_workers, len(searches))
        if parallel <= 1:
            for search_pairs_of_chunk in searches:
                yield from self.search(resource_type, search_pairs_of_chunk, page_size=page_size, method=method)
            return
        yield from self._search_concurrently(resource_type, searches, parallel, page_size, method)

    def _search_concurrently(
        self,
        resource_type: str,
        searches: list[list[tuple[str, str]]],
        parallel: int,
        page_size: int | None,
        method: str | None,
    ) -> Iterator[dict[str, Any]]:
        """Run searches ``parallel`` at a time; yield each one's resources in order once it is complete.

        Servers that load search results in stages (HAPI pauses a search at 13, 503 and 2,003 results) leave a
        single search waiting between pages; running several at once overlaps those waits. At most ``parallel``
        searches are held in memory.
        """

        def collect(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
            return list(self.search(resource_type, pairs, page_size=page_size, method=method))

        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="fhir-search") as pool:
            pending: deque[Future[list[dict[str, Any]]]] = deque()
            remaining = iter(searches)
            try:
                for pairs in itertools.islice(remaining, parallel):
                    pending.append(pool.submit(collect, pairs))
                while pending:
                    resources = pending.popleft().result()
                    following = next(remaining, None)
                    if following is not None:
                        pending.append(pool.submit(collect, following))
                    yield from resources
            finally:
                # A failed search, or a consumer that stopped early: do not start the searches still queued.
                for future in pending:
                    future.cancel()

    # -- writes ----------------------------------------------------------------------------------------------------

    def transaction(self, entries: Sequence[Mapping[str, Any]]) -> list[EntryResult]:
        """POST a transaction Bundle of ``entries`` (see :func:`transaction_entry`); one result per entry, in order.

        The server applies all entries or none; a refused transaction raises FhirError with its diagnostics. The
        transaction is retried on 502/504/connection errors only when every entry is idempotent (a conditional
        create, PUT, GET or DELETE).
        """
        if not entries:
            return []
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
        idempotent = all(
            (entry.get("request") or {}).get("method") in ("GET", "PUT", "DELETE")
            or "ifNoneExist" in (entry.get("request") or {})
            for entry in entries
        )
        what = f"POST transaction of {len(entries)} entries"
        response = self.send(
            "POST",
            self.base_url,
            what=what,
            data=json.dumps(bundle).encode("utf-8"),
            headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"},
            idempotent=idempotent,
        )
        answer = self._json(self._checked(response, what), what)
        answered = answer.get("entry") or []
        if len(answered) != len(entries):
            raise FhirError(f"{what}: the server answered {len(answered)} entries", response.status_code)
        results = []
        for item in answered:
            reply = item.get("response") or {}
            outcome = reply.get("outcome")
            reason = ""
            if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
                reason = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue") or [] if i.get("diagnostics"))
            results.append(
                EntryResult(
                    _status_code(str(reply.get("status", ""))), reply.get("location"), reply.get("etag"), reason
                )
            )
        created = sum(result.created for result in results)
        log.info("fhir: transaction of %d entries: %d created, %d not", len(results), created, len(results) - created)
        return results

    def conditional_create(self, resource: Any, if_none_exist: str) -> EntryResult:
        """POST one R4B resource with ``If-None-Exist`` (e.g. ``identifier=urn:x|abc``): 201 created, 200 existed.

        Several matches (HAPI: 412) raise FhirError. Conditional creates of one identifier must not run in
        parallel: the server can then create duplicates.
        """
        body = resource_json(resource)
        resource_type = body["resourceType"]
        what = f"POST {resource_type} (conditional create)"
        response = self.send(
            "POST",
            self.url_for(resource_type),
            what=what,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": FHIR_JSON, "If-None-Exist": if_none_exist, "Prefer": "return=minimal"},
        )
        self._checked(response, what, expected=(200, 201))
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        return EntryResult(response.status_code, location, response.headers.get("ETag"))

    # -- notes -----------------------------------------------------------------------------------------------------

    def read_binary(self, url: str) -> tuple[bytes, str | None]:
        """Read a Binary (relative ``Binary/id`` or an absolute URL on the server): its bytes and contentType.

        Accepts both answers servers give: the Binary resource as FHIR JSON (``data`` in base64) or the raw
        content with its own Content-Type.
        """
        target = self.url_for(url)
        what = self._describe("GET", target)
        response = self._checked(
            self.send("GET", target, what=what, headers={"Accept": f"{FHIR_JSON}, */*;q=0.5"}), what
        )
        served = response.headers.get("Content-Type")
        if media_type(served) in (FHIR_JSON, "application/json"):
            body = self._json(response, what)
            if body.get("resourceType") == "Binary":
                try:
                    return base64.b64decode(body.get("data") or "", validate=True), body.get("contentType")
                except (binascii.Error, ValueError):
                    raise FhirError(f"{what}: Binary.data is not valid base64") from None
        return response.content, served

    def note_texts(self, resource: Mapping[str, Any]) -> list[NoteText]:
        """The text of a DocumentReference's or DiagnosticReport's notes, decoded with their charset.

        DocumentReference: every ``content.attachment``; DiagnosticReport: every ``presentedForm`` and the
        ``conclusion``. An attachment is read from its inline ``data`` (base64), else from its ``url`` (a Binary on
        this server). text/plain is returned as it is, text/html with tags stripped; other media types are skipped.
        """
        resource_type = str(resource.get("resourceType", ""))
        resource_id = str(resource.get("id", ""))
        if resource_type == "DocumentReference":
            attachments = [c.get("attachment") or {} for c in resource.get("content") or []]
        elif resource_type == "DiagnosticReport":
            attachments = list(resource.get("presentedForm") or [])
        else:
            raise ValueError(f"notes come from DocumentReference or DiagnosticReport, not {resource_type or '?'}")
        texts: list[NoteText] = []
        for attachment in attachments:
            content_type = attachment.get("contentType")
            if attachment.get("data") is not None:
                try:
                    raw = base64.b64decode(attachment["data"], validate=True)
                except (binascii.Error, ValueError):
                    raise FhirError(f"{resource_type}/{resource_id}: attachment data is not valid base64") from None
                origin = "data"
            elif attachment.get("url"):
                raw, served = self.read_binary(str(attachment["url"]))
                content_type = content_type or served
                origin = "url"
            else:
                continue
            text = attachment_text(raw, content_type)
            if text is None:
                log.debug("fhir: %s/%s: skipped a %s attachment", resource_type, resource_id, media_type(content_type))
                continue
            texts.append(NoteText(resource_type, resource_id, text, content_type or "text/plain", origin))
        conclusion = resource.get("conclusion")
        if resource_type == "DiagnosticReport" and isinstance(conclusion, str) and conclusion.strip():
            texts.append(NoteText(resource_type, resource_id, conclusion, "text/plain", "conclusion"))
        return texts
