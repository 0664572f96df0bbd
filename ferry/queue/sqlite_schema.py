"""The SQLite queue's schema versions and the steps between them (migrations).

``sqlite.SCHEMA`` is version 1, the first released shape. Every later change is one
step in ``MIGRATIONS``, applied once, in order, inside one write transaction that
re-checks the version (so two processes opening the queue at once cannot both apply
it); ``meta.schema_version`` says how far a database has come. A database newer than
this code knows is refused rather than guessed at. New steps are appended, never edited.

Version 2 (history retention, issue 11.2):

- ``messages.finished``: when the last recipient became final. The body is deleted then;
  the history is purged ``queue.history_retention`` later (partial index: only
  finished messages are in it, oldest first).
- ``recipients.expiry_reason``: "lifetime" or "max_retries" for an Expired recipient.
- Counters kept by triggers in the same transaction as the change they count
  (``message_counts``, ``recipient_counts``, ``route_counts``, ``pending_totals``),
  so statistics read a
  handful of rows instead of scanning the history. Triggers also keep them right for
  every future code path that inserts, updates or deletes rows.
- ``recipients_pending``: a partial index over pending recipients only, so listings of
  pending mail cost what the pending queue costs, whatever the history holds.
- ``auto_vacuum=INCREMENTAL``, so pages freed by purges can be given back in small
  steps (``PRAGMA incremental_vacuum``). SQLite only switches an existing database
  with a ``VACUUM``, a one-time rewrite of the file (it needs as much free disk as the
  file takes); a new database gets the mode before its first table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ferry.envelope import Status
from ferry.queue.outbox import SCHEMA as OUTBOX_SCHEMA
from ferry.queue.sqlite_ops import OPERATOR_SCHEMA, PENDING_WHERE, WAITING_WHERE, one_of

PENDING = "('Queued','Deferred','InProgress')"
FINAL = "('Delivered','Failed','Expired','Cancelled')"

_V2 = f"""
ALTER TABLE messages ADD COLUMN finished REAL;
ALTER TABLE recipients ADD COLUMN expiry_reason TEXT;
CREATE INDEX IF NOT EXISTS messages_finished ON messages(finished) WHERE finished IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_arrival ON messages(arrival, id);
-- The oldest message with work left: one step down this index.
CREATE INDEX IF NOT EXISTS messages_pending_arrival ON messages(arrival) WHERE finished IS NULL;
CREATE INDEX IF NOT EXISTS recipients_pending ON recipients(status, message_id)
    WHERE status IN {PENDING};

-- Messages already finished: their time is their last attempt's; their bodies go.
UPDATE messages SET finished = COALESCE(
    (SELECT MAX(a.at) FROM attempts a JOIN recipients r ON a.recipient_id = r.id
     WHERE r.message_id = messages.id), arrival)
WHERE NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = messages.id
                  AND r.status IN {PENDING});
DELETE FROM bodies WHERE message_id IN (SELECT id FROM messages WHERE finished IS NOT NULL);

CREATE TABLE message_counts (
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (status, priority)
) WITHOUT ROWID;
INSERT INTO message_counts(status, priority, n, size)
    SELECT status, priority, COUNT(*), SUM(size) FROM messages GROUP BY status, priority;

CREATE TABLE recipient_counts (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n INTEGER NOT NULL,
    retries INTEGER NOT NULL
);
INSERT INTO recipient_counts(id, n, retries)
    SELECT 1, COUNT(*), COALESCE(SUM(MAX(attempts - 1, 0)), 0) FROM recipients;

