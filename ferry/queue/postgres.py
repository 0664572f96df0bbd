"""The PostgreSQL queue: the contract of ``base.Queue`` on a database several nodes share.

The same semantics as the SQLite queue (``sqlite.py``), by other means:

- **Group commit.** Enqueues go to one writer task; it takes whatever is waiting (up to
  ``batch``), runs each as one statement in a single transaction and commits once: many
  250s share one WAL flush. A caller learns its queue id only after that commit returned.
  If a statement fails, the group is rolled back and each of its jobs is run again alone,
  so one bad message never costs its neighbours their 250.
- **Claims** take due recipients with ``SELECT ... FOR UPDATE SKIP LOCKED`` in priority
  then age order, and lease them (owner + expiry): workers on several nodes never wait
  for each other's rows, and a dead node's leases simply run out.
- **Message status** is derived from the recipients, as in SQLite; the message rows are
  locked first (in id order) so that two nodes finishing two recipients of one message at
  once cannot both see the other's recipient as pending.
- Every other change runs in its own short transaction on a pooled connection (psycopg 3,
  ``psycopg_pool``); a deadlock or serialisation failure is retried.

The schema is created and migrated by ``postgres_schema.migrate`` when the queue opens.
Tables live in the connection's ``search_path`` (``options=-csearch_path=...`` in the DSN
puts a queue in its own schema).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from ferry.domains import domain_key
from ferry.envelope import EnvelopeIn, Priority, Reply, Status, message_status
from ferry.queue import outbox
from ferry.queue.base import (
    Attempt,
    AttemptResult,
    ClaimedRecipient,
    IdempotencyRecord,
    IdempotencyReplay,
    MessageInfo,
    Queue,
    QueueStats,
    RecipientInfo,
    new_queue_id,
)
from ferry.queue.postgres_ops import PostgresOperatorMethods
from ferry.queue.postgres_schema import PENDING, migrate, schema_version

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

#: Transient conflicts between concurrent transactions: the transaction is run again.
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
RETRIES = 5
#: LISTEN/NOTIFY channel on which committed new mail wakes idle nodes.
CHANNEL = "ferry_queue"
#: How long an operation waits for a pooled connection (the server is down: 451 then).
POOL_TIMEOUT = 10.0


def describe_dsn(dsn: str) -> str:
    """The DSN for logs and errors: host, port, database and user, never a password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable DSN)"
    host = parts.get("host") or "(PGHOST)"
    port = f":{parts['port']}" if parts.get("port") else ""
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


def read_password_file(path: str) -> str:
    """The first line of ``path`` (a password file, like smart hosts' ``password_file``)."""
    text = Path(path).read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""


def conninfo(dsn: str, password_file: str = "") -> str:
    """The connection string: ``dsn`` plus the password from ``password_file``.

    Empty parts are left to libpq, so the standard ``PG*`` variables (PGHOST,
    PGPASSWORD, PGPASSFILE...) fill what the DSN leaves out.
    """
    if password_file:
        return make_conninfo(dsn, password=read_password_file(password_file))
    return make_conninfo(dsn)


def _reply(code: int | None, enhanced: str | None, text: str | None) -> Reply | None:
    if code is None:
        return None
    return Reply(code, enhanced, text or "")


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


_PENDING = ("Queued", "Deferred", "InProgress")
# The columns of one outcome, and of one attempt row, as arrays for unnest().
_RECORD_COLUMNS = (
    "id",
    "pending",
    "counts",
    "final",
    "next",
    "code",
    "enh",
    "text",
    "route",
    "warned",
    "reason",
)
_ATTEMPT_COLUMNS = ("id", "outcome", "code", "enh", "text", "hop", "tls", "tried")


#: How often a node writes its heartbeat; ``ferry nodes`` calls one silent for three
#: beats "silent" (its leases run out on their own: ``queue.lease_seconds``).
HEARTBEAT_SECONDS = 10.0
#: A node silent this long is dropped from the table (it was never stopped cleanly).
FORGET_NODE_AFTER = 86400.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One ``ferry serve`` sharing the queue."""

    id: str  # host:pid, the prefix of its leases' owners
    host: str
    version: str
    started: float
    heartbeat: float
    in_hand: int  # recipients leased by its workers right now

    def silent(self, now: float) -> bool:
        return now - self.heartbeat > 3 * HEARTBEAT_SECONDS

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "version": self.version,
            "started": self.started,
            "heartbeat": self.heartbeat,
            "in_hand": self.in_hand,
            "silent": self.silent(now),
        }


#: A scheduler's published states count while this fresh (it publishes every 2 s; a
#: killed node's last states stop counting after this).
STATE_FRESH_SECONDS = 30.0


def node_of(owner: str) -> str:
    """The node (``host:pid``) of a lease owner / scheduler (``host:pid:n``)."""
    return owner.rsplit(":", 1)[0] if ":" in owner else owner


@dataclass
class NodeStats:
    """One node's delivery statistics as kept in the database (``ferry stats``)."""

    node: str  # host:pid; '' for the nodes that have stopped
    #: counter path (a JSON array) -> total since the node started
    counters: dict[str, int] = field(default_factory=dict)
    #: scheduler (owner) -> its latest published states
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    heartbeat: float | None = None  # None: not in ``nodes`` (stopped or forgotten)


class QueueNotFound(LookupError):
    """The database holds no Ferry queue (and none was to be created)."""

    def __init__(self, description: str) -> None:
        super().__init__(
            f"no queue exists in {description} (`ferry serve` creates it on its first start;"
            " check queue.dsn and the search_path)"
        )


@dataclass
class _Job:
    fn: Callable[[Conn], Awaitable[Any]]
    future: asyncio.Future[Any]


