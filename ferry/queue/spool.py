"""Message bodies as files beside the SQLite queue: the spool (issue 12).

A large body costs twice in a WAL database -- once into the WAL, once more when the
checkpoint copies it into the database file -- and every read of it walks the WAL
index. In the spool it is written once and read with one ``pread``
(``bench/body_storage.py`` measured both; the README has the numbers).

Bodies are appended to *segments*: files of up to ``SEGMENT_BYTES`` that one writer
(``Writer``: an intake process, or ``ferry serve``'s queue) fills, a message's row
naming its segment and offset. One file per body cost a file creation, a deletion
and their journal commits per message; a segment shares one ``fdatasync`` among the
sessions writing at the same moment and is deleted once for hundreds of bodies
(the README has the numbers). Older queues have one file per body, ``<id>``: those
are still read and deleted as before.

The order that keeps a 250 honest and never shows a half-written message:

1. the body is appended to the writer's current segment and ``fdatasync``-ed (a new
   segment's name is made durable by an fsync of the directory before its first
   body is used);
2. only then is the message's row committed; delivery sees a message only through
   its row, so bytes no row names are invisible;
3. a segment is *sealed* once its writer has moved on to the next one and every
   row commit naming it is over (the writer tells the queue: ``on_sealed``); a
   writer that is gone (a dead intake process, a restart) has sealed all of its
   segments;
4. a sealed segment is deleted only after the commit that finished or removed its
   last live message (a crash in between leaves a segment no live row names: an
   orphan, removed by the start-up sweep). A segment mostly made of finished
   messages has its live bodies copied to a new segment (``SqliteQueue.compact_spool``).

Only ``ferry serve`` writes the spool, and it sweeps orphans at start, before it
accepts mail; nothing else may sweep (a body written but not yet committed by a
running server looks exactly like an orphan).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from pathlib import Path

#: The spool directory inside the queue directory (beside queue.db).
DIRECTORY = "spool"

# Queue ids are hex (ferry.queue.base.new_queue_id); anything else never becomes a path.
_NAME = re.compile(r"[0-9A-Za-z]{1,64}")
# A segment: "seg.<writer tag>.<sequence>". The dot keeps it apart from any queue id.
_SEGMENT = re.compile(r"seg\.([0-9A-Za-z]{1,32})\.([0-9]{1,12})")

#: A writer starts a new segment when its current one would pass this size ...
SEGMENT_BYTES = 16 * 1024 * 1024
#: ... or is this old (seconds): a quiet relay's bodies are not held for days by a
#: segment that never fills.
SEGMENT_SECONDS = 300.0


def spool_dir(queue_dir: str | os.PathLike[str]) -> Path:
    return Path(queue_dir) / DIRECTORY


def body_path(spool: Path, message_id: str) -> Path:
    """Where the body of ``message_id`` lives; refuses ids that are not plain names."""
    if not _NAME.fullmatch(message_id):
        raise ValueError(f"not a queue id: {message_id!r}")
    return spool / message_id


def segment_path(spool: Path, name: str) -> Path:
    """Where segment ``name`` lives; refuses anything that is not a segment's name."""
    if not _SEGMENT.fullmatch(name):
        raise ValueError(f"not a spool segment: {name!r}")
    return spool / name


def is_segment(name: str) -> bool:
    return _SEGMENT.fullmatch(name) is not None


def segment_tag(name: str) -> str:
    """The tag of the writer that wrote segment ``name``."""
    m = _SEGMENT.fullmatch(name)
    if m is None:
        raise ValueError(f"not a spool segment: {name!r}")
    return m.group(1)


_tags = itertools.count()


def new_tag() -> str:
    """A writer's tag: unique among the writers of one queue directory, across restarts
    (the time in ms, the process id and a counter)."""
    return f"{int(time.time() * 1000):x}{os.getpid():x}{next(_tags):x}"


