"""One validated settings object for riskbridge: defaults < config file < ``RISKBRIDGE_*`` environment.

The defaults point at the loopback sandbox (``riskbridge sandbox up``), so a fresh clone works with no
configuration. A site writes a TOML file (``--config`` or ``RISKBRIDGE_CONFIG``) and overrides single keys
through the environment with ``__`` between levels, e.g. ``RISKBRIDGE_PACS__PORT=104``.

Every validation problem becomes one :class:`SettingsError` whose message names the key, e.g.
``pacs.port: Input should be a valid integer (value 'abc')``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from riskbridge.credentials import default_secret_problems
from riskbridge.errors import ConfigurationError
from riskbridge.hosts import is_loopback_host

ENV_PREFIX = "RISKBRIDGE_"
CONFIG_ENV = "RISKBRIDGE_CONFIG"
DEFAULT_CONFIG_FILE = Path("riskbridge.toml")

_AE_TITLE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-. ")


class SettingsError(ConfigurationError):
    """Raised when settings cannot be loaded; the message names every offending key."""


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if not set(value) <= _AE_TITLE_CHARS or value.strip() != value:
        raise ValueError("an AE title uses letters, digits, '_', '-', '.' and no leading/trailing spaces")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """TLS files for a DICOM association; all three or none."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path


class PacsSettings(_Section):
    """The PACS riskbridge queries (C-FIND) and retrieves from, and riskbridge's own storage SCP."""

    host: str = "127.0.0.1"
    port: int = Field(14242, ge=1, le=65535)
    called_ae: str = "ORTHANC"
    calling_ae: str = "RISKBRIDGE"
    scp_ae: str = "RISKBRIDGE_SCP"
    scp_port: int = Field(11113, ge=1, le=65535)
    # Where riskbridge's storage SCP listens; a site whose PACS is on another host sets its own interface.
    scp_bind_address: str = "127.0.0.1"
    # Peers (IP addresses or CIDR networks) the storage SCP accepts connections from, checked before TLS and before any
    # DICOM is read; empty: the addresses `host` resolves to (all of loopback when one is a loopback address).
    scp_allowed_peers: list[str] = []
    # Off loopback the SCP needs [pacs.tls]: without it images and their patients' names cross the network in clear.
    # true accepts that (`riskbridge doctor` then warns).
    scp_allow_plaintext: bool = False
    # A client that connects to the storage SCP and does not finish its TLS handshake in this time is dropped.
    tls_handshake_timeout_s: float = Field(10.0, gt=0)
    # The largest PDU riskbridge receives, as SCP and SCU (peers fragment by it). 1 MiB holds a whole 512x512 CT slice,
    # so a slice still arrives in one PDU as with the unlimited size used before; unlimited let a peer announce a 4 GiB
    # PDU that pynetdicom would buffer whole.
    max_pdu_kb: int = Field(1024, ge=16, le=65536)
    # The largest DIMSE message (one instance) riskbridge receives over C-MOVE or C-GET; past it the association is
    # aborted. Received messages are held in memory until complete, so this bounds memory per association.
    max_instance_mb: int = Field(512, ge=1, le=4096)
    dicomweb_url: str | None = "http://127.0.0.1:18042/dicom-web"
    # DicomwebSettings is defined after FhirAuth, which it reuses: hence the factory.
    dicomweb: DicomwebSettings = Field(default_factory=lambda: DicomwebSettings())
    tls: TlsSettings | None = None
    transport: Literal["auto", "c-move", "c-get", "dicomweb"] = "auto"
    # Parallel retrieval worker processes. For C-MOVE, worker i receives on AE title scp_ae + i at scp_port + i
    # (worker 0 on scp_ae itself): register each one in the PACS.
    workers: int = Field(2, ge=1, le=16)
    max_attempts: int = Field(3, ge=1, le=10)
    timeout_s: float = Field(30.0, gt=0)
    # Attributes the PACS's C-FIND does not return (ImageType, SliceThickness, OtherPatientIDsSequence, ...) read from
    # one retrieved instance per series: off, when-needed (only what C-FIND left out) or always; at most
    # header_sample_limit series per study (docs/series-selection.md "Header sampling").
    header_sampling: Literal["off", "when-needed", "always"] = "when-needed"
    header_sample_limit: int = Field(8, ge=1, le=64)
    # Free space the staging filesystem keeps beyond a series' expected size: a series that would eat into it is not
    # retrieved, its study is quarantined staging_disk_full (docs/retrieval.md "Staging on disk").
    staging_min_free_mb: int = Field(1024, ge=0)
    # The expected size of one instance (C-FIND tells no sizes): a 512x512 16-bit CT slice with its header.
    staging_instance_kb: int = Field(520, ge=1)

    _ae = field_validator("called_ae", "calling_ae", "scp_ae")(_check_ae_title)

    @field_validator("scp_allowed_peers")
    @classmethod
    def _peers_are_networks(cls, peers: list[str]) -> list[str]:
        import ipaddress

        for peer in peers:
            try:
                ipaddress.ip_network(peer, strict=True)
            except ValueError as exc:
                raise ValueError(f"{peer!r}: {exc} (give an IP address or a network such as 10.20.0.0/16)") from None
        return peers

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> PacsSettings:
        if self.scp_plaintext_off_loopback() and not self.scp_allow_plaintext:
            raise ValueError(
                f"scp_bind_address {self.scp_bind_address!r} is not a loopback address and [pacs.tls] is not set: the "
                "storage SCP would receive images unencrypted; configure [pacs.tls], or set scp_allow_plaintext = true "
                "to accept that"
            )
        return self

    def scp_plaintext_off_loopback(self) -> bool:
        """True when the storage SCP would listen without TLS on an address other than loopback."""
        return self.tls is None and not self.is_loopback(self.scp_bind_address)

    @staticmethod
    def is_loopback(address: str) -> bool:
        """True for a loopback IP address (IPv4-mapped IPv6 too) and ``localhost``; any other host name is not."""
        return is_loopback_host(address)

    @model_validator(mode="after")
    def _worker_ae_titles_fit(self) -> PacsSettings:
        if self.workers > 1:
            _check_ae_title(f"{self.scp_ae}{self.workers - 1}")
        if self.scp_port + self.workers - 1 > 65535:
            raise ValueError("scp_port + workers - 1 exceeds 65535")
        return self

    def scp_endpoints(self) -> list[tuple[str, int]]:
        """Return the storage SCP ``(AE title, port)`` of each retrieval worker."""
        return [(self.scp_ae if i == 0 else f"{self.scp_ae}{i}", self.scp_port + i) for i in range(self.workers)]