class PostgresQueue(PostgresOperatorMethods, Queue):
    """The PostgreSQL implementation of the queue contract."""

    def __init__(
        self,
        dsn: str,
        *,
        password_file: str = "",
        batch: int = 256,
        durable: bool = True,
        event_log: bool = False,
        pool_size: int = 8,
        create: bool = True,
    ) -> None:
        """Prepare a pool for ``dsn``; :meth:`open` connects and migrates the schema.

        ``durable=False`` (a delivery worker's claims and outcomes) commits with
        ``synchronous_commit=off``: a crash of the database server may undo the last
        outcomes (a message is then sent twice, never lost). Intake's queue is durable.
        """
        self.description = describe_dsn(dsn)
        #: False: never create the schema (the CLI: a wrong DSN is not an empty queue).
        self.create = create
        #: The connection string (holds a password when one was given: never log it).
        self.conninfo = conninfo(dsn, password_file)
        self.batch = batch
        self.durable = durable
        #: Write the event log (webhooks, ``GET /v1/events``) with every state change.
        self.event_log = event_log
        self._pool = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            open=False,
            name="ferry-queue",
            timeout=POOL_TIMEOUT,
        )
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._node_id: str | None = None
        self._pool_check: asyncio.Task[None] | None = None
        # A connection of its own for session advisory locks (webhook turns): a lock
        # lives as long as the connection that took it.
        self._locks: Conn | None = None
        self._held_turns: set[str] = set()
        self._locks_guard = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._opened = False
        self._opening = asyncio.Lock()
        self._closed = False
        #: Group commits, the jobs they carried and the seconds they took (metrics).
        self.commits = 0
        self.committed_jobs = 0
        self.commit_seconds = 0.0

    async def _configure(self, conn: Conn) -> None:
        # A 250 means the commit is on disk: never inherit a server's "off" for intake.
        await conn.execute(
            "SELECT set_config('synchronous_commit', %s, false)",
            ("on" if self.durable else "off",),
        )

    async def open(self) -> PostgresQueue:
        """Connect, create or upgrade the schema (refusing a newer one), start the writer.

        Every operation opens the queue on first use, so ``open_queue`` stays synchronous.
        """
        async with self._opening:
            if not self._opened:
                await self._open()
        return self

    async def _open(self) -> None:
        if self._closed:
            raise RuntimeError("the queue is closed")
        # One direct connection first: a wrong password or an unreachable server fails
        # at once with libpq's words (the pool would retry until its timeout).
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=30
            )
        except psycopg.OperationalError as exc:
            # libpq's message names host, port and user, never the password.
            raise ConnectionError(f"cannot connect to {self.description}: {exc}") from None
        try:
            if not self.create and await schema_version(conn) == 0:
                raise QueueNotFound(self.description)
            await migrate(conn)
        finally:
            await conn.close()
        try:
            await self._pool.open(wait=True, timeout=30)
        except psycopg_pool_errors() as exc:
            raise ConnectionError(f"cannot connect to {self.description}: {exc}") from None
        self._writer = asyncio.create_task(self._write_loop(), name="ferry-queue-writer")
        self._opened = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._listener, self._pool_check, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._node_id is not None and self._opened:
            # A clean stop leaves the table; a killed node stays there, silent. Its
            # delivery counters join those of the other stopped nodes.
            node = self._node_id

            async def leave(conn: Conn) -> None:
                await conn.execute("DELETE FROM nodes WHERE id = %s", (node,))
                await _fold_counters(conn, [node])

            with contextlib.suppress(psycopg.Error, OSError):
                await self._tx(leave)
        if self._locks is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._locks.close()  # frees our webhook turns for other nodes
        if self._writer is not None:
            await self._jobs.put(None)
            await self._writer
        if self._opened:
            await self._pool.close()

    def commit_counters(self) -> tuple[int, int, float]:
        """(commits, jobs committed, seconds spent) by this process's writer."""
        return self.commits, self.committed_jobs, self.commit_seconds

    async def check(self, *, quick: bool = False) -> builtins.list[str]:
        """Problems with the queue ([] when sound): PostgreSQL keeps its own pages whole,
        so this connects and checks the schema version (``open``) and nothing more."""
        await self.open()
        return []

    async def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` when any node commits new mail (``LISTEN``/``NOTIFY``).

        A hint, never relied on for correctness: a node that misses a notification (its
        listening connection was down) still finds the mail by polling. Notifications
        in a burst arrive as they come; ``wake`` is expected to coalesce them (the
        scheduler's event, a worker's pipe).
        """
        await self.open()
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(wake), name="ferry-queue-listen")

    async def _listen(self, wake: Callable[[], None]) -> None:
        backoff = 0.5
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=10
                )
                try:
                    await conn.execute(f"LISTEN {CHANNEL}".encode())
                    backoff = 0.5
                    wake()  # what was committed while we were not listening
                    async for _note in conn.notifies():
                        wake()
                finally:
                    await conn.close()
            except psycopg.OperationalError:
                pass
            # Reconnect after a pause (doubling to 30 s): the database is away.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def register_node(self, node_id: str, host: str, version: str) -> None:
        """Announce this node in ``nodes`` and keep its heartbeat while the queue is open."""
        await self.open()
        self._node_id = node_id
        started = time.time()

        async def beat(now: float) -> None:
            async def job(conn: Conn) -> None:
                await conn.execute(
                    "INSERT INTO nodes(id, host, version, started, heartbeat)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
                    " SET heartbeat = excluded.heartbeat",
                    (node_id, host, version, started, now),
                )
                await conn.execute(
                    "DELETE FROM nodes WHERE heartbeat < %s", (now - FORGET_NODE_AFTER,)
                )
                # Counters of nodes gone from the table (forgotten, or a worker that
                # published after its node left) join the stopped nodes' ('').
                cur = await conn.execute(
                    "SELECT DISTINCT c.node FROM delivery_counters c WHERE c.node <> ''"
                    " AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = c.node)"
                    " AND NOT EXISTS (SELECT 1 FROM delivery_state s WHERE s.node = c.node"
                    " AND s.at >= %s)",
                    (now - STATE_FRESH_SECONDS,),
                )
                await _fold_counters(conn, [str(r[0]) for r in await cur.fetchall()])

            await self._tx(job)

        await beat(started)

        async def loop() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_SECONDS)
                # A beat that fails (the database is away) is simply the next one's job.
                with contextlib.suppress(psycopg.Error, OSError):
                    await beat(time.time())

        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(loop(), name="ferry-node-heartbeat")

    async def import_message(
        self,
        message: tuple[Any, ...],
        body: bytes,
        recipients: Sequence[tuple[Any, ...]],
        attempts: Sequence[tuple[Any, ...]],
    ) -> bool:
        """Write one message moved from another queue (``ferry.queue.transfer``), whole.

        ``message``: id, sender, size, priority, arrival, expires, status,
        client_address, client_helo, auth_user, envid, ret, smtputf8, body_8bit, extra;
        ``recipients``: (old id, address, domain, orcpt, notify, status, priority,
        arrival, attempts, next_attempt, last_code, last_enhanced, last_text, route,
        delay_warned, expiry_reason); ``attempts``: (old recipient id, at, outcome,
        code, enhanced, text, next_hop, tls, tried). False: a message with that id is here
        already.
        """

        async def job(conn: Conn) -> bool:
            m = list(message)
            m[12], m[13] = bool(m[12]), bool(m[13])
            cur = await conn.execute(
                "INSERT INTO messages(id, sender, size, priority, arrival, expires, status,"
                " client_address, client_helo, auth_user, envid, ret, smtputf8, body_8bit,"
                " extra) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                m,
            )
            if await cur.fetchone() is None:
                return False
            await conn.execute(
                "INSERT INTO bodies(message_id, data) VALUES (%s, %s)", (message[0], body)
            )
            new_ids: dict[Any, int] = {}
            for r in recipients:
                old, *rest = r
                status, attempts_made, next_attempt = rest[4], rest[7], rest[8]
                if status == "InProgress":  # a lease of the old queue: void here, due now
                    status = "Deferred" if attempts_made else "Queued"
                cur = await conn.execute(
                    "INSERT INTO recipients(message_id, address, domain, orcpt, notify, status,"
                    " priority, arrival, attempts, next_attempt, last_code, last_enhanced,"
                    " last_text, route, delay_warned, expiry_reason) VALUES (%s, %s, %s, %s,"
                    " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (
                        message[0],
                        *rest[:4],
                        status,
                        *rest[5:8],
                        # A pending recipient is due at its time (or at once).
                        rest[6] if next_attempt is None and status in _PENDING else next_attempt,
                        *rest[9:13],
                        bool(rest[13]),
                        rest[14],
                    ),
                )
                row = await cur.fetchone()
                assert row is not None
                new_ids[old] = int(row[0])
            rows = [(new_ids[a[0]], *a[1:]) for a in attempts if a[0] in new_ids]
            if rows:
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO attempts(recipient_id, at, outcome, code, enhanced, text,"
                        " next_hop, tls, tried) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        rows,
                    )
            await _refresh_message_status(conn, [str(message[0])])
            await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            return True

        return await self._tx(job)

    async def nodes(self) -> builtins.list[NodeInfo]:
        """The nodes sharing this queue, with the work each has in hand."""

        async def job(conn: Conn) -> builtins.list[NodeInfo]:
            cur = await conn.execute(
                "SELECT n.id, n.host, n.version, n.started, n.heartbeat,"
                " (SELECT COUNT(*) FROM recipients r WHERE r.status = 'InProgress'"
                " AND left(r.lease_owner, length(n.id) + 1) = n.id || ':')"
                " FROM nodes n ORDER BY n.host, n.started"
            )
            return [
                NodeInfo(r[0], r[1], r[2], float(r[3]), float(r[4]), int(r[5]))
                for r in await cur.fetchall()
            ]

        return await self._read(job)

    # -- plumbing ---------------------------------------------------------------

    @staticmethod
    async def _refresh_status(conn: Conn, message_ids: list[str], now: float) -> None:
        await _refresh_message_status(conn, message_ids, now)

    @staticmethod
    async def _cancel_dsns(
        conn: Conn,
        message_ids: builtins.list[str],
        cancelled: set[int],
        make_dsn: Callable[[MessageInfo, bytes], EnvelopeIn | None],
        now: float,
        lifetime: float,
    ) -> int:
        """Queue a DSN for each message with just-cancelled recipients (``bulk`` cancel):
        in the cancel's own transaction, so a DSN exists exactly when its cancel does."""
        n = 0
        for message in await _load_messages(conn, message_ids):
            cur = await conn.execute(
                "SELECT id FROM recipients WHERE message_id = %s ORDER BY id", (message.id,)
            )
            rids = [int(r[0]) for r in await cur.fetchall() if int(r[0]) in cancelled]
            if not rids:
                continue
            message.recipients = await _load_recipients(conn, rids)
            cur = await conn.execute("SELECT data FROM bodies WHERE message_id = %s", (message.id,))
            row = await cur.fetchone()
            envelope = make_dsn(message, bytes(row[0]) if row else b"")
            if envelope is not None:
                await _insert_message(conn, new_queue_id(now), envelope, now, now + lifetime)
                n += 1
        if n:
            await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))  # wake a node
        return n

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]], *, pipeline: bool = False) -> T:
        """Run ``fn`` in one transaction on a pooled connection, again after a conflict.

        ``pipeline``: statements whose results ``fn`` does not read go out without
        waiting (psycopg's pipeline mode); ``fn`` must then not read ``rowcount``
        before it has fetched that statement's rows.
        """
        await self.open()
        for attempt in range(RETRIES):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    if not pipeline:
                        return await fn(conn)
                    async with conn.pipeline():
                        return await fn(conn)
            except RETRYABLE:
                if attempt == RETRIES - 1:
                    raise
            except psycopg.OperationalError:
                self._connection_lost()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection_lost(self) -> None:
        """The server went away (or restarted): test every idle pooled connection now,
        so the next operations get fresh ones instead of failing one broken one each."""
        if self._pool_check is None or self._pool_check.done():
            self._pool_check = asyncio.create_task(self._pool.check(), name="ferry-pool-check")

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        # One snapshot per read job (REPEATABLE READ), read-only.
        await self.open()
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return await fn(conn)
        except psycopg.OperationalError:
            self._connection_lost()
            raise

    async def _grouped(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` in the writer's next group commit; return once that commit is done."""
        await self.open()
        if self._writer is None or self._closed:
            raise RuntimeError("the queue is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._jobs.put(_Job(fn, fut))
        return await fut

    async def _write_loop(self) -> None:
        while True:
            first = await self._jobs.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.batch:
                try:
                    nxt = self._jobs.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            await self._run_group(group)
            if stop:
                return

    async def _run_group(self, group: list[_Job]) -> None:
        started = time.perf_counter()
        results: list[tuple[_Job, bool, Any]] = []
        try:
            # Pipeline mode: the group's statements go out without waiting for each
            # other's results (one round trip for the lot, not one per message); an
            # error surfaces at the next result read or at the end of the pipeline.
            async with self._pool.connection() as conn, conn.transaction(), conn.pipeline():
                for job in group:
                    try:
                        value = await job.fn(conn)
                    except psycopg.Error:
                        raise  # the transaction is aborted: handled below
                    except Exception as exc:
                        # Jobs raise their own errors before writing anything.
                        results.append((job, False, exc))
                    else:
                        results.append((job, True, value))
                if any(ok for _job, ok, _value in results):
                    # New mail: wake idle nodes (delivered at COMMIT; one per group).
                    await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                self._connection_lost()
            if len(group) > 1 and not isinstance(exc, psycopg.OperationalError):
                # One job's statement failed: the others are not to blame. Each again alone.
                for job in group:
                    await self._run_group([job])
                return
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        except BaseException as exc:
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.commits += 1
        self.committed_jobs += len(group)
        self.commit_seconds += time.perf_counter() - started
        # Only now, after the commit, do callers learn their outcome.
        for job, ok, value in results:
            if job.future.done():
                continue  # the caller gave up (cancelled); the message is stored anyway
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    # -- intake -----------------------------------------------------------------

    async def enqueue(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> str:
        now = time.time()
        qid = queue_id or new_queue_id(now)
        exp = expires if expires is not None else now + 4 * 86400
        log = self.event_log

        async def job(conn: Conn) -> str:
            if idempotency is not None:
                # Insert the key, or take over an expired one; a live one is a replay.
                cur = await conn.execute(
                    "INSERT INTO idempotency(key, fingerprint, queue_id, response, expires)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET"
                    " fingerprint = excluded.fingerprint, queue_id = excluded.queue_id,"
                    " response = excluded.response, expires = excluded.expires"
                    " WHERE idempotency.expires <= %s RETURNING key",
                    (
                        idempotency.key,
                        idempotency.fingerprint,
                        qid,
                        idempotency.response,
                        idempotency.expires,
                        now,
                    ),
                )
                if await cur.fetchone() is None:
                    existing = await _idempotency_row(conn, idempotency.key, now)
                    if existing is not None:
                        raise IdempotencyReplay(existing)
            await _insert_message(conn, qid, envelope, now, exp)
            if log:
                await _received_event(conn, qid, envelope, now)
            return qid

        return await self._grouped(job)

    async def idempotency(self, key: str, *, now: float) -> IdempotencyRecord | None:
        return await self._read(lambda conn: _idempotency_row(conn, key, now))

    # -- delivery ---------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        *,
        now: float,
        limit: int,
        lease: float,
        exclude_domains: Collection[str] = (),
    ) -> list[ClaimedRecipient]:
        excluded = sorted(set(exclude_domains))
        until = now + lease

        async def job(conn: Conn) -> list[ClaimedRecipient]:
            # Due and pending, or leased by a worker whose lease ran out (it died);
            # highest priority first, then oldest. SKIP LOCKED: rows another node is
            # claiming right now are passed over, not waited for.
            cur = await conn.execute(
                "WITH due AS (SELECT id FROM recipients"
                f" WHERE status IN {PENDING}"
                " AND ((status <> 'InProgress' AND next_attempt <= %(now)s)"
                " OR (status = 'InProgress' AND lease_until <= %(now)s))"
                " AND NOT (domain = ANY(%(excluded)s))"
                " ORDER BY priority DESC, arrival, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE recipients r SET status = 'InProgress', lease_owner = %(owner)s,"
                " lease_until = %(until)s FROM due, messages m"
                " WHERE r.id = due.id AND m.id = r.message_id"
                f" RETURNING {_prefixed('r', _RCPT_COLS)}, {_prefixed('m', _MSG_COLS)}",
                {"now": now, "excluded": excluded, "limit": limit, "owner": owner, "until": until},
            )
            rows = await cur.fetchall()
            if not rows:
                return []
            n = _RCPT_COLS.count(",") + 1
            # One MessageInfo per message, as it was before this claim (as SQLite's).
            messages = {r[n]: _message(r[n:]) for r in rows}
            out = [ClaimedRecipient(_recipient(r[:n]), messages[r[n]], until) for r in rows]
            # A message with a recipient in progress is in progress, whatever else its
            # recipients are (``message_status``): no need to read them. The UPDATE waits
            # for a node that holds the message's lock to finish recording.
            await conn.execute(
                "UPDATE messages SET status = 'InProgress' WHERE id = ANY(%s)"
                " AND status <> 'InProgress'",
                (sorted(messages),),
            )
            out.sort(key=lambda c: (-int(c.message.priority), c.message.arrival, c.recipient.id))
            return out

        return await self._tx(job, pipeline=True)

    async def record(
        self,
        owner: str,
        results: list[AttemptResult],
        *,
        now: float,
        new_messages: Sequence[tuple[EnvelopeIn, float, Sequence[int]]] = (),
    ) -> list[str | None]:
        ids = [new_queue_id(now) for _ in new_messages]
        log = self.event_log

        async def job(conn: Conn) -> list[str | None]:
            touched: set[str] = set()
            updated: set[int] = set()
            addresses: dict[int, tuple[str, str, Status]] = {}
            metadata: dict[str, Any] = {}
            by_id = {res.recipient_id: res for res in results}
            cols: dict[str, list[Any]] = {k: [] for k in _RECORD_COLUMNS}
            for res in by_id.values():
                reply = res.reply
                pending = res.status == Status.DEFERRED or not res.status.is_final
                cols["id"].append(res.recipient_id)
                cols["pending"].append(pending)
                cols["counts"].append(res.counts_as_attempt)
                cols["final"].append(res.status.value)
                cols["next"].append(
                    (res.next_attempt if res.next_attempt is not None else now) if pending else None
                )
                cols["code"].append(reply.code if reply else None)
                cols["enh"].append(reply.enhanced if reply else None)
                cols["text"].append(reply.text if reply else None)
                cols["route"].append(res.route)
                cols["warned"].append(res.delay_warned)
                cols["reason"].append(res.expiry_reason)
            # Every outcome in one statement, but only while the lease is still ours:
            # cancelled meanwhile, or our lease ran out and another worker owns the
            # recipient now -> that row is left alone.
            cur = await conn.execute(
                "UPDATE recipients r SET status = CASE WHEN v.pending THEN"
                " (CASE WHEN NOT v.counts AND r.attempts = 0 THEN 'Queued' ELSE 'Deferred' END)"
                " ELSE v.final END,"
                " next_attempt = v.next, lease_owner = NULL, lease_until = NULL,"
                " attempts = r.attempts + CASE WHEN v.counts THEN 1 ELSE 0 END,"
                " last_code = COALESCE(v.code, r.last_code),"
                " last_enhanced = CASE WHEN v.code IS NULL THEN r.last_enhanced ELSE v.enh END,"
                " last_text = COALESCE(v.text, r.last_text), route = COALESCE(v.route, r.route),"
                " delay_warned = r.delay_warned OR v.warned,"
                " expiry_reason = CASE WHEN v.final = 'Expired' AND NOT v.pending"
                " THEN COALESCE(v.reason, r.expiry_reason) ELSE r.expiry_reason END"
                " FROM unnest(%s::bigint[], %s::boolean[], %s::boolean[], %s::text[],"
                " %s::float8[], %s::integer[], %s::text[], %s::text[], %s::text[],"
                " %s::boolean[], %s::text[])"
                " AS v(id, pending, counts, final, next, code, enh, text, route, warned, reason)"
                " WHERE r.id = v.id AND r.status = 'InProgress' AND r.lease_owner = %s"
                " RETURNING r.id, r.message_id, r.address, r.status, r.attempts",
                (*(cols[k] for k in _RECORD_COLUMNS), owner),
            )
            rows = sorted(await cur.fetchall())
            attempts: dict[str, list[Any]] = {k: [] for k in _ATTEMPT_COLUMNS}
            for rid, message_id, address, status_text, attempts_after in rows:
                res = by_id[rid]
                new_status = Status(status_text)
                if res.counts_as_attempt:
                    reply = res.reply
                    for k, v in zip(
                        _ATTEMPT_COLUMNS,
                        (
                            rid,
                            res.status.value,
                            reply.code if reply else None,
                            reply.enhanced if reply else None,
                            reply.text if reply else None,
                            res.next_hop,
                            res.tls,
                            json.dumps(list(res.tried)) if res.tried else None,
                        ),
                        strict=True,
                    ):
                        attempts[k].append(v)
                    if log:
                        await _outcome_event(
                            conn,
                            now,
                            message_id,
                            address,
                            res,
                            new_status,
                            attempts_after,
                            metadata,
                        )
                touched.add(message_id)
                updated.add(rid)
                addresses[rid] = (message_id, address, new_status)
            if attempts["id"]:
                await conn.execute(
                    "INSERT INTO attempts(recipient_id, at, outcome, code, enhanced, text,"
                    " next_hop, tls, tried) SELECT id, %s, outcome, code, enh, text, hop, tls,"
                    " tried FROM unnest(%s::bigint[], %s::text[], %s::integer[], %s::text[],"
                    " %s::text[], %s::text[], %s::text[], %s::text[])"
                    " WITH ORDINALITY AS a(id, outcome, code, enh, text, hop, tls, tried, i)"
                    " ORDER BY i",
                    (now, *(attempts[k] for k in _ATTEMPT_COLUMNS)),
                )
            await _refresh_message_status(conn, sorted(touched), now)
            # A DSN goes in only if an outcome it reports was really recorded (not one
            # discarded because the recipient was cancelled or taken over meanwhile).
            out: list[str | None] = []
            for qid, (envelope, expires, about) in zip(ids, new_messages, strict=True):
                if updated.intersection(about):
                    await _insert_message(conn, qid, envelope, now, expires)
                    await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
                    out.append(qid)
                    if log:
                        await _dsn_events(
                            conn,
                            now,
                            qid,
                            [addresses[i] for i in about if i in addresses],
                            metadata,
                        )
                else:
                    out.append(None)
            return out

        return await self._tx(job, pipeline=True)

    async def read_message(self, message_id: str) -> bytes | None:
        async def job(conn: Conn) -> bytes | None:
            cur = await conn.execute("SELECT data FROM bodies WHERE message_id = %s", (message_id,))
            row = await cur.fetchone()
            return bytes(row[0]) if row else None

        return await self._read(job)

    async def read_messages(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        async def job(conn: Conn) -> dict[str, bytes]:
            cur = await conn.execute(
                "SELECT message_id, data FROM bodies WHERE message_id = ANY(%s)",
                (list(message_ids),),
            )
            return {mid: bytes(data) for mid, data in await cur.fetchall()}

        return await self._read(job)

    async def extend_leases(self, owner: str, recipient_ids: Sequence[int], *, until: float) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE recipients SET lease_until = %s WHERE status = 'InProgress'"
                " AND lease_owner = %s AND id = ANY(%s)",
                (until, owner, list(recipient_ids)),
            )
            return cur.rowcount

        return await self._tx(job)

    async def release_leases(self, owner: str | None = None) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE recipients SET status = CASE WHEN attempts > 0 THEN 'Deferred'"
                " ELSE 'Queued' END, lease_owner = NULL, lease_until = NULL"
                " WHERE status = 'InProgress' AND (%(owner)s::text IS NULL"
                " OR lease_owner = %(owner)s) RETURNING message_id",
                {"owner": owner},
            )
            ids = [r[0] for r in await cur.fetchall()]
            await _refresh_message_status(conn, sorted(set(ids)))
            return len(ids)

        return await self._tx(job)

    async def next_due(self, *, exclude_domains: Collection[str] = ()) -> float | None:
        excluded = sorted(set(exclude_domains))

        async def job(conn: Conn) -> float | None:
            # LEAST ignores NULLs: None only when nothing is pending at all.
            cur = await conn.execute(
                "SELECT LEAST((SELECT MIN(next_attempt) FROM recipients"
                " WHERE status IN ('Queued', 'Deferred') AND NOT (domain = ANY(%(x)s))),"
                " (SELECT MIN(lease_until) FROM recipients WHERE status = 'InProgress'"
                " AND NOT (domain = ANY(%(x)s))))",
                {"x": excluded},
            )
            row = await cur.fetchone()
            return row[0] if row else None

        return await self._read(job)

    # -- operators --------------------------------------------------------------

    async def get(self, message_id: str) -> MessageInfo | None:
        async def job(conn: Conn) -> MessageInfo | None:
            msgs = await _load_messages(conn, [message_id])
            if not msgs:
                return None
            msg = msgs[0]
            cur = await conn.execute(
                "SELECT id FROM recipients WHERE message_id = %s ORDER BY id", (message_id,)
            )
            ids = [r[0] for r in await cur.fetchall()]
            msg.recipients = await _load_recipients(conn, ids, history=True)
            return msg

        return await self._read(job)

    async def list(
        self,
        *,
        status: Status | None = None,
        domain: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[MessageInfo]:
        async def job(conn: Conn) -> builtins.list[MessageInfo]:
            where: builtins.list[str] = []
            args: builtins.list[Any] = []
            if status in (Status.QUEUED, Status.DEFERRED, Status.IN_PROGRESS):
                # A pending state: every message with a recipient in it, partially
                # delivered ones included (an operator asking "what is deferred?").
                where.append(
                    "id IN (SELECT message_id FROM recipients"
                    f" WHERE status IN {PENDING} AND status = %s)"
                )
                args.append(status.value)
            elif status is not None:
                where.append("status = %s")
                args.append(status.value)
            if sender is not None:
                where.append("sender = %s")
                args.append(sender)
            if domain is not None:
                where.append("id IN (SELECT message_id FROM recipients WHERE domain = %s)")
                args.append(domain_key(domain))
            sql = "SELECT id FROM messages"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY arrival DESC, id DESC LIMIT %s OFFSET %s"
            cur = await conn.execute(sql.encode(), (*args, limit, offset))
            ids = [r[0] for r in await cur.fetchall()]
            by_id = {m.id: m for m in await _load_messages(conn, ids)}
            cur = await conn.execute(
                "SELECT id FROM recipients WHERE message_id = ANY(%s) ORDER BY id", (ids,)
            )
            rids = [r[0] for r in await cur.fetchall()]
            for r in await _load_recipients(conn, rids):
                by_id[r.message_id].recipients.append(r)
            return [by_id[i] for i in ids if i in by_id]

        return await self._read(job)

    async def retry(self, message_id: str, *, now: float) -> int:
        log = self.event_log

        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE recipients SET next_attempt = %s WHERE message_id = %s"
                " AND status IN ('Queued', 'Deferred')",
                (now, message_id),
            )
            if cur.rowcount:
                await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            if log and cur.rowcount:
                await _operator_event(conn, now, message_id, "retry", cur.rowcount)
            return cur.rowcount

        return await self._tx(job)

    async def cancel(self, message_id: str, *, now: float) -> int:
        log = self.event_log

        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE recipients SET status = 'Cancelled', next_attempt = NULL,"
                " lease_owner = NULL, lease_until = NULL"
                f" WHERE message_id = %s AND status IN {PENDING}",
                (message_id,),
            )
            n = cur.rowcount
            await _refresh_message_status(conn, [message_id], now)
            if log and n:
                await _operator_event(conn, now, message_id, "cancel", n)
            return n

        return await self._tx(job)

    async def remove(self, message_id: str) -> bool:
        log = self.event_log

        async def job(conn: Conn) -> bool:
            cur = await conn.execute("DELETE FROM messages WHERE id = %s", (message_id,))
            gone = cur.rowcount > 0
            if log and gone:
                await _operator_event(conn, time.time(), message_id, "remove", 1)
            return gone

        return await self._tx(job)

    async def clear_expired(self) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT message_id FROM recipients"
                " GROUP BY message_id HAVING bool_or(status = 'Expired')"
                f" AND NOT bool_or(status IN {PENDING}))"
            )
            return cur.rowcount

        return await self._tx(job)

    async def purge(self, *, before: float, limit: int) -> int:
        async def job(conn: Conn) -> int:
            # ON DELETE CASCADE takes recipients, attempts and the body.
            cur = await conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                " WHERE finished IS NOT NULL AND finished < %s ORDER BY finished LIMIT %s)",
                (before, limit),
            )
            n = cur.rowcount
            # The event log and used idempotency keys follow the same retention.
            await conn.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < %s"
                " ORDER BY id LIMIT %s)",
                (before, limit),
            )
            await conn.execute(
                "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency"
                " WHERE expires < %s LIMIT %s)",
                (time.time(), limit),
            )
            return n

        return await self._tx(job)

    async def statistics(self, *, now: float) -> QueueStats:
        # Aggregates over the tables (PostgreSQL has no cheap COUNT(*)): counters kept
        # by triggers, as SQLite has, would be hot rows every node writes. Later work.
        async def job(conn: Conn) -> QueueStats:
            st = QueueStats()
            counts: dict[str, int] = {}
            by_priority: dict[int, int] = {}
            cur = await conn.execute(
                "SELECT status, priority, COUNT(*), COALESCE(SUM(size), 0) FROM messages"
                " GROUP BY status, priority"
            )
            for status, prio, n, size in await cur.fetchall():
                counts[status] = counts.get(status, 0) + int(n)
                by_priority[prio] = by_priority.get(prio, 0) + int(n)
                st.total_size += int(size)
            st.total_messages = sum(counts.values())
            st.queued_messages = counts.get("Queued", 0)
            st.in_progress_messages = counts.get("InProgress", 0)
            st.deferred_messages = counts.get("Deferred", 0)
            st.delivered_messages = counts.get("Delivered", 0)
            st.partially_delivered_messages = counts.get("PartiallyDelivered", 0)
            st.failed_messages = counts.get("Failed", 0)
            st.expired_messages = counts.get("Expired", 0)
            st.cancelled_messages = counts.get("Cancelled", 0)
            cur = await conn.execute(
                "SELECT MIN(arrival), MIN(arrival) FILTER (WHERE finished IS NULL),"
                " COUNT(*) FILTER (WHERE finished IS NULL),"
                " SUM(trunc(arrival)) FILTER (WHERE finished IS NULL) FROM messages"
            )
            row = await cur.fetchone()
            assert row is not None
            oldest, oldest_pending, pending, arrival_sum = row
            st.oldest_message_time = oldest
            st.oldest_pending_recipient_time = oldest_pending
            st.average_queue_time = now - float(arrival_sum) / pending if pending else None
            cur = await conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(GREATEST(attempts - 1, 0)), 0) FROM recipients"
            )
            row = await cur.fetchone()
            assert row is not None
            n, retries = int(row[0]), int(row[1])
            st.average_retry_count = retries / n if n else None
            st.messages_by_priority = {
                Priority(p).name.capitalize(): n for p, n in sorted(by_priority.items())
            }
            cur = await conn.execute(
                "SELECT route, COUNT(DISTINCT message_id) FROM recipients"
                " WHERE route IS NOT NULL GROUP BY route ORDER BY route"
            )
            st.messages_by_smart_host = {r: int(n) for r, n in await cur.fetchall()}
            return st

        return await self._read(job)

    # -- one webhook sender per endpoint across nodes --------------------------------

    async def webhook_turn(self, endpoint: str) -> bool:
        """True while this process holds ``endpoint``'s sending turn: a session advisory
        lock (per schema and endpoint) on a connection of its own, freed by the server
        when that connection ends -- a clean stop, or a node that died -- so another
        node's sender takes over within its next poll. While its connection is lost a
        sender holds no turn (it may have been taken over): it stops sending."""
        await self.open()
        async with self._locks_guard:
            try:
                if self._locks is None or self._locks.closed:
                    self._held_turns.clear()
                    self._locks = await psycopg.AsyncConnection.connect(
                        self.conninfo, autocommit=True, connect_timeout=10
                    )
                if endpoint in self._held_turns:
                    await self._locks.execute("SELECT 1")  # still connected: still ours
                    return True
                cur = await self._locks.execute(
                    "SELECT pg_try_advisory_lock(hashtextextended("
                    " current_schema() || ':ferry-webhook:' || %s, 0))",
                    (endpoint,),
                )
                row = await cur.fetchone()
            except psycopg.OperationalError:
                if self._locks is not None:
                    with contextlib.suppress(psycopg.Error, OSError):
                        await self._locks.close()
                self._locks = None
                self._held_turns.clear()
                return False
            if row and row[0]:
                self._held_turns.add(endpoint)
                return True
            return False

    # -- delivery statistics of every node (``ferry stats``) ------------------------

    async def add_delivery_stats(
        self,
        owner: str,
        counters: Mapping[str, int],
        state: Mapping[str, Any] | None,
        *,
        now: float,
    ) -> bool:
        """Add a scheduler's counts to its node's counters and keep its states (see
        ``Queue.add_delivery_stats``). Each node writes only its own rows, so nodes
        never wait for each other here."""
        node = node_of(owner)
        keys = [k for k, v in counters.items() if v]
        values = [int(counters[k]) for k in keys]

        async def job(conn: Conn) -> None:
            if keys:
                await conn.execute(
                    "INSERT INTO delivery_counters(node, key, n)"
                    " SELECT %s, k, v FROM unnest(%s::text[], %s::bigint[]) AS t(k, v)"
                    " ON CONFLICT (node, key) DO UPDATE SET n = delivery_counters.n + excluded.n",
                    (node, keys, values),
                )
            if state is None:
                await conn.execute("DELETE FROM delivery_state WHERE owner = %s", (owner,))
            else:
                await conn.execute(
                    "INSERT INTO delivery_state(owner, node, at, data) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (owner) DO UPDATE SET node = excluded.node, at = excluded.at,"
                    " data = excluded.data",
                    (owner, node, now, _dumps(dict(state))),
                )

        await self._tx(job)
        return True

    async def delivery_stats(self, *, now: float) -> builtins.list[NodeStats]:
        """Every node's delivery counters (node '': the nodes that have stopped) and the
        states of the schedulers that published within ``STATE_FRESH_SECONDS``."""

        async def job(conn: Conn) -> builtins.list[NodeStats]:
            by_node: dict[str, NodeStats] = {}
            cur = await conn.execute("SELECT node, key, n FROM delivery_counters")
            for node, key, n in await cur.fetchall():
                by_node.setdefault(node, NodeStats(node)).counters[key] = int(n)
            cur = await conn.execute(
                "SELECT owner, node, data FROM delivery_state WHERE at >= %s ORDER BY owner",
                (now - STATE_FRESH_SECONDS,),
            )
            for owner, node, data in await cur.fetchall():
                by_node.setdefault(node, NodeStats(node)).states[owner] = json.loads(data)
            cur = await conn.execute("SELECT id, heartbeat FROM nodes")
            for node, heartbeat in await cur.fetchall():
                by_node.setdefault(node, NodeStats(node)).heartbeat = float(heartbeat)
            return [by_node[k] for k in sorted(by_node)]

        return await self._read(job)

    # -- the event log (webhooks, GET /v1/events) ----------------------------------

    async def events(
        self, *, after: int, types: Sequence[str] = (), limit: int = 100
    ) -> builtins.list[outbox.StoredEvent]:
        async def job(conn: Conn) -> builtins.list[outbox.StoredEvent]:
            # Ids are taken at insert, not at commit: with several transactions writing
            # events at once (intake, delivery workers, other nodes), a lower id can
            # become visible after a higher one, and a reader that had moved past it
            # would never see it. So the log is read in (transaction id, id) order, and
            # only events of transactions older than every one still running (the
            # snapshot's xmin): that set never grows behind the cursor. ``after`` (an
            # event id) stands for its place in that order.
            cur = await conn.execute(
                "SELECT id, at, type, message_id, data FROM events"
                " WHERE (xid, id) > (COALESCE((SELECT xid FROM events WHERE id <= %(after)s"
                " ORDER BY id DESC LIMIT 1), '0'::xid8), %(after)s)"
                " AND xid < pg_snapshot_xmin(pg_current_snapshot())"
                " AND (cardinality(%(types)s::text[]) = 0 OR type = ANY(%(types)s))"
                " ORDER BY xid, id LIMIT %(limit)s",
                {"after": after, "types": list(types), "limit": limit},
            )
            return [_stored(r) for r in await cur.fetchall()]

        return await self._read(job)

    async def events_by_id(self, ids: Sequence[int]) -> builtins.list[outbox.StoredEvent]:
        async def job(conn: Conn) -> builtins.list[outbox.StoredEvent]:
            cur = await conn.execute(
                "SELECT id, at, type, message_id, data FROM events WHERE id = ANY(%s) ORDER BY id",
                (sorted(set(ids)),),
            )
            return [_stored(r) for r in await cur.fetchall()]

        return await self._read(job)

    async def webhook_cursor(self, endpoint: str) -> int:
        """The endpoint's cursor; a new endpoint starts at the current end of the log."""

        async def job(conn: Conn) -> int:
            await conn.execute(
                "INSERT INTO webhook_cursors(endpoint, after)"
                " SELECT %s, COALESCE(MAX(id), 0) FROM events ON CONFLICT (endpoint) DO NOTHING",
                (endpoint,),
            )
            cur = await conn.execute(
                "SELECT after FROM webhook_cursors WHERE endpoint = %s", (endpoint,)
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        return await self._tx(job)

    async def webhook_done(
        self, endpoint: str, *, after: int | None = None, retried: Sequence[int] = ()
    ) -> None:
        async def job(conn: Conn) -> None:
            if after is not None:
                await _advance(conn, endpoint, after)
            await conn.execute(
                "DELETE FROM webhook_failures WHERE endpoint = %s AND event_id = ANY(%s)",
                (endpoint, list(retried)),
            )

        await self._tx(job)

    async def webhook_failed(
        self, endpoint: str, event_ids: Sequence[int], *, now: float, error: str, after: int | None
    ) -> None:
        async def job(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO webhook_failures(endpoint, event_id, at, error, retry)"
                " SELECT %s, e, %s, %s, false FROM unnest(%s::bigint[]) AS e"
                " ON CONFLICT (endpoint, event_id) DO UPDATE SET at = excluded.at,"
                " error = excluded.error, retry = false",
                (endpoint, now, error, list(event_ids)),
            )
            if after is not None:
                await _advance(conn, endpoint, after)

        await self._tx(job)

    async def webhook_retries(self, endpoint: str, limit: int) -> builtins.list[int]:
        async def job(conn: Conn) -> builtins.list[int]:
            cur = await conn.execute(
                "SELECT event_id FROM webhook_failures WHERE endpoint = %s AND retry"
                " ORDER BY event_id LIMIT %s",
                (endpoint, limit),
            )
            return [int(r[0]) for r in await cur.fetchall()]

        return await self._read(job)

    async def webhook_failures(self) -> builtins.list[tuple[str, int, float, str]]:
        async def job(conn: Conn) -> builtins.list[tuple[str, int, float, str]]:
            cur = await conn.execute(
                "SELECT endpoint, event_id, at, error FROM webhook_failures"
                " ORDER BY endpoint, event_id"
            )
            return [(r[0], int(r[1]), float(r[2]), r[3]) for r in await cur.fetchall()]

        return await self._read(job)

    async def webhook_retry(self, endpoint: str | None) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE webhook_failures SET retry = true"
                " WHERE %(e)s::text IS NULL OR endpoint = %(e)s",
                {"e": endpoint},
            )
            return cur.rowcount

        return await self._tx(job)

    async def webhook_rewind(self, endpoint: str, since: float) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute(
                "SELECT COALESCE((SELECT MIN(id) - 1 FROM events WHERE at >= %s),"
                " (SELECT COALESCE(MAX(id), 0) FROM events))",
                (since,),
            )
            row = await cur.fetchone()
            assert row is not None
            after = int(row[0])
            await conn.execute(
                "INSERT INTO webhook_cursors(endpoint, after) VALUES (%s, %s)"
                " ON CONFLICT (endpoint) DO UPDATE SET after = excluded.after",
                (endpoint, after),
            )
            return after

        return await self._tx(job)


