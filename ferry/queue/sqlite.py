"""The SQLite queue: WAL, synchronous=FULL, one writer thread with group commit.

Every operation is a function run on the writer thread's connection. The thread takes
whatever jobs are waiting (up to ``batch``), runs them in one transaction -- as if each
were in its own SAVEPOINT, so one failing job undoes none of its neighbours (see
``_Writer._run_group``) -- and commits them with one fsync. Concurrent
SMTP sessions therefore share fsyncs: durability costs little throughput, and a 250 is
only sent after the commit that holds the message has returned.

Small message bodies live in the database too, so one fsync covers message and
metadata; large ones are files in a spool beside it, durable before the commit of
the row that makes them visible (ferry/queue/spool.py; issue 12 measured why).
Other processes (the CLI while ``ferry serve`` runs) open their own connection; WAL
lets them read freely and SQLite's lock serialises their short writes.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import copy
import json
import os
import queue as _stdqueue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ferry.domains import domain_key
from ferry.envelope import (
    FINAL_STATUSES,
    EnvelopeIn,
    Priority,
    Reply,
    Status,
    message_status,
)
from ferry.events import QueueStorageLost as QueueStorageLostEvent
from ferry.events import emit
from ferry.queue import outbox, spool, sqlite_ops
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
from ferry.queue.selection import (
    WAITING,
    BulkAction,
    BulkResult,
    Counts,
    Page,
    Selection,
    Summary,
    Suspension,
)
from ferry.queue.sqlite_schema import DUE_WHERE, migrate

T = TypeVar("T")

# Version 1; later versions are steps in sqlite_schema.MIGRATIONS.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    arrival REAL NOT NULL,
    expires REAL NOT NULL,
    status TEXT NOT NULL,
    client_address TEXT,
    client_helo TEXT,
    auth_user TEXT,
    envid TEXT,
    ret TEXT,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    body_8bit INTEGER NOT NULL DEFAULT 0,
    extra TEXT
);
CREATE INDEX IF NOT EXISTS messages_status ON messages(status);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender);
CREATE TABLE IF NOT EXISTS bodies (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    orcpt TEXT,
    notify TEXT,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    arrival REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    lease_owner TEXT,
    lease_until REAL,
    last_code INTEGER,
    last_enhanced TEXT,
    last_text TEXT,
    route TEXT,
    delay_warned INTEGER NOT NULL DEFAULT 0
);
-- The claim query walks this index: pending recipients by due time.
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt)
    WHERE status IN ('Queued', 'Deferred', 'InProgress');
CREATE INDEX IF NOT EXISTS recipients_order ON recipients(priority DESC, arrival, id)
    WHERE status IN ('Queued', 'Deferred', 'InProgress');
CREATE INDEX IF NOT EXISTS recipients_message ON recipients(message_id);
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients(domain);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    recipient_id INTEGER NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    code INTEGER,
    enhanced TEXT,
    text TEXT,
    next_hop TEXT,
    tls TEXT
);
CREATE INDEX IF NOT EXISTS attempts_recipient ON attempts(recipient_id);
"""

QUEUE_TABLES = frozenset({"meta", "messages", "bodies", "recipients", "attempts"})

PENDING_SQL = "('Queued', 'Deferred', 'InProgress')"


WAL_SIZE_LIMIT = 16 * 1024 * 1024

#: Bodies of this many bytes or more are spool files, smaller ones rows in ``bodies``.
#: Measured (bench/body_storage.py, README "Where message bodies live"): below it a
#: file's own block, inode and journal cost more than the WAL's copy and checkpoint.
SPOOL_THRESHOLD = 16 * 1024
#: A queue whose commits are not fsynced (a delivery worker's, synchronous=NORMAL)
#: deletes body files in batches this often, after one fsync of the WAL.
UNLINK_INTERVAL = 1.0
#: Spool compaction (``SqliteQueue.compact_spool``): a sealed segment this many seconds
#: untouched, whose live bodies fill less than this share of it, has them copied to a
#: new segment, so one deferred message does not hold a whole segment's disk for days.
COMPACT_AGE = 600.0
COMPACT_SHARE = 0.5
#: A segment emptied by compaction is deleted this many seconds later: a reader that
#: looked up a moved body's old place just before the move can still read it there.
COMPACT_GRACE = 60.0


class QueueNotFound(FileNotFoundError):
    """There is no queue database at the configured path (and none was to be created)."""

    def __init__(self, db_path: Path) -> None:
        super().__init__(
            f"no queue exists at {db_path} (`ferry serve` creates it on its first start;"
            " check queue.path, pass --config FILE or set FERRY_DATA)"
        )


class QueueDamaged(OSError):
    """SQLite found the queue database corrupt; the message says how to recover."""

    def __init__(self, db_path: Path, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:10])
        more = len(self.problems) - 10
        super().__init__(
            f"the queue database {db_path} is damaged:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\n"
            + recovery_steps(db_path)
        )


class QueueStorageLost(OSError):
    """The database file was deleted or replaced under a running writer."""


def recovery_steps(db_path: Path) -> str:
    """What an operator does with a damaged queue (the README says the same)."""
    db = str(db_path)
    new = str(db_path.with_name("queue-recovered.db"))
    aside = db_path.parent / "damaged"
    return (
        "To recover: stop ferry, then with SQLite's command-line shell (sqlite3):\n"
        f"  sqlite3 {db} .recover | sqlite3 {new}\n"
        "  (if .recover fails -- Debian's and Ubuntu's sqlite3 lack what it needs and say\n"
        '  "SQL logic error" or "no such table: sqlite_dbpage" -- use .dump instead:\n'
        f"  rm {new}; sqlite3 {db} .dump | sqlite3 {new})\n"
        f"  mkdir -p {aside} && mv {db}* {aside}/\n"
        f"  mv {new} {db}\n"
        "  ferry queue check\n"
        "and start ferry again."
    )


def _sqlite_uri(path: Path, mode: str) -> str:
    # A URI so that mode=rw / mode=ro refuse to create a missing file.
    return "file:" + urllib.parse.quote(str(path.absolute())) + f"?mode={mode}"


def connect(path: Path, *, create: bool = True, readonly: bool = False) -> sqlite3.Connection:
    """Open the database with the settings every connection must share.

    ``create=False`` never makes a new database file (QueueNotFound instead);
    ``readonly=True`` opens an existing one for reading only (the CLI's listings).
    """
    if readonly or not create:
        if not path.is_file():
            raise QueueNotFound(path)
        conn = sqlite3.connect(
            _sqlite_uri(path, "ro" if readonly else "rw"),
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=30,
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    if readonly:
        # The file is in WAL mode already (its creator set it); a reader cannot change it.
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit -- a 250 must survive power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # In a SAVEPOINT (a group commit's jobs after one failed: _Writer._run_group) and in
    # statements that change several rows, SQLite copies each page first changed into a
    # statement journal -- by default a temporary *file*: measured, a delivered outcome's
    # UPDATE in a savepoint took 258 us with it and 80 us in memory (a job touches a few
    # dozen pages; the journal is dropped at RELEASE). Nothing durable lives there.
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA busy_timeout=30000")
    # The WAL file keeps its high-water mark unless limited: truncate it to this after
    # a checkpoint, so a burst does not leave the disk usage high (retention, 11.2).
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    # Debian builds SQLite with SECURE_DELETE: a deleted body would be overwritten with
    # zeros, page by page -- written to the WAL and checkpointed again, as much I/O as
    # storing it (bench/body_storage.py). FAST zeroes only what costs no extra I/O.
    conn.execute("PRAGMA secure_delete=FAST")
    return conn


# When another process holds the write lock, retry this often (SQLite's own busy
# handler sleeps 1, 2, 5, 10... ms: far too long next to a sub-millisecond transaction).
LOCK_RETRY_SECONDS = 0.0002
LOCK_TIMEOUT_SECONDS = 30.0


def begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting (briefly and often) for another writer to finish."""
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(LOCK_RETRY_SECONDS)


# A job's caller waits on a concurrent future (a thread: ``run_sync``) or on an asyncio
# future (a coroutine: ``SqliteQueue._run``).
_Waiter = concurrent.futures.Future[Any] | asyncio.Future[Any]
_Job = tuple[Callable[[sqlite3.Connection], Any], _Waiter, bool]


def _start(fut: _Waiter) -> bool:
    """Mark the job as started; False if its caller gave up (cancelled) first."""
    if isinstance(fut, concurrent.futures.Future):
        return fut.set_running_or_notify_cancel()
    # Read from the writer thread: a cancellation that lands just after this check is
    # like one that lands while the job runs -- the job commits, its result is dropped.
    return not fut.cancelled()


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Answer a group's asyncio callers (run in their event loop)."""
    for fut, ok, value in results:
        if fut.done():  # cancelled meanwhile
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _answer(results: Sequence[tuple[_Waiter, bool, Any]]) -> None:
    """Give every caller its job's result or exception.

    Asyncio callers are answered in one call per event loop: waking a loop from another
    thread is a system call, and each ``asyncio.wrap_future`` made one per job (measured:
    7 % of the writer thread's time in a group of 50 enqueues).
    """
    loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for fut, ok, value in results:
        if isinstance(fut, concurrent.futures.Future):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        else:
            loops.setdefault(fut.get_loop(), []).append((fut, ok, value))
    for loop, batch in loops.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, batch)