class FhirAuth(_Section):
    """How riskbridge authenticates to the FHIR server.

    ``none``; ``basic`` (username, password); ``bearer`` (a fixed token); ``oauth2`` (client credentials grant with
    client_id and client_secret at token_url); ``smart`` (SMART Backend Services: client credentials with a
    private_key_jwt client assertion signed with private_key_file, identified by key_id, RS384 or ES384).
    """

    type: Literal["none", "basic", "bearer", "oauth2", "smart"] = "none"
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    private_key_file: Path | None = None
    key_id: str | None = None
    algorithm: Literal["RS384", "ES384"] = "RS384"
    scope: str | None = None
    # A cached access token is renewed this long before the expiry its token endpoint announced.
    refresh_skew_s: float = Field(30.0, ge=0)

    @field_validator("token_url")
    @classmethod
    def _token_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("private_key_file")
    @classmethod
    def _key_file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _required_for_type(self) -> FhirAuth:
        required: dict[str, tuple[str, ...]] = {
            "none": (),
            "basic": ("username", "password"),
            "bearer": ("token",),
            "oauth2": ("token_url", "client_id", "client_secret"),
            "smart": ("token_url", "client_id", "private_key_file", "key_id", "scope"),
        }
        missing = [name for name in required[self.type] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"auth type {self.type!r} needs {', '.join(missing)}")
        return self


