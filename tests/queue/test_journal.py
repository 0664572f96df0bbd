"""The delivery worker's outcome journal (ferry/queue/journal.py, issue 12).

Outcomes are written to the journal before the connection's next transaction and
committed behind it; whatever a dead worker left unacknowledged is recorded again from
its journal, on a real SQLite queue.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ferry.envelope import EnvelopeIn, RecipientIn, Reply, Status
from ferry.queue.base import AttemptResult
from ferry.queue.journal import OutcomeJournal, journal_dir, pending, replay
from ferry.queue.sqlite import SqliteQueue

OK = Reply(250, "2.0.0", "ok")
NOW = 1_800_000_000.0


def _delivered(rid: int) -> list[AttemptResult]:
    return [AttemptResult(rid, Status.DELIVERED, OK, route="smarthost:sink")]


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.journal"))


def test_acknowledged_entries_are_not_pending_and_a_clean_close_deletes_the_journal(
    tmp_path: Path,
) -> None:
    j = OutcomeJournal(tmp_path, "relay.test:42:0")
    one = j.append(_delivered(1), NOW, [])
    two = j.append(_delivered(2), NOW, [])
    assert one is not None and two is not None and one < two
    assert j.in_flight == 2
    j.done([one])
    assert j.in_flight == 1
    [(_paths, entries)] = pending(tmp_path)
    assert [e.seq for e in entries] == [two]
    assert entries[0].owner == "relay.test:42:0" and entries[0].results == _delivered(2)
    j.done([two])
    j.close()
    assert _files(tmp_path) == []


def test_a_close_with_entries_in_flight_keeps_them_for_the_replay(tmp_path: Path) -> None:
    j = OutcomeJournal(tmp_path, "w:1:0")
    seq = j.append(_delivered(7), NOW, [])
    j.close()
    [(_paths, entries)] = pending(tmp_path)
    assert [e.seq for e in entries] == [seq]


def test_a_torn_last_frame_ends_the_file(tmp_path: Path) -> None:
    j = OutcomeJournal(tmp_path, "w:1:0")
    j.append(_delivered(1), NOW, [])
    j.append(_delivered(2), NOW, [])
    j.close()
    [path] = list(tmp_path.glob("*.journal"))
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the second frame cut short (a crash mid-write)
    [(_paths, entries)] = pending(tmp_path)
    assert [e.results[0].recipient_id for e in entries] == [1]
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # a damaged byte: its CRC no longer matches
    path.write_bytes(bytes(flipped))
    [(_paths, entries)] = pending(tmp_path)
    assert [e.results[0].recipient_id for e in entries] == [1]


def test_segments_rotate_and_a_fully_acknowledged_one_is_deleted(tmp_path: Path) -> None:
    j = OutcomeJournal(tmp_path, "w:1:0", segment_bytes=200)
    seqs = [j.append(_delivered(i), NOW, []) for i in range(10)]
    assert all(s is not None for s in seqs)
    assert len(_files(tmp_path)) > 2
    first_files = _files(tmp_path)
    j.done([s for s in seqs[:-1] if s is not None])
    # Every segment but the one being written (and the last entry's) is gone.
    assert len(_files(tmp_path)) < len(first_files)
    [(_paths, entries)] = pending(tmp_path)
    assert [e.seq for e in entries] == [seqs[-1]]


def test_a_failing_journal_says_so_and_the_caller_waits_for_commits(tmp_path: Path) -> None:
    j = OutcomeJournal(tmp_path, "w:1:0")
    os.close(j._fd)  # the file can no longer be written (as on a failing disk)
    assert j.append(_delivered(1), NOW, []) is None
    assert j.broken and j.in_flight == 0
    j._fd = -1


def _status(db: Path, rid: int) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT status FROM recipients WHERE id=?", (rid,)).fetchone()[0])


async def test_replay_records_what_was_not_acknowledged_once(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        for i in range(3):
            await q.enqueue(
                EnvelopeIn("s@a.test", [RecipientIn(f"r{i}@b.test")], b"Subject: x\r\n\r\nx\r\n")
            )
        claimed = await q.claim("w:1:0", now=NOW, limit=10, lease=600)
        ids = sorted(c.recipient.id for c in claimed)
        d = journal_dir(tmp_path / "q")
        j = OutcomeJournal(d, "w:1:0")
        acked = j.append(_delivered(ids[0]), NOW, [])
        assert acked is not None
        j.done([acked])  # committed (in this test: only said to be)
        j.append(_delivered(ids[1]), NOW, [])
        fail = Reply(550, "5.1.1", "no such user")
        j.append([AttemptResult(ids[2], Status.FAILED, fail, route="smarthost:sink")], NOW, [])
        j.close()  # the worker dies with two entries in flight

        assert await replay(q, d) == 2
        db = tmp_path / "q" / "queue.db"
        assert _status(db, ids[0]) == "InProgress"  # acknowledged: never replayed
        assert _status(db, ids[1]) == "Delivered"
        assert _status(db, ids[2]) == "Failed"
        assert _files(d) == []
        assert await replay(q, d) == 0
    finally:
        await q.close()


async def test_a_replayed_entry_for_a_recipient_no_longer_ours_changes_nothing(
    tmp_path: Path,
) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        await q.enqueue(EnvelopeIn("s@a.test", [RecipientIn("r@b.test")], b"\r\nx\r\n"))
        [c] = await q.claim("w:1:0", now=NOW, limit=10, lease=600)
        rid = c.recipient.id
        # Recorded (the commit happened) but the ack never reached the journal.
        await q.record("w:1:0", _delivered(rid), now=NOW)
        d = journal_dir(tmp_path / "q")
        j = OutcomeJournal(d, "w:1:0")
        defer = Reply(451, "4.3.0", "later")
        j.append([AttemptResult(rid, Status.DEFERRED, defer, next_attempt=NOW + 60)], NOW, [])
        j.close()
        await replay(q, d)
        assert _status(tmp_path / "q" / "queue.db", rid) == "Delivered"
    finally:
        await q.close()


async def test_a_journaled_dsn_is_queued_by_the_replay(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        await q.enqueue(EnvelopeIn("s@a.test", [RecipientIn("r@b.test")], b"\r\nx\r\n"))
        [c] = await q.claim("w:1:0", now=NOW, limit=10, lease=600)
        rid = c.recipient.id
        d = journal_dir(tmp_path / "q")
        j = OutcomeJournal(d, "w:1:0")
        dsn = EnvelopeIn("", [RecipientIn("s@a.test")], b"Subject: failure\r\n\r\nreport\r\n")
        fail = Reply(550, "5.1.1", "no such user")
        failed = [AttemptResult(rid, Status.FAILED, fail, route="smarthost:sink")]
        j.append(failed, NOW, [(dsn, NOW + 86400, [rid])])
        j.close()
        assert await replay(q, d) == 1
        with sqlite3.connect(tmp_path / "q" / "queue.db") as conn:
            senders = [r[0] for r in conn.execute("SELECT sender FROM messages ORDER BY id")]
        assert senders == ["s@a.test", ""]
    finally:
        await q.close()


def test_only_the_named_owners_journal_is_replayed(tmp_path: Path) -> None:
    for owner in ("w:1:0", "w:1:1"):
        j = OutcomeJournal(tmp_path, owner)
        j.append(_delivered(1), NOW, [])
        j.close()
    [(paths, _entries)] = pending(tmp_path, "w:1:1")
    assert [p.name for p in paths] == ["w_1_1.0.journal"]
    assert len(pending(tmp_path)) == 2


def test_a_journal_left_unreplayed_is_kept_and_numbering_goes_on_after_it(
    tmp_path: Path,
) -> None:
    old = OutcomeJournal(tmp_path, "w:1:0")
    kept = old.append(_delivered(1), NOW, [])
    old.close()
    # The same worker restarted before its journal could be replayed.
    new = OutcomeJournal(tmp_path, "w:1:0")
    seq = new.append(_delivered(2), NOW, [])
    assert kept is not None and seq is not None and seq > kept
    new.done([seq])
    new.close()
    [(_paths, entries)] = pending(tmp_path)
    assert [e.results[0].recipient_id for e in entries] == [1]


async def test_an_entry_that_cannot_be_recorded_does_not_stop_the_replay(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        await q.enqueue(EnvelopeIn("s@a.test", [RecipientIn("r@b.test")], b"\r\nx\r\n"))
        [c] = await q.claim("w:1:0", now=NOW, limit=10, lease=600)
        d = journal_dir(tmp_path / "q")
        j = OutcomeJournal(d, "w:1:0")
        j.append(["not an outcome"], NOW, [])  # type: ignore[list-item]
        j.append(_delivered(c.recipient.id), NOW, [])
        j.close()
        assert await replay(q, d) == 1
        assert _status(tmp_path / "q" / "queue.db", c.recipient.id) == "Delivered"
        assert _files(d) == []
    finally:
        await q.close()
