"""Sandbox mechanics without starting servers: Orthanc's and dcmqrscp's generated configs, port and binary checks,
PID files."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from riskbridge.dev.sandbox import RLE_LOSSLESS, Sandbox, SandboxError, _require_binary, dcmqrscp_pacs
from riskbridge.settings import Settings


def _sandbox(tmp_path: Path, **sandbox: object) -> Sandbox:
    return Sandbox(Settings(sandbox={"dir": tmp_path / "sb", **sandbox}))


def test_orthanc_config_is_strict(tmp_path: Path) -> None:
    orthanc = _sandbox(tmp_path, extra_calling_aes=["DCMTK", "QA_TOOL"]).orthanc
    config = orthanc.config()
    assert config["RemoteAccessAllowed"] is False
    assert config["DicomCheckCalledAet"] is True
    for key in ("Echo", "Store", "Find", "Get", "Move"):
        assert config[f"DicomAlwaysAllow{key}"] is False
    ae_titles = {entry["AET"] for entry in config["DicomModalities"].values()}  # type: ignore[attr-defined]
    assert ae_titles == {"RISKBRIDGE", "RISKBRIDGE_SCP", "RISKBRIDGE_SCP1", "DCMTK", "QA_TOOL"}
    assert str(config["Plugins"][0]).endswith("libOrthancDicomWeb.so")  # type: ignore[index]
    assert config["SyncStorageArea"] is False
    assert str(config["StorageDirectory"]).startswith(str(tmp_path / "sb"))


def _config_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dcmqrscp_config_admits_only_riskbridge_and_moves_to_its_scps(tmp_path: Path) -> None:
    box = _sandbox(tmp_path, extra_calling_aes=["DCMTK", "QA_TOOL"], dcmqrscp_port=14999, dcmqrscp_ae="QR_TEST")
    part = box.dcmqrscp
    lines = _config_lines(part.config())
    assert "NetworkTCPPort  = 14999" in lines
    hosts = lines[lines.index("HostTable BEGIN") + 1 : lines.index("HostTable END")]
    # Move destinations: each retrieval worker's storage SCP at its own port; then the calling AE titles.
    assert hosts[:5] == [
        "peer0 = (RISKBRIDGE_SCP, 127.0.0.1, 11113)",
        "peer1 = (RISKBRIDGE_SCP1, 127.0.0.1, 11114)",
        "peer2 = (RISKBRIDGE, 127.0.0.1, 11113)",
        "peer3 = (DCMTK, 127.0.0.1, 11213)",
        "peer4 = (QA_TOOL, 127.0.0.1, 11214)",
    ]
    assert hosts[5] == "riskbridge = peer0, peer1, peer2, peer3, peer4"
    ae_table = lines[lines.index("AETable BEGIN") + 1 : lines.index("AETable END")]
    storage = tmp_path / "sb" / "dcmqrscp" / "storage"
    # One AE title, read-write, the largest quota dcmqrscp allows, and no ANY: only the peers above may associate.
    assert ae_table == [f'QR_TEST "{storage}" RW (500, 1024mb) riskbridge']
    assert not any("ANY" in line for line in lines)


def test_dcmqrscp_accepts_uncompressed_before_rle_and_the_c_get_role(tmp_path: Path) -> None:
    text = _sandbox(tmp_path).dcmqrscp.association_config()
    lines = _config_lines(text)
    incoming = lines[lines.index("[UncompressedOrRLE]") + 1 : lines.index("[Explicit]")]
    assert incoming == [
        "TransferSyntax1 = 1.2.840.10008.1.2.1",  # Explicit VR Little Endian first: what C-GET requesters get
        "TransferSyntax2 = 1.2.840.10008.1.2",
        f"TransferSyntax3 = {RLE_LOSSLESS}",  # accepted when it is all a sender proposes
    ]
    assert "PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\UncompressedOrRLE" in lines
    assert "Role1 = 1.2.840.10008.5.1.4.1.1.2\\BOTH" in lines  # a C-GET requester acts as the storage SCP
    outgoing = lines[lines.index("[OutgoingStorage]") + 1 : lines.index("[[SCPSCURoleSelection]]")]
    assert outgoing[:2] == [
        "PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\Explicit",
        "PresentationContext2 = 1.2.840.10008.5.1.4.1.1.2\\Implicit",
    ]
    assert lines[-5:] == [
        "[Incoming]",
        "PresentationContexts = IncomingStorage",
        "SCPSCURoleSelection = IncomingRoles",
        "[Outgoing]",
        "PresentationContexts = OutgoingStorage",
    ]


def test_dcmqrscp_command_uses_both_generated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("riskbridge.dev.sandbox._require_binary", lambda name, package, search=(): Path(f"/bin/{name}"))
    part = _sandbox(tmp_path).dcmqrscp
    argv, env, user = part.command()
    assert argv[:3] == ["/bin/dcmqrscp", "--config", str(part.config_file)]
    assert "--disable-host-lookup" in argv  # the peer check compares "127.0.0.1", not a DNS name
    assert argv[-4:] == ["--assoc-config-file", str(part.association_file), "Incoming", "Outgoing"]
    assert env == {"TCP_NODELAY": "1"} and user is None
    part.prepare(lambda name, message: None)
    assert part.config_file.read_text() == part.config()
    assert part.association_file.read_text() == part.association_config()
    assert part.storage_dir.is_dir()


def test_dcmqrscp_refuses_a_storage_path_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match=r"dcmqrscp: its storage path .*parentheses.*RISKBRIDGE_SANDBOX__DIR"):
        _sandbox(tmp_path / "site (copy)").dcmqrscp.config()


def test_dcmqrscp_pacs_settings_swap_only_where_the_pacs_is() -> None:
    settings = Settings(pacs={"transport": "dicomweb", "workers": 3}, sandbox={"dcmqrscp_port": 14999})
    pacs = dcmqrscp_pacs(settings)
    assert (pacs.host, pacs.port, pacs.called_ae) == ("127.0.0.1", 14999, "DCMQRSCP")
    assert pacs.calling_ae == settings.pacs.calling_ae
    assert pacs.scp_endpoints() == settings.pacs.scp_endpoints()
    assert pacs.dicomweb_url is None and pacs.tls is None
    assert pacs.transport == "auto"  # dcmqrscp has no DICOMweb
    assert Sandbox(settings).select(["dcmqrscp"])[0].endpoints() == ("DICOM DCMQRSCP@127.0.0.1:14999",)


def test_busy_port_names_port_and_setting(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        box = _sandbox(tmp_path, hapi_port=port)
        with pytest.raises(SandboxError) as caught:
            box.hapi.check_ports()
    message = str(caught.value)
    assert f"port {port} is already in use" in message
    assert "sandbox.hapi_port" in message and "RISKBRIDGE_SANDBOX__HAPI_PORT" in message


def test_missing_binary_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match=r"'Orthanc' not found: install the Debian package 'orthanc'"):
        _require_binary("Orthanc", "orthanc")


def test_pid_file_of_a_dead_or_recycled_process_is_not_trusted(tmp_path: Path) -> None:
    part = _sandbox(tmp_path).orthanc
    part.dir.mkdir(parents=True)
    finished = subprocess.Popen(["true"])
    finished.wait()
    part.pid_file.write_text(f"{finished.pid} 12345\n")
    assert part.running_pid() is None
    assert part.has_stale_pid_file()
    # Our own PID with a wrong start time: a recycled PID must never be signalled.
    part.pid_file.write_text(f"{os.getpid()} 1\n")
    assert part.running_pid() is None
    assert part.stop() is False
    assert not part.pid_file.exists()


def test_status_of_a_never_started_sandbox(tmp_path: Path) -> None:
    statuses = _sandbox(tmp_path).status()
    assert [status.name for status in statuses] == ["orthanc", "hapi-fhir", "postgres", "dcmqrscp"]
    assert {status.state for status in statuses} == {"stopped"}


def test_a_listener_is_attributed_to_the_process_that_holds_it() -> None:
    from riskbridge.dev.sandbox import _process_listens_on

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert _process_listens_on(os.getpid(), port)
        bystander = subprocess.Popen(["sleep", "5"])
        try:
            # Another server answering on the port must never count as ours.
            assert not _process_listens_on(bystander.pid, port)
        finally:
            bystander.kill()
            bystander.wait()
    assert not _process_listens_on(os.getpid(), port)


def test_hapi_runs_its_own_copy_of_the_launcher_jar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = tmp_path / "target" / "riskbridge-hapi-fhir.jar"
    built.parent.mkdir()
    built.write_bytes(b"build 1")
    hapi = _sandbox(tmp_path).hapi
    monkeypatch.setattr(type(hapi), "jar", property(lambda self: built))
    hapi.dir.mkdir(parents=True)

    installed = hapi._install_server_jar()
    assert installed == hapi.server_jar and installed.read_bytes() == b"build 1"
    assert str(installed) in hapi.command()[0]
    with installed.open("rb") as running:  # what a running server holds open
        built.write_bytes(b"build 2, rewritten in place as Maven does")
        os.utime(built, ns=(1, 1))
        assert hapi._install_server_jar().read_bytes() == b"build 2, rewritten in place as Maven does"
        assert running.read() == b"build 1"
    inode = installed.stat().st_ino
    assert hapi._install_server_jar().stat().st_ino == inode  # unchanged build: no new copy


def _stand_in_parts(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every part's checks, prepare, start and stop by stand-ins; return the list start/stop append to."""
    calls: list[str] = []
    for part in box.parts:
        monkeypatch.setattr(part, "check_prerequisites", lambda: None)
        monkeypatch.setattr(part, "check_ports", lambda: None)
        monkeypatch.setattr(part, "prepare", lambda progress: None)

        def start(name: str = part.name) -> int:
            calls.append(f"start {name}")
            return 1

        def stop(timeout_s: float = 30.0, name: str = part.name) -> bool:
            calls.append(f"stop {name}")
            return True

        monkeypatch.setattr(part, "start", start)
        monkeypatch.setattr(part, "stop", stop)
    return calls


def test_a_part_that_cannot_be_prepared_leaves_no_other_part_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _sandbox(tmp_path)
    calls = _stand_in_parts(box, monkeypatch)
    for part in (box.orthanc, box.hapi):
        monkeypatch.setattr(part, "prepare", lambda progress, name=part.name: calls.append(f"prepare {name}"))

    def unreachable(progress: object) -> None:
        raise SandboxError("postgres: the 'postgres' user cannot reach the sandbox dir")

    monkeypatch.setattr(box.postgres, "prepare", unreachable)
    with pytest.raises(SandboxError, match="cannot reach"):
        box.up()
    assert calls == ["prepare orthanc", "prepare hapi-fhir"]  # and nothing started


def test_a_part_that_fails_to_start_stops_the_parts_this_call_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _sandbox(tmp_path)
    calls = _stand_in_parts(box, monkeypatch)

    def refuses() -> int:
        raise SandboxError("postgres: could not start")

    monkeypatch.setattr(box.postgres, "start", refuses)
    with pytest.raises(SandboxError, match="could not start"):
        box.up()
    assert calls == ["start orthanc", "start hapi-fhir", "stop orthanc", "stop hapi-fhir"]