class HttpTlsSettings(_Section):
    """TLS of an HTTPS client: a site CA bundle instead of the system CAs, and a client certificate for mutual TLS.

    PEM files; ``cert_file`` and ``key_file`` go together. The server's certificate is always verified.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> HttpTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its private key)")
        return self


class DicomwebSettings(_Section):
    """Credentials, TLS and limits of the DICOMweb client of ``pacs.dicomweb_url`` (docs/retrieval.md "DICOMweb
    security").

    ``auth`` takes the options of ``fhir.auth`` (none, basic, bearer, oauth2, smart); with credentials,
    ``pacs.dicomweb_url`` and the token URL must be https:// unless their host is loopback.
    """

    auth: FhirAuth = FhirAuth()
    tls: HttpTlsSettings = HttpTlsSettings()
    # A WADO-RS part (one instance) larger than this fails its request; nothing larger is written to staging.
    max_part_mb: int = Field(512, ge=1, le=65536)
    # Of an HTTP error answer at most this much is read, for the reason in the error message.
    max_error_body_kb: int = Field(4, ge=1, le=1024)
    # QIDO-RS asks for this many matches per page (limit and offset) ...
    qido_page_size: int = Field(1000, ge=1, le=10000)
    # ... and a listing that still grows after this many pages fails (a server paging without end).
    max_pages: int = Field(100, ge=1, le=100000)


class FhirRetry(_Section):
    """When and how long the FHIR client retries 429, 502, 503, 504 and connection errors."""

    max_attempts: int = Field(5, ge=1, le=20)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    # A Retry-After longer than this is not waited for: the request fails instead of stalling the nightly run.
    max_retry_after_s: float = Field(120.0, ge=0)


class FhirSettings(_Section):
    """The FHIR R4 server labs and notes come from and RiskAssessments go to."""

    base_url: str = "http://127.0.0.1:18080/fhir"
    auth: FhirAuth = FhirAuth()
    timeout_s: float = Field(30.0, gt=0)
    # Searches ask for this many resources per page (``_count``); servers may cap it silently (HAPI's paging
    # provider: its maximum page size, 1000 in the sandbox). Fewer pages mean fewer requests for the same resources.
    page_size: int = Field(1000, ge=1, le=1000)
    # Batched searches put this many patients at most into one OR-list ...
    batch_size: int = Field(200, ge=1, le=5000)
    # ... and split it further so a GET search URL stays below this many characters.
    max_url_length: int = Field(6000, ge=512, le=65536)
    # "post" sends searches as POST [type]/_search with a form body (no URL length limit, nothing in access logs).
    search_method: Literal["get", "post"] = "get"
    # Batched searches run this many OR-list chunks at once (threads sharing the connection pool).
    search_workers: int = Field(1, ge=1, le=16)
    # A search that still has a link[next] after this many pages fails (a server paging without end).
    max_pages: int = Field(10000, ge=1)
    # A note attachment (Binary or inline data) larger than this is not read: the note counts as unreadable.
    max_attachment_bytes: int = Field(20 * 1024 * 1024, ge=1)
    pool_size: int = Field(8, ge=1, le=64)
    retry: FhirRetry = FhirRetry()

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class DatabaseSettings(_Section):
    """The PostgreSQL ledger."""

    dsn: SecretStr = SecretStr("postgresql://riskbridge@127.0.0.1:15432/riskbridge")


class SiteSettings(_Section):
    """Facts about the hospital that data does not always carry."""

    # IANA zone for times without an offset (DICOM without TimezoneOffsetFromUTC, partial FHIR dates). No default:
    # guessing a zone shifts every window by hours.
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown IANA time zone {value!r} (e.g. 'America/New_York')") from None
        return value


class IdentitySettings(_Section):
    """How PACS patients are matched to FHIR Patients (see docs/identity.md)."""

    # IssuerOfPatientID -> FHIR identifier system, e.g. {"SYNTH_HOSP" = "http://hospital.example/mrn"}.
    issuer_systems: dict[str, str] = {}
    default_issuer: str | None = None  # stands in for a missing IssuerOfPatientID; must be a key above
    site_prefix_pattern: str | None = r"^[A-Z][A-Z0-9]*-"  # one site prefix removed before comparing (None: off)
    fallback: bool = False  # Jaro-Winkler on names + exact birth date when no identifier resolves
    fallback_link_threshold: float = Field(0.97, gt=0, le=1)
    fallback_review_threshold: float = Field(0.88, gt=0, le=1)

    @model_validator(mode="after")
    def _default_is_mapped(self) -> IdentitySettings:
        if self.default_issuer is not None and self.default_issuer not in self.issuer_systems:
            raise ValueError(f"default_issuer {self.default_issuer!r} is not a key of issuer_systems")
        if self.fallback_review_threshold > self.fallback_link_threshold:
            raise ValueError("fallback_review_threshold must not exceed fallback_link_threshold")
        return self


class WritebackSettings(_Section):
    """How RiskAssessments are identified, coded and bundled (see riskbridge/writeback.py)."""

    identifier_system: str = "urn:riskbridge:risk-assessment"
    outcome_system: str = "http://snomed.info/sct"
    outcome_code: str = "363358000"
    outcome_display: str = "Malignant tumor of lung"
    low_below: float = Field(0.1, gt=0, lt=1)  # probability below this: low
    high_from: float = Field(0.3, gt=0, lt=1)  # from this on: high; between: moderate
    bundle_size: int = Field(50, ge=1, le=500)
    # Transaction bundles posted at once. Each bundle holds other identifiers than the rest, so concurrency never
    # duplicates a RiskAssessment; 2 used both cores of a 2-core HAPI (bench/fhir_io.py).
    bundle_workers: int = Field(2, ge=1, le=16)

    @model_validator(mode="after")
    def _ordered(self) -> WritebackSettings:
        if not self.low_below < self.high_from:
            raise ValueError("low_below must be smaller than high_from")
        return self


class RunSettings(_Section):
    """How ``riskbridge run`` and the DAGs run the pipeline: chunk sizes, the report directory, the model package."""

    report_dir: Path = Path(".riskbridge/reports")  # each run's HTML report goes to <report_dir>/<run_id>/
    retrieve_chunk_size: int = Field(8, ge=1, le=1000)  # chosen series per retrieve task (Airflow map index)
    clinical_chunk_size: int = Field(50, ge=1, le=5000)  # studies per clinical task (batched FHIR searches)
    model_package: Path | None = None  # a model package directory; None: the reference model shipped with riskbridge
    # The active package's sha256 (`riskbridge score`/train print it): every run verifies the package against it
    # before it judges or scores, so a package replaced on disk stops the run instead of scoring with another model.
    model_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    # A candidate package scored in shadow next to the active one: ledger and report only, never the FHIR server.
    shadow_package: Path | None = None
    shadow_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    score_workers: int = Field(0, ge=0, le=32)  # DataLoader processes that preprocess volumes while the model scores
    # A run that quarantines more than this share of the studies it discovered fails at the end (report written
    # first) instead of finishing green: usually a site setting that matches nothing. 1.0 turns the alert off.
    quarantine_alert_fraction: float = Field(0.8, gt=0, le=1)
    quarantine_alert_min_studies: int = Field(10, ge=1)  # smaller runs never alert
    # The site's key for the pseudonyms logs give UIDs and MRNs (riskbridge.records.uid_hash): made with 32 random
    # bytes, mode 0600, when missing. Every process of a site must read the same file (give an absolute path);
    # RISKBRIDGE_PSEUDONYM_KEY, when set, is the key instead.
    pseudonym_key_file: Path = Path(".riskbridge/pseudonym.key")


class ExportSettings(_Section):
    """How ``riskbridge cohort export`` labels and pseudonymizes a site's training table (docs/site-training.md)."""

    label_spec: str = "chest_ct"  # a shipped label spec's name, or the path of a YAML label spec
    # The key of the HMAC that turns (FHIR Patient id, StudyInstanceUID) into a table row's key. Keep it secret and
    # the same across exports of one site (the same patient keeps the same key); without it nothing is exported.
    pseudonym_secret: SecretStr | None = None
    # How the labels' resources are read: FHIR Bulk Data $export (one server-side job), batched searches, or
    # auto: $export when the server's CapabilityStatement declares it at Patient level, else searches.
    clinical_source: Literal["auto", "bulk", "search"] = "auto"
    bulk_timeout_s: float = Field(3600.0, gt=0)  # the longest wait for the export job
    bulk_max_poll_interval_s: float = Field(30.0, gt=0)  # HAPI always asks for 120 s; poll at least this often

    @field_validator("pseudonym_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the pseudonym secret needs at least 16 characters")
        return value


class MonitorSettings(_Section):
    """What ``riskbridge monitor`` and the weekly ``riskbridge_monitor`` DAG compare, and when they alert
    (docs/site-training.md "Monitoring"). PSI below 0.1 is the usual "no shift", 0.1 to 0.25 "some", above 0.25
    "a shift to act on"."""

    # The training table of the active model (riskbridge cohort export's output); its features are the reference.
    training_table: Path | None = None
    schedule: str = "0 6 * * 1"  # riskbridge_monitor's cron, in site.timezone: Mondays 06:00, the week before
    psi_warn: float = Field(0.1, gt=0)
    psi_alert: float = Field(0.25, gt=0)
    # An alert also needs the shift to be significant at the window's size (KS, Fisher's exact or chi-square test):
    # PSI of a small site's week is mostly noise (riskbridge.model.drift.DriftThresholds says why).
    p_alert: float = Field(0.001, gt=0, lt=1)
    missing_share_alert: float = Field(0.15, gt=0, le=1)  # a feature's missing share moved this much (absolute)
    auroc_drop_alert: float = Field(0.10, gt=0, le=1)  # AUROC on arrived labels this far below the package's own
    ece_alert: float = Field(0.10, gt=0, le=1)
    min_current: int = Field(30, ge=1)  # fewer values in the window: reported, never an alert
    # The weekly DAG judges outcomes of the scans this long before its week: a label needs the horizon (365 days
    # for the shipped spec) plus follow-up evidence after it.
    outcome_lag_days: int = Field(455, ge=1, le=3650)


class AirflowSettings(_Section):
    """How the Airflow DAGs schedule, retry and place the pipeline's tasks (docs/operations.md)."""

    schedule: str = "0 2 * * *"  # riskbridge_nightly's cron, in site.timezone (UTC when unset)
    # The first nightly run covers the hours before it; every later one covers from where the last one ended (the
    # watermark) to its trigger, DST nights and missed nights included (docs/operations.md "Coverage").
    nightly_window_hours: int = Field(24, ge=1, le=744)
    # Each nightly run also rediscovers this long before the watermark: studies that reached the PACS late, and
    # quarantined studies whose labs or identity may have arrived since. Decided studies cost one C-FIND row.
    nightly_lookback_hours: int = Field(72, ge=1, le=2160)
    # A nightly run further behind its trigger than this fails, naming the gap and the backfill that covers it.
    nightly_max_catchup_hours: int = Field(168, ge=24, le=8760)
    retries: int = Field(3, ge=0, le=20)
    retry_delay_s: float = Field(60.0, gt=0)
    retry_backoff: float = Field(2.0, ge=0)  # delay multiplier per retry (60 s, 120 s, 240 s); 0: constant delay
    max_retry_delay_s: float = Field(1800.0, gt=0)
    task_timeout_min: float = Field(120.0, gt=0)  # execution timeout of every task
    # Retrieve tasks at once, each with one slot and up to pacs.workers associations: slots x workers at the PACS.
    pacs_pool: str = "pacs_associations"
    pacs_pool_slots: int = Field(2, ge=1, le=256)
    gpu_pool: str = "gpu"
    gpu_pool_slots: int = Field(1, ge=1, le=64)
    score_queue: str | None = None  # executor queue for scoring (CeleryExecutor: "gpu"); None: the default queue
    clinical_parallelism: int = Field(2, ge=1, le=64)  # clinical tasks of one run at once (FHIR server load)
    # Airflow Connections the tasks read credentials from; "" (or None): use this file's [pacs], [fhir], [database].
    pacs_conn_id: str | None = "pacs_default"
    fhir_conn_id: str | None = "fhir_default"
    db_conn_id: str | None = "riskbridge_db"
    home: Path = Path(".riskbridge/airflow")  # the AIRFLOW_HOME `riskbridge airflow init` prepares

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r} (e.g. '0 2 * * *')")
        return value


