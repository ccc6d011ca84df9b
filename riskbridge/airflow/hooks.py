"""Airflow hooks for riskbridge's three Connections, and the riskbridge Settings they produce.

``pacs_default`` (type ``riskbridge_pacs``), ``fhir_default`` (``riskbridge_fhir``) and ``riskbridge_db``
(``riskbridge_db``, or any PostgreSQL connection) say where the PACS, the FHIR server and the ledger are and hold the
credentials to reach them. :func:`settings_with_connections` lays them over the settings from riskbridge's config file
and environment, so a DAG task builds its Pipeline from Airflow's secrets, not from passwords in riskbridge.toml.
:func:`connections_from_settings` goes the other way: ``riskbridge airflow init`` seeds a local Airflow with it.

Connection fields (docs/operations.md has examples):

- PACS: host, port; extra: ``called_ae``, ``calling_ae``, ``scp_ae``, ``scp_port``, ``scp_bind_address``,
  ``dicomweb_url``, ``transport``, ``workers``, ``max_attempts``, ``timeout_s``, and for DICOM TLS all of
  ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``. Keys not given keep riskbridge's [pacs] value.
- FHIR: host = the base URL (``https://ehr.example/fhir/r4``; or a bare host with port and extra ``scheme``/``path``);
  extra ``auth_type`` none | basic (login, password) | bearer (password = token) | oauth2 (login = client id,
  password = client secret, ``token_url``, ``scope``) | smart (login = client id, ``token_url``,
  ``private_key_file``, ``key_id``, ``algorithm``, ``scope``); the [fhir] tuning keys (``timeout_s``, ``page_size``,
  ``batch_size``, ``max_url_length``, ``search_method``, ``search_workers``, ``pool_size``) may be given in extra too.
  The connection owns the authentication: without ``auth_type`` there is none.
- ledger: host, port, login, password, schema = database; every extra key is a libpq parameter (``sslmode``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from pydantic import BaseModel, ValidationError

from riskbridge.errors import ConfigurationError
from riskbridge.settings import DatabaseSettings, FhirSettings, PacsSettings, Settings

PACS_CONN_TYPE = "riskbridge_pacs"
FHIR_CONN_TYPE = "riskbridge_fhir"
DB_CONN_TYPE = "riskbridge_db"

_PACS_EXTRAS = (
    "called_ae",
    "calling_ae",
    "scp_ae",
    "scp_port",
    "scp_bind_address",
    "dicomweb_url",
    "transport",
    "workers",
    "max_attempts",
    "timeout_s",
    # who may connect to the storage SCP, and how much a peer may send (docs/retrieval.md "Who may connect")
    "scp_allowed_peers",
    "scp_allow_plaintext",
    "tls_handshake_timeout_s",
    "max_pdu_kb",
    "max_instance_mb",
)
_TLS_EXTRAS = ("tls_ca_file", "tls_cert_file", "tls_key_file")
_FHIR_TUNING_EXTRAS = (
    "timeout_s",
    "page_size",
    "batch_size",
    "max_url_length",
    "search_method",
    "search_workers",
    "pool_size",
)
_FHIR_AUTH_EXTRAS = ("auth_type", "token_url", "scope", "private_key_file", "key_id", "algorithm", "refresh_skew_s")
_FHIR_URL_EXTRAS = ("scheme", "path")


class ConnectionSettingsError(ConfigurationError, ValueError):
    """An Airflow Connection is missing or cannot become riskbridge settings; the message names it and the field."""


class ConnectionLike(Protocol):
    """The parts of an Airflow Connection the hooks read (``airflow.sdk.Connection`` has them)."""

    conn_id: str
    host: str | None
    port: int | None
    login: str | None
    password: str | None
    schema: str | None

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


def _extra(connection: ConnectionLike, conn_type: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Return the connection's extra without empty values; the UI's ``extra__<type>__`` prefix is accepted."""
    prefix = f"extra__{conn_type}__"
    extra = {
        (key[len(prefix) :] if key.startswith(prefix) else key): value
        for key, value in connection.extra_dejson.items()
        if value is not None and value != ""
    }
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise ConnectionSettingsError(
            f"connection {connection.conn_id!r}: unknown extra key(s) {', '.join(unknown)} "
            f"(a {conn_type} connection takes {', '.join(allowed)})"
        )
    return extra


