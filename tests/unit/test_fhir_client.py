"""Unit tests of the FHIR client without a server: URL chunking, Retry-After, backoff bounds, note text decoding,
authentication headers and SMART client assertions (verified with the public key), and the retry / paging / token
logic driven through a scripted in-memory Session."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir_responses import ScriptedSession, make_response
from pydantic import ValidationError

from riskbridge.connectors.fhir import (
    AttachmentError,
    AttachmentTooLargeError,
    FhirClient,
    FhirError,
    attachment_text,
    code_filter,
    content_type_charset,
    date_filter,
    encode_query,
    html_to_text,
    load_private_key,
    or_list_chunks,
    referenced_id,
    resource_json,
    session_for,
    smart_client_assertion,
    subject_patient_id,
    transaction_entry,
)
from riskbridge.connectors.fhir.notes import note_texts
from riskbridge.errors import ConfigurationError
from riskbridge.settings import FhirAuth, FhirRetry, FhirSettings

BASE = "https://fhir.test/fhir"  # https: credentials are refused over plain http to a remote host
TOKEN_URL = "https://auth.test/token"
SECRET = "client s3cr3t+/&value"  # characters RFC 6749 form-encodes in client_secret_basic


# --- a scripted Session ------------------------------------------------------------------------------------------


def make_client(handler, auth: FhirAuth | None = None, clock=None, **settings: Any):
    """A FhirClient over a ScriptedSession; sleeps are recorded, never slept."""
    sleeps: list[float] = []
    session = ScriptedSession(handler)
    fhir = FhirSettings(base_url=BASE, auth=auth or FhirAuth(), **settings)
    extra = {"clock": clock} if clock else {}
    client = FhirClient(fhir, sleep=sleeps.append, rng=random.Random(1), session=session, **extra)
    return client, session, sleeps


def bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def observation(n: int, patient: str = "p1") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{n}", "subject": {"reference": f"Patient/{patient}"}}


# --- URL building and chunking -----------------------------------------------------------------------------------


def test_or_list_chunks_respect_length_and_count_and_keep_order() -> None:
    prefix = f"{BASE}/Observation?code=x&_count=200&subject="
    values = [f"Patient/rb-cafe0123-p{i:05d}" for i in range(500)]
    chunks = or_list_chunks(prefix, values, max_url_length=1000, max_values=30)
    assert [v for chunk in chunks for v in chunk] == values
    for chunk in chunks:
        url = prefix + encode_query([("x", ",".join(chunk))])[2:]
        assert len(url) <= 1000
        assert len(chunk) <= 30
    # Greedy: every chunk but the last is full (adding the next value would break a limit).
    for chunk, following in itertools.pairwise(chunks):
        longer = prefix + ",".join([*chunk, following[0]])
        assert len(longer) > 1000 or len(chunk) == 30


def test_or_list_chunk_of_one_value_too_long_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the limit"):
        or_list_chunks("http://x/" + "a" * 600, ["Patient/" + "b" * 64], max_url_length=640, max_values=10)


def test_query_encoding_keeps_or_lists_readable_and_escapes_pipe_and_plus() -> None:
    query = encode_query([("code", code_filter("http://loinc.org", ["2160-0", "718-7"])), *date_pairs()])
    assert "code=http://loinc.org%7C2160-0,http://loinc.org%7C718-7" in query
    assert "date=ge2024-01-13T10:00:00%2B01:00" in query
    assert "date=le2024-01-15T10:00:00%2B01:00" in query


def date_pairs() -> list[tuple[str, str]]:
    end = datetime(2024, 1, 15, 10, tzinfo=timezone(timedelta(hours=1)))
    return [("date", value) for value in date_filter(end - timedelta(days=2), end)]


def test_references_and_subjects() -> None:
    assert referenced_id("Patient/rb-1") == "rb-1"
    assert referenced_id("http://h/fhir/Patient/rb-1/_history/3") == "rb-1"
    assert referenced_id("Group/g1") is None
    assert subject_patient_id({"subject": {"reference": "Patient/a"}}) == "a"
    assert subject_patient_id({"patient": {"reference": "Patient/b"}}) == "b"
    assert subject_patient_id({}) is None


def test_batched_search_splits_patients_by_url_length() -> None:
    seen_urls: list[str] = []

    def handler(method, url, headers, data):
        seen_urls.append(url)
        subjects = parse_qs(urlsplit(url).query)["subject"][0].split(",")
        return make_response(200, bundle([observation(i, s.split("/")[1]) for i, s in enumerate(subjects)]))

    client, session, _ = make_client(handler, max_url_length=700)
    ids = [f"rb-cafe0123-p{i:05d}" for i in range(100)]
    found = list(client.search_by_patients("Observation", ids, {"code": "http://loinc.org|2160-0"}))
    assert sorted(subject_patient_id(r) or "" for r in found) == sorted(ids)  # a missing subject ("") fails it
    assert len(seen_urls) > 1
    assert all(len(url) <= 700 for url in seen_urls)
    assert all(call[2]["Cache-Control"] == "no-cache" for call in session.calls)


def test_concurrent_batched_search_keeps_chunk_order_and_loses_nothing() -> None:
    def handler(method, url, headers, data):
        subjects = parse_qs(urlsplit(url).query)["subject"][0].split(",")
        return make_response(200, bundle([observation(i, s.split("/")[1]) for i, s in enumerate(subjects)]))

    client, session, _ = make_client(handler, batch_size=4, search_workers=3)
    ids = [f"p{i:03d}" for i in range(30)]
    found = [subject_patient_id(r) for r in client.search_by_patients("Observation", ids)]
    assert found == ids  # chunk order, although the chunks ran at once
    assert len(session.calls) == 8 and client.stats.requests == 8 and client.stats.pages == 8


def test_concurrent_batched_search_raises_a_failing_chunk() -> None:
    def handler(method, url, headers, data):
        if "Patient/p005" in url:
            return make_response(
                400, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "HAPI-0001: bad"}]}
            )
        return make_response(200, bundle([]))

    client, _, _ = make_client(handler, batch_size=2, search_workers=2)
    with pytest.raises(FhirError, match="HAPI-0001: bad"):
        list(client.search_by_patients("Observation", [f"p{i:03d}" for i in range(10)]))


def test_batched_search_rejects_ids_that_could_break_an_or_list() -> None:
    client, _, _ = make_client(lambda *a: make_response(200, bundle([])))
    with pytest.raises(ValueError, match="not a valid FHIR id"):
        list(client.search_by_patients("Observation", ["a,b"]))


def test_post_search_sends_a_form_body() -> None:
    def handler(method, url, headers, data):
        assert method == "POST" and url == f"{BASE}/Observation/_search"
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = parse_qs(data.decode())
        assert form["subject"] == ["Patient/a,Patient/b"] and form["_count"] == ["50"]
        return make_response(200, bundle([observation(1, "a"), observation(2, "b")]))

    client, _, _ = make_client(handler, search_method="post")
    assert len(list(client.search_by_patients("Observation", ["a", "b"], page_size=50))) == 2


# --- paging and restarts -----------------------------------------------------------------------------------------


def test_search_follows_next_links_to_the_end() -> None:
    pages = {
        "first": bundle([observation(1), observation(2)], f"{BASE}?_getpages=s&_getpagesoffset=2"),
        "_getpagesoffset=2": bundle([observation(3), observation(4)], f"{BASE}?_getpages=s&_getpagesoffset=4"),
        "_getpagesoffset=4": bundle([observation(5)]),
    }

    def handler(method, url, headers, data):
        key = next((k for k in pages if k in url), "first")
        return make_response(200, pages[key])

    client, session, _ = make_client(handler)
    assert [r["id"] for r in client.search("Observation", {"subject": "Patient/p1"}, page_size=2)] == [
        "o1",
        "o2",
        "o3",
        "o4",
        "o5",
    ]
    assert "_count=2" in session.calls[0][1]
    assert client.stats.pages == 3


def test_expired_page_restarts_the_search_without_duplicates() -> None:
    expired = {"done": False}

    def handler(method, url, headers, data):
        if "_getpagesoffset=2" in url:
            if not expired["done"]:
                expired["done"] = True
                return make_response(410, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "gone"}]})
            return make_response(200, bundle([observation(3), observation(4)]))
        return make_response(200, bundle([observation(1), observation(2)], f"{BASE}?_getpages=s&_getpagesoffset=2"))

    client, _, _ = make_client(handler)
    assert [r["id"] for r in client.search("Observation", {"subject": "Patient/p1"})] == ["o1", "o2", "o3", "o4"]
    assert client.stats.search_restarts == 1


def test_next_link_to_another_host_is_refused() -> None:
    client, _, _ = make_client(lambda *a: make_response(200, bundle([observation(1)], "http://evil.test/fhir?p=1")))
    with pytest.raises(FhirError, match="outside the FHIR server"):
        list(client.search("Observation"))


def paged_handler(pages: dict[str, dict[str, Any]]):
    """Answers each page request with the bundle whose key is in the URL (the first page otherwise)."""
    served = itertools.count(1)

    def handler(method, url, headers, data):
        if next(served) > 50:
            pytest.fail("the client kept paging")
        return make_response(200, pages[next((k for k in pages if k in url), "first")])

    return handler


SEARCH_PHI = {"identifier": "urn:mrn|MRN-4711", "name": "Smith"}  # values no error message may show


@pytest.mark.parametrize(
    ("pages", "message"),
    [
        (  # page 3 links back to page 2
            {
                "first": bundle([observation(1)], f"{BASE}?_getpages=s&offset=1"),
                "offset=1": bundle([observation(2)], f"{BASE}?_getpages=s&offset=2"),
                "offset=2": bundle([observation(3)], f"{BASE}?_getpages=s&offset=1"),
            },
            "Observation search: link\\[next\\] of page 3 leads back to page 2, already read",
        ),
        (  # a page that names itself as next
            {"first": bundle([observation(1)], f"{BASE}?_getpages=s&offset=1"), "offset=1": bundle([], "SELF")},
            "Observation search: link\\[next\\] of page 2 leads back to page 2, already read",
        ),
    ],
)
def test_a_paging_cycle_raises_naming_the_search_not_its_query(pages: dict[str, Any], message: str) -> None:
    for page in pages.values():
        for link in page["link"]:
            link["url"] = f"{BASE}?_getpages=s&offset=1" if link["url"] == "SELF" else link["url"]
    client, session, _ = make_client(paged_handler(pages))
    with pytest.raises(FhirError, match=message) as caught:
        list(client.search("Observation", SEARCH_PHI))
    assert "MRN-4711" not in str(caught.value) and "Smith" not in str(caught.value)
    assert len(session.calls) == len(pages)  # no page is requested twice


def test_a_next_link_back_to_the_first_get_page_is_a_cycle() -> None:
    first: dict[str, str] = {}

    def handler(method, url, headers, data):
        if len(session.calls) > 50:
            pytest.fail("the client kept paging")
        first.setdefault("url", url)
        return make_response(200, bundle([observation(len(first))], first["url"]))

    client, session, _ = make_client(handler)
    with pytest.raises(FhirError, match="of page 1 leads back to page 1"):
        list(client.search("Observation", SEARCH_PHI))
    assert len(session.calls) == 1


def test_the_page_limit_stops_an_endless_search() -> None:
    def endless(method, url, headers, data):
        if len(session.calls) > 50:
            pytest.fail("the client kept paging")
        offset = int(url.rsplit("offset=", 1)[1]) if "offset=" in url else 0
        return make_response(200, bundle([observation(offset)], f"{BASE}?_getpages=s&offset={offset + 1}"))

    client, session, _ = make_client(endless, max_pages=3)
    with pytest.raises(FhirError, match=r"Observation search: more than fhir\.max_pages = 3 pages") as caught:
        list(client.search("Observation", SEARCH_PHI))
    assert "MRN-4711" not in str(caught.value) and "Smith" not in str(caught.value)
    assert len(session.calls) == 3 and client.stats.pages == 3

    pages = {
        "first": bundle([observation(1)], f"{BASE}?_getpages=s&offset=1"),
        "offset=1": bundle([observation(2)], f"{BASE}?_getpages=s&offset=2"),
        "offset=2": bundle([observation(3)]),
    }
    client, _, _ = make_client(paged_handler(pages), max_pages=3)  # exactly max_pages pages: fine
    assert [r["id"] for r in client.search("Observation")] == ["o1", "o2", "o3"]


def test_page_and_attachment_limits_are_settings() -> None:
    fhir = FhirSettings()
    assert fhir.max_pages == 10000 and fhir.max_attachment_bytes == 20 * 1024 * 1024
    with pytest.raises(ValidationError):
        FhirSettings(max_pages=0)
    with pytest.raises(ValidationError):
        FhirSettings(max_attachment_bytes=0)


# --- retries -----------------------------------------------------------------------------------------------------


def test_503_burst_is_retried_honouring_retry_after() -> None:
    answers = [
        make_response(503, headers={"Retry-After": "3"}),
        make_response(503),
        make_response(429, headers={"Retry-After": "1"}),
        make_response(200, bundle([observation(1)])),
    ]
    client, session, sleeps = make_client(lambda *a: answers.pop(0))
    assert [r["id"] for r in client.search("Observation")] == ["o1"]
    assert len(session.calls) == 4
    assert sleeps[0] == 3.0 and sleeps[2] == 1.0
    assert 0.25 <= sleeps[1] <= 1.0  # backoff for attempt 2 with the default base of 0.5 s


def test_retries_are_bounded_and_the_error_carries_the_diagnostics() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "HAPI-9999: overloaded"}]}
    client, session, sleeps = make_client(
        lambda *a: make_response(503, outcome), retry=FhirRetry(max_attempts=3, backoff_base_s=0.1)
    )
    with pytest.raises(FhirError) as caught:
        list(client.search("Observation", {"subject": "Patient/x"}))
    assert caught.value.status == 503
    assert "HAPI-9999: overloaded" in str(caught.value)
    assert "Patient/x" not in str(caught.value)  # query strings never reach messages
    assert len(session.calls) == 3 and len(sleeps) == 2


def test_too_long_retry_after_is_not_waited_for() -> None:
    client, session, sleeps = make_client(
        lambda *a: make_response(503, headers={"Retry-After": "3600"}), retry=FhirRetry(max_retry_after_s=60)
    )
    with pytest.raises(FhirError, match="503"):
        client.read("Patient", "a")
    assert len(session.calls) == 1 and sleeps == []


def test_non_idempotent_post_is_not_resent_after_a_502() -> None:
    client, session, _ = make_client(lambda *a: make_response(502))
    entry = {"request": {"method": "POST", "url": "RiskAssessment"}, "resource": {"resourceType": "RiskAssessment"}}
    with pytest.raises(FhirError, match="502"):
        client.transaction([entry])
    assert len(session.calls) == 1


def test_connection_errors_are_retried_for_reads() -> None:
    failures = [requests.ConnectionError("reset"), requests.ReadTimeout("slow")]

    def handler(method, url, headers, data):
        if failures:
            raise failures.pop(0)
        return make_response(200, {"resourceType": "Patient", "id": "a"})

    client, session, sleeps = make_client(handler)
    assert client.read("Patient", "a")["id"] == "a"
    assert len(session.calls) == 3 and len(sleeps) == 2


# --- writes ------------------------------------------------------------------------------------------------------


def risk_assessment():
    from fhir.resources.R4B.riskassessment import RiskAssessment

    return RiskAssessment.model_validate(
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "identifier": [{"system": "urn:test", "value": "k1"}],
            "subject": {"reference": "Patient/a"},
            "prediction": [{"probabilityDecimal": 0.25}],
        }
    )


def test_outgoing_resources_must_be_r4b_models() -> None:
    from fhir.resources.riskassessment import RiskAssessment as R5RiskAssessment

    assert resource_json(risk_assessment())["prediction"] == [{"probabilityDecimal": 0.25}]
    r5 = R5RiskAssessment.model_validate(
        {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/a"}}
    )
    with pytest.raises(TypeError, match="R4B"):
        resource_json(r5)
    with pytest.raises(TypeError):
        resource_json({"resourceType": "RiskAssessment"})


def test_transaction_posts_a_bundle_and_returns_each_entry_status() -> None:
    def handler(method, url, headers, data):
        sent = json.loads(data)
        assert url == BASE and sent["type"] == "transaction"
        assert sent["entry"][0]["request"] == {
            "method": "POST",
            "url": "RiskAssessment",
            "ifNoneExist": "identifier=urn:test|k1",
        }
        return make_response(
            200,
            {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [
                    {"response": {"status": "201 Created", "location": "RiskAssessment/7/_history/1"}},
                    {"response": {"status": "200 OK", "location": "RiskAssessment/5/_history/1"}},
                ],
            },
        )

    client, _, _ = make_client(handler)
    entries = [transaction_entry(risk_assessment(), if_none_exist="identifier=urn:test|k1") for _ in range(2)]
    results = client.transaction(entries)
    assert [(r.status, r.created, r.resource_id) for r in results] == [(201, True, "7"), (200, False, "5")]


def test_conditional_create_sends_if_none_exist() -> None:
    def handler(method, url, headers, data):
        assert headers["If-None-Exist"] == "identifier=urn:test|k1"
        return make_response(201, headers={"Location": f"{BASE}/RiskAssessment/9/_history/1"})

    client, _, _ = make_client(handler)
    result = client.conditional_create(risk_assessment(), "identifier=urn:test|k1")
    assert result.created and result.resource_id == "9"


# --- note text ---------------------------------------------------------------------------------------------------


def test_html_is_stripped_and_entities_unescaped() -> None:
    html = (
        "<html><head><title>t</title><style>p{}</style></head><body><h1>Assessment</h1>"
        "<p>Temp 38.2&deg;C &amp; rising &#8594; <b>COPD</b>.</p><script>alert(1)</script>"
        "<ul><li>Denies   diabetes.</li><li>Never smoker.</li></ul></body></html>"
    )
    assert html_to_text(html) == "Assessment\nTemp 38.2°C & rising → COPD.\nDenies diabetes.\nNever smoker."


def test_charset_parameter_is_honoured() -> None:
    latin = "Temp 38.5 °C. Denies diabetes.".encode("latin-1")
    assert content_type_charset("text/plain; charset=ISO-8859-1") == "ISO-8859-1"
    assert content_type_charset('text/plain;charset="UTF-8"') == "UTF-8"
    assert content_type_charset("text/plain") is None
    assert attachment_text(latin, "text/plain; charset=ISO-8859-1") == "Temp 38.5 °C. Denies diabetes."
    assert attachment_text("38 °C".encode(), "text/plain;charset=UTF-8") == "38 °C"
    assert attachment_text("38 °C".encode(), None) == "38 °C"
    assert attachment_text("<p>38 °C</p>".encode("latin-1"), "text/html; charset=iso-8859-1") == "38 °C"
    assert attachment_text(b"%PDF-1.4", "application/pdf") is None
    assert attachment_text("38 °C".encode(), "text/plain; charset=no-such-charset") == "38 °C"


def test_note_texts_from_inline_data_binary_url_and_conclusion() -> None:
    def handler(method, url, headers, data):
        assert url == f"{BASE}/Binary/b1"
        return make_response(200, raw="Prior NSTEMI. 37 °C".encode("latin-1"), headers={"Content-Type": "text/plain"})

    client, _, _ = make_client(handler)
    doc = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "content": [
            {"attachment": {"contentType": "text/html", "data": base64.b64encode(b"<p>COPD &amp; CKD</p>").decode()}},
            {"attachment": {"contentType": "text/plain; charset=ISO-8859-1", "url": "Binary/b1"}},
        ],
    }
    texts = client.note_texts(doc)
    assert [(t.text, t.origin) for t in texts] == [("COPD & CKD", "data"), ("Prior NSTEMI. 37 °C", "url")]
    report = {"resourceType": "DiagnosticReport", "id": "r1", "conclusion": "No acute findings."}
    assert [(t.text, t.origin) for t in client.note_texts(report)] == [("No acute findings.", "conclusion")]


def test_binary_served_as_fhir_json_is_decoded() -> None:
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": base64.b64encode(b"Denies COPD.").decode()}
    client, _, _ = make_client(lambda *a: make_response(200, binary))
    assert client.read_binary(f"{BASE}/Binary/b2") == (b"Denies COPD.", "text/plain")


class Trickle:
    """A streamed body of ``size`` bytes that counts what was read of it (as urllib3's raw response would)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.read_bytes = 0
        self.closed = False

    def read(self, amount: int = -1, *args: Any, **kwargs: Any) -> bytes:
        amount = self.left if amount is None or amount < 0 else min(amount, self.left)
        self.left -= amount
        self.read_bytes += amount
        return b"a" * amount

    def close(self) -> None:
        self.closed = True


def streamed(size: int, content_type: str = "text/plain", length: bool = False) -> tuple[requests.Response, Trickle]:
    """A 200 answer whose body of ``size`` bytes is read from the wire as the caller iterates it."""
    response = requests.Response()
    response.status_code = 200
    headers = {"Content-Type": content_type, **({"Content-Length": str(size)} if length else {})}
    response.headers = requests.structures.CaseInsensitiveDict(headers)
    body = Trickle(size)
    response.raw = body
    return response, body


def test_a_binary_over_the_cap_is_not_read_to_its_end() -> None:
    response, body = streamed(5 * 1024 * 1024)
    client, session, _ = make_client(lambda *a: response, max_attachment_bytes=1000)
    with pytest.raises(AttachmentTooLargeError, match=r"larger than fhir\.max_attachment_bytes \(1000 bytes\)"):
        client.read_binary("Binary/big")
    assert body.read_bytes < 1000 + 64 * 1024 and body.closed
    assert session.calls[0][1] == f"{BASE}/Binary/big"

    response, body = streamed(5000, length=True)  # Content-Length says so: nothing is read
    client, _, _ = make_client(lambda *a: response, max_attachment_bytes=1000)
    with pytest.raises(AttachmentTooLargeError):
        client.read_binary("Binary/big")
    assert body.read_bytes == 0

    response, body = streamed(1000)  # exactly the cap: read
    client, _, _ = make_client(lambda *a: response, max_attachment_bytes=1000)
    assert client.read_binary("Binary/ok") == (b"a" * 1000, "text/plain")


def test_a_binary_resource_over_the_cap_is_refused() -> None:
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": base64.b64encode(b"x" * 2000).decode()}
    client, _, _ = make_client(lambda *a: make_response(200, binary), max_attachment_bytes=1500)
    with pytest.raises(AttachmentTooLargeError):
        client.read_binary("Binary/b3")
    client, _, _ = make_client(lambda *a: make_response(200, binary), max_attachment_bytes=2000)
    assert client.read_binary("Binary/b3") == (b"x" * 2000, "text/plain")


def test_note_attachments_are_type_checked_before_their_body_is_read() -> None:
    response, body = streamed(4096, content_type="application/pdf")
    client, session, _ = make_client(lambda *a: response)
    untyped = {"resourceType": "DocumentReference", "id": "d2", "content": [{"attachment": {"url": "Binary/pdf"}}]}
    assert client.note_texts(untyped) == []
    assert len(session.calls) == 1 and body.read_bytes == 0  # the server said PDF: the body stays unread

    pdf = {"resourceType": "Binary", "contentType": "application/pdf", "data": "not base64 at all!"}
    client, _, _ = make_client(lambda *a: make_response(200, pdf))
    assert client.note_texts(untyped) == []  # a PDF Binary resource is not decoded

    client, session, _ = make_client(lambda *a: pytest.fail("a PDF attachment must not be downloaded"))
    typed = {
        "resourceType": "DocumentReference",
        "id": "d3",
        "content": [
            {"attachment": {"contentType": "application/pdf", "url": "Binary/pdf"}},
            {"attachment": {"contentType": "application/pdf", "data": "not base64 either"}},
        ],
    }
    assert client.note_texts(typed) == [] and session.calls == []

    declared_text = {
        "resourceType": "DocumentReference",
        "id": "d6",
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/b6"}}],
    }
    served = {"type": "application/pdf"}

    def reader(url: str) -> tuple[bytes, str | None]:
        return b"No COPD.", served["type"]

    assert note_texts(declared_text, reader) == []  # the server says PDF: not decoded as text
    served["type"] = "application/octet-stream"  # says nothing: the declared type stands
    assert [t.text for t in note_texts(declared_text, reader)] == ["No COPD."]


def test_oversized_or_broken_note_attachments_raise_attachment_errors() -> None:
    client, session, _ = make_client(lambda *a: pytest.fail("nothing to download"), max_attachment_bytes=100)
    inline = {
        "resourceType": "DocumentReference",
        "id": "d4",
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(b"x" * 101).decode()}}],
    }
    with pytest.raises(AttachmentTooLargeError, match="DocumentReference/d4: attachment larger"):
        client.note_texts(inline)
    declared = {
        "resourceType": "DiagnosticReport",
        "id": "r2",
        "presentedForm": [{"contentType": "text/plain", "url": "Binary/b9", "size": 101}],
    }
    with pytest.raises(AttachmentTooLargeError):
        client.note_texts(declared)
    broken = {"resourceType": "DocumentReference", "id": "d5", "content": [{"attachment": {"data": "%%%"}}]}
    with pytest.raises(AttachmentError, match="not valid base64"):
        client.note_texts(broken)
    assert session.calls == []

    outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "HAPI-2001: gone"}]}
    client, _, _ = make_client(lambda *a: make_response(404, outcome))
    with pytest.raises(AttachmentError, match="GET /Binary/b9: 404 HAPI-2001") as caught:
        client.note_texts(declared)
    assert caught.value.status == 404
    client, _, _ = make_client(lambda *a: make_response(403, outcome))  # scopes or credentials: every read fails
    with pytest.raises(FhirError, match="403") as refused:
        client.note_texts(declared)
    assert not isinstance(refused.value, AttachmentError)
    # A server that keeps failing is not one unreadable note: the chunk fails and is retried later.
    client, _, _ = make_client(lambda *a: make_response(503), retry=FhirRetry(max_attempts=2))
    with pytest.raises(FhirError, match="503") as failed:
        client.note_texts(declared)
    assert not isinstance(failed.value, AttachmentError)