class RetentionSettings(_Section):
    """How long the ledger keeps patient identifiers (``riskbridge db purge``; docs/ledger.md "PHI and retention")."""

    # A run without activity (start, a stage, finish) for this many days loses its studies' patient identifiers (PACS
    # patient ids, other ids, accession numbers, names, birth dates, sex, study description) and its on-demand lists,
    # and can no longer be resumed; UIDs, decisions, scores and the outbox stay.
    phi_days: int = Field(30, ge=1, le=3650)
    # Sooner, the names and birth dates of studies that never got an identity decision (their run stopped before
    # match): a decided study loses them at once. A run resumed after this matches by identifiers only.
    undecided_days: int = Field(7, ge=1, le=3650)
    # Staged images (whole DICOM files, names included): remove-scored deletes a run's scored series when the run
    # finishes (a rescore retrieves them again); keep leaves them. Anything else staged goes after staging_days
    # (`riskbridge staging purge`, docs/retrieval.md "Staging retention").
    staging_after_run: Literal["keep", "remove-scored"] = "remove-scored"
    staging_days: float = Field(7.0, gt=0, le=3650)

    @model_validator(mode="after")
    def _undecided_first(self) -> RetentionSettings:
        if self.undecided_days > self.phi_days:
            raise ValueError("undecided_days must not exceed phi_days")
        return self


