"""The loopback sandbox: real Orthanc, HAPI FHIR, PostgreSQL and dcmtk dcmqrscp servers started from packages.

``riskbridge sandbox up`` runs each server as a plain child process with all of its state under one
directory (``sandbox.dir``, default ``.riskbridge/sandbox``); ``down`` stops exactly the processes ``up``
started, identified by PID and kernel start time (so a recycled PID is never signalled); ``status`` reports
each part. No Docker engine is needed.

- Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) with a generated JSON config: DICOMweb plugin on,
  remote HTTP access off, and strict DICOM AE authorization (only the AE titles in ``DicomModalities`` may
  associate). Orthanc 1.10 binds its DICOM port on all interfaces whatever the config says; the AE check is
  what keeps strangers out. Started with ``TCP_NODELAY=1`` (its DCMTK layer leaves Nagle on otherwise).
- HAPI FHIR JPA (R4) from our own launcher under ``docker/hapi-fhir``, built with Maven on first use; its database
  is H2 in memory (``sandbox.hapi_database = "h2"``, the default) or a database of its own in the sandbox's
  PostgreSQL (``"postgresql"``: PostgreSQL then starts first, and the database is recreated empty on every HAPI start,
  as an in-memory H2 is).
- PostgreSQL from Debian: a cluster of its own (initdb) in the sandbox directory, on its own port.
- dcmtk's Query/Retrieve SCP ``dcmqrscp`` (Debian ``dcmtk``): a second PACS that answers only what a strict PACS
  answers (its C-FIND returns a fixed, small set of attributes per level), with a generated configuration: its AE
  title, a storage area in the sandbox directory, riskbridge's AE titles as the only peers and move destinations,
  and an association profile accepting uncompressed and RLE Lossless storage. Like Orthanc it binds on all
  interfaces; the peer list (calling AE title and host 127.0.0.1) keeps strangers out.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions
import requests

from riskbridge.connectors import dicom
from riskbridge.errors import RiskbridgeError
from riskbridge.settings import PacsSettings, Settings

ProgressCallback = Callable[[str, str], None]
"""Called as ``progress(part_name, message)`` while the sandbox changes state."""

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # riskbridge/dev/sandbox.py -> the checkout
HAPI_SOURCE_DIR = PROJECT_ROOT / "docker" / "hapi-fhir"
HAPI_JAR_NAME = "riskbridge-hapi-fhir.jar"
HAPI_POSTGRES_DATABASE = "hapi"  # HAPI's database in the sandbox's PostgreSQL when sandbox.hapi_database = "postgresql"
POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
ORTHANC_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


# The storage SOP classes the dcmqrscp accepts (C-STORE in) and offers (C-MOVE/C-GET out): CT in its three forms,
# the dose report of the synthetic cohort, and the usual companions of a CT study.
DCMQRSCP_STORAGE_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR Storage
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State Storage
)
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# dcmqrscp's index keeps at most 500 studies and 1 GiB per study (dcmqrdb's DB_UpperMaxStudies and
# DB_UpperMaxBytesPerStudy); past either it deletes the oldest studies or images to make room.
DCMQRSCP_MAX_STUDIES = 500
DCMQRSCP_MAX_MB_PER_STUDY = 1024


class SandboxError(RiskbridgeError):
    """A sandbox problem a person can fix; the message is one line saying what and how."""


@dataclass(frozen=True)
class PartStatus:
    """What ``status`` knows about one server."""

    name: str
    state: str  # "ready", "starting", "stopped" or "stale pid file"
    pid: int | None
    endpoints: tuple[str, ...]
    detail: str = ""


def _noop(part: str, message: str) -> None:
    return None


def _process_start_time(pid: int) -> str | None:
    """Return the kernel start time of ``pid`` (clock ticks since boot), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from the closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def _listening_inodes(port: int) -> set[str]:
    """Return the socket inodes listening on TCP ``port`` (IPv4 or IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def _process_listens_on(pid: int, port: int) -> bool:
    """True when process ``pid`` itself holds a socket listening on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return False
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, PermissionError):
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in wanted:
                return True
        except OSError:
            continue
    return False