CREATE TABLE route_counts (route TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO route_counts(route, n)
    SELECT route, COUNT(DISTINCT message_id) FROM recipients
    WHERE route IS NOT NULL GROUP BY route;

CREATE TRIGGER message_counts_insert AFTER INSERT ON messages BEGIN
    INSERT OR IGNORE INTO message_counts(status, priority) VALUES (NEW.status, NEW.priority);
    UPDATE message_counts SET n = n + 1, size = size + NEW.size
        WHERE status = NEW.status AND priority = NEW.priority;
END;
CREATE TRIGGER message_counts_delete AFTER DELETE ON messages BEGIN
    UPDATE message_counts SET n = n - 1, size = size - OLD.size
        WHERE status = OLD.status AND priority = OLD.priority;
END;
CREATE TRIGGER message_counts_update AFTER UPDATE OF status, priority, size ON messages
WHEN OLD.status IS NOT NEW.status OR OLD.priority IS NOT NEW.priority
    OR OLD.size IS NOT NEW.size
BEGIN
    UPDATE message_counts SET n = n - 1, size = size - OLD.size
        WHERE status = OLD.status AND priority = OLD.priority;
    INSERT OR IGNORE INTO message_counts(status, priority) VALUES (NEW.status, NEW.priority);
    UPDATE message_counts SET n = n + 1, size = size + NEW.size
        WHERE status = NEW.status AND priority = NEW.priority;
END;

CREATE TRIGGER recipient_counts_insert AFTER INSERT ON recipients BEGIN
    UPDATE recipient_counts SET n = n + 1, retries = retries + MAX(NEW.attempts - 1, 0)
        WHERE id = 1;
END;
CREATE TRIGGER recipient_counts_delete AFTER DELETE ON recipients BEGIN
    UPDATE recipient_counts SET n = n - 1, retries = retries - MAX(OLD.attempts - 1, 0)
        WHERE id = 1;
END;
CREATE TRIGGER recipient_counts_attempts AFTER UPDATE OF attempts ON recipients
WHEN OLD.attempts IS NOT NEW.attempts
BEGIN
    UPDATE recipient_counts
        SET retries = retries + MAX(NEW.attempts - 1, 0) - MAX(OLD.attempts - 1, 0)
        WHERE id = 1;
END;

-- pending_totals: messages with work left (finished IS NULL), and the sum of their
-- arrival times in whole seconds (integers: no drift however long it runs), for the
-- average age of the queue.
CREATE TABLE pending_totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n INTEGER NOT NULL,
    arrival_sum INTEGER NOT NULL
);
INSERT INTO pending_totals(id, n, arrival_sum)
    SELECT 1, COUNT(*), COALESCE(SUM(CAST(arrival AS INTEGER)), 0) FROM messages
    WHERE finished IS NULL;
CREATE TRIGGER pending_totals_insert AFTER INSERT ON messages WHEN NEW.finished IS NULL
BEGIN
    UPDATE pending_totals SET n = n + 1, arrival_sum = arrival_sum + CAST(NEW.arrival AS INTEGER)
        WHERE id = 1;
END;
CREATE TRIGGER pending_totals_delete AFTER DELETE ON messages WHEN OLD.finished IS NULL
BEGIN
    UPDATE pending_totals SET n = n - 1, arrival_sum = arrival_sum - CAST(OLD.arrival AS INTEGER)
        WHERE id = 1;
END;
CREATE TRIGGER pending_totals_update AFTER UPDATE OF finished, arrival ON messages
WHEN (OLD.finished IS NULL) != (NEW.finished IS NULL) OR OLD.arrival IS NOT NEW.arrival
BEGIN
    UPDATE pending_totals SET
        n = n - (OLD.finished IS NULL) + (NEW.finished IS NULL),
        arrival_sum = arrival_sum
            - CASE WHEN OLD.finished IS NULL THEN CAST(OLD.arrival AS INTEGER) ELSE 0 END
            + CASE WHEN NEW.finished IS NULL THEN CAST(NEW.arrival AS INTEGER) ELSE 0 END
        WHERE id = 1;
END;

-- route_counts: messages with at least one recipient on that route.
CREATE TRIGGER route_counts_insert AFTER INSERT ON recipients
WHEN NEW.route IS NOT NULL AND NOT EXISTS (SELECT 1 FROM recipients
    WHERE message_id = NEW.message_id AND route = NEW.route AND id != NEW.id)
BEGIN
    INSERT OR IGNORE INTO route_counts(route, n) VALUES (NEW.route, 0);
    UPDATE route_counts SET n = n + 1 WHERE route = NEW.route;
END;
CREATE TRIGGER route_counts_set AFTER UPDATE OF route ON recipients
WHEN NEW.route IS NOT NULL AND NEW.route IS NOT OLD.route AND NOT EXISTS (SELECT 1
    FROM recipients WHERE message_id = NEW.message_id AND route = NEW.route AND id != NEW.id)
BEGIN
    INSERT OR IGNORE INTO route_counts(route, n) VALUES (NEW.route, 0);
    UPDATE route_counts SET n = n + 1 WHERE route = NEW.route;
END;
CREATE TRIGGER route_counts_unset AFTER UPDATE OF route ON recipients
WHEN OLD.route IS NOT NULL AND NEW.route IS NOT OLD.route AND NOT EXISTS (SELECT 1
    FROM recipients WHERE message_id = OLD.message_id AND route = OLD.route)
BEGIN
    UPDATE route_counts SET n = n - 1 WHERE route = OLD.route;
