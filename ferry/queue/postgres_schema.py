"""The PostgreSQL queue's schema versions and the steps between them (migrations).

The same shape as the SQLite queue's (``sqlite.SCHEMA`` + ``sqlite_schema``), written for
PostgreSQL: times are ``double precision`` seconds since the epoch (the contract's floats),
ids are identity columns, bodies are ``bytea`` in their own table (so a row of recipients
being updated never rewrites a body: PostgreSQL copies the whole row on every UPDATE).

``MIGRATIONS[i]`` takes a database from version i to i + 1 (version 0: an empty schema).
They run in one transaction under a transaction-scoped advisory lock, so several nodes
starting at once apply each step exactly once; ``meta.schema_version`` says how far a
database has come. A database newer than this code knows is refused, never guessed at.
Steps are appended, never edited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from psycopg import AsyncConnection

PENDING = "('Queued','Deferred','InProgress')"

# Version 1: messages, bodies, recipients, attempts; idempotency keys; the event log.
_V1 = f"""
CREATE TABLE IF NOT EXISTS messages (
    id text PRIMARY KEY,
    sender text NOT NULL,
    size bigint NOT NULL,
    priority integer NOT NULL,
    arrival double precision NOT NULL,
    expires double precision NOT NULL,
    status text NOT NULL,
    client_address text,
    client_helo text,
    auth_user text,
    envid text,
    ret text,
    smtputf8 boolean NOT NULL DEFAULT false,
    body_8bit boolean NOT NULL DEFAULT false,
    extra text,
    finished double precision
);
CREATE INDEX IF NOT EXISTS messages_status ON messages(status);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender);
CREATE INDEX IF NOT EXISTS messages_arrival ON messages(arrival, id);
CREATE INDEX IF NOT EXISTS messages_finished ON messages(finished) WHERE finished IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_pending_arrival ON messages(arrival) WHERE finished IS NULL;

CREATE TABLE IF NOT EXISTS bodies (
    message_id text PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    data bytea NOT NULL
);
-- Bodies are written once and read whole: no compression attempt on the way in.
ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE IF NOT EXISTS recipients (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address text NOT NULL,
    domain text NOT NULL,
    orcpt text,
    notify text,
    status text NOT NULL,
    priority integer NOT NULL,
    arrival double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt double precision,
    lease_owner text,
    lease_until double precision,
    last_code integer,
    last_enhanced text,
    last_text text,
    route text,
    delay_warned boolean NOT NULL DEFAULT false,
    expiry_reason text
);
-- The claim walks this index in its order and stops at the limit (pending rows only).
CREATE INDEX IF NOT EXISTS recipients_order ON recipients(priority DESC, arrival, id)
    WHERE status IN {PENDING};
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE status IN {PENDING};
CREATE INDEX IF NOT EXISTS recipients_message ON recipients(message_id);
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients(domain);
CREATE INDEX IF NOT EXISTS recipients_pending ON recipients(status, message_id)
    WHERE status IN {PENDING};

CREATE TABLE IF NOT EXISTS attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient_id bigint NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
    at double precision NOT NULL,
    outcome text NOT NULL,
    code integer,
    enhanced text,
    text text,
    next_hop text,
    tls text
);
CREATE INDEX IF NOT EXISTS attempts_recipient ON attempts(recipient_id);