class SandboxSettings(_Section):
    """Ports and state directory of the loopback sandbox (``riskbridge sandbox up``)."""

    dir: Path = Path(".riskbridge/sandbox")
    orthanc_http_port: int = Field(18042, ge=1, le=65535)
    hapi_port: int = Field(18080, ge=1, le=65535)
    hapi_java_opts: str = "-Xmx1g -XX:+UseSerialGC"
    # HAPI FHIR's database: "h2" (in memory, the default) or "postgresql" (a database "hapi" in the sandbox's own
    # PostgreSQL, which then starts first); docs/sandbox.md, "HAPI FHIR".
    hapi_database: Literal["h2", "postgresql"] = "h2"
    postgres_port: int = Field(15432, ge=1, le=65535)
    # AE titles a test or site tool may call Orthanc (and the dcmqrscp) from (dcmtk's findscu/movescu in the tests).
    extra_calling_aes: list[str] = ["DCMTK"]
    ready_timeout_s: float = Field(240.0, gt=0)
    # dcmtk's Query/Retrieve SCP: a second, stricter PACS (docs/sandbox.md); binds on all interfaces, like Orthanc.
    dcmqrscp_port: int = Field(14243, ge=1, le=65535)
    dcmqrscp_ae: str = "DCMQRSCP"

    _ae = field_validator("extra_calling_aes")(lambda v: [_check_ae_title(a) for a in v])
    _dcmqrscp_ae = field_validator("dcmqrscp_ae")(_check_ae_title)