def _port_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _require_binary(name: str, package: str, search: Sequence[Path] = ()) -> Path:
    for directory in search:
        if (directory / name).is_file():
            return directory / name
    found = shutil.which(name)
    if found is None:
        raise SandboxError(f"'{name}' not found: install the Debian package '{package}' (apt-get install {package})")
    return Path(found)


class _Part(ABC):
    """One sandbox server: its directory, its PID file, how to start it and how to tell it is ready."""

    name = ""

    def __init__(self, settings: Settings, root: Path) -> None:
        self.settings = settings
        self.dir = root / self.name
        self.pid_file = self.dir / "pid"
        self.log_file = self.dir / f"{self.name}.log"

    # -- subclass interface -------------------------------------------------------------------------
    @abstractmethod
    def ports(self) -> list[tuple[int, str, str]]:
        """Return ``(port, bind host, setting key)`` for every port this part listens on."""

    @abstractmethod
    def endpoints(self) -> tuple[str, ...]:
        """Return the endpoints a person or a test connects to."""

    @abstractmethod
    def check_prerequisites(self) -> None:
        """Raise :class:`SandboxError` if a binary this part needs is missing."""

    @abstractmethod
    def prepare(self, progress: ProgressCallback) -> None:
        """Create configuration and on-disk state; safe to call again."""

    @abstractmethod
    def command(self) -> tuple[list[str], dict[str, str], str | None]:
        """Return the argv, extra environment and the user to run as (None: the current user)."""

    @abstractmethod
    def ready(self) -> bool:
        """Return True once the server answers its protocol."""

    def after_ready(self, progress: ProgressCallback) -> None:  # noqa: B027 (an optional hook, not abstract)
        """One-time work once the server answers (create the database, ...); most parts need none."""

    def stop_signal(self) -> int:
        """The signal that makes this server shut down cleanly and promptly."""
        return signal.SIGTERM

    # -- shared mechanics ---------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        """Return the PID this sandbox started if that process is still alive, else None."""
        try:
            pid_text, started = self.pid_file.read_text().split()
            pid = int(pid_text)
        except (FileNotFoundError, ValueError):
            return None
        return pid if _process_start_time(pid) == started else None

    def has_stale_pid_file(self) -> bool:
        """True when a PID file exists but its process is gone (or the PID now belongs to another one)."""
        return self.pid_file.exists() and self.running_pid() is None

    def check_ports(self) -> None:
        """Raise :class:`SandboxError` naming the first busy port and the setting that moves it."""
        for port, host, key in self.ports():
            if not _port_free(port, host):
                env = "RISKBRIDGE_" + key.upper().replace(".", "__")
                raise SandboxError(f"{self.name}: port {port} is already in use; free it or change '{key}' ({env}=...)")

    def start(self) -> int:
        """Start the server process detached from this one; return its PID."""
        argv, extra_env, user = self.command()
        env = {**os.environ, **extra_env}
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                user=user,
                start_new_session=True,
            )
        started = _process_start_time(process.pid)
        self.pid_file.write_text(f"{process.pid} {started}\n")
        return process.pid

    def exited_early(self) -> str | None:
        """If the started process has died, return the tail of its log as the reason."""
        if self.running_pid() is not None:
            return None
        tail = self.log_file.read_text(errors="replace").strip().splitlines()[-5:] if self.log_file.exists() else []
        return " | ".join(tail) or "no log output"

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the process this sandbox started (TERM, then KILL after ``timeout_s``); True if one was running."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, self.stop_signal())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running_pid() is not None:
            time.sleep(0.2)
        if self.running_pid() is not None:
            os.killpg(pid, signal.SIGKILL)
            while self.running_pid() is not None:
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> PartStatus:
        """Report whether this part is stopped, starting or ready."""
        pid = self.running_pid()
        if pid is None:
            state = "stale pid file" if self.has_stale_pid_file() else "stopped"
            return PartStatus(self.name, state, None, self.endpoints())
        return PartStatus(self.name, "ready" if self.serving() else "starting", pid, self.endpoints())

    def serving(self) -> bool:
        """True when the process this sandbox started listens on all its ports and answers its protocol.

        Checking the listener's owner matters: another server on the same port would otherwise answer for it.
        """
        pid = self.running_pid()
        if pid is None:
            return False
        return all(_process_listens_on(pid, port) for port, _, _ in self.ports()) and self.ready()


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