# --- authentication ----------------------------------------------------------------------------------------------


def test_basic_and_bearer_headers() -> None:
    client, session, _ = make_client(
        lambda *a: make_response(200, {"resourceType": "Patient", "id": "a"}),
        auth=FhirAuth(type="basic", username="svc", password=SECRET),
    )
    client.read("Patient", "a")
    expected = "Basic " + base64.b64encode(f"svc:{SECRET}".encode()).decode()
    assert session.calls[0][2]["Authorization"] == expected
    assert SECRET not in repr(client)

    client, session, _ = make_client(
        lambda *a: make_response(200, {"resourceType": "Patient", "id": "a"}),
        auth=FhirAuth(type="bearer", token=SECRET),
    )
    client.read("Patient", "a")
    assert session.calls[0][2]["Authorization"] == f"Bearer {SECRET}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenIssuer:
    """Scripted token endpoint + resource server: tokens t1, t2, ...; the server accepts only ``valid`` tokens."""

    def __init__(self, expires_in: int = 300) -> None:
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.forms: list[dict[str, list[str]]] = []
        self.token_headers: list[dict[str, str]] = []
        self.valid: set[str] = set()

    def __call__(self, method, url, headers, data):
        if url == TOKEN_URL:
            self.forms.append(parse_qs(data) if isinstance(data, str) else {k: [v] for k, v in data.items()})
            self.token_headers.append(headers)
            token = f"t{len(self.issued) + 1}"
            self.issued.append(token)
            self.valid.add(token)
            return make_response(200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})
        if headers.get("Authorization", "").removeprefix("Bearer ") not in self.valid:
            return make_response(401, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "no"}]})
        return make_response(200, {"resourceType": "Patient", "id": "a"})