class Settings(BaseSettings):
    """All of riskbridge's settings; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    pacs: PacsSettings = PacsSettings()
    fhir: FhirSettings = FhirSettings()
    database: DatabaseSettings = DatabaseSettings()
    staging_dir: Path = Path(".riskbridge/staging")
    model_dir: Path = Path(".riskbridge/models")
    series_rules: str = "chest_ct"  # a shipped rule set's name, or the path of a YAML rule file
    feature_spec: str = "chest_ct"  # a shipped feature spec's name, or the path of a YAML spec
    units_table: Path | None = None  # a site's unit table, on top of the shipped one (docs/units.md)
    site: SiteSettings = SiteSettings()
    identity: IdentitySettings = IdentitySettings()
    writeback: WritebackSettings = WritebackSettings()
    run: RunSettings = RunSettings()
    export: ExportSettings = ExportSettings()
    monitor: MonitorSettings = MonitorSettings()
    airflow: AirflowSettings = AirflowSettings()
    sandbox: SandboxSettings = SandboxSettings()
    retention: RetentionSettings = RetentionSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file arrives as init kwargs; the environment overrides it key by key.
        return env_settings, init_settings


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    value = error.get("input")
    shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" (value {value!r})"
    if any(secret in key for secret in ("password", "token", "secret", "dsn")):
        shown = ""
    return f"{key}: {message}{shown}"


def names_a_file(value: str) -> bool:
    """True when a name-or-path setting (``series_rules``, ``feature_spec``) names a YAML file, not a shipped one."""
    return value.endswith((".yaml", ".yml")) or "/" in value


def config_file_path(explicit: Path | None = None) -> Path | None:
    """Return the config file to read: ``explicit``, else ``$RISKBRIDGE_CONFIG``, else ./riskbridge.toml if present."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(config_file: Path | None = None) -> Settings:
    """Load and validate settings; raise :class:`SettingsError` naming each bad or missing key."""
    path = config_file_path(config_file)
    values = _read_config_file(path) if path is not None else {}
    source = f" (config file {path})" if path else ""
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(_describe(dict(error)) for error in exc.errors())
        raise SettingsError(f"invalid settings{source}: {problems}") from None
    # Checked on the whole object: whether a default password is acceptable depends on the servers of its section.
    defaults = default_secret_problems(settings)
    if defaults:
        raise SettingsError(f"invalid settings{source}: {'; '.join(defaults)}")
    return settings