class _Writer(threading.Thread):
    """The one thread that runs jobs against the database, committing in groups."""

    def __init__(self, path: Path, batch: int, durable: bool = True, create: bool = True) -> None:
        super().__init__(name="ferry-queue-writer", daemon=True)
        self.path = path
        self.conn = connect(path, create=create)
        self.identity: dict[Path, tuple[int, int]] = {}
        self.durable = durable
        if not durable:
            # Delivery bookkeeping (claims, outcomes) only: WAL commits without fsync
            # (NORMAL is still crash-safe; only a power loss can undo the last outcomes,
            # and then a message is sent twice, never lost).
            self.conn.execute("PRAGMA synchronous=NORMAL")
        #: The connection's synchronous mode (connect() sets FULL).
        self.sync_mode = "FULL" if durable else "NORMAL"
        self.batch = batch
        # (job, its future, whether its commit must be fsynced before it is answered)
        self.jobs: _stdqueue.SimpleQueue[_Job | None] = _stdqueue.SimpleQueue()
        self.stopped = False
        #: Commits, the jobs they carried and the seconds they took (metrics read these).
        self.commits = 0
        self.committed_jobs = 0
        self.commit_seconds = 0.0

    def remember_files(self) -> None:
        """Note which files (device, inode) the connection has open: the database and its WAL."""
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(p)
                self.identity[p] = (st.st_dev, st.st_ino)

    def check_files(self) -> None:
        """Raise QueueStorageLost if the database or its WAL is no longer at its path.

        SQLite keeps writing into a deleted (unlinked) file without complaint, and
        everything committed there is gone at the next start: a 250 would be a lie.
        Two stat() calls per group commit (microseconds) make that impossible.
        """
        for p, (dev, ino) in self.identity.items():
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise QueueStorageLost(f"{p}: deleted while in use") from None
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise QueueStorageLost(f"{p}: replaced by another file while in use") from None

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], *, fsync: bool = True
    ) -> concurrent.futures.Future[T]:
        """Queue a job; ``fsync=False``: its commit need not reach the disk before it is
        answered (a delivery worker's bookkeeping, see ``SqliteQueue.relaxed``)."""
        if self.stopped:
            raise RuntimeError("the queue is closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.jobs.put((fn, fut, fsync))
        return fut

    def submit_async(
        self, fn: Callable[[sqlite3.Connection], T], *, fsync: bool = True
    ) -> asyncio.Future[T]:
        """``submit`` for a coroutine of the running event loop: await the future."""
        if self.stopped:
            raise RuntimeError("the queue is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.jobs.put((fn, fut, fsync))
        return fut

    def stop(self) -> None:
        self.stopped = True
        self.jobs.put(None)
        self.join()
        self.conn.close()
        # A job queued beside the stop (a race with submit) is refused, not left waiting.
        refused: list[tuple[_Waiter, bool, Any]] = []
        with contextlib.suppress(_stdqueue.Empty):
            while True:
                job = self.jobs.get_nowait()
                if job is not None and _start(job[1]):
                    refused.append((job[1], False, RuntimeError("the queue is closed")))
        _answer(refused)

    def run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.batch:
                try:
                    nxt = self.jobs.get_nowait()
                except _stdqueue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            relaxed = [(fn, fut) for fn, fut, fsync in group if not fsync]
            if relaxed and self.durable:
                # Outcomes and claims first, in a commit of their own without an fsync:
                # their sessions go on at once instead of waiting for intake's fsync
                # (the guarantee a delivery worker had when it committed them itself).
                # The fsync of the next commit covers them too: the WAL is sequential.
                self._synchronous("NORMAL")
                self._run_group(relaxed)
                group = [job for job in group if job[2]]
            if group:
                if self.durable:
                    self._synchronous("FULL")
                self._run_group([(fn, fut) for fn, fut, _fsync in group])
            if stop:
                return

    def _synchronous(self, mode: str) -> None:
        """Commit with (FULL) or without (NORMAL) an fsync from now on; a durable writer
        keeps the mode between groups, so a run of relaxed groups switches it once."""
        if self.sync_mode != mode:
            self.conn.execute(f"PRAGMA synchronous={mode}")
            self.sync_mode = mode

    def _run_group(self, group: list[tuple[Callable[[sqlite3.Connection], Any], _Waiter]]) -> None:
        conn = self.conn
        results: list[tuple[_Waiter, bool, Any]] = []
        begun: set[int] = set()  # id() of the futures of jobs started
        started = time.perf_counter()
        try:
            begin_immediate(conn)
            # Every job as if in a SAVEPOINT of its own, one failing job undoing none of
            # its neighbours: first optimistically without them, since a savepoint makes
            # SQLite copy every page a job touches that an earlier job of the group made
            # dirty (the counter rows, the right edge of every index: each job, again);
            # only if a job fails is the whole group rolled back and run once more, each
            # job in its savepoint. Jobs are database work, so running one again over the
            # same database does the same (``SqliteQueue._write`` resets what it collects).
            failed = False
            for fn, fut in group:
                if id(fut) not in begun:
                    if not _start(fut):
                        continue
                    begun.add(id(fut))
                try:
                    value = fn(conn)
                except BaseException:
                    failed = True
                    break
                if not conn.in_transaction:  # an error SQLite rolled back itself, caught
                    failed = True
                    break
                results.append((fut, True, value))
            if failed:
                results = []
                if conn.in_transaction:  # (some errors end the transaction themselves)
                    conn.execute("ROLLBACK")
                begin_immediate(conn)
                for fn, fut in group:
                    if id(fut) not in begun:
                        if not _start(fut):
                            continue
                        begun.add(id(fut))
                    conn.execute("SAVEPOINT job")
                    try:
                        value = fn(conn)
                    except BaseException as exc:  # the job's error is the caller's
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                        results.append((fut, False, exc))
                    else:
                        conn.execute("RELEASE job")
                        results.append((fut, True, value))
            self.check_files()
            conn.execute("COMMIT")
            self.commits += 1
            self.committed_jobs += len(results)
            self.commit_seconds += time.perf_counter() - started
        except BaseException as exc:  # the commit itself failed: nobody succeeded
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            # Started, or not yet started (BEGIN failed): every caller learns it.
            _answer(
                [
                    (fut, False, exc)
                    for _fn, fut in group
                    if id(fut) in begun or (not fut.done() and _start(fut))
                ]
            )
            return
        # Only now, after the fsync, do callers learn their outcome.
        _answer(results)


def _reply(code: int | None, enhanced: str | None, text: str | None) -> Reply | None:
    if code is None:
        return None
    return Reply(code, enhanced, text or "")


# -- message bodies: rows in ``bodies`` or files in the spool (issue 12) ----------

# What the job being run frees once it commits (see SqliteQueue._write): ``ids``, the
# messages whose body is a file of its own (an older queue), and ``segments``.
_drops = threading.local()


# Walks the partial index messages_spooled (sqlite_schema.py, version 5).
_LIVE_SPOOLED = "SELECT id FROM messages WHERE spool = 1 AND finished IS NULL"
# Walks the partial index messages_segment (sqlite_schema.py, version 7).
_LIVE_SEGMENTS = "SELECT DISTINCT segment FROM messages WHERE spool = 2 AND finished IS NULL"


def _select_spooled(conn: sqlite3.Connection, sql: str, ids: list[str] | None = None) -> list[Any]:
    """``sql`` (with ``{cols}`` for ``segment, body_offset``), run over ``ids`` if given.

    In a queue not yet at schema version 7 the columns are two NULLs: a read-only tool
    (``ferry queue show``, ``check``) may open a queue that an upgraded ``ferry serve``
    has not started on yet, and must not migrate it.
    """

    def run(cols: str) -> list[Any]:
        text = sql.replace("{cols}", cols)
        return conn.execute(text).fetchall() if ids is None else _select_in(conn, text, ids)

    try:
        return run("segment, body_offset")
    except sqlite3.OperationalError as exc:
        if "no such column" not in str(exc):
            raise
        return run("NULL, NULL")


def _freed_after_commit(mid: str, kind: int, segment: str | None) -> None:
    """Note what the job being run frees once it commits (``SqliteQueue._write``): a
    body file of its own (``spool`` 1) or a segment (2). A job run without a sink --
    ``run_sync`` -- leaves them to the start-up sweep."""
    if kind == 1:
        ids: builtins.list[str] | None = getattr(_drops, "ids", None)
        if ids is not None:
            ids.append(mid)
    elif kind == 2 and segment is not None:
        segments: set[str] | None = getattr(_drops, "segments", None)
        if segments is not None:
            segments.add(segment)


def _drop_bodies(conn: sqlite3.Connection, message_ids: list[str]) -> None:
    """These messages are being finished or deleted: inline bodies go now, in this
    transaction; spool files and segments only after it commits
    (``SqliteQueue._write``). Call before the rows change."""
    if getattr(_drops, "ids", None) is not None and message_ids:
        rows = _select_in(
            conn,
            "SELECT id, spool, segment FROM messages"
            " WHERE spool != 0 AND finished IS NULL AND id IN ({})",
            message_ids,
        )
        for mid, kind, segment in rows:
            _freed_after_commit(mid, kind, segment)
    _exec_in(conn, "DELETE FROM bodies WHERE message_id IN ({})", message_ids)


def _read_bodies(conn: sqlite3.Connection, spool_dir: Path, ids: list[str]) -> dict[str, bytes]:
    """Bodies by message id, from rows or the spool; finished or unknown ids left out."""
    out = {
        mid: bytes(data)
        for mid, data in _select_in(
            conn, "SELECT message_id, data FROM bodies WHERE message_id IN ({})", ids
        )
    }
    rest = [i for i in ids if i not in out]
    if rest:
        # Only a committed row names a spool body: bytes alone are never a message.
        sql = (
            "SELECT id, spool, {cols}, size FROM messages"
            " WHERE spool != 0 AND finished IS NULL AND id IN ({})"
        )
        rows = _select_spooled(conn, sql, rest)
        for mid, kind, segment, offset, size in rows:
            if kind == 1:
                data = spool.read(spool_dir, mid)
            else:
                data = spool.read_at(spool_dir, segment, offset, size)
            if data is not None:  # finished and deleted since this snapshot
                out[mid] = data
    return out


def read_body(conn: sqlite3.Connection, db_path: Path, message_id: str) -> bytes | None:
    """One message's body through ``conn`` (tools with their own connection)."""
    return _read_bodies(conn, spool.spool_dir(db_path.parent), [message_id]).get(message_id)


def _sweep_spool(conn: sqlite3.Connection, spool_dir: Path) -> tuple[int, set[str]]:
    """(entries removed, the segments live messages still need)."""
    segments = {r[0] for r in conn.execute(_LIVE_SEGMENTS)}
    live = {r[0] for r in conn.execute(_LIVE_SPOOLED)} | segments
    removed = spool.remove_names(spool_dir, spool.orphans(spool.names(spool_dir), live))
    return removed, segments


def _missing_bodies(conn: sqlite3.Connection, spool_dir: Path) -> list[str]:
    """Live messages whose spool body is not there: its file or segment missing, or a
    segment too short to hold it."""
    live = [r[0] for r in conn.execute(_LIVE_SPOOLED)]
    problems = [
        f"message {mid}: its body file {spool_dir / mid} is missing"
        for mid in spool.missing(live, set(spool.names(spool_dir)))
    ]
    sizes: dict[str, int | None] = {}
    rows = _select_spooled(
        conn, "SELECT id, {cols}, size FROM messages WHERE spool = 2 AND finished IS NULL"
    )
    for mid, segment, offset, size in rows:
        path = spool_dir / segment
        if segment not in sizes:
            try:
                sizes[segment] = path.stat().st_size
            except FileNotFoundError:
                sizes[segment] = None
        have = sizes[segment]
        if have is None:
            problems.append(f"message {mid}: its body's segment {path} is missing")
        elif have < offset + size:
            problems.append(
                f"message {mid}: its body's segment {path} ends at {have} bytes, before"
                f" the body does ({offset + size})"
            )
    return problems


def _live_in(conn: sqlite3.Connection, segments: list[str]) -> set[str]:
    """Those of ``segments`` that some live message's body is in."""
    sql = _LIVE_SEGMENTS + " AND segment IN ({})"
    return {r[0] for r in _select_in(conn, sql, segments)}


# -- operator tools: selections, bulk changes, suspensions (see sqlite_ops) ---------


class OperatorMethods:
    """``SqliteQueue``'s operator side, kept apart so the core stays readable."""

    _read: Callable[..., Any]
    _run: Callable[..., Any]
    _write: Callable[..., Any]
    spool: Path

    async def list_page(
        self, sel: Selection, *, now: float, limit: int = 100, after: str | None = None
    ) -> Page:
        """Messages with a selected recipient, newest first; ``after`` = the last id shown."""
        page: Page = await self._read(
            lambda conn: sqlite_ops.list_page(conn, sel, now=now, limit=limit, after=after)
        )
        return page

    async def counts(self) -> Counts:
        result: Counts = await self._read(sqlite_ops.counts)
        return result

    async def summary(self, sel: Selection, *, now: float) -> Summary:
        result: Summary = await self._read(lambda conn: sqlite_ops.summary(conn, sel, now=now))
        return result

    async def count_selected(self, sel: Selection, *, now: float) -> tuple[int, int]:
        """(messages, recipients) the selection names (for a confirmation prompt)."""

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            pairs = sqlite_ops.selected_recipients(conn, sel, now)
            return len({m for _r, m in pairs}), len(pairs)

        result: tuple[int, int] = await self._read(job)
        return result

    async def bulk(
        self,
        action: BulkAction,
        sel: Selection,
        *,
        now: float,
        by: str,
        make_dsn: Callable[[MessageInfo, bytes], EnvelopeIn | None] | None = None,
        dsn_lifetime: float = 4 * 86400,
    ) -> BulkResult:
        """Apply ``action`` to the selected recipients in one transaction, with its
        operator event (and, for ``cancel`` with ``make_dsn``, the DSNs to the senders:
        ``make_dsn`` gets each message with its just-cancelled recipients)."""
        statuses = {
            "retry": (Status.QUEUED, Status.DEFERRED),
            "hold": (Status.QUEUED, Status.DEFERRED),
            "release": (Status.HELD,),
            "cancel": WAITING,
            "remove": (),
        }[action]

        def job(conn: sqlite3.Connection) -> BulkResult:
            pairs = sqlite_ops.selected_recipients(conn, sel, now, statuses)
            ids = [r for r, _m in pairs]
            message_ids = sorted({m for _r, m in pairs})
            dsns = 0
            if action == "remove":
                touched = len(ids)
                _drop_bodies(conn, message_ids)
                sqlite_ops.remove_messages(conn, message_ids)
            elif action == "retry":
                touched = sqlite_ops.make_due(conn, ids, now)
            elif action in ("hold", "release"):
                touched = sqlite_ops.set_held(conn, ids, action == "hold", now)
            else:
                done = set(sqlite_ops.cancel(conn, ids))
                touched = len(done)
                if make_dsn is not None and done:
                    dsns = _cancel_dsns(
                        conn, self.spool, message_ids, done, make_dsn, now, dsn_lifetime
                    )
            if action != "remove":
                _refresh_message_status(conn, message_ids)
            sqlite_ops.log_operator_event(
                conn,
                now=now,
                by=by,
                action=action + (" with DSN" if make_dsn is not None else ""),
                selection=sel.describe(),
                messages=len(message_ids),
                recipients=touched,
            )
            return BulkResult(action, len(message_ids), touched, dsns)

        result: BulkResult = await self._write(job)
        return result

    async def suspend(
        self, domain: str, *, now: float, until: float | None, reason: str, by: str
    ) -> None:
        """Pause delivery to ``domain`` (``*``: every destination) until ``until``."""

        def job(conn: sqlite3.Connection) -> None:
            sqlite_ops.suspend(conn, domain, now=now, until=until, reason=reason, by=by)
            end = "resumed"
            if until is not None:
                end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
            what = f"{domain} until {end} {reason}"
            sqlite_ops.log_operator_event(
                conn,
                now=now,
                by=by,
                action="suspend",
                selection=what.strip(),
                messages=0,
                recipients=0,
            )

        await self._run(job)

    async def resume(
        self, domain: str, *, by: str | None = None, logged_by: str | None = None
    ) -> bool:
        """Lift ``domain``'s suspension (only one set by ``by`` when given);
        ``logged_by`` records the act as an operator event."""

        def job(conn: sqlite3.Connection) -> bool:
            lifted = sqlite_ops.resume(conn, domain, by)
            if logged_by is not None:
                sqlite_ops.log_operator_event(
                    conn,
                    now=time.time(),
                    by=logged_by,
                    action="resume",
                    selection=domain if lifted else f"{domain} (was not suspended)",
                    messages=0,
                    recipients=0,
                )
            return lifted

        result: bool = await self._run(job)
        return result

    async def suspensions(self, *, now: float) -> list[Suspension]:
        result: list[Suspension] = await self._read(lambda conn: sqlite_ops.suspensions(conn, now))
        return result

    async def operator_events(self, after: int) -> list[dict[str, Any]]:
        """Operator actions recorded after event ``after`` (``ferry serve`` logs them)."""
        result: list[dict[str, Any]] = await self._read(
            lambda conn: sqlite_ops.operator_events_after(conn, after)
        )
        return result

    async def last_operator_event(self) -> int:
        result: int = await self._read(sqlite_ops.last_operator_event)
        return result


def _cancel_dsns(
    conn: sqlite3.Connection,
    spool_dir: Path,
    message_ids: list[str],
    cancelled: set[int],
    make_dsn: Callable[[MessageInfo, bytes], EnvelopeIn | None],
    now: float,
    lifetime: float,
) -> int:
    n = 0
    for message in _load_messages(conn, message_ids):
        rids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM recipients WHERE message_id=? ORDER BY id", (message.id,)
            )
            if r[0] in cancelled
        ]
        if not rids:
            continue
        message.recipients = _load_recipients(conn, rids)
        data = _read_bodies(conn, spool_dir, [message.id]).get(message.id, b"")
        envelope = make_dsn(message, data)
        if envelope is not None:
            _insert_message(conn, new_queue_id(now), envelope, now, now + lifetime)
            n += 1
    return n