class _Orthanc(_Part):
    name = "orthanc"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.sandbox.orthanc_http_port}"

    def ports(self) -> list[tuple[int, str, str]]:
        # Orthanc 1.10 binds DICOM on all interfaces, so that is where the port must be free.
        return [
            (self.settings.pacs.port, "0.0.0.0", "pacs.port"),
            (self.settings.sandbox.orthanc_http_port, "127.0.0.1", "sandbox.orthanc_http_port"),
        ]

    def endpoints(self) -> tuple[str, ...]:
        pacs = self.settings.pacs
        return (
            f"DICOM {pacs.called_ae}@127.0.0.1:{pacs.port}",
            f"REST {self.http_url}",
            f"DICOMweb {self.http_url}/dicom-web",
        )

    def plugin_path(self) -> Path:
        for candidate in ORTHANC_PLUGIN_CANDIDATES:
            if candidate.is_file():
                return candidate
        raise SandboxError(
            "Orthanc DICOMweb plugin (libOrthancDicomWeb.so) not found: "
            "install the Debian package 'orthanc-dicomweb' (apt-get install orthanc-dicomweb)"
        )

    def check_prerequisites(self) -> None:
        _require_binary("Orthanc", "orthanc", [Path("/usr/sbin")])
        self.plugin_path()

    def config(self) -> dict[str, object]:
        """The Orthanc JSON configuration this sandbox runs with."""
        pacs = self.settings.pacs
        allow_all = {
            "AllowEcho": True,
            "AllowFind": True,
            "AllowMove": True,
            "AllowGet": True,
            "AllowStore": True,
        }
        modalities: dict[str, object] = {
            "riskbridge": {"AET": pacs.calling_ae, "Host": "127.0.0.1", "Port": pacs.scp_port, **allow_all},
        }
        for index, (ae_title, port) in enumerate(pacs.scp_endpoints()):
            modalities[f"riskbridge_scp_{index}"] = {"AET": ae_title, "Host": "127.0.0.1", "Port": port, **allow_all}
        for index, ae_title in enumerate(self.settings.sandbox.extra_calling_aes):
            # A tool's own storage SCP (e.g. dcmtk's storescp for movescu) listens at scp_port + 100 + index.
            modalities[f"extra_{index}"] = {
                "AET": ae_title,
                "Host": "127.0.0.1",
                "Port": pacs.scp_port + 100 + index,
                **allow_all,
            }
        return {
            "Name": "riskbridge-sandbox",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "storage"),
            "StorageCompression": False,
            "SyncStorageArea": False,
            "HttpServerEnabled": True,
            "HttpPort": self.settings.sandbox.orthanc_http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": pacs.called_ae,
            "DicomPort": pacs.port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": modalities,
            "DicomThreadsCount": 4,
            "Plugins": [str(self.plugin_path())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "SaveJobs": False,
        }

    def prepare(self, progress: ProgressCallback) -> None:
        (self.dir / "storage").mkdir(parents=True, exist_ok=True)
        (self.dir / "orthanc.json").write_text(json.dumps(self.config(), indent=2))

    def command(self) -> tuple[list[str], dict[str, str], str | None]:
        binary = _require_binary("Orthanc", "orthanc", [Path("/usr/sbin")])
        return [str(binary), str(self.dir / "orthanc.json")], {"TCP_NODELAY": "1"}, None

    def ready(self) -> bool:
        return _http_ok(f"{self.http_url}/system")