def oauth2_auth(**extra: Any) -> FhirAuth:
    return FhirAuth(
        type="oauth2", token_url=TOKEN_URL, client_id="riskbridge", client_secret=SECRET, scope="system/*.rs", **extra
    )


def test_client_credentials_token_is_cached_until_expiry_then_renewed() -> None:
    issuer, clock = TokenIssuer(expires_in=300), FakeClock()
    client, _, _ = make_client(issuer, auth=oauth2_auth(refresh_skew_s=30), clock=clock)
    for _ in range(5):
        client.read("Patient", "a")
    assert issuer.issued == ["t1"]
    form = issuer.forms[0]
    assert form["grant_type"] == ["client_credentials"] and form["scope"] == ["system/*.rs"]
    user, _, password = base64.b64decode(issuer.token_headers[0]["Authorization"].split()[1]).decode().partition(":")
    assert (unquote_plus(user), unquote_plus(password)) == ("riskbridge", SECRET)
    clock.now += 269  # still inside expiry - skew
    client.read("Patient", "a")
    assert issuer.issued == ["t1"]
    clock.now += 2  # past expires_in - skew: renewed before the server would refuse it
    client.read("Patient", "a")
    assert issuer.issued == ["t1", "t2"]


def test_a_401_renews_the_token_once() -> None:
    issuer = TokenIssuer()
    client, _, _ = make_client(issuer, auth=oauth2_auth())
    client.read("Patient", "a")
    issuer.valid.clear()  # the server revoked t1
    client.read("Patient", "a")
    assert issuer.issued == ["t1", "t2"] and client.stats.token_renewals_on_401 == 1

    def refuse_everything(method, url, headers, data):
        response = issuer(method, url, headers, data)
        if url != TOKEN_URL:
            return make_response(401, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "no"}]})
        return response

    client, session, _ = make_client(refuse_everything, auth=oauth2_auth())
    with pytest.raises(FhirError) as caught:
        client.read("Patient", "a")
    assert caught.value.status == 401
    assert len([c for c in session.calls if c[1] != TOKEN_URL]) == 2  # the first try and one renewal, no loop


