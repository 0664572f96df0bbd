"""The SQLite queue's writer thread: jobs committed in groups, each as if alone."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ferry.queue.sqlite import SqliteQueue


def _insert(key: str) -> Callable[[sqlite3.Connection], str]:
    def job(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO meta(key, value) VALUES (?, 'x')", (key,))
        return key

    return job


def _half_way(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES ('half', 'x')")
    conn.execute("UPDATE meta SET value = 'changed' WHERE key = 'schema_version'")
    raise RuntimeError("failed half way")


async def test_a_job_failing_half_way_undoes_only_itself_in_its_group(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        writer = q._w
        entered, gate = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> bool:
            entered.set()
            return gate.wait(10)

        # The writer is held inside this job while the next ones queue up behind it:
        # they are then taken, and committed, as one group.
        held = writer.submit(hold)
        assert entered.wait(10)
        before = writer.submit(_insert("before"))
        failing = writer.submit(_half_way)
        after = writer.submit(_insert("after"))
        commits = q.commits
        gate.set()
        assert held.result(timeout=10) is True
        assert before.result(timeout=10) == "before"
        with pytest.raises(RuntimeError, match="half way"):
            failing.result(timeout=10)
        assert after.result(timeout=10) == "after"
        assert q.commits == commits + 2  # the held job's commit, then the group's
        rows = dict(q.run_sync(lambda c: c.execute("SELECT key, value FROM meta").fetchall()))
        assert rows["before"] == rows["after"] == "x"
        assert "half" not in rows and rows["schema_version"] != "changed"
    finally:
        await q.close()