END;
CREATE TRIGGER route_counts_delete AFTER DELETE ON recipients
WHEN OLD.route IS NOT NULL AND NOT EXISTS (SELECT 1
    FROM recipients WHERE message_id = OLD.message_id AND route = OLD.route)
BEGIN
    UPDATE route_counts SET n = n - 1 WHERE route = OLD.route;
END;
"""


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    def step(conn: sqlite3.Connection) -> None:
        # executescript() would COMMIT first; run the statements inside our transaction.
        for statement in _statements(sql):
            conn.execute(statement)

    return step


def _statements(sql: str) -> list[str]:
    """Split a script into complete statements (trigger bodies hold semicolons)."""
    out: list[str] = []
    current = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement: {current.strip()[:60]!r}")
    return out


# Version 3 (HTTP API and webhooks, issue 13): idempotency keys, written in the same
# transaction as their message; the event log (an outbox) with webhook cursors and failures.
_V3 = (
    """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    response TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency(expires);
"""
    + OUTBOX_SCHEMA
)


def _v4(conn: sqlite3.Connection) -> None:
    # Version 4 (operator tools, issue 11.4): suspensions, operator events, the hosts
    # tried in an attempt, indexes over waiting recipients (ferry/queue/sqlite_ops.py).
    _script(OPERATOR_SCHEMA)(conn)
    conn.execute("ALTER TABLE attempts ADD COLUMN tried TEXT")


def _v5(conn: sqlite3.Connection) -> None:
    # Version 5 (message bodies in a spool of files, issue 12): ``messages.spool`` is 1
    # when the body is the file spool/<id> (ferry/queue/spool.py), 0 when it is a row
    # in ``bodies`` as before. Existing bodies stay where they are and are read there.
    conn.execute("ALTER TABLE messages ADD COLUMN spool INTEGER NOT NULL DEFAULT 0")
    # Unfinished spooled messages: the start-up orphan sweep and `ferry queue check`
    # walk this index, not the history.
    conn.execute(
        "CREATE INDEX IF NOT EXISTS messages_spooled ON messages(id)"
        " WHERE spool = 1 AND finished IS NULL"
    )


#: Due (waiting for their next attempt): ``next_due`` finds the earliest in one step.
DUE_WHERE = one_of("status", (Status.QUEUED, Status.DEFERRED))

# Version 6 (a cheaper writer, issue 12): the same indexes and counters, cheaper to keep.
# - Partial indexes over recipients say "status is one of" with OR-ed equalities
#   instead of an IN list: SQLite evaluates a constant IN list of three or more values
#   through a temporary b-tree built anew for every statement run -- at every insert and
#   update of a recipient, once per partial index and row image (sqlite_ops.one_of).
#   Queries repeat the new predicates word for word, or SQLite would not use the indexes.
# - recipients_due was used by no query (``next_due`` scanned the table): now it holds
#   the due recipients only (Queued, Deferred), and ``next_due`` reads its first entry.
# - Counter triggers: one UPSERT instead of INSERT OR IGNORE then UPDATE; a first
#   attempt (no retry yet) no longer rewrites recipient_counts to add zero.
# The names stay: version 1's CREATE INDEX IF NOT EXISTS, run at every start, must
# find them there.
_V6 = f"""
DROP INDEX IF EXISTS recipients_due;
CREATE INDEX recipients_due ON recipients(next_attempt) WHERE {DUE_WHERE};
DROP INDEX IF EXISTS recipients_order;
CREATE INDEX recipients_order ON recipients(priority DESC, arrival, id) WHERE {PENDING_WHERE};
DROP INDEX IF EXISTS recipients_pending;
CREATE INDEX recipients_pending ON recipients(status, message_id) WHERE {PENDING_WHERE};
DROP INDEX IF EXISTS recipients_waiting_by_age;
CREATE INDEX recipients_waiting_by_age ON recipients(
    arrival, message_id, domain, status) WHERE {WAITING_WHERE};
DROP INDEX IF EXISTS recipients_waiting_by_domain;
CREATE INDEX recipients_waiting_by_domain ON recipients(
    domain, arrival, message_id, status) WHERE {WAITING_WHERE};
DROP INDEX IF EXISTS recipients_waiting_by_reply;
CREATE INDEX recipients_waiting_by_reply ON recipients(
    status, last_code, last_enhanced, domain, arrival) WHERE {WAITING_WHERE};