def test_token_endpoint_errors_never_show_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def handler(method, url, headers, data):
        return make_response(401, {"error": "invalid_client", "error_description": "bad secret"})

    client, _, _ = make_client(handler, auth=oauth2_auth())
    with pytest.raises(FhirError) as caught:
        client.read("Patient", "a")
    assert "invalid_client: bad secret" in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in repr(client) and SECRET not in caplog.text


def test_access_tokens_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = TokenIssuer()
    client, _, _ = make_client(issuer, auth=oauth2_auth())
    client.read("Patient", "a")
    assert "access token obtained" in caplog.text
    assert "Bearer t1" not in caplog.text and SECRET not in caplog.text


def write_key(tmp_path: Path, algorithm: str) -> tuple[Path, Any]:
    if algorithm == "RS384":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / f"{algorithm}.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path, key.public_key()


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_backend_services_assertion_verifies_with_the_public_key(tmp_path: Path, algorithm: str) -> None:
    key_file, public_key = write_key(tmp_path, algorithm)
    issuer = TokenIssuer()
    auth = FhirAuth(
        type="smart",
        token_url=TOKEN_URL,
        client_id="rb-client",
        private_key_file=key_file,
        key_id="key-1",
        algorithm=algorithm,
        scope="system/Observation.rs",
    )
    client, _, _ = make_client(issuer, auth=auth)
    client.read("Patient", "a")
    client.read("Patient", "a")
    assert issuer.issued == ["t1"]
    form = issuer.forms[0]
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    assert "Authorization" not in issuer.token_headers[0]
    assertion = form["client_assertion"][0]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == algorithm and header["kid"] == "key-1" and header["typ"] == "JWT"
    claims = jwt.decode(assertion, public_key, algorithms=[algorithm], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == "rb-client"
    now = datetime.now(UTC).timestamp()
    assert now < claims["exp"] <= now + 300
    assert claims["jti"]
    other = smart_client_assertion("rb-client", TOKEN_URL, load_private_key(key_file, algorithm), "key-1", algorithm)
    assert jwt.decode(other, public_key, algorithms=[algorithm], audience=TOKEN_URL)["jti"] != claims["jti"]


def test_private_key_must_match_the_algorithm(tmp_path: Path) -> None:
    rsa_file, _ = write_key(tmp_path, "RS384")
    ec_file, _ = write_key(tmp_path, "ES384")
    with pytest.raises(FhirError, match="ES384 needs an EC P-384 key"):
        load_private_key(rsa_file, "ES384")
    with pytest.raises(FhirError, match="RS384 needs an RSA key"):
        load_private_key(ec_file, "RS384")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(FhirError, match="not an unencrypted PEM private key"):
        load_private_key(garbage, "RS384")


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"type": "oauth2", "token_url": TOKEN_URL, "client_id": "c"}, "client_secret"),
        ({"type": "smart", "token_url": TOKEN_URL, "client_id": "c", "scope": "s"}, "private_key_file, key_id"),
        ({"type": "basic", "username": "u"}, "password"),
    ],
)
def test_auth_settings_name_what_is_missing(values: dict[str, Any], missing: str) -> None:
    with pytest.raises(ValidationError, match=f"needs {missing}"):
        FhirAuth(**values)