# An outcome, recorded only while the recipient is still in progress under our lease.
_RECORD_SQL = (
    "UPDATE recipients SET status=CASE WHEN ? AND attempts=0 THEN 'Queued' ELSE ? END,"
    " next_attempt=?, lease_owner=NULL, lease_until=NULL, attempts=attempts+?,"
    " last_code=COALESCE(?, last_code), last_enhanced=CASE WHEN ? IS NULL"
    " THEN last_enhanced ELSE ? END, last_text=COALESCE(?, last_text),"
    " route=COALESCE(?, route), delay_warned=MAX(delay_warned, ?),"
    " expiry_reason=CASE WHEN ? IS NULL THEN expiry_reason ELSE ? END"
    " WHERE id=? AND status='InProgress' AND lease_owner=?"
    " RETURNING message_id, status, attempts, address"
)


class SqliteQueue(OperatorMethods, Queue):
    """The SQLite implementation of the queue contract."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch: int = 256,
        durable: bool = True,
        event_log: bool = False,
        create: bool = True,
        readonly: bool = False,
        spool_threshold: int | None = SPOOL_THRESHOLD,
        segment_bytes: int = spool.SEGMENT_BYTES,
    ) -> None:
        """Open (``create=True``: or make) the queue in directory ``path``.

        ``create=False`` opens only an existing database (QueueNotFound otherwise);
        ``readonly=True`` also has no writer: for the CLI's listings, which must never
        make or change a database. A database SQLite cannot read raises QueueDamaged.
        Bodies of ``spool_threshold`` bytes or more that ``enqueue`` stores go to the
        spool (None: every body a row), in segments of up to ``segment_bytes``.
        """
        directory = Path(path)
        self.db_path = self.database_path(directory)
        self.spool = spool.spool_dir(directory)
        self.spool_threshold = spool_threshold
        self._spool_writer = spool.Writer(
            self.spool, on_sealed=self._sealed_by_writer, segment_bytes=segment_bytes
        )
        # Segments no writer appends to any more (spool.py, step 3): deleted once no
        # live message needs them. Shared with the ``relaxed()`` view, as are the next.
        self._sealed: set[str] = set()
        self._seal_tasks: set[asyncio.Task[int]] = set()
        self._emptied: dict[str, float] = {}  # by compaction: segment -> when (monotonic)
        self._durable = durable
        self._unlink_later: builtins.list[str] = []
        self._release_later: set[str] = set()
        self._unlink_due = 0.0
        self.unlink_interval = UNLINK_INTERVAL
        self.readonly = readonly
        self._writer: _Writer | None = None
        self._fsync = True  # False in the view ``relaxed()`` returns
        self._storage_lost = False
        if readonly:
            if not self.db_path.is_file():
                raise QueueNotFound(self.db_path)
        else:
            if create:
                directory.mkdir(parents=True, exist_ok=True)
            try:
                self._writer = _Writer(self.db_path, batch, durable, create)
                # Create, or upgrade step by step (ferry/queue/sqlite_schema.py).
                migrate(self._writer.conn, SCHEMA, begin_immediate)
            except sqlite3.DatabaseError as exc:
                if self._writer is not None:
                    self._writer.conn.close()
                if isinstance(exc, sqlite3.OperationalError):  # locked, I/O, permissions
                    raise
                # SQLITE_NOTADB "file is not a database", SQLITE_CORRUPT "malformed"
                raise QueueDamaged(self.db_path, [str(exc)]) from None
            # From here on begin_immediate() does the waiting for the write lock.
            self._writer.conn.execute("PRAGMA busy_timeout=0")
            self._writer.remember_files()
            self._writer.start()
            if not self.spool.is_dir():
                self.spool.mkdir(exist_ok=True)
                spool.fsync_dir(directory)  # the spool's own name is durable too
        #: Write the event log (webhooks, ``GET /v1/events``) with every state change.
        self.event_log = event_log
        self._closed = False
        # Reads run on their own connections in worker threads: WAL lets them proceed
        # while the writer is busy, so a read never waits behind someone else's fsync.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._readers_idle = threading.Condition(self._readers_lock)
        self._reads_active = 0

    # -- plumbing ---------------------------------------------------------------

    @staticmethod
    def database_path(directory: str | os.PathLike[str]) -> Path:
        """The database file of the queue in ``directory`` (queue.path)."""
        return Path(directory) / "queue.db"

    @property
    def _w(self) -> _Writer:
        if self._writer is None:
            raise RuntimeError(f"{self.db_path}: the queue is open read-only")
        return self._writer

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            value = await self._w.submit_async(fn, fsync=self._fsync)
        except QueueStorageLost as exc:
            if not self._storage_lost:
                # Once per loss, not once per refused message.
                self._storage_lost = True
                emit(
                    QueueStorageLostEvent(
                        str(self.db_path),
                        str(exc),
                        "every write is refused (451 4.3.0) until ferry is restarted"
                        " on a restored or new queue database",
                    )
                )
            raise
        self._storage_lost = False
        return value

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._read_sync, fn)

    def _read_sync(self, fn: Callable[[sqlite3.Connection], T], *, closing: bool = False) -> T:
        """``fn`` on this thread's reader connection; ``closing``: also while ``close()``
        runs (its own last reads, before it closes the readers)."""
        with self._readers_lock:
            if self._closed and not closing:
                raise RuntimeError("the queue is closed")
            self._reads_active += 1
        try:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = connect(self.db_path, create=False, readonly=self.readonly)
                self._local.conn = conn
                with self._readers_lock:
                    self._readers.append(conn)
            conn.execute("BEGIN")  # one consistent snapshot per read job
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        finally:
            with self._readers_lock:
                self._reads_active -= 1
                self._readers_idle.notify_all()

    def _close_readers(self) -> None:
        # A connection closed while another thread reads through it would crash the
        # process (SQLite frees what the reader is using): wait for reads in flight.
        with self._readers_lock:
            self._readers_idle.wait_for(lambda: self._reads_active == 0, timeout=30)
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def relaxed(self) -> SqliteQueue:
        """This queue, with writes answered once committed rather than once fsynced.

        For a delivery worker's claims, outcomes and leases, which ``ferry serve``
        writes for it (ferry/queue/remote.py): the same writer and group commits as
        intake, but committed just before intake's fsynced part of each group
        (synchronous=NORMAL): a process crash loses none of them, a power loss may undo
        the last ones (a message is then sent twice, never lost) -- exactly what a worker
        writing with ``durable=False`` had, without waiting for intake's fsyncs.
        """
        view = copy.copy(self)  # shares the writer and readers: close the original only
        view._fsync = False
        return view

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a job from a thread with no event loop (tools, tests)."""
        return self._w.submit(fn).result()

    @property
    def commits(self) -> int:
        """How many group commits the writer has made (for stats and benchmarks)."""
        return self._writer.commits if self._writer is not None else 0

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._spool_writer.close()
            await self.settle_spool()
            if self._writer is not None:
                await asyncio.to_thread(self._writer.stop)
            if self._unlink_later or self._release_later:
                await asyncio.to_thread(self._unlink_durably, self._unlink_later)
            await asyncio.to_thread(self._close_readers)

    async def check(self, *, quick: bool = False) -> list[str]:
        """SQLite's integrity_check (or the faster quick_check): [] when the database is sound.

        quick_check skips the index-content comparison: linear in the database size,
        cheap enough for every start.
        """
        return await asyncio.to_thread(_integrity, self.db_path, quick)

    # -- message bodies (spool files: ferry/queue/spool.py) -------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``_run`` for jobs that may finish or delete messages: their spool files and
        segments are freed here, after the commit (a crash before it leaves orphans,
        swept at start)."""
        dropped: builtins.list[str] = []
        segments: set[str] = set()

        def job(conn: sqlite3.Connection) -> T:
            # The writer may run a job twice: only the last run counts.
            dropped.clear()
            segments.clear()
            _drops.ids, _drops.segments = dropped, segments
            try:
                return fn(conn)
            finally:
                _drops.ids = _drops.segments = None

        value = await self._run(job)
        if self._durable and self._fsync:
            if dropped:
                spool.unlink(self.spool, dropped)
            if segments & self._sealed:
                await asyncio.to_thread(self._release, segments, fsynced=True)
            return value
        # Not fsynced (a worker's own queue, or the ``relaxed()`` view serve writes a
        # worker's outcomes through): a power loss could undo the commit but not an
        # unlink, leaving a pending message without its body. Unlink in batches, after
        # an fsync of the WAL. The list is shared with the queue ``relaxed()`` copied,
        # so ``close()`` of the original deletes what is still waiting.
        self._unlink_later.extend(dropped)
        self._release_later.update(segments & self._sealed)
        pending = self._unlink_later or self._release_later
        if pending and time.monotonic() >= self._unlink_due:
            ids = self._unlink_later[:]
            del self._unlink_later[:]
            self._unlink_due = time.monotonic() + self.unlink_interval
            await asyncio.to_thread(self._unlink_durably, ids)
        return value

    def _fsync_wal(self) -> None:
        """Make every commit so far durable (those made without an fsync, too)."""
        with contextlib.suppress(FileNotFoundError):  # no WAL: everything is in the file
            fd = os.open(self.db_path.with_name(self.db_path.name + "-wal"), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _unlink_durably(self, message_ids: builtins.list[str]) -> None:
        """Make the commits that finished these messages durable, then delete the files
        and the sealed segments they left without a live message."""
        self._fsync_wal()
        spool.unlink(self.spool, message_ids)
        segments = set(self._release_later)
        self._release_later.difference_update(segments)
        if segments:
            self._release(segments, fsynced=True)

    def _release(self, segments: Iterable[str], *, fsynced: bool = False) -> int:
        """Delete those of ``segments`` that are sealed and that no live message needs
        (spool.py, step 4); returns how many. ``fsynced``: every commit that finished
        their messages is durable already (otherwise the WAL is fsynced first)."""
        candidates = [name for name in segments if name in self._sealed]
        if not candidates:
            return 0
        live = self._read_sync(lambda conn: _live_in(conn, candidates), closing=True)
        done = [name for name in candidates if name not in live]
        if done and not fsynced:
            self._fsync_wal()
        for name in done:
            self._sealed.discard(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.segment_path(self.spool, name))
        return len(done)

    def _sealed_by_writer(self, segment: str) -> None:
        """Our own spool writer sealed ``segment`` (called on the event loop)."""
        self._sealed.add(segment)  # at once: a finish committed next must see it
        task = asyncio.get_running_loop().create_task(self.seal_segment(segment))
        self._seal_tasks.add(task)
        task.add_done_callback(self._seal_tasks.discard)

    async def settle_spool(self) -> None:
        """Wait until the segments our own writer sealed are deleted if unneeded."""
        while self._seal_tasks:
            await asyncio.gather(*self._seal_tasks, return_exceptions=True)

    async def seal_segment(self, segment: str) -> int:
        """No writer appends to ``segment`` any more and every commit naming it is over
        (an intake process tells ``ferry serve`` so): delete it when no live message
        needs it, now or once the last one finishes. Returns 1 if deleted now."""
        spool.segment_path(self.spool, segment)  # refuses a name that is no segment
        self._sealed.add(segment)
        return await asyncio.to_thread(self._release, [segment])

    async def seal_writer(self, tag: str) -> int:
        """The writer ``tag`` (an intake process) is gone and every call it made is
        over: each of its segments is sealed. Returns how many were deleted now."""
        names = [
            n
            for n in spool.names(self.spool)
            if spool.is_segment(n) and spool.segment_tag(n) == tag
        ]
        self._sealed.update(names)
        return await asyncio.to_thread(self._release, names)

    async def compact_spool(
        self,
        *,
        min_age: float = COMPACT_AGE,
        max_share: float = COMPACT_SHARE,
        grace: float = COMPACT_GRACE,
    ) -> int:
        """Copy the live bodies out of sealed segments that are mostly finished mail,
        and delete segments nothing needs any more; returns how many segments were
        emptied. ``ferry serve`` runs it with the history purge (``Retention``).

        A body moves the way it was written: appended to our writer's segment and made
        durable, then its row is pointed there in a commit (a crash in between leaves a
        copy no row names). The old segment goes ``grace`` seconds after it is empty.
        """
        now = time.monotonic()
        for segment, when in list(self._emptied.items()):
            if now - when >= grace:
                del self._emptied[segment]
                await asyncio.to_thread(self._release, [segment])
        live = await self._read(
            lambda conn: conn.execute(
                "SELECT segment, SUM(size) FROM messages"
                " WHERE spool = 2 AND finished IS NULL GROUP BY segment"
            ).fetchall()
        )
        in_use = {segment for segment, _size in live}
        # Sealed, and no live message at all (a seal whose deletion failed): delete.
        # (A copy first: threads deleting segments change the set.)
        idle = [s for s in list(self._sealed) if s not in in_use and s not in self._emptied]
        if idle:
            await asyncio.to_thread(self._release, idle)
        emptied = 0
        for segment, live_bytes in live:
            if segment not in self._sealed or segment in self._emptied:
                continue
            try:
                st = os.stat(spool.segment_path(self.spool, segment))
            except FileNotFoundError:
                continue
            if time.time() - st.st_mtime < min_age or live_bytes >= max_share * st.st_size:
                continue
            await self._move_bodies(segment)
            self._emptied[segment] = time.monotonic()
            emptied += 1
        return emptied

    async def _move_bodies(self, segment: str) -> None:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT id, body_offset, size FROM messages"
                " WHERE spool = 2 AND finished IS NULL AND segment = ?",
                (segment,),
            ).fetchall()
        )
        for mid, offset, size in rows:
            data = await asyncio.to_thread(spool.read_at, self.spool, segment, offset, size)
            if data is None:
                continue
            async with self._spool_writer.append(data) as (new_segment, new_offset):

                def move(conn: sqlite3.Connection, mid: str = mid) -> None:
                    # Finished meanwhile: the copy is bytes no row names.
                    conn.execute(
                        "UPDATE messages SET segment = ?, body_offset = ? WHERE id = ?"
                        " AND spool = 2 AND segment = ? AND finished IS NULL",
                        (new_segment, new_offset, mid, segment),
                    )

                await self._run(move)

    async def sweep_spool(self) -> int:
        """Delete spool files and segments no live message names (a crash between a
        body's write and its row's commit, or between a commit and the deletion it
        allowed); every segment left is sealed (no writer runs yet).

        Only for ``ferry serve`` at start, before it accepts mail: a body another
        process has written but not yet committed looks exactly like an orphan.
        """
        removed, segments = await self._run(lambda conn: _sweep_spool(conn, self.spool))
        self._sealed.update(segments)
        return removed

    async def check_bodies(self) -> builtins.list[str]:
        """Problems with bodies: spool files or segments live messages need, missing
        or too short."""
        return await self._read(lambda conn: _missing_bodies(conn, self.spool))

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
        size = len(envelope.data)
        if self.spool_threshold is not None and size >= self.spool_threshold:
            # Durable before the row that makes it visible is committed (spool.py).
            async with self._spool_writer.append(envelope.data) as segment:
                return await self._commit_new(
                    envelope, size, qid, now, expires, idempotency, segment
                )
        return await self._commit_new(envelope, size, qid, now, expires, idempotency, None)

    async def enqueue_spooled(
        self,
        envelope: EnvelopeIn,
        size: int,
        *,
        queue_id: str,
        segment: str,
        offset: int,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> str:
        """Commit the rows of a message whose body of ``size`` bytes is already durable
        at ``offset`` of the spool segment ``segment`` (an intake process wrote it:
        ferry/intake/process.py); ``envelope.data`` is not used."""
        spool.segment_path(self.spool, segment)  # refuses a name that is no segment
        return await self._commit_new(
            envelope, size, queue_id, time.time(), expires, idempotency, (segment, offset)
        )

    async def _commit_new(
        self,
        envelope: EnvelopeIn,
        size: int,
        qid: str,
        now: float,
        expires: float | None,
        idempotency: IdempotencyRecord | None,
        segment: tuple[str, int] | None,
    ) -> str:
        exp = expires if expires is not None else now + 4 * 86400
        log = self.event_log

        def insert(conn: sqlite3.Connection) -> str:
            _insert_message(conn, qid, envelope, now, exp, segment, size)
            if log:
                _received_event(conn, qid, envelope, now, size)
            return qid

        fn: Callable[[sqlite3.Connection], str] = insert
        if idempotency is not None:
            record = idempotency

            def job(conn: sqlite3.Connection) -> str:
                # The writer thread runs one job at a time inside its transaction: the
                # look-up and the insert below cannot interleave with another request's.
                existing = _idempotency_row(conn, record.key, now)
                if existing is not None:
                    raise IdempotencyReplay(existing)
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency(key, fingerprint, queue_id, response,"
                    " expires) VALUES (?,?,?,?,?)",
                    (
                        record.key,
                        record.fingerprint,
                        qid,
                        record.response,
                        record.expires,
                    ),
                )
                return insert(conn)

            fn = job

        # A body whose row is not committed is bytes no row names in its segment: freed
        # with the segment.
        return await self._run(fn)

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

        def job(conn: sqlite3.Connection) -> list[ClaimedRecipient]:
            # Due and pending, or leased by a worker whose lease ran out (it crashed);
            # highest priority first, then oldest. The recipients_order index lets
            # SQLite walk in that order and stop at the limit.
            skip = ""
            if excluded:
                skip = f" AND domain NOT IN ({','.join('?' * len(excluded))})"
            rows = conn.execute(
                "SELECT id FROM recipients INDEXED BY recipients_order"
                f" WHERE {sqlite_ops.PENDING_WHERE}"
                " AND ((status != 'InProgress' AND next_attempt <= ?)"
                f" OR (status = 'InProgress' AND lease_until <= ?)){skip}"
                " ORDER BY priority DESC, arrival, id LIMIT ?",
                (now, now, *excluded, limit),
            ).fetchall()
            if not rows:
                return []
            chosen = [r[0] for r in rows]
            until = now + lease
            _exec_in(
                conn,
                "UPDATE recipients SET status='InProgress', lease_owner=?, lease_until=?"
                " WHERE id IN ({})",
                chosen,
                prefix=(owner, until),
            )
            recips = _load_recipients(conn, chosen)
            msg_ids = sorted({r.message_id for r in recips})
            messages = {m.id: m for m in _load_messages(conn, msg_ids)}
            _refresh_message_status(conn, msg_ids, now)
            return [ClaimedRecipient(r, messages[r.message_id], until) for r in recips]

        return await self._run(job)

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

        def job(conn: sqlite3.Connection) -> list[str | None]:
            touched: set[str] = set()
            updated: set[int] = set()
            addresses: dict[int, tuple[str, str, Status]] = {}
            metadata: dict[str, Any] = {}
            for res in results:
                reply = res.reply
                code, enh, text = (
                    (reply.code, reply.enhanced, reply.text) if reply else (None, None, None)
                )
                fresh_queued = False  # Queued again if no attempt was ever made
                if res.status == Status.DEFERRED or not res.status.is_final:
                    status = Status.DEFERRED
                    fresh_queued = not res.counts_as_attempt
                    next_attempt = res.next_attempt if res.next_attempt is not None else now
                else:
                    status = res.status
                    next_attempt = None
                expiry = res.expiry_reason if status is Status.EXPIRED else None
                # One statement per outcome: the guard (still ours, still in progress:
                # not cancelled meanwhile, our lease not taken over by another worker)
                # is in the WHERE, the values the rest needs come back with RETURNING.
                # SET expressions see the row before the change (``attempts=0``).
                row = conn.execute(
                    _RECORD_SQL,
                    (
                        fresh_queued,
                        status.value,
                        next_attempt,
                        1 if res.counts_as_attempt else 0,
                        code,
                        code,
                        enh,
                        text,
                        res.route,
                        int(res.delay_warned),
                        expiry,
                        expiry,
                        res.recipient_id,
                        owner,
                    ),
                ).fetchall()
                if not row:
                    continue  # removed, cancelled or taken over meanwhile
                message_id, new_value, attempts_after, address = row[0]
                new_status = Status(new_value)
                attempts_before = attempts_after - (1 if res.counts_as_attempt else 0)
                if res.counts_as_attempt:
                    conn.execute(
                        "INSERT INTO attempts(recipient_id, at, outcome, code, enhanced, text,"
                        " next_hop, tls, tried) VALUES (?,?,?,?,?,?,?,?,?)",
                        (
                            res.recipient_id,
                            now,
                            res.status.value,
                            code,
                            enh,
                            text,
                            res.next_hop,
                            res.tls,
                            sqlite_ops.tried_json(res.tried),
                        ),
                    )
                    if log:
                        _outcome_event(
                            conn,
                            now,
                            message_id,
                            address,
                            res,
                            new_status,
                            attempts_before + 1,
                            metadata,
                        )
                touched.add(message_id)
                updated.add(res.recipient_id)
                addresses[res.recipient_id] = (message_id, address, new_status)
            _refresh_message_status(conn, sorted(touched), now)
            # A DSN goes in only if an outcome it reports was really recorded (not one
            # discarded because the recipient was cancelled or taken over meanwhile).
            out: list[str | None] = []
            for qid, (envelope, expires, about) in zip(ids, new_messages, strict=True):
                if updated.intersection(about):
                    _insert_message(conn, qid, envelope, now, expires)
                    out.append(qid)
                    if log:
                        _dsn_events(
                            conn,
                            now,
                            qid,
                            [addresses[i] for i in about if i in addresses],
                            metadata,
                        )
                else:
                    out.append(None)
            return out

        return await self._write(job)

    async def read_message(self, message_id: str) -> bytes | None:
        def job(conn: sqlite3.Connection) -> bytes | None:
            return _read_bodies(conn, self.spool, [message_id]).get(message_id)

        return await self._read(job)

    async def read_messages(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        def job(conn: sqlite3.Connection) -> dict[str, bytes]:
            return _read_bodies(conn, self.spool, list(message_ids))

        return await self._read(job)

    async def extend_leases(self, owner: str, recipient_ids: Sequence[int], *, until: float) -> int:
        def job(conn: sqlite3.Connection) -> int:
            n = 0
            for i in range(0, len(recipient_ids), _CHUNK):
                part = recipient_ids[i : i + _CHUNK]
                n += conn.execute(
                    "UPDATE recipients SET lease_until=? WHERE status='InProgress'"
                    f" AND lease_owner=? AND id IN ({','.join('?' * len(part))})",
                    (until, owner, *part),
                ).rowcount
            return n

        return await self._run(job)

    async def release_leases(self, owner: str | None = None) -> int:
        def job(conn: sqlite3.Connection) -> int:
            where = "status='InProgress'" + (" AND lease_owner=?" if owner else "")
            args: tuple[Any, ...] = (owner,) if owner else ()
            ids = [
                r[0] for r in conn.execute(f"SELECT message_id FROM recipients WHERE {where}", args)
            ]
            cur = conn.execute(
                "UPDATE recipients SET status=CASE WHEN attempts>0 THEN 'Deferred'"
                f" ELSE 'Queued' END, lease_owner=NULL, lease_until=NULL WHERE {where}",
                args,
            )
            _refresh_message_status(conn, sorted(set(ids)))
            return cur.rowcount

        return await self._run(job)

    async def next_due(self, *, exclude_domains: Collection[str] = ()) -> float | None:
        excluded = sorted(set(exclude_domains))
        skip = f" AND domain NOT IN ({','.join('?' * len(excluded))})" if excluded else ""

        def job(conn: sqlite3.Connection) -> float | None:
            # The due recipients' index (its first entry) and the pending one, not the
            # history (the predicates, word for word, are the indexes').
            row = conn.execute(
                "SELECT MIN(t) FROM (SELECT MIN(next_attempt) AS t FROM recipients"
                f" INDEXED BY recipients_due WHERE {DUE_WHERE}{skip} UNION ALL"
                " SELECT MIN(lease_until) FROM recipients"
                f" WHERE {sqlite_ops.PENDING_WHERE} AND status='InProgress'{skip})",
                (*excluded, *excluded),
            ).fetchone()
            return row[0] if row else None

        return await self._read(job)

    # -- operators --------------------------------------------------------------

    async def get(self, message_id: str) -> MessageInfo | None:
        def job(conn: sqlite3.Connection) -> MessageInfo | None:
            msgs = _load_messages(conn, [message_id])
            if not msgs:
                return None
            msg = msgs[0]
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM recipients WHERE message_id=? ORDER BY id", (message_id,)
                )
            ]
            msg.recipients = _load_recipients(conn, ids, history=True)
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
    ) -> list[MessageInfo]:
        def job(conn: sqlite3.Connection) -> list[MessageInfo]:
            where, args = [], []
            if status in (Status.QUEUED, Status.DEFERRED, Status.IN_PROGRESS):
                # A pending state: every message with a recipient in it, partially
                # delivered ones included (an operator asking "what is deferred?").
                # The pending term lets SQLite use the recipients_pending partial index:
                # the cost follows the pending queue, not the history.
                where.append(
                    "id IN (SELECT message_id FROM recipients"
                    f" WHERE {sqlite_ops.PENDING_WHERE} AND status=?)"
                )
                args.append(status.value)
            elif status is not None:
                where.append("status=?")
                args.append(status.value)
            if sender is not None:
                where.append("sender=?")
                args.append(sender)
            if domain is not None:
                where.append("id IN (SELECT message_id FROM recipients WHERE domain=?)")
                args.append(domain_key(domain))
            sql = "SELECT id FROM messages"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY arrival DESC, id DESC LIMIT ? OFFSET ?"
            ids = [r[0] for r in conn.execute(sql, (*args, limit, offset))]
            msgs = _load_messages(conn, ids)
            by_id = {m.id: m for m in msgs}
            rids = _select_in(
                conn, "SELECT id FROM recipients WHERE message_id IN ({}) ORDER BY id", ids
            )
            for r in _load_recipients(conn, [x[0] for x in rids]):
                by_id[r.message_id].recipients.append(r)
            return [by_id[i] for i in ids]

        return await self._read(job)

    async def retry(self, message_id: str, *, now: float) -> int:
        def job(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE recipients SET next_attempt=? WHERE message_id=?"
                " AND status IN ('Queued','Deferred')",
                (now, message_id),
            )
            if log and cur.rowcount:
                _operator_event(conn, now, message_id, "retry", cur.rowcount)
            return cur.rowcount

        log = self.event_log
        return await self._run(job)

    async def cancel(self, message_id: str, *, now: float) -> int:
        def job(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE recipients SET status='Cancelled', next_attempt=NULL, lease_owner=NULL,"
                f" lease_until=NULL WHERE message_id=? AND status IN {PENDING_SQL}",
                (message_id,),
            )
            _refresh_message_status(conn, [message_id], now)
            _refresh_message_status(conn, [message_id])
            if log and cur.rowcount:
                _operator_event(conn, now, message_id, "cancel", cur.rowcount)
            return cur.rowcount

        log = self.event_log
        return await self._write(job)

    async def remove(self, message_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            _drop_bodies(conn, [message_id])
            gone = conn.execute("DELETE FROM messages WHERE id=?", (message_id,)).rowcount > 0
            if log and gone:
                _operator_event(conn, time.time(), message_id, "remove", 1)
            return gone

        log = self.event_log
        return await self._write(job)

    # -- the event log (webhooks, GET /v1/events) ----------------------------------

    async def events(
        self, *, after: int, types: Sequence[str] = (), limit: int = 100
    ) -> builtins.list[outbox.StoredEvent]:
        return await self._read(lambda c: outbox.read(c, after=after, types=types, limit=limit))

    async def events_by_id(self, ids: Sequence[int]) -> builtins.list[outbox.StoredEvent]:
        return await self._read(lambda c: outbox.by_ids(c, ids))

    async def webhook_cursor(self, endpoint: str) -> int:
        return await self._run(lambda c: outbox.cursor(c, endpoint))

    async def webhook_done(
        self, endpoint: str, *, after: int | None = None, retried: Sequence[int] = ()
    ) -> None:
        def job(c: sqlite3.Connection) -> None:
            if after is not None:
                outbox.advance(c, endpoint, after)
            outbox.retried(c, endpoint, retried)

        await self._run(job)

    async def webhook_failed(
        self, endpoint: str, event_ids: Sequence[int], *, now: float, error: str, after: int | None
    ) -> None:
        def job(c: sqlite3.Connection) -> None:
            outbox.fail(c, endpoint, event_ids, now, error)
            if after is not None:
                outbox.advance(c, endpoint, after)

        await self._run(job)

    async def webhook_retries(self, endpoint: str, limit: int) -> builtins.list[int]:
        return await self._read(lambda c: outbox.retries(c, endpoint, limit))

    async def webhook_failures(self) -> builtins.list[tuple[str, int, float, str]]:
        return await self._read(outbox.failures)

    async def webhook_retry(self, endpoint: str | None) -> int:
        return await self._run(lambda c: outbox.request_retry(c, endpoint))

    def commit_counters(self) -> tuple[int, int, float]:
        """(commits, jobs committed, seconds spent) by this process's writer."""
        w = self._w
        return w.commits, w.committed_jobs, w.commit_seconds

    async def webhook_rewind(self, endpoint: str, since: float) -> int:
        return await self._run(lambda c: outbox.rewind(c, endpoint, since))

    async def clear_expired(self) -> int:
        def job(conn: sqlite3.Connection) -> int:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT message_id FROM recipients GROUP BY message_id"
                    f" HAVING SUM(status='Expired') > 0 AND SUM(status IN {PENDING_SQL}) = 0"
                )
            ]
            _drop_bodies(conn, ids)
            _exec_in(conn, "DELETE FROM messages WHERE id IN ({})", ids)
            return len(ids)

        return await self._write(job)

    async def statistics(self, *, now: float) -> QueueStats:
        # Counts come from counters kept by triggers (sqlite_schema.py) and ages from the
        # pending rows only: the cost follows the pending queue, not the history.
        def job(conn: sqlite3.Connection) -> QueueStats:
            st = QueueStats()
            counts: dict[str, int] = {}
            by_priority: dict[int, int] = {}
            for status, prio, n, size in conn.execute(
                "SELECT status, priority, n, size FROM message_counts WHERE n != 0"
            ):
                counts[status] = counts.get(status, 0) + n
                by_priority[prio] = by_priority.get(prio, 0) + n
                st.total_size += size
            st.total_messages = sum(counts.values())
            st.queued_messages = counts.get("Queued", 0)
            st.in_progress_messages = counts.get("InProgress", 0)
            st.deferred_messages = counts.get("Deferred", 0)
            st.delivered_messages = counts.get("Delivered", 0)
            st.partially_delivered_messages = counts.get("PartiallyDelivered", 0)
            st.failed_messages = counts.get("Failed", 0)
            st.expired_messages = counts.get("Expired", 0)
            st.cancelled_messages = counts.get("Cancelled", 0)
            # messages_arrival index: one step, not a scan.
            st.oldest_message_time = conn.execute("SELECT MIN(arrival) FROM messages").fetchone()[0]
            # A recipient arrives with its message, and a message is finished exactly
            # when its last recipient is final: the oldest unfinished message is the
            # oldest pending recipient's (messages_pending_arrival: one index step).
            st.oldest_pending_recipient_time = conn.execute(
                "SELECT MIN(arrival) FROM messages WHERE finished IS NULL"
            ).fetchone()[0]
            # Every message with work left, PartiallyDelivered ones included.
            pending, arrival_sum = conn.execute(
                "SELECT n, arrival_sum FROM pending_totals WHERE id=1"
            ).fetchone()
            st.average_queue_time = now - arrival_sum / pending if pending else None
            n, retries = conn.execute(
                "SELECT n, retries FROM recipient_counts WHERE id=1"
            ).fetchone()
            st.average_retry_count = retries / n if n else None
            st.messages_by_priority = {
                Priority(p).name.capitalize(): n for p, n in sorted(by_priority.items())
            }
            st.messages_by_smart_host = dict(
                conn.execute("SELECT route, n FROM route_counts WHERE n > 0 ORDER BY route")
            )
            return st

        return await self._read(job)

    # -- retention ----------------------------------------------------------------

    async def purge(self, *, before: float, limit: int) -> int:
        return await self._run(lambda conn: _purge(conn, before, limit))

    async def reclaim_space(self, *, pages: int) -> int:
        return await self._run(lambda conn: _reclaim(conn, pages))

    async def checkpoint(self) -> None:
        def run() -> None:
            # Its own connection, outside any transaction; PASSIVE never waits for
            # readers or writers: what it cannot copy now, a later checkpoint will.
            conn = connect(self.db_path)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                conn.close()

        await asyncio.to_thread(run)

    async def free_space(self) -> tuple[int, int]:
        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            total = conn.execute("PRAGMA page_count").fetchone()[0]
            return int(free), int(total)

        return await self._read(job)