class _Hapi(_Part):
    name = "hapi-fhir"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.sandbox.hapi_port}/fhir"

    @property
    def jar(self) -> Path:
        return HAPI_SOURCE_DIR / "target" / HAPI_JAR_NAME

    def ports(self) -> list[tuple[int, str, str]]:
        return [(self.settings.sandbox.hapi_port, "127.0.0.1", "sandbox.hapi_port")]

    def endpoints(self) -> tuple[str, ...]:
        return (f"FHIR R4 {self.base_url}",)

    def check_prerequisites(self) -> None:
        _require_binary("java", "openjdk-17-jre-headless")
        if not self.jar.is_file() or self._sources_newer_than_jar():
            _require_binary("mvn", "maven")

    def _sources_newer_than_jar(self) -> bool:
        built = self.jar.stat().st_mtime
        sources = [HAPI_SOURCE_DIR / "pom.xml", *HAPI_SOURCE_DIR.glob("src/**/*")]
        return any(path.is_file() and path.stat().st_mtime > built for path in sources)

    def prepare(self, progress: ProgressCallback) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.jar.is_file() and not self._sources_newer_than_jar():
            self._install_server_jar()
            return
        progress(self.name, "building the HAPI FHIR launcher with Maven (first run downloads to ~/.m2)")
        build_log = self.dir / "build.log"
        with build_log.open("wb") as log:
            result = subprocess.run(
                ["mvn", "-B", "-q", "-f", str(HAPI_SOURCE_DIR / "pom.xml"), "package", "-DskipTests"],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0 or not self.jar.is_file():
            raise SandboxError(f"hapi-fhir: Maven build failed (exit {result.returncode}); see {build_log}")
        self._install_server_jar()

    @property
    def server_jar(self) -> Path:
        """The copy of the launcher this sandbox's server runs from (see :meth:`_install_server_jar`)."""
        return self.dir / HAPI_JAR_NAME

    def _install_server_jar(self) -> Path:
        # Maven rewrites target/*.jar in place, and a running JVM then fails on its next class load: each sandbox
        # runs its own copy, replaced by rename (a running server keeps the file it opened).
        built, installed = self.jar.stat(), self.server_jar
        if installed.is_file():
            current = installed.stat()
            if (current.st_size, current.st_mtime_ns) == (built.st_size, built.st_mtime_ns):
                return installed
        partial = installed.with_suffix(".jar.partial")
        shutil.copy2(self.jar, partial)
        os.replace(partial, installed)
        return installed

    @property
    def on_postgres(self) -> bool:
        """True when this HAPI keeps its data in the sandbox's PostgreSQL (``sandbox.hapi_database``)."""
        return self.settings.sandbox.hapi_database == "postgresql"

    def database_arguments(self) -> list[str]:
        """The launcher's datasource options for ``sandbox.hapi_database`` (none for H2: the launcher's default).

        PostgreSQL: the JDBC URL of the database :data:`HAPI_POSTGRES_DATABASE` in the sandbox's own cluster and its
        role; the cluster trusts loopback connections (``initdb --auth=trust``), so there is no password to pass. The
        launcher picks the JDBC driver and HAPI's dialect from the URL (docker/hapi-fhir/README.md).
        """
        if not self.on_postgres:
            return []
        port = self.settings.sandbox.postgres_port
        return [
            f"--spring.datasource.url=jdbc:postgresql://127.0.0.1:{port}/{HAPI_POSTGRES_DATABASE}",
            f"--spring.datasource.username={_Postgres.role}",
        ]

    def command(self) -> tuple[list[str], dict[str, str], str | None]:
        java = _require_binary("java", "openjdk-17-jre-headless")
        argv = [
            str(java),
            *self.settings.sandbox.hapi_java_opts.split(),
            "-jar",
            str(self.server_jar),
            f"--server.port={self.settings.sandbox.hapi_port}",
            "--server.address=127.0.0.1",
            *self.database_arguments(),
        ]
        return argv, {}, None

    def ready(self) -> bool:
        return _http_ok(f"{self.base_url}/metadata", timeout=30.0)


class _Postgres(_Part):
    name = "postgres"
    database = "riskbridge"
    role = "riskbridge"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def ports(self) -> list[tuple[int, str, str]]:
        return [(self.settings.sandbox.postgres_port, "127.0.0.1", "sandbox.postgres_port")]

    def endpoints(self) -> tuple[str, ...]:
        port = self.settings.sandbox.postgres_port
        return (f"PostgreSQL postgresql://{self.role}@127.0.0.1:{port}/{self.database}",)

    def _run_as(self) -> str | None:
        # PostgreSQL refuses to run as root; the Debian package's 'postgres' account runs it instead.
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise SandboxError(
                "running as root needs the 'postgres' system user: install the Debian package 'postgresql'"
            ) from None
        return "postgres"

    def check_prerequisites(self) -> None:
        _require_binary("initdb", "postgresql", POSTGRES_BIN_DIRS)
        _require_binary("postgres", "postgresql", POSTGRES_BIN_DIRS)
        self._run_as()

    def prepare(self, progress: ProgressCallback) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        user = self._run_as()
        if user is not None:
            account = pwd.getpwnam(user)
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            probe = subprocess.run(["test", "-w", str(self.dir)], user=user, check=False)
            if probe.returncode != 0:
                raise SandboxError(
                    f"postgres: the 'postgres' user cannot reach {self.dir}; put sandbox.dir on a path "
                    "every user can traverse (RISKBRIDGE_SANDBOX__DIR=...)"
                )
        if (self.data_dir / "PG_VERSION").is_file():
            return
        progress(self.name, "initdb: creating the sandbox's own cluster")
        initdb = _require_binary("initdb", "postgresql", POSTGRES_BIN_DIRS)
        result = subprocess.run(
            [
                str(initdb),
                "-D",
                str(self.data_dir),
                "-U",
                self.role,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            user=user,
            cwd=self.dir,
            check=False,
        )
        if result.returncode != 0:
            raise SandboxError(f"postgres: initdb failed: {result.stderr.strip().splitlines()[-1:]}")

    def command(self) -> tuple[list[str], dict[str, str], str | None]:
        postgres = _require_binary("postgres", "postgresql", POSTGRES_BIN_DIRS)
        argv = [
            str(postgres),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.settings.sandbox.postgres_port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.dir}",
            "-c",
            "fsync=off",  # a throwaway test cluster: durability across power loss is not wanted
        ]
        return argv, {}, self._run_as()

    def stop_signal(self) -> int:
        return signal.SIGINT  # PostgreSQL's "fast" shutdown; SIGTERM waits for clients to leave

    def _connect(self, dbname: str) -> psycopg2.extensions.connection:

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.settings.sandbox.postgres_port,
            user=self.role,
            dbname=dbname,
            connect_timeout=2,
        )

    def ready(self) -> bool:
        try:
            self._connect("postgres").close()
        except psycopg2.OperationalError:
            return False
        return True

    def after_ready(self, progress: ProgressCallback) -> None:
        connection = self._connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cursor.fetchone() is None:
                    progress(self.name, f"creating database {self.database}")
                    cursor.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            connection.close()

    def recreate_database(self, name: str, progress: ProgressCallback) -> None:
        """Drop the database ``name`` if it exists (closing its connections) and create it empty."""
        connection = self._connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                progress(self.name, f"creating database {name} (empty)")
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()