def read_at(spool: Path, segment: str, offset: int, size: int) -> bytes | None:
    """``size`` bytes at ``offset`` of a segment, or None when the segment is gone
    (its messages finished meanwhile) or too short to hold them (damaged)."""
    try:
        fd = os.open(segment_path(spool, segment), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    return data if len(data) == size else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """Group commit for fsyncs of one file or directory, shared by the threads that
    write it.

    A caller registers after its write; an fsync that *started* after that covers it.
    While one fsync runs, callers that arrive wait and the next fsync covers all of
    them: N concurrent sessions pay about one fsync, not N.
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
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
                    self._flush()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                # Reached only if the fsync succeeded (an error propagates to this
                # caller; the waiters then try their own fsync).
                self.fsyncs += 1
                self._done = max(self._done, covers)


class _Segment:
    """A segment being filled: its file, where the next body goes, and how many bodies
    are between their write and the end of their row's commit (``inflight``)."""

    def __init__(self, spool: Path, name: str) -> None:
        self.spool = spool
        self.name = name
        self.path = segment_path(spool, name)
        self.size = 0  # offset of the next body
        self.started = time.monotonic()
        self.inflight = 0
        self.retired = False  # the writer has moved on to a newer segment
        self.fd: int | None = None
        self._lock = threading.Lock()
        self.sync = GroupSync(self._fdatasync)

    def open(self) -> int:
        """The file, created on first use, its name durable before any body in it is."""
        with self._lock:
            if self.fd is None:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    fsync_dir(self.spool)
                except BaseException:
                    os.close(fd)
                    raise
                self.fd = fd
            return self.fd

    def _fdatasync(self) -> None:
        assert self.fd is not None
        # fdatasync also writes the size and block map (needed to read the data back).
        os.fdatasync(self.fd)

    def write(self, data: bytes, offset: int) -> None:
        """Steps 1 of the module's order: the body durable at ``offset`` on return."""
        fd = self.open()
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        self.sync.sync()

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class Writer:
    """Bodies made durable from an event loop, appended to segments (one writer each).

    Writes and fdatasyncs run on a pool of threads (they release the GIL); the bodies
    of sessions writing at the same moment share one fdatasync. ``ferry serve``'s queue
    has one writer; so has each intake process, which writes the bodies of the messages
    it receives before it asks serve to commit their rows. ``on_sealed(name)`` is
    called (on the event loop) when a segment is sealed (the module's step 3).
    """

    # Sessions whose writes may run at once; their fdatasyncs are shared (GroupSync).
    THREADS = 32

    def __init__(
        self,
        spool: Path,
        tag: str | None = None,
        on_sealed: Callable[[str], object] | None = None,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        segment_seconds: float = SEGMENT_SECONDS,
    ) -> None:
        self.spool = spool
        self.tag = tag or new_tag()
        self.on_sealed = on_sealed
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self._sequence = 0
        self._current: _Segment | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _segment_for(self, size: int) -> _Segment:
        seg = self._current
        if seg is not None and seg.size > 0:
            full = seg.size + size > self.segment_bytes
            if full or time.monotonic() - seg.started > self.segment_seconds:
                self._retire(seg)
                seg = None
        if seg is None:
            self._sequence += 1
            seg = _Segment(self.spool, f"seg.{self.tag}.{self._sequence}")
            self._current = seg
        return seg

    def _retire(self, seg: _Segment) -> None:
        seg.retired = True
        if self._current is seg:
            self._current = None
        if seg.inflight == 0:
            self._seal(seg)

    def _seal(self, seg: _Segment) -> None:
        seg.close()
        if seg.size and self.on_sealed is not None:
            self.on_sealed(seg.name)

    @contextlib.asynccontextmanager
    async def append(self, data: bytes) -> AsyncIterator[tuple[str, int]]:
        """``async with writer.append(body) as (segment, offset):`` the body is durable
        inside the block; commit the row that names it there. The segment is not sealed
        before the block is left (the commit over, whether or not it succeeded)."""
        seg = self._segment_for(len(data))
        offset = seg.size
        seg.size += len(data)
        seg.inflight += 1
        try:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.THREADS, thread_name_prefix="ferry-spool"
                )
            await asyncio.get_running_loop().run_in_executor(self._pool, seg.write, data, offset)
            yield seg.name, offset
        finally:
            seg.inflight -= 1
            if not seg.retired and seg.size >= self.segment_bytes:
                self._retire(seg)  # full: sealed as soon as nothing is in flight
            elif seg.retired and seg.inflight == 0:
                self._seal(seg)

    async def close(self) -> None:
        """Seal the current segment (nothing may be appended after this)."""
        if self._current is not None:
            self._retire(self._current)
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
