"""The test PostgreSQL server itself: reachable, on loopback, and asking for a password."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def test_server_answers_on_loopback(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT inet_server_addr()::text, current_setting('server_version_num')")
        addr, version = row.fetchone()  # type: ignore[misc]
    assert addr.startswith("127.")
    assert int(version) >= 130000


def test_server_refuses_a_wrong_password(pg_dsn: str) -> None:
    wrong = make_conninfo(pg_dsn, password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(wrong, connect_timeout=10)
    assert conninfo_to_dict(pg_dsn)["host"] == "127.0.0.1"
