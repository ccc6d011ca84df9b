"""One-off PostgreSQL statements for tests and benchmarks: creating and dropping scratch databases, reading rows.

The ledger itself goes through :mod:`riskbridge.ledger`; these helpers are for the tools around it (the test
suite's scratch databases, the benchmarks' own ledgers and Airflow metadata). Each call opens its own connection
and closes it.
"""

from __future__ import annotations

from typing import Any

import psycopg2


def admin(dsn: str, statement: str) -> None:
    """Run ``statement`` outside a transaction (CREATE DATABASE and DROP DATABASE cannot run in one)."""
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def query(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of one query, ``args`` bound as its parameters."""
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())
    finally:
        connection.close()
