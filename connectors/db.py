"""PostgreSQL I/O for the ledger through psycopg2: connections from the configured DSN."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions

from riskbridge.errors import LedgerError
from riskbridge.settings import DatabaseSettings


class DatabaseError(LedgerError):
    """The ledger database could not be reached or used; the message says which and why (never the password)."""


def connect(database: DatabaseSettings, timeout_s: int = 5) -> psycopg2.extensions.connection:
    """Open a psycopg2 connection to the ledger database; raise :class:`DatabaseError` on failure."""
    dsn = database.dsn.get_secret_value()
    try:
        return psycopg2.connect(dsn, connect_timeout=timeout_s)
    except psycopg2.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(f"PostgreSQL {safe_dsn(dsn)}: {first_line}") from None


def safe_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password removed, for messages and logs."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.pop("password", None)
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