def psycopg_pool_errors() -> tuple[type[BaseException], ...]:
    """What a pool that cannot connect raises (a timeout, or the connection's error)."""
    from psycopg_pool import PoolTimeout

    return (PoolTimeout, psycopg.OperationalError)


# -- helpers run inside a transaction ---------------------------------------------


def _stored(r: tuple[Any, ...]) -> outbox.StoredEvent:
    return outbox.StoredEvent(int(r[0]), float(r[1]), r[2], r[3], json.loads(r[4]))


async def _advance(conn: Conn, endpoint: str, after: int) -> None:
    await conn.execute(
        "INSERT INTO webhook_cursors(endpoint, after) VALUES (%s, %s) ON CONFLICT (endpoint)"
        " DO UPDATE SET after = GREATEST(webhook_cursors.after, excluded.after)",
        (endpoint, after),
    )


async def _fold_counters(conn: Conn, nodes: builtins.list[str]) -> None:
    """Add stopped nodes' delivery counters to node '' (the stopped nodes) and drop
    their own rows: the totals stay, the table does not grow with every restart."""
    if not nodes:
        return
    await conn.execute(
        "INSERT INTO delivery_counters(node, key, n)"
        " SELECT '', key, SUM(n) FROM delivery_counters WHERE node = ANY(%s) GROUP BY key"
        " ON CONFLICT (node, key) DO UPDATE SET n = delivery_counters.n + excluded.n",
        (nodes,),
    )
    await conn.execute("DELETE FROM delivery_counters WHERE node = ANY(%s)", (nodes,))
    await conn.execute("DELETE FROM delivery_state WHERE node = ANY(%s)", (nodes,))


