"""Association set-up against local pynetdicom peers: TCP_NODELAY, retries with backoff, errors that name the peer."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from riskbridge.connectors.dicom import DicomError, associate, echo
from riskbridge.settings import PacsSettings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _echo_scp(port: int, *, require_calling_aet: list[str] | None = None) -> AE:
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    if require_calling_aet:
        ae.require_calling_aet = require_calling_aet
    ae.start_server(("127.0.0.1", port), block=False)
    return ae


def test_a_closed_port_is_retried_then_reported_with_peer_and_attempts() -> None:
    port = _free_port()
    pacs = PacsSettings(port=port, called_ae="PEER", max_attempts=2)
    started = time.perf_counter()
    with pytest.raises(DicomError, match=rf"PEER@127\.0\.0\.1:{port}"):
        associate(pacs, Verification, "C-ECHO", timeout_s=2)
    assert time.perf_counter() - started >= 0.5  # one backoff pause between the two attempts


def test_an_association_that_fails_first_succeeds_on_a_later_attempt() -> None:
    port = _free_port()
    peers: list[AE] = []
    starter = threading.Timer(0.3, lambda: peers.append(_echo_scp(port)))
    starter.start()
    try:
        assoc = associate(PacsSettings(port=port, called_ae="PEER", max_attempts=3), Verification, "C-ECHO", 2)
        try:
            assert assoc.is_established
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            assoc.release()
    finally:
        starter.join()
        for peer in peers:
            peer.shutdown()


def test_a_permanent_rejection_is_not_retried() -> None:
    port = _free_port()
    peer = _echo_scp(port, require_calling_aet=["SOMEONE_ELSE"])
    try:
        with pytest.raises(DicomError, match=r"association rejected .*\(attempt 1 of 3\)"):
            associate(PacsSettings(port=port, called_ae="PEER", max_attempts=3), Verification, "C-ECHO", 2)
        # A health check makes one attempt only.
        with pytest.raises(DicomError, match=r"C-ECHO RISKBRIDGE -> PEER@.*\(attempt 1 of 1\)"):
            echo(PacsSettings(port=port, called_ae="PEER"), timeout_s=2)
    finally:
        peer.shutdown()


def test_a_c_find_abandoned_early_aborts_instead_of_racing_a_release() -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    from riskbridge.connectors.dicom import find

    def many_matches(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for number in range(500):
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = f"1.2.3.{number}"
            yield 0xFF00, match

    port = _free_port()
    ae = AE(ae_title="PEER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, many_matches)])
    try:
        query = Dataset()
        query.StudyInstanceUID = ""
        started = time.perf_counter()
        matches = find(PacsSettings(port=port, called_ae="PEER"), "STUDY", query, timeout_s=10)
        first = next(matches)
        matches.close()
        assert first.StudyInstanceUID == "1.2.3.0"
        assert time.perf_counter() - started < 5
        # Reading to the end still works and ends in a release.
        assert len(list(find(PacsSettings(port=port, called_ae="PEER"), "STUDY", query, timeout_s=10))) == 500
    finally:
        ae.shutdown()


def test_pynetdicom_identifier_dumps_are_off_once_the_connector_is_imported() -> None:
    import logging

    from pynetdicom import _config

    import riskbridge.connectors.dicom  # noqa: F401  (the import applies the setting)

    assert not _config.LOG_REQUEST_IDENTIFIERS and not _config.LOG_RESPONSE_IDENTIFIERS
    assert logging.getLogger("pynetdicom").getEffectiveLevel() >= logging.WARNING