def _integrity(db_path: Path, quick: bool) -> list[str]:
    # Its own read-only connection: a damaged file can fail any statement, COMMIT included.
    pragma = "quick_check" if quick else "integrity_check"
    conn = connect(db_path, readonly=True)
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}")]
    except sqlite3.DatabaseError as exc:  # too damaged to even walk
        return [str(exc)]
    finally:
        conn.close()
    # One row may hold several problems separated by newlines.
    lines = [ln for r in rows for ln in str(r).splitlines() if ln.strip()]
    if lines != ["ok"]:
        return [ln for ln in lines if not ln.startswith("***")]
    # Sound as a file, but is it a whole queue? (A recovery that stopped half way is not.)
    conn = connect(db_path, readonly=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    missing = sorted(QUEUE_TABLES - tables)
    return [f"not a complete Ferry queue: no table {', '.join(missing)}"] if missing else []


# -- helpers run on the writer thread --------------------------------------------


def _idempotency_row(conn: sqlite3.Connection, key: str, now: float) -> IdempotencyRecord | None:
    row = conn.execute(
        "SELECT key, fingerprint, queue_id, response, expires FROM idempotency"
        " WHERE key = ? AND expires > ?",
        (key, now),
    ).fetchone()
    return IdempotencyRecord(*row) if row else None


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


def _received_event(
    conn: sqlite3.Connection, qid: str, envelope: EnvelopeIn, now: float, size: int
) -> None:
    meta = json.loads(envelope.extra["metadata"]) if "metadata" in envelope.extra else {}
    outbox.add(
        conn,
        now,
        "received",
        qid,
        {
            "sender": envelope.sender,
            "recipients": [r.address for r in envelope.recipients],
            "size": size,
            "priority": envelope.priority.name.lower(),
            "client": envelope.client_address or envelope.auth_user,
            "metadata": meta,
        },
    )


def _outcome_event(
    conn: sqlite3.Connection,
    now: float,
    message_id: str,
    address: str,
    res: AttemptResult,
    status: Status,
    attempt: int,
    metadata: dict[str, Any],
) -> None:
    outbox.add(
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
            "metadata": outbox.metadata_of(conn, message_id, metadata),
        },
    )