async def _idempotency_row(conn: Conn, key: str, now: float) -> IdempotencyRecord | None:
    cur = await conn.execute(
        "SELECT key, fingerprint, queue_id, response, expires FROM idempotency"
        " WHERE key = %s AND expires > %s",
        (key, now),
    )
    row = await cur.fetchone()
    return IdempotencyRecord(*row) if row else None


async def _insert_message(
    conn: Conn, qid: str, envelope: EnvelopeIn, now: float, expires: float
) -> str:
    """The message, its body and its recipients: one statement, one round trip."""
    prio = int(envelope.priority)
    rcpts = envelope.recipients
    await conn.execute(
        "WITH m AS (INSERT INTO messages(id, sender, size, priority, arrival, expires, status,"
        " client_address, client_helo, auth_user, envid, ret, smtputf8, body_8bit, extra)"
        " VALUES (%(id)s, %(sender)s, %(size)s, %(prio)s, %(now)s, %(expires)s, 'Queued',"
        " %(client)s, %(helo)s, %(auth)s, %(envid)s, %(ret)s, %(utf8)s, %(b8)s, %(extra)s)),"
        " b AS (INSERT INTO bodies(message_id, data) VALUES (%(id)s, %(data)s))"
        " INSERT INTO recipients(message_id, address, domain, orcpt, notify, status,"
        " priority, arrival, next_attempt)"
        " SELECT %(id)s, a, d, o, n, 'Queued', %(prio)s, %(now)s, %(now)s"
        " FROM unnest(%(a)s::text[], %(d)s::text[], %(o)s::text[], %(n)s::text[])"
        " WITH ORDINALITY AS t(a, d, o, n, i) ORDER BY i",
        {
            "id": qid,
            "sender": envelope.sender,
            "size": len(envelope.data),
            "prio": prio,
            "now": now,
            "expires": expires,
            "client": envelope.client_address,
            "helo": envelope.client_helo,
            "auth": envelope.auth_user,
            "envid": envelope.envid,
            "ret": envelope.ret,
            "utf8": envelope.smtputf8,
            "b8": envelope.body_8bit,
            "extra": json.dumps(envelope.extra) if envelope.extra else None,
            "data": envelope.data,
            "a": [r.address for r in rcpts],
            "d": [r.domain for r in rcpts],
            "o": [r.orcpt for r in rcpts],
            "n": [r.notify for r in rcpts],
        },
    )
    return qid