DROP TRIGGER message_counts_insert;
CREATE TRIGGER message_counts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO message_counts(status, priority, n, size)
        VALUES (NEW.status, NEW.priority, 1, NEW.size)
        ON CONFLICT(status, priority) DO UPDATE SET n = n + 1, size = size + excluded.size;
END;
DROP TRIGGER message_counts_update;
CREATE TRIGGER message_counts_update AFTER UPDATE OF status, priority, size ON messages
WHEN OLD.status IS NOT NEW.status OR OLD.priority IS NOT NEW.priority
    OR OLD.size IS NOT NEW.size
BEGIN
    UPDATE message_counts SET n = n - 1, size = size - OLD.size
        WHERE status = OLD.status AND priority = OLD.priority;
    INSERT INTO message_counts(status, priority, n, size)
        VALUES (NEW.status, NEW.priority, 1, NEW.size)
        ON CONFLICT(status, priority) DO UPDATE SET n = n + 1, size = size + excluded.size;
END;
DROP TRIGGER recipient_counts_attempts;
CREATE TRIGGER recipient_counts_attempts AFTER UPDATE OF attempts ON recipients
WHEN MAX(OLD.attempts - 1, 0) != MAX(NEW.attempts - 1, 0)
BEGIN
    UPDATE recipient_counts
        SET retries = retries + MAX(NEW.attempts - 1, 0) - MAX(OLD.attempts - 1, 0)
        WHERE id = 1;
END;
DROP TRIGGER route_counts_insert;
CREATE TRIGGER route_counts_insert AFTER INSERT ON recipients
WHEN NEW.route IS NOT NULL AND NOT EXISTS (SELECT 1 FROM recipients
    WHERE message_id = NEW.message_id AND route = NEW.route AND id != NEW.id)
BEGIN
    INSERT INTO route_counts(route, n) VALUES (NEW.route, 1)
        ON CONFLICT(route) DO UPDATE SET n = n + 1;
END;
DROP TRIGGER route_counts_set;
CREATE TRIGGER route_counts_set AFTER UPDATE OF route ON recipients
WHEN NEW.route IS NOT NULL AND NEW.route IS NOT OLD.route AND NOT EXISTS (SELECT 1
    FROM recipients WHERE message_id = NEW.message_id AND route = NEW.route AND id != NEW.id)
BEGIN
    INSERT INTO route_counts(route, n) VALUES (NEW.route, 1)
        ON CONFLICT(route) DO UPDATE SET n = n + 1;
END;
"""


def _v7(conn: sqlite3.Connection) -> None:
    # Version 7 (spool segments, issue 12): ``messages.spool`` 2 says the body is
    # ``size`` bytes at ``body_offset`` of the spool segment ``segment``
    # (ferry/queue/spool.py). Bodies stored before stay rows (0) or files (1).
    conn.execute("ALTER TABLE messages ADD COLUMN segment TEXT")
    conn.execute("ALTER TABLE messages ADD COLUMN body_offset INTEGER")
    # The live messages of a segment: whether it may be deleted, what compaction moves.
    conn.execute(
        "CREATE INDEX IF NOT EXISTS messages_segment ON messages(segment)"
        " WHERE spool = 2 AND finished IS NULL"
    )


#: MIGRATIONS[i] takes a database from version i + 1 to i + 2. Append only.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _script(_V2),
    _script(_V3),
    _v4,
    _v5,
    _script(_V6),
    _v7,
]
LATEST = len(MIGRATIONS) + 1


class SchemaTooNew(RuntimeError):
    """The database was written by a newer Ferry."""


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 1


def migrate(
    conn: sqlite3.Connection, base_schema: str, begin: Callable[[sqlite3.Connection], None]
) -> int:
    """Create or upgrade the database on ``conn`` (autocommit mode) to ``LATEST``.

    ``base_schema`` is version 1 (idempotent ``CREATE ... IF NOT EXISTS``); ``begin``
    opens a write transaction. Returns the version the database was found at.
    """
    fresh = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
    if fresh:
        # Only an empty database takes the mode without a VACUUM.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.executescript(base_schema)
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1')")
    found = _version(conn)
    if found > LATEST:
        raise SchemaTooNew(
            f"the queue database is at schema version {found}; this Ferry knows up to"
            f" {LATEST}: run a newer Ferry"
        )
    while _version(conn) < LATEST:
        begin(conn)
        try:
            version = _version(conn)  # another process may have migrated meanwhile
            if version < LATEST:
                MIGRATIONS[version - 1](conn)
                conn.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(version + 1),)
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")  # the one-time rewrite that makes the mode take effect
    return found
