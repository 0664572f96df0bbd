"""The event log (an outbox): state changes as rows, written in the transaction that makes them.

Webhooks and ``GET /v1/events`` read this table, so an event exists exactly when its
state change was committed: a crash can neither lose one nor invent one. Each row is one
event; ``id`` orders them and is the replay cursor. ``data`` is the event's fields as
JSON, the message's ``metadata`` (from the API) included.

Webhook endpoints keep a cursor each (``webhook_cursors``): the id of the last event they
acknowledged. Events an endpoint never accepted within its retry window are kept in
``webhook_failures`` for ``ferry webhooks list`` and ``retry``.

These functions run on a backend's connection inside its transaction (SQLite's writer
thread); they hold no state.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from ferry.config import WebhookEvent

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    message_id TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE TABLE IF NOT EXISTS webhook_cursors (endpoint TEXT PRIMARY KEY, after INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_failures (
    endpoint TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    at REAL NOT NULL,
    error TEXT NOT NULL,
    retry INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (endpoint, event_id)
);
"""

#: Every event type the log holds (webhook subscriptions name these).
EVENT_TYPES: tuple[str, ...] = get_args(WebhookEvent)

#: A recipient's new status to the event that reports it.
STATUS_EVENT = {
    "Delivered": "delivered",
    "Deferred": "deferred",
    "Queued": "deferred",
    "Failed": "failed",
    "Expired": "expired",
}


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    at: float
    type: str
    message_id: str | None
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "at": self.at,
            "message_id": self.message_id,
            **self.data,
        }


def metadata_of(conn: sqlite3.Connection, message_id: str, cache: dict[str, Any]) -> Any:
    """The API metadata stored with a message (``{}`` when none)."""
    if message_id not in cache:
        row = conn.execute("SELECT extra FROM messages WHERE id=?", (message_id,)).fetchone()
        extra = json.loads(row[0]) if row and row[0] else {}
        cache[message_id] = json.loads(extra["metadata"]) if "metadata" in extra else {}
    return cache[message_id]


def add(
    conn: sqlite3.Connection,
    at: float,
    type_: str,
    message_id: str | None,
    data: dict[str, Any],
) -> None:
    conn.execute(
        "INSERT INTO events(at, type, message_id, data) VALUES (?,?,?,?)",
        (at, type_, message_id, json.dumps(data, ensure_ascii=False, separators=(",", ":"))),
    )


def read(
    conn: sqlite3.Connection,
    *,
    after: int,
    types: Sequence[str] = (),
    limit: int = 100,
) -> list[StoredEvent]:
    where = "id > ?"
    args: list[Any] = [after]
    if types:
        where += f" AND type IN ({','.join('?' * len(types))})"
        args += list(types)
    rows = conn.execute(
        f"SELECT id, at, type, message_id, data FROM events WHERE {where} ORDER BY id LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [StoredEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]


def by_ids(conn: sqlite3.Connection, ids: Iterable[int]) -> list[StoredEvent]:
    wanted = sorted(set(ids))
    if not wanted:
        return []
    rows = conn.execute(
        f"SELECT id, at, type, message_id, data FROM events WHERE id IN"
        f" ({','.join('?' * len(wanted))}) ORDER BY id",
        wanted,
    ).fetchall()
    return [StoredEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]


def last_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def cursor(conn: sqlite3.Connection, endpoint: str) -> int:
    """The endpoint's cursor; a new endpoint starts at the current end of the log
    (history is for replay, not a flood to a newly added webhook)."""
    row = conn.execute("SELECT after FROM webhook_cursors WHERE endpoint=?", (endpoint,)).fetchone()
    if row is not None:
        return int(row[0])
    start = last_id(conn)
    conn.execute("INSERT INTO webhook_cursors(endpoint, after) VALUES (?, ?)", (endpoint, start))
    return start


def advance(conn: sqlite3.Connection, endpoint: str, after: int) -> None:
    conn.execute(
        "INSERT INTO webhook_cursors(endpoint, after) VALUES (?, ?) ON CONFLICT(endpoint)"
        " DO UPDATE SET after=MAX(after, excluded.after)",
        (endpoint, after),
    )


def fail(
    conn: sqlite3.Connection, endpoint: str, event_ids: Iterable[int], at: float, error: str
) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO webhook_failures(endpoint, event_id, at, error, retry)"
        " VALUES (?,?,?,?,0)",
        [(endpoint, i, at, error) for i in event_ids],
    )


def failures(conn: sqlite3.Connection) -> list[tuple[str, int, float, str]]:
    return [
        (r[0], int(r[1]), float(r[2]), r[3])
        for r in conn.execute(
            "SELECT endpoint, event_id, at, error FROM webhook_failures ORDER BY endpoint, event_id"
        )
    ]


def request_retry(conn: sqlite3.Connection, endpoint: str | None) -> int:
    """Mark failed deliveries (of one endpoint, or all) to be sent again."""
    where, args = ("WHERE endpoint=?", (endpoint,)) if endpoint else ("", ())
    return conn.execute(f"UPDATE webhook_failures SET retry=1 {where}", args).rowcount


def retries(conn: sqlite3.Connection, endpoint: str, limit: int) -> list[int]:
    rows = conn.execute(
        "SELECT event_id FROM webhook_failures WHERE endpoint=? AND retry=1 ORDER BY event_id"
        " LIMIT ?",
        (endpoint, limit),
    )
    return [int(r[0]) for r in rows]


def retried(conn: sqlite3.Connection, endpoint: str, event_ids: Iterable[int]) -> None:
    conn.executemany(
        "DELETE FROM webhook_failures WHERE endpoint=? AND event_id=?",
        [(endpoint, i) for i in event_ids],
    )


def rewind(conn: sqlite3.Connection, endpoint: str, since: float) -> int:
    """Point ``endpoint``'s cursor before the first event at or after ``since``."""
    row = conn.execute("SELECT MIN(id) FROM events WHERE at >= ?", (since,)).fetchone()
    after = (int(row[0]) - 1) if row and row[0] is not None else last_id(conn)
    conn.execute(
        "INSERT INTO webhook_cursors(endpoint, after) VALUES (?, ?) ON CONFLICT(endpoint)"
        " DO UPDATE SET after=excluded.after",
        (endpoint, after),
    )
    return after


def purge(conn: sqlite3.Connection, *, before: float, limit: int = 5000) -> int:
    """Events older than ``before`` (the history retention), a batch at a time."""
    return conn.execute(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? ORDER BY id LIMIT ?)",
        (before, limit),
    ).rowcount
