"""FHIR search: query strings, OR-lists across patients, and walking a search's pages to the end.

Pure functions build what :class:`~riskbridge.connectors.fhir.FhirClient` sends: :func:`search_pairs` and
:func:`encode_query` (``,`` ``/`` ``:`` left readable, ``|`` escaped), :func:`code_filter` and :func:`date_filter`
for the usual parameters, and :func:`or_list_chunks` to split many patients into OR-lists whose URL fits a length
limit. The paging logic lives here too: :func:`page_resources` yields a page's new resources (skipping ``outcome``
entries and what was already yielded), :class:`PageTrail` stops a search whose ``link[next]`` leads back to a page
already read (a cycle) or past ``fhir.max_pages``, :func:`restarting` runs a search again from its first page when a
page expired (410 Gone), and :func:`in_chunk_order` runs several chunk searches at once in threads while yielding
their resources in chunk order. The client supplies only the requests.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from .errors import FhirError

log = logging.getLogger(__name__)

MAX_SEARCH_RESTARTS = 3
# Characters left unescaped in search query strings: ',' separates OR values, ':' and '/' appear in system URIs and
# references. '|' is escaped (%7C) because strict servlet containers refuse it raw.
QUERY_SAFE = ",/:"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

SearchParams = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]
_Search = TypeVar("_Search")


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


# --- paging ------------------------------------------------------------------------------------------------------


class _PageExpired(Exception):
    """A next-page link answered 410 Gone: the server dropped the search's cached results."""


def page_resources(bundle: Mapping[str, Any], seen: set[str]) -> Iterator[dict[str, Any]]:
    """Yield the resources of one searchset page not yet in ``seen`` (``Type/id``), adding them to it.

    Entries with search mode ``outcome`` (an OperationOutcome about the search) are not yielded.
    """
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource")
        if not isinstance(resource, dict) or (entry.get("search") or {}).get("mode") == "outcome":
            continue
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        if key in seen:
            continue
        seen.add(key)
        yield resource


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The URL of a searchset page's ``link[next]``, or None on the last page."""
    return next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)


class PageTrail:
    """The pages one pass over a search has read; checks each ``link[next]`` before it is followed.

    A next link to a page already read (a server paging in a cycle) or one past ``max_pages`` pages raises
    :class:`FhirError` instead of paging forever. Messages name the search (``Observation search``) and page
    numbers, never a URL: page links carry the query (identifiers, names).
    """

    def __init__(self, search: str, max_pages: int, first_url: str | None = None) -> None:
        """Start at page 1 of ``search`` (its name in messages); ``first_url`` is page 1's URL if it was a GET."""
        self.search = search
        self.max_pages = max_pages
        self.page = 1
        self._read: dict[str, int] = {first_url: 1} if first_url else {}

    def follow(self, next_url: str) -> int:
        """Record that ``next_url`` (absolute) is read next and return its page number; FhirError for a cycle or
        for a page beyond ``max_pages``."""
        earlier = self._read.get(next_url)
        if earlier is not None:
            raise FhirError(
                f"{self.search}: link[next] of page {self.page} leads back to page {earlier}, already read "
                "(the server pages in a cycle); search stopped"
            )
        if self.page >= self.max_pages:
            raise FhirError(
                f"{self.search}: more than fhir.max_pages = {self.max_pages} pages (page {self.page} still has a "
                "link[next]); search stopped"
            )
        self.page += 1
        self._read[next_url] = self.page
        return self.page


def restarting(
    resource_type: str,
    search_once: Callable[[set[str]], Iterator[dict[str, Any]]],
    on_restart: Callable[[], None] = lambda: None,
) -> Iterator[dict[str, Any]]:
    """Yield what ``search_once(seen)`` yields; when a page expired (it raised ``_PageExpired``), search again.

    ``seen`` holds the ``Type/id`` of every resource yielded, across restarts, so a restarted search yields only
    what is new. After :data:`MAX_SEARCH_RESTARTS` restarts the search fails with :class:`FhirError` (410).
    """
    seen: set[str] = set()
    began = time.perf_counter()
    restarts = 0
    while True:
        try:
            yield from search_once(seen)
            break
        except _PageExpired:
            restarts += 1
            on_restart()
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


def in_chunk_order(
    collect: Callable[[_Search], list[dict[str, Any]]], searches: Sequence[_Search], parallel: int
) -> Iterator[dict[str, Any]]:
    """Run ``collect`` over ``searches`` ``parallel`` at a time; yield each one's resources in order once complete.

    Servers that load search results in stages (HAPI pauses a search at 13, 503 and 2,003 results) leave a
    single search waiting between pages; running several at once overlaps those waits. At most ``parallel``
    searches are held in memory. A failed search raises; searches not yet started are then not started.
    """
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="fhir-search") as pool:
        pending: deque[Future[list[dict[str, Any]]]] = deque()
        remaining = iter(searches)
        try:
            for search in itertools.islice(remaining, parallel):
                pending.append(pool.submit(collect, search))
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