def _validated(model: type[BaseModel], values: dict[str, Any], connection: ConnectionLike) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(all)'}: {error['msg']}" for error in exc.errors()
        )
        raise ConnectionSettingsError(f"connection {connection.conn_id!r}: {problems}") from None


def _refuse_unused(connection: ConnectionLike, conn_type: str, **fields: str | None) -> None:
    used = sorted(name for name, value in fields.items() if value)
    if used:
        raise ConnectionSettingsError(
            f"connection {connection.conn_id!r}: a {conn_type} connection does not use {', '.join(used)}"
        )


def pacs_settings_from_connection(connection: ConnectionLike, base: PacsSettings) -> PacsSettings:
    """Return ``base`` with the host, port and extra fields the PACS connection sets."""
    extra = _extra(connection, PACS_CONN_TYPE, _PACS_EXTRAS + _TLS_EXTRAS)
    _refuse_unused(connection, PACS_CONN_TYPE, login=connection.login, password=connection.password)
    if not connection.host:
        raise ConnectionSettingsError(f"connection {connection.conn_id!r}: host (the PACS) is not set")
    values = base.model_dump()
    values["host"] = connection.host
    if connection.port:
        values["port"] = connection.port
    values.update({key: extra[key] for key in _PACS_EXTRAS if key in extra})
    tls = {key.removeprefix("tls_"): extra[key] for key in _TLS_EXTRAS if key in extra}
    if tls:
        if len(tls) != len(_TLS_EXTRAS):
            raise ConnectionSettingsError(
                f"connection {connection.conn_id!r}: DICOM TLS needs all of {', '.join(_TLS_EXTRAS)}"
            )
        values["tls"] = tls
    settings: PacsSettings = _validated(PacsSettings, values, connection)
    return settings


def _fhir_base_url(connection: ConnectionLike, extra: Mapping[str, Any]) -> str:
    if not connection.host:
        raise ConnectionSettingsError(f"connection {connection.conn_id!r}: host (the FHIR base URL) is not set")
    if "://" in connection.host:
        if "scheme" in extra or "path" in extra:
            raise ConnectionSettingsError(
                f"connection {connection.conn_id!r}: the host is a full URL; extra scheme/path would contradict it"
            )
        parts = urlsplit(connection.host)
        if connection.port and parts.port is None:
            parts = parts._replace(netloc=f"{parts.netloc}:{connection.port}")
        return urlunsplit(parts)
    netloc = f"{connection.host}:{connection.port}" if connection.port else connection.host
    path = str(extra.get("path", "")).strip("/")
    return f"{extra.get('scheme', 'https')}://{netloc}/{path}".rstrip("/")


def _fhir_auth(connection: ConnectionLike, extra: Mapping[str, Any]) -> dict[str, Any]:
    auth_type = extra.get("auth_type", "none")
    login, password = connection.login or None, connection.password or None
    options = {key: extra[key] for key in _FHIR_AUTH_EXTRAS if key in extra and key != "auth_type"}
    auth: dict[str, Any] = {"type": auth_type, **options}
    if auth_type == "none":
        if login or password:
            raise ConnectionSettingsError(
                f"connection {connection.conn_id!r}: login/password are set but extra auth_type is not "
                "(basic, bearer, oauth2 or smart)"
            )
    elif auth_type == "basic":
        auth.update(username=login, password=password)
    elif auth_type == "bearer":
        _refuse_unused(connection, f"{FHIR_CONN_TYPE} (bearer)", login=login)
        auth.update(token=password)
    elif auth_type == "oauth2":
        auth.update(client_id=login, client_secret=password)
    elif auth_type == "smart":
        _refuse_unused(connection, f"{FHIR_CONN_TYPE} (smart: the key file signs)", password=password)
        auth.update(client_id=login)
    return auth


def fhir_settings_from_connection(connection: ConnectionLike, base: FhirSettings) -> FhirSettings:
    """Return ``base`` with the base URL and authentication of the FHIR connection (and any tuning keys it sets)."""
    extra = _extra(connection, FHIR_CONN_TYPE, _FHIR_TUNING_EXTRAS + _FHIR_AUTH_EXTRAS + _FHIR_URL_EXTRAS)
    _refuse_unused(connection, FHIR_CONN_TYPE, schema=connection.schema)
    values = base.model_dump()
    values["base_url"] = _fhir_base_url(connection, extra)
    values["auth"] = _fhir_auth(connection, extra)
    values.update({key: extra[key] for key in _FHIR_TUNING_EXTRAS if key in extra})
    settings: FhirSettings = _validated(FhirSettings, values, connection)
    return settings


