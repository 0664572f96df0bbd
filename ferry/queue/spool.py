"""Message bodies as files beside the SQLite queue: the spool (issue 12).

A large body costs twice in a WAL database -- once into the WAL, once more when the
checkpoint copies it into the database file -- and every read of it walks the WAL
index. As a file it is written once and read with one ``read()``
(``bench/body_storage.py`` measured both; the README has the numbers).

The order that keeps a 250 honest and never shows a half-written message:

1. the body is written to ``<id>`` and ``fdatasync``-ed (no temporary name: the row,
   not the name, makes it visible; bench/body_storage.py measured a rename slower);
2. the spool directory is fsynced (``DirSync``: one fsync covers every file created
   before it started, so concurrent sessions share it);
3. only then is the message's row committed; delivery sees a message only through
   its row, so a body without a row is invisible and is removed by ``orphans`` at
   the next start;
4. a body file is deleted only after the commit that finished or removed its message
   (a crash in between leaves a file whose row is gone or finished: an orphan too).

Only ``ferry serve`` writes spool files, and it sweeps orphans at start, before it
accepts mail; nothing else may sweep (a body written but not yet committed by a
running server looks exactly like an orphan).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import threading
from collections.abc import Collection, Iterable
from pathlib import Path

#: The spool directory inside the queue directory (beside queue.db).
DIRECTORY = "spool"

# Queue ids are hex (ferry.queue.base.new_queue_id); anything else never becomes a path.
_NAME = re.compile(r"[0-9A-Za-z]{1,64}")


def spool_dir(queue_dir: str | os.PathLike[str]) -> Path:
    return Path(queue_dir) / DIRECTORY


def body_path(spool: Path, message_id: str) -> Path:
    """Where the body of ``message_id`` lives; refuses ids that are not plain names."""
    if not _NAME.fullmatch(message_id):
        raise ValueError(f"not a queue id: {message_id!r}")
    return spool / message_id


def write_file(spool: Path, message_id: str, data: bytes) -> Path:
    """Write the body under its final name and fdatasync it.

    No temporary name and rename: what makes a body visible is the committed row that
    names it, not the file's name, so a half-written file is an orphan like any other
    (and one metadata operation less lets the fdatasync's journal commit also carry
    the directory entry, making the directory fsync that follows cheap on ext4).
    The file's name is durable once the directory is fsynced (``DirSync.sync``).
    """
    final = body_path(spool, message_id)
    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        # fdatasync also writes the size and block map (needed to read the data back).
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(final)
        raise
    os.close(fd)
    return final


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Group commit for directory fsyncs, shared by every thread that writes bodies.

    A caller registers after its rename; an fsync that *started* after that covers it.
    While one fsync runs, callers that arrive wait and the next fsync covers all of
    them: N concurrent sessions pay about one directory fsync, not N.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out
        self._done = 0  # every ticket up to this one is durable
        self._running = False
        self.fsyncs = 0  # for benchmarks and tests

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._requested
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                # Reached only if the fsync succeeded (an error propagates to this
                # caller; the waiters then try their own fsync).
                self.fsyncs += 1
                self._done = max(self._done, covers)


def store(spool: Path, dirsync: DirSync, message_id: str, data: bytes) -> Path:
    """Steps 1 and 2: the body is durable under its final name when this returns."""
    path = write_file(spool, message_id, data)
    dirsync.sync()
    return path


class Writer:
    """Bodies made durable from an event loop: :func:`store` on a pool of threads (the
    write and fdatasync release the GIL), the directory fsyncs shared (``DirSync``).

    ``ferry serve``'s queue has one; so has each intake process, which writes the bodies
    of the messages it receives before it asks serve to commit their rows.
    """

    # Sessions whose fdatasync may run at once: concurrent fsyncs share journal commits
    # (ext4), so sessions do not queue behind one another's fsync.
    THREADS = 32

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.dirsync = DirSync(spool)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def store(self, message_id: str, data: bytes) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.THREADS, thread_name_prefix="ferry-spool"
            )
        await asyncio.get_running_loop().run_in_executor(
            self._pool, store, self.spool, self.dirsync, message_id, data
        )

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown)
            self._pool = None


def read(spool: Path, message_id: str) -> bytes | None:
    """The body's bytes, or None when the file is gone (finished meanwhile)."""
    try:
        with open(body_path(spool, message_id), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def unlink(spool: Path, message_ids: Iterable[str]) -> int:
    """Delete bodies whose messages are committed finished or removed; returns how many.

    Not fsynced: if a crash undoes a deletion, the file is an orphan, swept at start.
    """
    n = 0
    for mid in message_ids:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(body_path(spool, mid))
            n += 1
    return n


def names(spool: Path) -> list[str]:
    """Every entry in the spool directory (none when it does not exist)."""
    try:
        return [e.name for e in os.scandir(spool)]
    except FileNotFoundError:
        return []


def orphans(entries: Iterable[str], live: Collection[str]) -> list[str]:
    """The entries to delete at start: every one that is not a live message's body.

    ``live`` are the ids whose row says the body is in the spool and that are not
    finished. Anything else in the directory is no message's body (pure: tested with
    table cases).
    """
    return sorted(name for name in entries if name not in live)


def missing(live: Iterable[str], entries: Collection[str]) -> list[str]:
    """Live messages whose body file is not there (``ferry queue check`` reports them)."""
    return sorted(mid for mid in live if mid not in entries)


def remove_names(spool: Path, entries: Iterable[str]) -> int:
    n = 0
    for name in entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool / name)
            n += 1
    return n
