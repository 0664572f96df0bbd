"""A delivery worker's outcome journal: recorded before the next transaction, committed later.

Issue 10.1's bar is that a crash repeats only the transactions in flight: each delivered
outcome must survive a process crash before its connection starts the next
transaction. A worker of a SQLite queue sends its writes to ``ferry serve``, the
database's one writer (ferry/queue/remote.py); waiting for that commit made every
delivery session wait for a round trip to another process and a group commit there
(measured: 15 ms of a 21 ms cycle per message at 1 KB, issue 12).

Postfix's answer is to write the outcome into the queue file, not to fsync it: a process
crash cannot lose what the kernel already has. This journal does the same: one
``write()`` per transaction into an append-only file, and the session goes on at once.
The record is sent to the writer as before; when it has committed, an acknowledgement
frame goes into the journal too. If the worker dies (even SIGKILL), ``ferry serve``
records every unacknowledged entry (:func:`replay`) before it hands the worker's leases
back; if ``ferry serve`` dies, the next one does it before anything else. A recipient no
longer in progress under the entry's owner is skipped by ``Queue.record`` itself, so an
entry recorded twice changes nothing. Only a power loss can lose an entry (it is not
fsynced): then a message is sent twice, never lost -- the same as a worker's own
``synchronous=NORMAL`` commits.

Frames: a 4-byte big-endian length, a CRC-32 of the payload, then the payload (a pickle:
``("o", seq, owner, results, now, new_messages)`` or ``("a", seqs)``). A frame cut short
or with a wrong CRC ends the file (a torn tail). Files are segments,
``<owner>.<n>.journal``: a new one starts past ``SEGMENT_BYTES``, and a segment whose
every entry is acknowledged is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.envelope import EnvelopeIn
from ferry.queue.base import AttemptResult, Queue

_HEAD = struct.Struct(">II")  # length, CRC-32 of the payload
SEGMENT_BYTES = 4 << 20
#: A frame this long is not ours (a damaged file): stop reading it.
MAX_FRAME = 1 << 30

#: A DSN an entry queues, as ``Queue.record`` takes it: envelope, expiry, the recipients
#: it reports on.
NewMessage = tuple[EnvelopeIn, float, list[int]]

log = logging.getLogger("ferry.delivery")


def journal_dir(queue_path: str | Path) -> Path:
    """Where the workers of the queue at ``queue_path`` keep their journals."""
    return Path(queue_path) / "journal"


def _safe(owner: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", owner)


def _segment_of(path: Path) -> tuple[str, int] | None:
    """``<owner>.<n>.journal`` -> (owner as in file names, n); None for another file."""
    stem, _, n = path.name.removesuffix(".journal").rpartition(".")
    return (stem, int(n)) if path.name.endswith(".journal") and n.isdigit() else None


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(data), zlib.crc32(data)) + data


def read_frames(path: Path) -> Iterator[Any]:
    """The frames of one journal file, up to its end or its first torn frame."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    pos = 0
    while len(data) - pos >= _HEAD.size:
        n, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        end = start + n
        if n > MAX_FRAME or end > len(data):
            return
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            return
        try:
            yield pickle.loads(payload)
        except Exception:  # not a frame of ours: the rest cannot be trusted
            return
        pos = end


@dataclass
class Entry:
    """One transaction's record, as ``Queue.record`` takes it."""

    seq: int
    owner: str
    results: list[AttemptResult]
    now: float
    new_messages: list[NewMessage] = field(default_factory=list)


def pending(directory: Path, owner: str | None = None) -> list[tuple[list[Path], list[Entry]]]:
    """Per journal (one owner's segments): its files and its unacknowledged entries, in
    the order they were written. ``owner``: that owner's journal only."""
    groups: dict[str, list[Path]] = {}
    pattern = f"{_safe(owner)}.*.journal" if owner is not None else "*.journal"
    for path in sorted(directory.glob(pattern)):
        seg = _segment_of(path)
        if seg is not None and (owner is None or seg[0] == _safe(owner)):
            groups.setdefault(seg[0], []).append(path)
    out: list[tuple[list[Path], list[Entry]]] = []
    for paths in groups.values():
        entries: dict[int, Entry] = {}
        acked: set[int] = set()
        for path in paths:
            for frame in read_frames(path):
                if frame[0] == "o":
                    _kind, seq, who, results, now, new_messages = frame
                    entries[seq] = Entry(seq, who, results, now, new_messages)
                elif frame[0] == "a":
                    acked.update(frame[1])
        out.append((paths, [entries[s] for s in sorted(entries) if s not in acked]))
    return out