def test_auth_settings_check_the_key_file_and_token_url(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="file not found"):
        FhirAuth(private_key_file=tmp_path / "absent.pem")
    with pytest.raises(ValidationError, match="must start with http"):
        FhirAuth(token_url="ftp://auth")
    with pytest.raises(ValidationError):
        FhirAuth(algorithm="HS256")
    assert SECRET not in repr(oauth2_auth())


@pytest.mark.parametrize("failure", ["503", "connection reset"])
def test_every_token_attempt_signs_a_fresh_assertion(tmp_path: Path, failure: str) -> None:
    key_file, public_key = write_key(tmp_path, "RS384")
    sent: list[str] = []

    def handler(method, url, headers, data):
        if url != TOKEN_URL:
            return make_response(200, {"resourceType": "Patient", "id": "a"})
        body = requests.Request("POST", url, data=data).prepare().body  # the form as requests puts it on the wire
        assert isinstance(body, str)
        sent.append(parse_qs(body)["client_assertion"][0])
        if len(sent) == 1:
            if failure == "503":
                return make_response(503)
            raise requests.ConnectionError("reset")
        return make_response(200, {"access_token": "t1", "token_type": "Bearer", "expires_in": 300})

    auth = FhirAuth(
        type="smart",
        token_url=TOKEN_URL,
        client_id="rb-client",
        private_key_file=key_file,
        key_id="key-1",
        scope="system/Observation.rs",
    )
    client, _, sleeps = make_client(handler, auth=auth)
    client.read("Patient", "a")
    assert len(sent) == 2 and len(sleeps) == 1
    first, second = (jwt.decode(a, public_key, algorithms=["RS384"], audience=TOKEN_URL) for a in sent)
    assert first["jti"] != second["jti"]