def _dsn_events(
    conn: sqlite3.Connection,
    now: float,
    dsn_id: str,
    about: list[tuple[str, str, Status]],
    metadata: dict[str, Any],
) -> None:
    """A DSN was queued: "delayed" for a delay warning, "bounced" for a failure report."""
    for message_id, address, status in about:
        if status == Status.DELIVERED:
            continue
        outbox.add(
            conn,
            now,
            "bounced" if status.is_final else "delayed",
            message_id,
            {
                "recipient": address,
                "dsn_id": dsn_id,
                "metadata": outbox.metadata_of(conn, message_id, metadata),
            },
        )


def _operator_event(
    conn: sqlite3.Connection, now: float, message_id: str, action: str, count: int
) -> None:
    outbox.add(conn, now, "operator", message_id, {"action": action, "recipients": count})


def _insert_message(
    conn: sqlite3.Connection,
    qid: str,
    envelope: EnvelopeIn,
    now: float,
    expires: float,
    segment: tuple[str, int] | None = None,
    size: int | None = None,
) -> str:
    """The message's rows; its body inline in ``bodies``, or (``segment``: name and
    offset) already durable in a spool segment (ferry/queue/spool.py), ``size`` bytes
    (default: the envelope's)."""
    prio = int(envelope.priority)
    conn.execute(
        "INSERT INTO messages(id, sender, size, priority, arrival, expires, status,"
        " client_address, client_helo, auth_user, envid, ret, smtputf8, body_8bit,"
        " extra, spool, segment, body_offset) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            qid,
            envelope.sender,
            len(envelope.data) if size is None else size,
            prio,
            now,
            expires,
            Status.QUEUED.value,
            envelope.client_address,
            envelope.client_helo,
            envelope.auth_user,
            envelope.envid,
            envelope.ret,
            int(envelope.smtputf8),
            int(envelope.body_8bit),
            json.dumps(envelope.extra) if envelope.extra else None,
            0 if segment is None else 2,
            None if segment is None else segment[0],
            None if segment is None else segment[1],
        ),
    )
    if segment is None:
        conn.execute("INSERT INTO bodies(message_id, data) VALUES (?, ?)", (qid, envelope.data))
    conn.executemany(
        "INSERT INTO recipients(message_id, address, domain, orcpt, notify, status,"
        " priority, arrival, next_attempt) VALUES (?,?,?,?,?,?,?,?,?)",
        [
            (qid, r.address, r.domain, r.orcpt, r.notify, "Queued", prio, now, now)
            for r in envelope.recipients
        ],
    )
    return qid