async def replay(queue: Queue, directory: Path, owner: str | None = None) -> int:
    """Record every unacknowledged entry of the journals in ``directory`` (``owner``:
    that worker's only), then delete them. Returns how many outcomes were recorded
    again. Call it when no worker writes these journals any more: the worker is dead,
    or ``ferry serve`` is starting."""
    replayed = 0
    for paths, entries in pending(directory, owner):
        for e in entries:
            try:
                await queue.record(e.owner, e.results, now=e.now, new_messages=e.new_messages)
            except Exception:
                # An entry that cannot be recorded (say, written by another version of
                # Ferry) must not keep `ferry serve` from starting: its recipients go
                # back to the queue with the leases and are delivered again.
                log.exception("outcome journal of %s: entry %d not recorded", e.owner, e.seq)
                continue
            replayed += len(e.results)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return replayed


class OutcomeJournal:
    """The worker's end: ``append`` before the next transaction, ``done`` after the commit."""

    def __init__(self, directory: Path, owner: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.owner = owner
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        # Files of this owner not replayed yet (a replay that failed) stay as they are:
        # numbering goes on after them, so no entry or ack is confused with theirs.
        self._seq = 0
        self._segment = -1
        for path in directory.glob(f"{_safe(owner)}.*.journal"):
            seg = _segment_of(path)
            if seg is not None and seg[0] == _safe(owner):
                self._segment = max(self._segment, seg[1])
                for frame in read_frames(path):
                    if frame[0] == "o":
                        self._seq = max(self._seq, int(frame[1]))
        self._fd = -1
        self._size = 0
        #: Unacknowledged entries per segment number; where each entry went.
        self._open_entries: dict[int, int] = {}
        self._where: dict[int, int] = {}
        self.broken = False
        self._next_segment()

    def _path(self, n: int) -> Path:
        return self.directory / f"{_safe(self.owner)}.{n}.journal"

    def _next_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._segment += 1
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._open_entries[self._segment] = 0

    def _write(self, frame: bytes) -> None:
        n = os.write(self._fd, frame)
        if n != len(frame):  # a short write to a regular file: the disk is full
            raise OSError(f"journal: wrote {n} of {len(frame)} bytes")
        self._size += n

    @property
    def in_flight(self) -> int:
        """Entries written and not yet acknowledged."""
        return len(self._where)

    def append(
        self,
        results: list[AttemptResult],
        now: float,
        new_messages: list[NewMessage],
    ) -> int | None:
        """Write one transaction's record; its number, or None if it could not be written
        (the caller then waits for the commit instead, as without a journal)."""
        if self.broken:
            return None
        self._seq += 1
        seq = self._seq
        try:
            if self._size >= self.segment_bytes:
                self._next_segment()
            self._write(_frame(("o", seq, self.owner, results, now, new_messages)))
        except OSError:
            # A full or failing disk: fall back to waiting for each commit, loudly once.
            log.exception("outcome journal %s failed; waiting for commits instead", self.owner)
            self.broken = True
            return None
        self._where[seq] = self._segment
        self._open_entries[self._segment] += 1
        return seq

    def done(self, seqs: Sequence[int]) -> None:
        """These entries are committed: acknowledge them, delete segments left empty."""
        seqs = [s for s in seqs if s in self._where]
        if not seqs:
            return
        if not self.broken:
            try:
                self._write(_frame(("a", seqs)))
            except OSError:
                log.exception("outcome journal %s failed", self.owner)
                self.broken = True
        for s in seqs:
            seg = self._where.pop(s)
            self._open_entries[seg] -= 1
        for seg in [g for g, n in self._open_entries.items() if n == 0 and g != self._segment]:
            # Every entry of that segment is committed (its acks may sit in a later
            # segment: an ack of an entry no longer written anywhere is harmless).
            del self._open_entries[seg]
            with contextlib.suppress(FileNotFoundError):
                self._path(seg).unlink()

    def close(self) -> None:
        """Stop writing; with nothing left unacknowledged, delete the journal (else the
        next ``ferry serve`` or the parent replays it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._where:
            for seg in list(self._open_entries):
                with contextlib.suppress(FileNotFoundError):
                    self._path(seg).unlink()
            self._open_entries.clear()