def credentials(kind: str, key_file: Path, token_url: str = TOKEN_URL) -> FhirAuth:
    """An auth section of ``kind`` with every value it needs."""
    if kind == "basic":
        return FhirAuth(type="basic", username="svc", password=SECRET)
    if kind == "bearer":
        return FhirAuth(type="bearer", token=SECRET)
    if kind == "oauth2":
        return FhirAuth(type="oauth2", token_url=token_url, client_id="c", client_secret=SECRET)
    if kind == "smart":
        return FhirAuth(
            type="smart", token_url=token_url, client_id="c", private_key_file=key_file, key_id="k", scope="system/*.rs"
        )
    return FhirAuth()


@pytest.mark.parametrize(
    ("kind", "base_url", "token_url", "refused"),
    [
        ("basic", "http://127.0.0.1:18080/fhir", TOKEN_URL, None),  # the sandbox
        ("bearer", "http://127.8.9.10/fhir", TOKEN_URL, None),
        ("basic", "http://localhost:8080/fhir", TOKEN_URL, None),
        ("bearer", "http://[::1]:8080/fhir", TOKEN_URL, None),
        ("smart", "http://127.0.0.1:18080/fhir", "http://localhost:9000/token", None),
        ("basic", "https://ehr.hospital.example/fhir", TOKEN_URL, None),
        ("none", "http://ehr.hospital.example/fhir", TOKEN_URL, None),
        ("basic", "http://ehr.hospital.example/fhir", TOKEN_URL, "fhir.base_url"),
        ("bearer", "http://10.1.2.3/fhir", TOKEN_URL, "fhir.base_url"),
        ("bearer", "http://127.0.0.1.evil.example/fhir", TOKEN_URL, "fhir.base_url"),
        ("oauth2", "http://ehr.hospital.example/fhir", TOKEN_URL, "fhir.base_url"),
        ("smart", "http://[2001:db8::1]/fhir", TOKEN_URL, "fhir.base_url"),
        ("oauth2", "https://ehr.hospital.example/fhir", "http://auth.hospital.example/token", "fhir.auth.token_url"),
        ("smart", "http://127.0.0.1:18080/fhir", "http://auth.hospital.example/token", "fhir.auth.token_url"),
    ],
)
def test_credentials_are_never_configured_over_plain_http_to_a_remote_host(
    tmp_path: Path, kind: str, base_url: str, token_url: str, refused: str | None
) -> None:
    key_file, _ = write_key(tmp_path, "RS384")
    fhir = FhirSettings(base_url=base_url, auth=credentials(kind, key_file, token_url))
    session = ScriptedSession(lambda *a: pytest.fail("nothing is sent while the client is built"))
    if refused is None:
        FhirClient(fhir, session=session).close()
        if kind in ("none", "basic", "bearer"):
            session_for(fhir).close()
        return
    with pytest.raises(
        ConfigurationError, match=f"{refused}: fhir.auth type '{kind}' would send credentials"
    ) as caught:
        FhirClient(fhir, session=session)
    assert "https://" in str(caught.value) and SECRET not in str(caught.value)
    if kind in ("basic", "bearer"):
        with pytest.raises(ConfigurationError):
            session_for(fhir)