def dcmqrscp_pacs(settings: Settings) -> PacsSettings:
    """Return the PACS settings that reach the sandbox dcmqrscp instead of the sandbox Orthanc.

    Same calling AE title, storage SCP endpoints, timeouts and retries as ``settings.pacs``; host 127.0.0.1, the
    port and AE title of ``settings.sandbox``; no DICOMweb and no TLS (dcmqrscp has neither), so ``transport``
    "dicomweb" becomes "auto" (C-GET). Tests switch PACS with ``settings.model_copy(update={"pacs": ...})``.
    """
    pacs = settings.pacs
    return pacs.model_copy(
        update={
            "host": "127.0.0.1",
            "port": settings.sandbox.dcmqrscp_port,
            "called_ae": settings.sandbox.dcmqrscp_ae,
            "dicomweb_url": None,
            "tls": None,
            "transport": "auto" if pacs.transport == "dicomweb" else pacs.transport,
        }
    )


class _Dcmqrscp(_Part):
    """dcmtk's Query/Retrieve SCP with a generated configuration (docs/sandbox.md, "dcmqrscp")."""

    name = "dcmqrscp"

    @property
    def storage_dir(self) -> Path:
        """The storage area: received files and dcmqrscp's index (index.dat)."""
        return self.dir / "storage"

    @property
    def config_file(self) -> Path:
        """dcmqrscp's own configuration: network, peers (HostTable) and its AE title (AETable)."""
        return self.dir / "dcmqrscp.cfg"

    @property
    def association_file(self) -> Path:
        """The association negotiation profiles (``-xf``): transfer syntaxes and roles per storage class."""
        return self.dir / "association.cfg"

    @property
    def pacs(self) -> PacsSettings:
        """The PACS settings that reach this server (see :func:`dcmqrscp_pacs`)."""
        return dcmqrscp_pacs(self.settings)

    def ports(self) -> list[tuple[int, str, str]]:
        # dcmqrscp 3.6.7 has no bind option: it listens on all interfaces.
        return [(self.settings.sandbox.dcmqrscp_port, "0.0.0.0", "sandbox.dcmqrscp_port")]

    def endpoints(self) -> tuple[str, ...]:
        sandbox = self.settings.sandbox
        return (f"DICOM {sandbox.dcmqrscp_ae}@127.0.0.1:{sandbox.dcmqrscp_port}",)

    def check_prerequisites(self) -> None:
        _require_binary("dcmqrscp", "dcmtk")

    def peers(self) -> list[tuple[str, int]]:
        """The ``(AE title, port)`` on 127.0.0.1 of every peer: the only calling AEs and C-MOVE destinations.

        riskbridge's storage SCPs (one per retrieval worker), its calling AE title, then ``sandbox.extra_calling_aes``
        (a tool's own storage SCP listens at ``scp_port + 100 + index``, as in Orthanc's configuration).
        """
        pacs = self.settings.pacs
        found: dict[str, int] = {}
        for ae_title, port in pacs.scp_endpoints():
            found.setdefault(ae_title, port)
        found.setdefault(pacs.calling_ae, pacs.scp_port)
        for index, ae_title in enumerate(self.settings.sandbox.extra_calling_aes):
            found.setdefault(ae_title, pacs.scp_port + 100 + index)
        return list(found.items())

    def config(self) -> str:
        """The text of dcmqrscp.cfg (format: dcmtk's dcmqrdb/docs/dcmqrcnf.txt).

        Peers are named in the HostTable and grouped under one symbolic name, so that no line outgrows the 511
        characters dcmqrscp reads per line. Hosts are IP addresses: dcmqrscp runs with ``-dhl`` (no reverse DNS), so
        a caller's host is "127.0.0.1", which its peer check compares as a string.
        """
        storage = str(self.storage_dir)
        if len(storage) > 200 or any(char in storage for char in "\"'()"):
            raise SandboxError(
                f"dcmqrscp: its storage path {storage} is longer than 200 characters or holds quotes or parentheses, "
                "which dcmqrscp cannot read; set a simpler sandbox.dir (RISKBRIDGE_SANDBOX__DIR=...)"
            )
        sandbox = self.settings.sandbox
        peers = self.peers()
        lines = [
            "# Generated by riskbridge sandbox: rewritten on every start.",
            f"NetworkTCPPort  = {sandbox.dcmqrscp_port}",
            "MaxPDUSize      = 131072",
            "MaxAssociations = 16",
            "",
            "HostTable BEGIN",
            *(f"peer{index} = ({ae_title}, 127.0.0.1, {port})" for index, (ae_title, port) in enumerate(peers)),
            "riskbridge = " + ", ".join(f"peer{index}" for index in range(len(peers))),
            "HostTable END",
            "",
            "VendorTable BEGIN",
            "VendorTable END",
            "",
            "AETable BEGIN",
            f'{sandbox.dcmqrscp_ae} "{storage}" RW ({DCMQRSCP_MAX_STUDIES}, {DCMQRSCP_MAX_MB_PER_STUDY}mb) riskbridge',
            "AETable END",
        ]
        too_long = [line for line in lines if len(line) > 500]
        if too_long:
            raise SandboxError(f"dcmqrscp: a configuration line exceeds what dcmqrscp reads: {too_long[0][:80]}...")
        return "\n".join(lines) + "\n"

    def association_config(self) -> str:
        """The text of association.cfg: the ``Incoming`` and ``Outgoing`` profiles (dcmtk's asconfig format).

        Incoming storage (C-STORE to dcmqrscp) accepts Explicit VR Little Endian, Implicit VR Little Endian and RLE
        Lossless, preferring them in that order, and accepts the SCP role a C-GET requester proposes. Without a
        profile, dcmqrscp's ``+xr`` would prefer RLE for every context proposing it, C-GET included, and then fail
        every sub-operation of an uncompressed instance (it cannot encode RLE). Outgoing (C-MOVE sub-operations)
        proposes Explicit VR Little Endian, then Implicit VR Little Endian, as separate contexts.
        """
        classes = DCMQRSCP_STORAGE_CLASSES
        lines = [
            "# Generated by riskbridge sandbox: rewritten on every start.",
            "[[TransferSyntaxes]]",
            "[UncompressedOrRLE]",
            f"TransferSyntax1 = {EXPLICIT_VR_LITTLE_ENDIAN}",
            f"TransferSyntax2 = {IMPLICIT_VR_LITTLE_ENDIAN}",
            f"TransferSyntax3 = {RLE_LOSSLESS}",
            "[Explicit]",
            f"TransferSyntax1 = {EXPLICIT_VR_LITTLE_ENDIAN}",
            "[Implicit]",
            f"TransferSyntax1 = {IMPLICIT_VR_LITTLE_ENDIAN}",
            "",
            "[[PresentationContexts]]",
            "[IncomingStorage]",
            *(f"PresentationContext{i} = {uid}\\UncompressedOrRLE" for i, uid in enumerate(classes, start=1)),
            "[OutgoingStorage]",
            *(
                f"PresentationContext{2 * i + k + 1} = {uid}\\{syntax}"
                for i, uid in enumerate(classes)
                for k, syntax in enumerate(("Explicit", "Implicit"))
            ),
            "",
            "[[SCPSCURoleSelection]]",
            "[IncomingRoles]",
            *(f"Role{i} = {uid}\\BOTH" for i, uid in enumerate(classes, start=1)),
            "",
            "[[Profiles]]",
            "[Incoming]",
            "PresentationContexts = IncomingStorage",
            "SCPSCURoleSelection = IncomingRoles",
            "[Outgoing]",
            "PresentationContexts = OutgoingStorage",
        ]
        return "\n".join(lines) + "\n"

    def prepare(self, progress: ProgressCallback) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config())
        self.association_file.write_text(self.association_config())

    def command(self) -> tuple[list[str], dict[str, str], str | None]:
        binary = _require_binary("dcmqrscp", "dcmtk")
        argv = [
            str(binary),
            "--config",
            str(self.config_file),
            "--disable-host-lookup",  # the peer check then compares the caller's IP address, not a DNS name
            "--assoc-config-file",
            str(self.association_file),
            "Incoming",
            "Outgoing",
        ]
        # DCMTK leaves Nagle's algorithm on unless TCP_NODELAY is set: loading 534 instances took 27 s instead of 4 s.
        return argv, {"TCP_NODELAY": "1"}, None

    def ready(self) -> bool:
        try:
            dicom.echo(self.pacs, timeout_s=5.0)
        except dicom.DicomError:
            return False
        return True


