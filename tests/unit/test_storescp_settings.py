"""The storage SCP's security settings: who may connect, TLS off loopback, size limits, and doctor's warning."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from riskbridge import doctor
from riskbridge.connectors.dicom import DicomError
from riskbridge.connectors.storescp import (
    LOOPBACK_NETWORKS,
    InstanceSink,
    StorageSCP,
    allowed_networks,
    peer_address,
)
from riskbridge.errors import ConfigurationError
from riskbridge.settings import PacsSettings, Settings, SettingsError, TlsSettings, load_settings


def _tls(tmp_path: Path) -> TlsSettings:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM")
    return TlsSettings(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem")


def test_the_defaults_are_bounded_and_trust_the_pacs_host_only() -> None:
    pacs = PacsSettings()
    assert pacs.scp_allowed_peers == [] and pacs.scp_allow_plaintext is False
    assert pacs.tls_handshake_timeout_s == 10.0
    assert (pacs.max_pdu_kb, pacs.max_instance_mb) == (1024, 512)


@pytest.mark.parametrize("address", ["10.0.0.5", "0.0.0.0", "::", "riskbridge.hospital.example"])
def test_plaintext_off_loopback_is_refused_unless_allowed(address: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="scp_allow_plaintext = true"):
        PacsSettings(scp_bind_address=address)
    assert PacsSettings(scp_bind_address=address, scp_allow_plaintext=True).scp_plaintext_off_loopback()
    assert not PacsSettings(scp_bind_address=address, tls=_tls(tmp_path)).scp_plaintext_off_loopback()


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "localhost"])
def test_plaintext_on_loopback_needs_nothing(address: str) -> None:
    assert not PacsSettings(scp_bind_address=address).scp_plaintext_off_loopback()


def test_the_plaintext_refusal_is_one_line_naming_the_section(tmp_path: Path) -> None:
    config = tmp_path / "riskbridge.toml"
    config.write_text('[pacs]\nscp_bind_address = "10.0.0.5"\n')
    with pytest.raises(SettingsError, match=r"pacs: .*'10\.0\.0\.5' is not a loopback address.*\[pacs\.tls\]"):
        load_settings(config)


@pytest.mark.parametrize(
    ("peers", "problem"),
    [(["10.0.0.5/24"], "has host bits set"), (["pacs.hospital.example"], "does not appear to be")],
)
def test_allowed_peers_must_be_addresses_or_networks(peers: list[str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        PacsSettings(scp_allowed_peers=peers)


@pytest.mark.parametrize(("field", "value"), [("max_pdu_kb", 0), ("max_instance_mb", 0), ("max_pdu_kb", 10**6)])
def test_the_size_limits_are_finite(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        PacsSettings(**{field: value})


def test_ipv4_mapped_peers_match_their_ipv4_entries() -> None:
    networks = allowed_networks(["10.20.0.0/16", "::ffff:192.0.2.7", "2001:db8::/32"], "ignored.example")
    assert peer_address("::ffff:10.20.3.4") in networks[0]
    assert peer_address("::ffff:192.0.2.7") in networks[1]  # a mapped entry means its IPv4 address
    assert peer_address("192.0.2.7") in networks[1]
    assert peer_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert not any(peer_address("::ffff:10.21.0.1") in network for network in networks)


def test_no_allowed_peers_means_the_pacs_host_and_loopback_means_all_of_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert allowed_networks([], "127.0.0.1") == LOOPBACK_NETWORKS

    def resolve(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "pacs.hospital.example"
        return [(socket.AF_INET, 0, 0, "", ("10.1.2.3", 0)), (socket.AF_INET6, 0, 0, "", ("2001:db8::3", 0, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert {str(n) for n in allowed_networks([], "pacs.hospital.example")} == {"10.1.2.3/32", "2001:db8::3/128"}


def test_a_pacs_host_that_does_not_resolve_stops_the_scp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unresolvable(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    scp = StorageSCP("RB_SCP", 1, InstanceSink(tmp_path), pacs_host="pacs.hospital.example")
    with pytest.raises(DicomError, match="scp_allowed_peers"):
        scp.start()


def test_the_scp_itself_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    scp = StorageSCP("RB_SCP", port, InstanceSink(tmp_path), bind_address="0.0.0.0")
    with pytest.raises(ConfigurationError, match="without TLS"):
        scp.start()
    with socket.socket() as probe:  # nothing was bound
        probe.bind(("0.0.0.0", port))


@pytest.fixture
def all_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor's three checks answer at once, so only its warnings are under test."""
    monkeypatch.setattr(doctor, "check_pacs", lambda pacs: "C-ECHO answered")
    monkeypatch.setattr(doctor, "check_fhir", lambda fhir: "HAPI")
    monkeypatch.setattr(doctor, "check_database", lambda database: "PostgreSQL 15")


def test_doctor_warns_when_plaintext_off_loopback_is_allowed(all_ok: None) -> None:
    results = doctor.run_checks(Settings(pacs={"scp_bind_address": "10.0.0.5", "scp_allow_plaintext": True}))
    assert len(results) == 4 and all(result.ok for result in results)
    warning = results[-1]
    assert warning.name == "Storage SCP (DICOM)" and warning.target == "RISKBRIDGE_SCP@10.0.0.5:11113"
    assert (warning.result, [r.result for r in results[:3]]) == ("WARN", ["OK", "OK", "OK"])
    assert warning.detail.startswith("listens off loopback without TLS")
    from typer.testing import CliRunner

    from riskbridge import cli_pacs
    from riskbridge.cli import app

    settings = Settings(pacs={"scp_bind_address": "10.0.0.5", "scp_allow_plaintext": True})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_pacs, "_settings", lambda: settings)
        shown = CliRunner().invoke(app, ["doctor", "--format", "tsv"])
    assert shown.exit_code == 0, shown.output  # a warning never fails the command
    assert "Storage SCP (DICOM)\tRISKBRIDGE_SCP@10.0.0.5:11113\tWARN\t" in shown.output


def test_doctor_has_no_warning_for_the_defaults_or_with_tls(all_ok: None, tmp_path: Path) -> None:
    assert len(doctor.run_checks(Settings())) == 3
    # Allowed but not used: with TLS configured nothing crosses the network in clear.
    tls = _tls(tmp_path)
    secured = Settings(pacs={"scp_bind_address": "10.0.0.5", "scp_allow_plaintext": True, "tls": tls})
    assert doctor.setting_warnings(secured) == []