_MSG_COLS = (
    "id, sender, size, priority, arrival, expires, status, client_address, client_helo,"
    " auth_user, envid, ret, smtputf8, extra, finished"
)


def _prefixed(alias: str, columns: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


def _message(r: Sequence[Any]) -> MessageInfo:
    return MessageInfo(
        id=r[0],
        sender=r[1],
        size=int(r[2]),
        priority=Priority(r[3]),
        arrival=r[4],
        expires=r[5],
        status=Status(r[6]),
        client_address=r[7],
        client_helo=r[8],
        auth_user=r[9],
        envid=r[10],
        ret=r[11],
        smtputf8=bool(r[12]),
        extra=json.loads(r[13]) if r[13] else {},
        finished=r[14],
    )


async def _load_messages(conn: Conn, ids: list[str]) -> list[MessageInfo]:
    if not ids:
        return []
    cur = await conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id = ANY(%s)", (ids,))
    by_id = {r[0]: _message(r) for r in await cur.fetchall()}
    return [by_id[i] for i in ids if i in by_id]


_RCPT_COLS = (
    "id, message_id, address, orcpt, notify, status, attempts, next_attempt,"
    " last_code, last_enhanced, last_text, route, delay_warned, expiry_reason"
)


def _recipient(r: Sequence[Any]) -> RecipientInfo:
    return RecipientInfo(
        id=r[0],
        message_id=r[1],
        address=r[2],
        orcpt=r[3],
        notify=r[4],
        status=Status(r[5]),
        attempts=r[6],
        next_attempt=r[7],
        last_reply=_reply(r[8], r[9], r[10]),
        route=r[11],
        delay_warned=bool(r[12]),
        expiry_reason=r[13],
    )


async def _load_recipients(
    conn: Conn, ids: list[int], history: bool = False
) -> list[RecipientInfo]:
    if not ids:
        return []
    cur = await conn.execute(f"SELECT {_RCPT_COLS} FROM recipients WHERE id = ANY(%s)", (ids,))
    by_id = {r[0]: _recipient(r) for r in await cur.fetchall()}
    if history and by_id:
        cur = await conn.execute(
            "SELECT recipient_id, at, outcome, code, enhanced, text, next_hop, tls, tried"
            " FROM attempts WHERE recipient_id = ANY(%s) ORDER BY at, id",
            (list(by_id),),
        )
        for rid, at, outcome, code, enh, text, hop, tls, tried in await cur.fetchall():
            by_id[rid].history.append(
                Attempt(
                    at,
                    _reply(code, enh, text),
                    Status(outcome),
                    hop,
                    tls,
                    tuple(json.loads(tried)) if tried else (),
                )
            )
    return [by_id[i] for i in ids if i in by_id]


async def _refresh_message_status(
    conn: Conn, message_ids: list[str], now: float | None = None
) -> None:
    """Keep messages.status equal to what its recipients' statuses derive (same txn).

    A message whose every recipient is final is finished: ``finished`` is set and its
    body deleted, in this same transaction (retention, issue 11.2).
    """
    if not message_ids:
        return
    # Lock the messages (in id order) before reading their recipients: under READ
    # COMMITTED the read then sees every other transaction that changed one of them
    # and committed, so two nodes finishing one message's two recipients at once
    # cannot both see the other's as still pending.
    await conn.execute(
        "SELECT id FROM messages WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (message_ids,)
    )
    cur = await conn.execute(
        "SELECT message_id, status FROM recipients WHERE message_id = ANY(%s)", (message_ids,)
    )
    statuses: dict[str, list[Status]] = {m: [] for m in message_ids}
    for mid, status in await cur.fetchall():
        statuses[mid].append(Status(status))
    ids = sorted(statuses)
    await conn.execute(
        "UPDATE messages m SET status = s.status FROM unnest(%s::text[], %s::text[])"
        " AS s(id, status) WHERE m.id = s.id AND m.status <> s.status",
        (ids, [message_status(statuses[m]).value for m in ids]),
    )
    done = [m for m in ids if statuses[m] and all(x.is_final for x in statuses[m])]
    if done:
        # Every DSN about them was built from the body before the outcome that
        # finished them was recorded, and is queued with its own copy.
        at = time.time() if now is None else now
        await conn.execute(
            "UPDATE messages SET finished = %s WHERE finished IS NULL AND id = ANY(%s)",
            (at, done),
        )
        await conn.execute("DELETE FROM bodies WHERE message_id = ANY(%s)", (done,))


async def _add_event(
    conn: Conn, at: float, type_: str, message_id: str | None, data: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO events(at, type, message_id, data) VALUES (%s, %s, %s, %s)",
        (at, type_, message_id, _dumps(data)),
    )


async def _metadata_of(conn: Conn, message_id: str, cache: dict[str, Any]) -> Any:
    """The API metadata stored with a message (``{}`` when none)."""
    if message_id not in cache:
        cur = await conn.execute("SELECT extra FROM messages WHERE id = %s", (message_id,))
        row = await cur.fetchone()
        extra = json.loads(row[0]) if row and row[0] else {}
        cache[message_id] = json.loads(extra["metadata"]) if "metadata" in extra else {}
    return cache[message_id]


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


async def _received_event(conn: Conn, qid: str, envelope: EnvelopeIn, now: float) -> None:
    meta = json.loads(envelope.extra["metadata"]) if "metadata" in envelope.extra else {}
    await _add_event(
        conn,
        now,
        "received",
        qid,
        {
            "sender": envelope.sender,
            "recipients": [r.address for r in envelope.recipients],
            "size": len(envelope.data),
            "priority": envelope.priority.name.lower(),
            "client": envelope.client_address or envelope.auth_user,
            "metadata": meta,
        },
    )


async def _outcome_event(
    conn: Conn,
    now: float,
    message_id: str,
    address: str,
    res: AttemptResult,
    status: Status,
    attempt: int,
    metadata: dict[str, Any],
) -> None:
    await _add_event(
        conn,
        now,
        outbox.STATUS_EVENT.get(status.value, status.value.lower()),
        message_id,
        {
            "recipient": address,
            "reply": _reply_json(res.reply),
            "attempt": attempt,
            "next_hop": res.next_hop,
            "route": res.route,
            "tls": res.tls,
            "next_attempt": res.next_attempt if status == Status.DEFERRED else None,
            "metadata": await _metadata_of(conn, message_id, metadata),
        },
    )


async def _dsn_events(
    conn: Conn,
    now: float,
    dsn_id: str,
    about: list[tuple[str, str, Status]],
    metadata: dict[str, Any],
) -> None:
    """A DSN was queued: "delayed" for a delay warning, "bounced" for a failure report."""
    for message_id, address, status in about:
        if status == Status.DELIVERED:
            continue
        await _add_event(
            conn,
            now,
            "bounced" if status.is_final else "delayed",
            message_id,
            {
                "recipient": address,
                "dsn_id": dsn_id,
                "metadata": await _metadata_of(conn, message_id, metadata),
            },
        )


async def _operator_event(conn: Conn, now: float, message_id: str, action: str, count: int) -> None:
    await _add_event(conn, now, "operator", message_id, {"action": action, "recipients": count})


__all__ = ["PostgresQueue", "conninfo", "describe_dsn"]