CREATE TABLE IF NOT EXISTS idempotency (
    key text PRIMARY KEY,
    fingerprint text NOT NULL,
    queue_id text NOT NULL,
    response text NOT NULL,
    expires double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency(expires);

CREATE TABLE IF NOT EXISTS events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    type text NOT NULL,
    message_id text,
    data text NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE TABLE IF NOT EXISTS webhook_cursors (endpoint text PRIMARY KEY, after bigint NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_failures (
    endpoint text NOT NULL,
    event_id bigint NOT NULL,
    at double precision NOT NULL,
    error text NOT NULL,
    retry boolean NOT NULL DEFAULT false,
    PRIMARY KEY (endpoint, event_id)
);
"""

# Version 2: the nodes sharing the queue (``ferry nodes``), each with a heartbeat.
# ``id`` is the node's lease-owner prefix (``host:pid``): its workers' leases are
# ``id:n``, so the work a node has in hand is counted from the recipients themselves.
_V2 = """
CREATE TABLE IF NOT EXISTS nodes (
    id text PRIMARY KEY,
    host text NOT NULL,
    version text NOT NULL,
    started double precision NOT NULL,
    heartbeat double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_lease_owner ON recipients(lease_owner)
    WHERE status = 'InProgress';
"""

# Version 3 (operator tools, issue 11.4, as SQLite's version 4): suspensions, operator
# events, the hosts tried in an attempt (JSON text), an index over waiting recipients.
_V3 = """
CREATE TABLE IF NOT EXISTS suspensions (
    domain text PRIMARY KEY,
    since double precision NOT NULL,
    until double precision,
    reason text NOT NULL DEFAULT '',
    by text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS operator_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    by text NOT NULL,
    action text NOT NULL,
    selection text NOT NULL,
    messages integer NOT NULL,
    recipients integer NOT NULL
);
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS tried text;
CREATE INDEX IF NOT EXISTS recipients_waiting_by_age ON recipients(arrival, message_id)
    WHERE status IN ('Queued','Deferred','InProgress','Held');
"""

# Version 4 (issue 14.5): limits shared by every node (``postgres_limits.py``).
# Connection slots are session advisory locks, not rows: ``ferry_try_slot`` takes the
# first free slot of a destination, skipping those this session holds already (a session
# lock is re-entrant: asking again for one it holds would answer "yes" a second time).
# Message and connection rates are counters per (window, bucket); breakers are records.
_V4 = """
CREATE OR REPLACE FUNCTION ferry_try_slot(k integer, cap integer, held integer[])
RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR s IN 0 .. cap - 1 LOOP
        IF NOT (s = ANY(held)) AND pg_try_advisory_lock(k, s) THEN
            RETURN s;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TABLE IF NOT EXISTS limit_rates (
    key text NOT NULL,
    bucket bigint NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (key, bucket)
);
-- Small shared states (a smart host's circuit breaker), the latest change wins.
CREATE TABLE IF NOT EXISTS limit_states (
    kind text NOT NULL,
    name text NOT NULL,
    changed_at double precision NOT NULL,
    state jsonb NOT NULL,
    PRIMARY KEY (kind, name)
);
"""

# Version 5 (``ferry stats`` across nodes, issue 14.7): delivery statistics kept in the
# database. ``delivery_counters``: what each node's schedulers counted (sent, failed,
# connections...), added to as they go, one row per node and counter (a node writes only
# its own rows: no row every node updates); node '' holds the nodes that have stopped.
# ``key`` is the counter's path in ``Scheduler.stats()`` as a JSON array.
# ``delivery_state``: each running scheduler's latest states (sessions open, backlog,
# breaker states...), replaced every few seconds, removed when it stops.
# ``events.xid``: see below. Bodies: lz4 compression, see below.
_V5 = """
CREATE TABLE IF NOT EXISTS delivery_counters (
    node text NOT NULL,
    key text NOT NULL,
    n bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (node, key)
);
CREATE TABLE IF NOT EXISTS delivery_state (
    owner text PRIMARY KEY,
    node text NOT NULL,
    at double precision NOT NULL,
    data text NOT NULL
);
-- The event log is read in commit-safe order: the writing transaction's id with each
-- event (``PostgresQueue.events``).
ALTER TABLE events ADD COLUMN IF NOT EXISTS xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS events_xid ON events(xid, id);
-- Bodies compressed with lz4 where the server has it (PostgreSQL 14+, built with lz4):
-- measured (bench/pg_bodies.py, README), a 100 KB text mail then writes 0.49x its size
-- in WAL instead of 1.07x, as fast; an already compressed attachment is stored as is at
-- no cost. pglz (the default) writes 3-5x slower. Elsewhere bodies stay uncompressed.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE bodies ALTER COLUMN data SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTENDED';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    NULL;
END
$$;
"""

#: MIGRATIONS[i] takes a database from version i to i + 1. Append only.
MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5]
LATEST = len(MIGRATIONS)

# pg_advisory_xact_lock key: "ferry" + "migr" as one 64-bit number, the same on every node.
MIGRATION_LOCK = 0x666572726D696772


class SchemaTooNew(RuntimeError):
    """The database was written by a newer Ferry."""


async def schema_version(conn: AsyncConnection[tuple[object, ...]]) -> int:
    """The version of the queue in the connection's schema (0: none there yet)."""
    cur = await conn.execute("SELECT to_regclass('meta') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    row = await cur.fetchone()
    return int(str(row[0])) if row else 0


async def migrate(conn: AsyncConnection[tuple[object, ...]]) -> int:
    """Create or upgrade the queue to ``LATEST`` on ``conn`` (autocommit mode).

    Returns the version the database was found at. Idempotent: a second run finds
    ``LATEST`` and does nothing. Raises :class:`SchemaTooNew` for a newer database.
    """
    found = await schema_version(conn)
    if found > LATEST:
        raise SchemaTooNew(
            f"the queue database is at schema version {found}; this Ferry knows up to"
            f" {LATEST}: run a newer Ferry"
        )
    if found == LATEST:
        return found
    async with conn.transaction():
        # One node migrates; the others wait here, then find the work done.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        version = await schema_version(conn)
        if version > LATEST:
            raise SchemaTooNew(
                f"the queue database is at schema version {version}; this Ferry knows up to"
                f" {LATEST}: run a newer Ferry"
            )
        for step in range(version, LATEST):
            await conn.execute(MIGRATIONS[step].encode())
        await conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(LATEST),),
        )
    return found