class Sandbox:
    """The four sandbox servers, started, inspected and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.sandbox.dir.resolve()
        self.orthanc = _Orthanc(settings, self.root)
        self.hapi = _Hapi(settings, self.root)
        self.postgres = _Postgres(settings, self.root)
        self.dcmqrscp = _Dcmqrscp(settings, self.root)
        self.parts: tuple[_Part, ...] = (self.orthanc, self.hapi, self.postgres, self.dcmqrscp)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SandboxError(f"another 'riskbridge sandbox' command is working on {self.root}") from None
            yield

    def select(self, only: Sequence[str] | None) -> tuple[_Part, ...]:
        """Return the parts named in ``only`` (all parts when None); raise SandboxError for an unknown name.

        A HAPI on PostgreSQL (``sandbox.hapi_database = "postgresql"``) brings the postgres part along.
        """
        if only is None:
            return self.parts
        names = [part.name for part in self.parts]
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SandboxError(f"unknown sandbox part(s) {', '.join(unknown)}: choose from {', '.join(names)}")
        wanted = set(only)
        if self.hapi.name in wanted and self.hapi.on_postgres:
            wanted.add(self.postgres.name)
        return tuple(part for part in self.parts if part.name in wanted)

    def up(self, progress: ProgressCallback = _noop, only: Sequence[str] | None = None) -> list[PartStatus]:
        """Start every part (or those named in ``only``) that is not running and wait until all answer.

        Return the status of the parts concerned.
        """
        parts = self.select(only)
        with self._lock():
            for part in parts:
                part.check_prerequisites()
            to_start = [part for part in parts if part.running_pid() is None]
            for part in to_start:
                part.check_ports()
            # Every part is prepared (directories, config, the HAPI build, PostgreSQL's permission check) before any
            # starts, so that a part that cannot start leaves no other part of this call running.
            for part in to_start:
                part.prepare(progress)
            # A HAPI on PostgreSQL starts once PostgreSQL answers and HAPI's database has been created empty.
            later = [part for part in to_start if part is self.hapi and self.hapi.on_postgres]
            started: list[_Part] = []
            prepared: list[_Part] = []  # parts already waited for and given their after_ready work
            try:
                for part in to_start:
                    if part not in later:
                        part.start()
                        started.append(part)
                        progress(part.name, "started")
                if later:
                    self._wait_ready([self.postgres], progress)
                    self.postgres.after_ready(progress)
                    self.postgres.recreate_database(HAPI_POSTGRES_DATABASE, progress)
                    prepared.append(self.postgres)
                    for part in later:
                        part.start()
                        started.append(part)
                        progress(part.name, "started")
            except BaseException:
                for part in started:
                    part.stop()
                raise
            for part in parts:
                if part not in to_start:
                    progress(part.name, "already running")
            remaining = [part for part in parts if part not in prepared]
            self._wait_ready(remaining, progress)
            for part in remaining:
                part.after_ready(progress)
            return [part.status() for part in parts]

    def _wait_ready(self, parts: Sequence[_Part], progress: ProgressCallback) -> None:
        waiting = list(parts)
        deadline = time.monotonic() + self.settings.sandbox.ready_timeout_s
        while waiting:
            for part in list(waiting):
                reason = part.exited_early()
                if reason is not None:
                    raise SandboxError(f"{part.name} exited during start-up: {reason} (log: {part.log_file})")
                if part.serving():
                    progress(part.name, "ready")
                    waiting.remove(part)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(part.name for part in waiting)
                raise SandboxError(
                    f"not ready after {self.settings.sandbox.ready_timeout_s:.0f} s: {names} "
                    "(raise sandbox.ready_timeout_s or read the logs under the sandbox dir)"
                )
            time.sleep(0.5)

    def down(self, progress: ProgressCallback = _noop) -> list[str]:
        """Stop the processes this sandbox started; return the names of the parts that were running."""
        with self._lock():
            stopped = []
            for part in self.parts:
                if part.stop():
                    progress(part.name, "stopped")
                    stopped.append(part.name)
            return stopped

    def status(self) -> list[PartStatus]:
        """Report each part's state without changing anything."""
        return [part.status() for part in self.parts]