_CHUNK = 500  # stay well under SQLite's bound-parameter limit


def _select_in(conn: sqlite3.Connection, sql: str, ids: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(ids), _CHUNK):
        part = ids[i : i + _CHUNK]
        out.extend(conn.execute(sql.format(",".join("?" * len(part))), part).fetchall())
    return out


def _exec_in(
    conn: sqlite3.Connection, sql: str, ids: list[Any], prefix: tuple[Any, ...] = ()
) -> None:
    for i in range(0, len(ids), _CHUNK):
        part = ids[i : i + _CHUNK]
        conn.execute(sql.format(",".join("?" * len(part))), (*prefix, *part))


_MSG_COLS = (
    "id, sender, size, priority, arrival, expires, status, client_address, client_helo,"
    " auth_user, envid, ret, smtputf8, extra, finished"
)


def _load_messages(conn: sqlite3.Connection, ids: list[str]) -> list[MessageInfo]:
    rows = _select_in(conn, f"SELECT {_MSG_COLS} FROM messages WHERE id IN ({{}})", ids)
    by_id = {
        r[0]: MessageInfo(
            id=r[0],
            sender=r[1],
            size=r[2],
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
        for r in rows
    }
    return [by_id[i] for i in ids if i in by_id]


_RCPT_COLS = (
    "id, message_id, address, orcpt, notify, status, attempts, next_attempt,"
    " last_code, last_enhanced, last_text, route, delay_warned, expiry_reason"
)


def _load_recipients(
    conn: sqlite3.Connection, ids: list[int], history: bool = False
) -> list[RecipientInfo]:
    rows = _select_in(conn, f"SELECT {_RCPT_COLS} FROM recipients WHERE id IN ({{}})", ids)
    by_id = {
        r[0]: RecipientInfo(
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
        for r in rows
    }
    if history and by_id:
        for rid, at, outcome, code, enh, text, hop, tls, tried in _select_in(
            conn,
            "SELECT recipient_id, at, outcome, code, enhanced, text, next_hop, tls, tried"
            " FROM attempts WHERE recipient_id IN ({}) ORDER BY at, id",
            list(by_id),
        ):
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


def _refresh_message_status(
    conn: sqlite3.Connection, message_ids: list[str], now: float | None = None
) -> None:
    """Keep messages.status equal to what its recipients' statuses derive (same txn).

    A message whose every recipient is final is finished: ``finished`` is set and its
    body deleted, in this same transaction (retention, issue 11.2).
    """
    if not message_ids:
        return
    statuses: dict[str, list[Status]] = {m: [] for m in message_ids}
    for mid, status in _select_in(
        conn, "SELECT message_id, status FROM recipients WHERE message_id IN ({})", message_ids
    ):
        statuses[mid].append(Status(status))
    pending: list[tuple[str, str, str]] = []
    final: list[tuple[str, str]] = []
    for mid, s in statuses.items():
        value = message_status(s).value
        if s and all(x.is_final for x in s):
            final.append((value, mid))
        else:
            pending.append((value, mid, value))
    # A row whose status stays is not rewritten (its pages stay clean).
    conn.executemany("UPDATE messages SET status=? WHERE id=? AND status IS NOT ?", pending)
    _finish(conn, final, now)


# -- retention (schema version 2: see sqlite_schema.py) --------------------------


def _finish(conn: sqlite3.Connection, messages: list[tuple[str, str]], now: float | None) -> None:
    """Give these messages their final status (status, id) and mark them finished, and
    drop their bodies: nothing will read them again.

    Every DSN about them was built from the body before the outcome that finished
    them was recorded (``Recorder``), and is queued with its own copy.
    """
    if not messages:
        return
    at = time.time() if now is None else now
    for value, mid in messages:
        # Status and finish time in one statement; RETURNING says whether the message
        # was unfinished until now (its spool file or segment, if any, is freed after
        # the commit: ``SqliteQueue._write``) -- what ``_drop_bodies`` would have
        # selected first.
        row = conn.execute(
            "UPDATE messages SET status=?, finished=? WHERE id=? AND finished IS NULL"
            " RETURNING spool, segment",
            (value, at, mid),
        ).fetchall()
        if row:
            _freed_after_commit(mid, *row[0])
        else:  # finished before (or gone): its status may still change
            conn.execute(
                "UPDATE messages SET status=? WHERE id=? AND status IS NOT ?", (value, mid, value)
            )
        conn.execute("DELETE FROM bodies WHERE message_id=?", (mid,))


def _purge(conn: sqlite3.Connection, before: float, limit: int) -> int:
    # The partial index messages_finished holds finished messages only, oldest first.
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM messages WHERE finished IS NOT NULL AND finished < ?"
            " ORDER BY finished LIMIT ?",
            (before, limit),
        )
    ]
    # ON DELETE CASCADE takes recipients and attempts; triggers keep the counters.
    _exec_in(conn, "DELETE FROM messages WHERE id IN ({})", ids)
    # The event log and used idempotency keys follow the same retention.
    outbox.purge(conn, before=before, limit=limit)
    conn.execute(
        "DELETE FROM idempotency WHERE key IN"
        " (SELECT key FROM idempotency WHERE expires < ? LIMIT ?)",
        (time.time(), limit),
    )
    return len(ids)


def _reclaim(conn: sqlite3.Connection, pages: int) -> int:
    before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    # Python's sqlite3 steps a PRAGMA that returns no columns only once, and one step of
    # incremental_vacuum gives back one page: so one statement per page (microseconds,
    # all inside this one transaction; executescript() would commit the group).
    for _ in range(min(pages, before)):
        conn.execute("PRAGMA incremental_vacuum(1)")
    after = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return before - after


__all__ = [
    "FINAL_STATUSES",
    "QueueDamaged",
    "QueueNotFound",
    "QueueStorageLost",
    "SqliteQueue",
    "connect",
    "recovery_steps",
]
