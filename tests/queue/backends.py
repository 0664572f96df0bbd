"""Open a fresh queue of either backend for a test (the contract runs against both).

A PostgreSQL queue gets a schema of its own in the test server (``pg_dsn``), named
after the test, through the DSN's ``search_path``: tests never see each other's rows.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from ferry.queue.postgres import PostgresQueue
from ferry.queue.sqlite import SqliteQueue

# "sqlite-spool": the SQLite queue with every body a spool file (ferry/queue/spool.py),
# so the contract holds for both places a body can live.
BACKENDS = ["sqlite", "sqlite-spool", "postgres"]


def fresh_schema(pg_dsn: str) -> str:
    """A new empty schema in the test server; returns a DSN whose queue lives in it."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}".encode())
    return make_conninfo(pg_dsn, options=f"-csearch_path={name}")


async def open_backend(
    backend: str, tmp_path: Path, pg_dsn: str | None, **kwargs: object
) -> SqliteQueue | PostgresQueue:
    if backend == "sqlite":
        return SqliteQueue(tmp_path / "q", **kwargs)  # type: ignore[arg-type]
    if backend == "sqlite-spool":
        return SqliteQueue(tmp_path / "q", spool_threshold=0, **kwargs)  # type: ignore[arg-type]
    assert pg_dsn is not None
    return await PostgresQueue(fresh_schema(pg_dsn), **kwargs).open()  # type: ignore[arg-type]
