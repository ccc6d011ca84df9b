"""PostgreSQL I/O for the ledger through psycopg2: connections from the configured DSN.

No message raised here holds the DSN's password: a malformed DSN is described by its problem (libpq's own message
quotes the text around the error, which may be the password, so quoted fragments are left out), a failed connection
by user, host, port and database name.
"""

from __future__ import annotations

import re

import psycopg2
import psycopg2.extensions

from riskbridge.errors import ConfigurationError, LedgerError
from riskbridge.settings import DatabaseSettings

# libpq's connection keywords: quoted in a parse error, these name the problem and never a secret.
_KEYWORDS = frozenset((
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "channel_binding", "connect_timeout",
    "client_encoding", "options", "application_name", "fallback_application_name", "keepalives", "keepalives_idle",
    "keepalives_interval", "keepalives_count", "tcp_user_timeout", "replication", "gssencmode", "sslmode",
    "requiressl", "sslcompression", "sslcert", "sslkey", "sslpassword", "sslrootcert", "sslcrl", "sslcrldir",
    "sslsni", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version", "krbsrvname", "gsslib",
    "service", "target_session_attrs", "load_balance_hosts",
))  # fmt: skip
_QUOTED = re.compile(r'"([^"]*)"')


class DatabaseError(LedgerError):
    """The ledger database could not be reached or used; the message says which and why (never the password)."""


class MalformedDsnError(DatabaseError, ConfigurationError):
    """``database.dsn`` cannot be parsed; the message names the problem, never the DSN or its password."""


def connect(database: DatabaseSettings, timeout_s: int = 5) -> psycopg2.extensions.connection:
    """Open a psycopg2 connection to the ledger database; raise :class:`MalformedDsnError` for a DSN that cannot
    be parsed and :class:`DatabaseError` for one that cannot connect."""
    dsn = database.dsn.get_secret_value()
    params = parse_dsn(dsn)
    try:
        return psycopg2.connect(dsn, connect_timeout=timeout_s)
    except psycopg2.Error as exc:  # OperationalError: unreachable, refused, refused credentials, a bad port value
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for secret in (params.get("password"), params.get("sslpassword")):
            if secret:
                first_line = first_line.replace(secret, "***")
        raise DatabaseError(f"PostgreSQL {safe_dsn(dsn)}: {first_line}") from None


def parse_dsn(dsn: str) -> dict[str, str]:
    """The DSN's connection parameters (a URI or key=value pairs); :class:`MalformedDsnError` naming the problem
    when it cannot be parsed."""
    # libpq reads the DSN as a C string and ends the password at the first '@' or '/': it would take the rest of a
    # password after a NUL, an unescaped '@' or '/' for host or port, and quote it in its error messages.
    if "\0" in dsn:
        raise MalformedDsnError("database.dsn is malformed: it contains a NUL character")
    scheme, separator, rest = dsn.partition("://")
    if separator and scheme in ("postgresql", "postgres"):
        before_query = rest.split("?", 1)[0]  # a parameter's value may hold '@'; libpq quotes a bad query whole
        authority = before_query.split("/", 1)[0]
        if authority.count("@") > 1 or ("@" not in authority and "@" in before_query):
            raise MalformedDsnError(
                "database.dsn is malformed: its user or password holds an unescaped '@' or '/' (percent-encode it: "
                "%40, %2F)"
            )
    try:
        return dict(psycopg2.extensions.parse_dsn(dsn))
    except (psycopg2.ProgrammingError, ValueError) as exc:
        raise MalformedDsnError(
            f"database.dsn is malformed: {_problem(str(exc))} (expected postgresql://user[:password]@host[:port]/"
            "dbname or key=value pairs)"
        ) from None


def _problem(message: str) -> str:
    """libpq's parse error without any quoted text but the connection keywords and "=" it names."""
    first_line = message.strip().splitlines()[0] if message.strip() else "cannot be parsed"
    first_line = first_line.removeprefix("invalid dsn: ")

    def keep_keyword(match: re.Match[str]) -> str:
        return match.group(0) if match.group(1) in _KEYWORDS or match.group(1) == "=" else '"..."'

    return _QUOTED.sub(keep_keyword, first_line)


def safe_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password removed, for messages and logs (``(malformed DSN)`` when it cannot be
    parsed)."""
    try:
        params = parse_dsn(dsn)
    except MalformedDsnError:
        return "(malformed DSN)"
    host, port, name = params.get("host", "localhost"), params.get("port", "5432"), params.get("dbname", "")
    return f"{params.get('user', '')}@{host}:{port}/{name}"


def server_version(database: DatabaseSettings) -> str:
    """Return the server's ``SHOW server_version``."""
    connection = connect(database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            row = cursor.fetchone()
    finally:
        connection.close()
    return str(row[0]) if row else "unknown"