def postgres_dsn_from_connection(connection: ConnectionLike) -> str:
    """Return the ``postgresql://`` DSN of a PostgreSQL connection; extra keys become libpq query parameters."""
    from psycopg2.extensions import parse_dsn

    missing = [name for name in ("host", "schema") if not getattr(connection, name)]
    if missing:
        raise ConnectionSettingsError(
            f"connection {connection.conn_id!r}: {' and '.join(missing)} not set (schema is the database name)"
        )
    user = quote(connection.login or "", safe="")
    password = quote(connection.password or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    port = f":{connection.port}" if connection.port else ""
    extra = {key: str(value) for key, value in sorted(connection.extra_dejson.items()) if value not in (None, "")}
    query = f"?{urlencode(extra)}" if extra else ""
    dsn = f"postgresql://{credentials}{connection.host}{port}/{quote(connection.schema or '', safe='')}{query}"
    try:
        parse_dsn(dsn)
    except Exception as exc:  # psycopg2.ProgrammingError names the bad libpq parameter
        raise ConnectionSettingsError(f"connection {connection.conn_id!r}: not a valid PostgreSQL DSN: {exc}") from None
    return dsn


class _RiskbridgeHook(BaseHook):
    """A hook whose connection id is an instance attribute named by ``conn_name_attr``."""

    conn_name_attr: str
    default_conn_name: str

    def __init__(self, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        setattr(self, self.conn_name_attr, conn_id or self.default_conn_name)

    @property
    def conn_id(self) -> str:
        """The Airflow connection id this hook reads."""
        conn_id: str = getattr(self, self.conn_name_attr)
        return conn_id

    def connection(self) -> ConnectionLike:
        """Fetch the connection; a missing one raises :class:`ConnectionSettingsError` saying how to create it."""
        try:
            return self.get_connection(self.conn_id)
        except AirflowNotFoundException:
            raise ConnectionSettingsError(
                f"Airflow connection {self.conn_id!r} is not defined: create it (riskbridge airflow init seeds it "
                f"from riskbridge's settings) or set AIRFLOW_CONN_{self.conn_id.upper()}"
            ) from None


class PacsHook(_RiskbridgeHook):
    """The PACS riskbridge queries and retrieves from: DICOM host, port, AE titles and TLS files."""

    conn_name_attr = "pacs_conn_id"
    default_conn_name = "pacs_default"
    conn_type = PACS_CONN_TYPE
    hook_name = "riskbridge PACS (DICOM)"

    def pacs_settings(self, base: PacsSettings | None = None) -> PacsSettings:
        """Return ``base`` (default: riskbridge's defaults) overridden by this connection."""
        return pacs_settings_from_connection(self.connection(), base or PacsSettings())

    def get_conn(self) -> PacsSettings:
        """Return the PACS settings this connection describes (riskbridge's connectors open associations)."""
        return self.pacs_settings()


class FhirHook(_RiskbridgeHook):
    """The FHIR R4 server labs and notes come from and RiskAssessments go to: base URL and authentication."""

    conn_name_attr = "fhir_conn_id"
    default_conn_name = "fhir_default"
    conn_type = FHIR_CONN_TYPE
    hook_name = "riskbridge FHIR server"

    def fhir_settings(self, base: FhirSettings | None = None) -> FhirSettings:
        """Return ``base`` (default: riskbridge's defaults) with this connection's URL, auth and tuning keys."""
        return fhir_settings_from_connection(self.connection(), base or FhirSettings())

    def get_conn(self) -> FhirSettings:
        """Return the FHIR settings this connection describes (riskbridge's FHIR client connects with them)."""
        return self.fhir_settings()


class RiskbridgeDbHook(_RiskbridgeHook):
    """The PostgreSQL ledger: host, port, login, password, database (schema) and libpq parameters in extra."""

    conn_name_attr = "riskbridge_db_conn_id"
    default_conn_name = "riskbridge_db"
    conn_type = DB_CONN_TYPE
    hook_name = "riskbridge ledger (PostgreSQL)"

    def database_settings(self) -> DatabaseSettings:
        """Return the [database] settings with this connection's DSN."""
        from pydantic import SecretStr

        return DatabaseSettings(dsn=SecretStr(postgres_dsn_from_connection(self.connection())))

    def get_conn(self) -> DatabaseSettings:
        """Return the ledger settings this connection describes (the Pipeline opens the ledger with them)."""
        return self.database_settings()


def settings_with_connections(settings: Settings) -> Settings:
    """Return ``settings`` with [pacs], [fhir] and [database] taken from the Airflow Connections [airflow] names.

    A connection id set to an empty string leaves that section as riskbridge's config file and environment say.
    """
    names = settings.airflow
    update: dict[str, Any] = {}
    if names.pacs_conn_id:
        update["pacs"] = PacsHook(names.pacs_conn_id).pacs_settings(settings.pacs)
    if names.fhir_conn_id:
        update["fhir"] = FhirHook(names.fhir_conn_id).fhir_settings(settings.fhir)
    if names.db_conn_id:
        update["database"] = RiskbridgeDbHook(names.db_conn_id).database_settings()
    return settings.model_copy(update=update)


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def pacs_connection(pacs: PacsSettings) -> dict[str, Any]:
    """Return the JSON form (as in ``AIRFLOW_CONN_PACS_DEFAULT``) of a PACS connection equal to ``pacs``."""
    extra: dict[str, Any] = {key: getattr(pacs, key) for key in _PACS_EXTRAS}
    if pacs.tls is not None:
        extra.update(
            tls_ca_file=str(pacs.tls.ca_file),
            tls_cert_file=str(pacs.tls.cert_file),
            tls_key_file=str(pacs.tls.key_file),
        )
    return {"conn_type": PACS_CONN_TYPE, "host": pacs.host, "port": pacs.port, "extra": _without_none(extra)}


def fhir_connection(fhir: FhirSettings) -> dict[str, Any]:
    """Return the JSON form of a FHIR connection equal to ``fhir`` (secrets included: it feeds Airflow's store)."""
    auth = fhir.auth
    secret = auth.password or auth.token or auth.client_secret
    login = auth.username or auth.client_id
    extra: dict[str, Any] = {key: getattr(fhir, key) for key in _FHIR_TUNING_EXTRAS}
    extra["auth_type"] = auth.type
    if auth.type in ("oauth2", "smart"):
        extra.update(token_url=auth.token_url, scope=auth.scope, refresh_skew_s=auth.refresh_skew_s)
    if auth.type == "smart":
        extra.update(private_key_file=str(auth.private_key_file), key_id=auth.key_id, algorithm=auth.algorithm)
    connection = {
        "conn_type": FHIR_CONN_TYPE,
        "host": fhir.base_url,
        "login": login,
        "password": secret.get_secret_value() if secret is not None else None,
        "extra": _without_none(extra),
    }
    return _without_none(connection)


def database_connection(database: DatabaseSettings) -> dict[str, Any]:
    """Return the JSON form of a ledger connection equal to ``database``'s DSN (URL or key=value form)."""
    from psycopg2.extensions import parse_dsn

    params = parse_dsn(database.dsn.get_secret_value())
    connection = {
        "conn_type": DB_CONN_TYPE,
        "host": params.pop("host", None),
        "port": int(params.pop("port")) if "port" in params else None,
        "login": params.pop("user", None),
        "password": params.pop("password", None),
        "schema": params.pop("dbname", None),
        "extra": params,
    }
    return _without_none(connection)


def connections_from_settings(settings: Settings) -> dict[str, dict[str, Any]]:
    """Return the Connections [airflow] names, in JSON form, describing riskbridge's [pacs], [fhir], [database]."""
    names = settings.airflow
    connections: dict[str, dict[str, Any]] = {}
    if names.pacs_conn_id:
        connections[names.pacs_conn_id] = pacs_connection(settings.pacs)
    if names.fhir_conn_id:
        connections[names.fhir_conn_id] = fhir_connection(settings.fhir)
    if names.db_conn_id:
        connections[names.db_conn_id] = database_connection(settings.database)
    return connections
