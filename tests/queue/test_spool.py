"""Message bodies in spool segments beside the SQLite queue (ferry/queue/spool.py, issue 12)."""

from __future__ import annotations

import json
import sqlite3
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.config import RelayConfig
from ferry.envelope import EnvelopeIn, RecipientIn, Reply, Status
from ferry.queue import spool
from ferry.queue.base import AttemptResult, IdempotencyRecord, IdempotencyReplay
from ferry.queue.selection import Selection
from ferry.queue.sqlite import SCHEMA, SPOOL_THRESHOLD, SqliteQueue
from ferry.queue.sqlite_schema import MIGRATIONS
from tests.harness import run_cli, write_toml

CASES = Path(__file__).parent.parent / "cases" / "spool" / "orphans.toml"
OK = Reply(250, "2.0.0", "ok")
T0 = 1_800_000_000.0
BIG = b"Subject: big\r\n\r\n" + b"y" * 40_000 + b"\r\n"


def _cases() -> list[dict[str, Any]]:
    with CASES.open("rb") as fh:
        cases: list[dict[str, Any]] = tomllib.load(fh)["case"]
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_sweep_and_check_rules(case: dict[str, Any]) -> None:
    assert spool.orphans(case["entries"], set(case["live"])) == case["orphans"]
    assert spool.missing(case["live"], set(case["entries"])) == case["missing"]


def test_the_configured_default_is_the_queues() -> None:
    assert RelayConfig().queue.spool_threshold == SPOOL_THRESHOLD


async def test_deleted_bodies_are_not_overwritten_through_the_wal(tmp_path: Path) -> None:
    # Debian's SQLite has SECURE_DELETE on: every deleted body page was written again as
    # zeros (into the WAL, then by the checkpoint). FAST zeroes only what costs no I/O.
    q = SqliteQueue(tmp_path / "q")
    try:
        assert q.run_sync(lambda c: c.execute("PRAGMA secure_delete").fetchone()[0]) == 2
    finally:
        await q.close()


def env(*rcpts: str, data: bytes = BIG) -> EnvelopeIn:
    return EnvelopeIn("s@example.org", [RecipientIn(r) for r in rcpts], data)


def files(q: SqliteQueue) -> list[str]:
    return sorted(spool.names(q.spool))


def segment_of(q: SqliteQueue, qid: str) -> str:
    row = q.run_sync(
        lambda c: c.execute("SELECT spool, segment FROM messages WHERE id = ?", (qid,)).fetchone()
    )
    assert row[0] == 2, row
    return str(row[1])


def one_per_body(path: Path, **kwargs: Any) -> SqliteQueue:
    """Every spooled body in a segment of its own, sealed once its row is committed:
    what a segment goes through, one message at a time."""
    return SqliteQueue(path, spool_threshold=0, segment_bytes=1, **kwargs)


async def test_large_bodies_go_to_a_segment_small_ones_are_rows(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")  # the default threshold and segment size
    try:
        small = await q.enqueue(env("a@x.test", data=b"Subject: s\r\n\r\nsmall\r\n"))
        big = await q.enqueue(env("b@x.test"))
        big2 = await q.enqueue(env("c@x.test", data=BIG + b"more\r\n"))
        seg = segment_of(q, big)
        assert segment_of(q, big2) == seg  # one segment, one after the other
        assert files(q) == [seg] and spool.is_segment(seg)
        assert (q.spool / seg).read_bytes() == BIG + BIG + b"more\r\n"
        assert await q.read_messages([small, big, big2, "NOSUCH"]) == {
            small: b"Subject: s\r\n\r\nsmall\r\n",
            big: BIG,
            big2: BIG + b"more\r\n",
        }
        assert await q.read_message(big) == BIG
    finally:
        await q.close()
    # Closed: the segment is sealed, and kept (its messages are pending).
    assert spool.names(tmp_path / "q" / "spool") == [seg]


async def test_a_body_without_its_row_is_no_message(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        # What a crash between the body's write and its row's commit leaves behind:
        # a whole segment no row names, a body file of an older queue, a stray file.
        (q.spool / "seg.dead.1").write_bytes(BIG)
        (q.spool / "0190A1B2C3D00000001").write_bytes(BIG)  # an older queue's file
        (q.spool / "0190A1B2C3D00000002.tmp").write_bytes(b"half")
        assert await q.read_message("0190A1B2C3D00000001") is None
        assert await q.list() == []
        kept = await q.enqueue(env("a@x.test"))
        assert await q.sweep_spool() == 3
        assert files(q) == [segment_of(q, kept)]  # the live body stays
        assert await q.read_message(kept) == BIG
    finally:
        await q.close()


async def test_a_segment_goes_after_the_commit_that_finishes_its_last_message(
    tmp_path: Path,
) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        first = await q.enqueue(env("a@x.test", "b@x.test"))
        second = await q.enqueue(env("c@x.test"))
        seg = segment_of(q, first)
        claimed = {
            c.recipient.address: c.recipient.id
            for c in await q.claim("w", now=T0, limit=10, lease=60)
        }
        done = [AttemptResult(claimed[a], Status.DELIVERED, OK) for a in ("a@x.test", "c@x.test")]
        await q.record("w", done, now=T0)
        assert await q.read_message(second) is None  # finished
        assert await q.read_message(first) == BIG  # b is still pending
        await q.record("w", [AttemptResult(claimed["b@x.test"], Status.DELIVERED, OK)], now=T0)
        # Every message in it is finished, but the writer still appends to it.
        assert files(q) == [seg]
        assert await q.seal_segment(seg) == 1
        assert files(q) == []
        assert await q.read_message(first) is None
        # Nothing left to sweep: the history stays, the body is gone.
        assert await q.sweep_spool() == 0
        info = await q.get(first)
        assert info is not None and info.finished == T0
    finally:
        await q.close()


async def test_a_sealed_segment_stays_while_a_message_in_it_is_pending(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        first, second = await q.enqueue(env("a@x.test")), await q.enqueue(env("b@x.test"))
        seg = segment_of(q, first)
        assert await q.seal_segment(seg) == 0  # both pending
        claimed = {
            c.message.id: c.recipient.id for c in await q.claim("w", now=T0, limit=9, lease=60)
        }
        await q.record("w", [AttemptResult(claimed[first], Status.DELIVERED, OK)], now=T0)
        assert files(q) == [seg]
        await q.record("w", [AttemptResult(claimed[second], Status.DELIVERED, OK)], now=T0)
        assert files(q) == []  # the last one's commit freed it
    finally:
        await q.close()


async def test_a_gone_writers_segments_are_sealed(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        # An intake process ("w1") wrote two segments and died; another ("w2") runs.
        (q.spool / "seg.w1.1").write_bytes(BIG)
        (q.spool / "seg.w1.2").write_bytes(BIG)
        (q.spool / "seg.w2.1").write_bytes(BIG)
        live = await q.enqueue_spooled(
            env("a@x.test"),
            len(BIG),
            queue_id="0190A1B2C3D00000009",
            segment="seg.w1.2",
            offset=0,
        )
        assert await q.seal_writer("w1") == 1  # seg.w1.1: no row names it
        assert files(q) == ["seg.w1.2", "seg.w2.1"]
        assert await q.read_message(live) == BIG
        with pytest.raises(ValueError):
            await q.seal_segment("../queue.db")
    finally:
        await q.close()


@pytest.mark.parametrize("relaxed", [False, True], ids=["worker-queue", "relaxed-view"])
async def test_without_fsynced_commits_segments_go_in_batches_after_a_wal_fsync(
    tmp_path: Path, relaxed: bool
) -> None:
    # A delivery worker's queue (synchronous=NORMAL), or serve's relaxed() view that
    # writes a worker's outcomes: a power loss could undo the commit that finished a
    # message but not the deletion of its body; so deletions wait for an fsync of the
    # WAL, done at most every unlink_interval (and at close). The relaxed view failed
    # before: it unlinked at once, after a commit that was not fsynced.
    base = one_per_body(tmp_path / "q", durable=relaxed)
    base.unlink_interval = 3600
    q = base.relaxed() if relaxed else base
    try:
        first, second = await q.enqueue(env("a@x.test")), await q.enqueue(env("b@x.test"))
        await base.settle_spool()
        claimed = {
            c.message.id: c.recipient.id for c in await q.claim("w", now=T0, limit=9, lease=60)
        }
        await q.record("w", [AttemptResult(claimed[first], Status.DELIVERED, OK)], now=T0)
        assert files(q) == [segment_of(q, second)]  # the first batch goes at once
        await q.record("w", [AttemptResult(claimed[second], Status.DELIVERED, OK)], now=T0)
        assert files(q) == [segment_of(q, second)]  # the next waits for the interval
        assert await q.read_message(second) is None  # finished: no longer readable
    finally:
        await base.close()
    assert spool.names(tmp_path / "q" / "spool") == []  # close flushes


async def test_remove_cancel_and_bulk_remove_free_their_segments(tmp_path: Path) -> None:
    q = one_per_body(tmp_path / "q")
    try:
        one, two, three = [await q.enqueue(env(f"{n}@x.test")) for n in "abc"]
        await q.settle_spool()
        assert await q.remove(one)
        assert await q.cancel(two, now=T0) == 1
        assert files(q) == [segment_of(q, three)]
        result = await q.bulk("remove", Selection(), now=T0, by="test")
        assert result.messages >= 1
        assert files(q) == []
    finally:
        await q.close()


async def test_cancel_with_dsn_reads_the_spooled_body(tmp_path: Path) -> None:
    q = one_per_body(tmp_path / "q")
    seen: list[bytes] = []

    def make_dsn(message: Any, data: bytes) -> EnvelopeIn:
        seen.append(data)
        return EnvelopeIn("", [RecipientIn("s@example.org")], b"Subject: dsn\r\n\r\nx\r\n")

    try:
        qid = await q.enqueue(env("a@x.test"))
        await q.settle_spool()
        result = await q.bulk("cancel", Selection(), now=T0, by="test", make_dsn=make_dsn)
        assert result.dsns == 1 and seen == [BIG]
        # The cancelled message's segment went after the commit; the DSN is a row (it
        # was queued inside the transaction, not through enqueue).
        assert files(q) == []
        assert await q.read_message(qid) is None
    finally:
        await q.close()


async def test_a_refused_enqueue_leaves_no_segment(tmp_path: Path) -> None:
    q = one_per_body(tmp_path / "q")
    try:
        key = IdempotencyRecord("token:t:k", "fp", "", "250 ok", expires=T0 * 2)
        first = await q.enqueue(env("a@x.test"), idempotency=key)
        with pytest.raises(IdempotencyReplay):
            await q.enqueue(env("a@x.test"), idempotency=key)
        await q.settle_spool()
        assert files(q) == [segment_of(q, first)]
    finally:
        await q.close()


async def test_an_older_queues_body_files_stay_readable(tmp_path: Path) -> None:
    # Version 5 and 6 queues kept each large body in a file of its own, spool/<id>.
    q = SqliteQueue(tmp_path / "q", spool_threshold=None)
    try:
        old = await q.enqueue(env("a@x.test"))
        q.run_sync(lambda c: c.execute("DELETE FROM bodies WHERE message_id = ?", (old,)))
        q.run_sync(lambda c: c.execute("UPDATE messages SET spool = 1 WHERE id = ?", (old,)))
        (q.spool / old).write_bytes(BIG)
        assert await q.read_message(old) == BIG
        assert await q.sweep_spool() == 0
        assert await q.check_bodies() == []
        claimed = await q.claim("w", now=T0, limit=10, lease=60)
        await q.record(
            "w", [AttemptResult(c.recipient.id, Status.DELIVERED, OK) for c in claimed], now=T0
        )
        assert files(q) == []
    finally:
        await q.close()


def test_segment_names_never_become_other_paths(tmp_path: Path) -> None:
    for bad in ("../queue.db", "seg..1", "seg.a/b.1", "seg.a.x", "0190A1B2C3D00000001"):
        assert not spool.is_segment(bad)
        with pytest.raises(ValueError):
            spool.segment_path(tmp_path, bad)
    assert spool.segment_tag("seg.abc.12") == "abc"


async def test_a_writer_moves_to_a_new_segment_when_full_and_seals_the_old(
    tmp_path: Path,
) -> None:
    sealed: list[str] = []
    w = spool.Writer(tmp_path, "t", on_sealed=sealed.append, segment_bytes=100)
    try:
        async with w.append(b"a" * 60) as first:
            async with w.append(b"b" * 60) as second:
                assert first == ("seg.t.1", 0) and second == ("seg.t.2", 0)
                # seg.t.1 is retired, but its first body's commit is still in flight.
                assert sealed == []
            assert sealed == []
        assert sealed == ["seg.t.1"]
        async with w.append(b"c" * 40) as third:
            assert third == ("seg.t.2", 60)
        assert sealed == ["seg.t.1", "seg.t.2"]  # full: sealed at once
    finally:
        await w.close()
    assert (tmp_path / "seg.t.2").read_bytes() == b"b" * 60 + b"c" * 40
    assert spool.read_at(tmp_path, "seg.t.2", 60, 40) == b"c" * 40
    assert spool.read_at(tmp_path, "seg.t.2", 60, 41) is None  # too short: damaged
    assert spool.read_at(tmp_path, "seg.t.9", 0, 1) is None  # gone


def test_fsyncs_are_shared_by_concurrent_writers(tmp_path: Path) -> None:
    d = spool.GroupSync(lambda: spool.fsync_dir(tmp_path))
    d.sync()
    d.sync()
    assert d.fsyncs == 2  # one after the other: one each
    barrier = threading.Barrier(16)

    def writer() -> None:
        barrier.wait()
        d.sync()

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every caller returned (covered by an fsync started after it asked) and at most
    # one fsync was in flight at a time; how many ran depends on the scheduling.
    assert 3 <= d.fsyncs <= 18


def test_ids_that_are_not_plain_names_never_become_paths(tmp_path: Path) -> None:
    for bad in ("../queue.db", "a/b", "", "x.tmp", "a" * 65):
        with pytest.raises(ValueError):
            spool.body_path(tmp_path, bad)


async def test_old_blob_bodies_stay_readable_beside_spooled_ones(tmp_path: Path) -> None:
    # A version-1 queue (every later step is a migration) holding a BLOB body.
    (tmp_path / "q").mkdir()
    conn = sqlite3.connect(tmp_path / "q" / "queue.db")
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT INTO messages(id, sender, size, priority, arrival, expires, status)"
        " VALUES ('OLD', 's@x.test', 5, 1, ?, ?, 'Queued')",
        (T0, T0 + 86400),
    )
    conn.execute("INSERT INTO bodies(message_id, data) VALUES ('OLD', x'68656c6c6f')")
    conn.execute(
        "INSERT INTO recipients(message_id, address, domain, status, priority, arrival,"
        " next_attempt) VALUES ('OLD', 'a@x.test', 'x.test', 'Queued', 1, ?, ?)",
        (T0, T0),
    )
    conn.commit()
    conn.close()
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        new = await q.enqueue(env("b@x.test"))
        assert await q.read_messages(["OLD", new]) == {"OLD": b"hello", new: BIG}
        assert files(q) == [segment_of(q, new)]
        assert await q.sweep_spool() == 0  # an inline body has no file to miss
        assert await q.check_bodies() == []
        # Delivering the old message drops its row body as before.
        claimed = await q.claim("w", now=T0 + 1, limit=10, lease=60)
        await q.record(
            "w", [AttemptResult(c.recipient.id, Status.DELIVERED, OK) for c in claimed], now=T0
        )
        assert await q.read_messages(["OLD", new]) == {}
        assert await q.seal_segment(segment_of(q, new)) == 1
        assert files(q) == []
    finally:
        await q.close()


async def test_queue_check_reports_a_missing_body_file(tmp_path: Path) -> None:
    cfg = write_toml(
        tmp_path / "ferry.toml",
        f'[queue]\npath = "{tmp_path}/data"\n',
    )
    q = one_per_body(tmp_path / "data")
    try:
        kept = await q.enqueue(env("a@x.test"))
        lost = await q.enqueue(env("b@x.test"))
        lost_segment = segment_of(q, lost)
    finally:
        await q.close()
    ok = run_cli(cfg, "queue", "check", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    (tmp_path / "data" / "spool" / lost_segment).unlink()
    bad = run_cli(cfg, "queue", "check", "--json")
    assert bad.returncode == 1
    problems = json.loads(bad.stdout)["problems"]
    assert len(problems) == 1 and lost in problems[0] and "missing" in problems[0]
    assert kept not in problems[0]
    human = run_cli(cfg, "queue", "check")
    assert human.returncode == 1 and f"message {lost}" in human.stdout


async def test_statement_journals_stay_in_memory(tmp_path: Path) -> None:
    # Each job of a group commit is a SAVEPOINT whose statement journal was a temporary
    # file: recording an outcome cost about 3x as much (bench/record_cost.py). 2: memory.
    q = SqliteQueue(tmp_path / "q")
    try:
        assert q.run_sync(lambda c: c.execute("PRAGMA temp_store").fetchone()[0]) == 2
    finally:
        await q.close()


async def test_compaction_moves_the_few_live_bodies_out_of_a_finished_segment(
    tmp_path: Path,
) -> None:
    # Room for exactly four bodies: the writer seals the segment after the fourth.
    q = SqliteQueue(tmp_path / "q", spool_threshold=0, segment_bytes=4 * (len(BIG) + 1))
    try:
        ids = [await q.enqueue(env(f"{n}@x.test", data=BIG + n.encode())) for n in "abcd"]
        old = segment_of(q, ids[0])
        assert {segment_of(q, m) for m in ids} == {old}
        await q.settle_spool()
        claimed = {
            c.message.id: c.recipient.id for c in await q.claim("w", now=T0, limit=9, lease=60)
        }
        done = [AttemptResult(claimed[m], Status.DELIVERED, OK) for m in ids[:3]]
        await q.record("w", done, now=T0)
        # Too recent (the default age) or still mostly live: nothing moves.
        assert await q.compact_spool() == 0
        assert await q.compact_spool(min_age=0, max_share=0.2) == 0
        assert await q.compact_spool(min_age=0, grace=3600) == 1
        moved = segment_of(q, ids[3])
        assert moved != old and await q.read_message(ids[3]) == BIG + b"d"
        assert files(q) == sorted([old, moved])  # kept for readers of the old row a while
        assert await q.compact_spool(min_age=0, grace=0) == 0
        assert files(q) == [moved]
        assert await q.check_bodies() == []
    finally:
        await q.close()


async def test_a_read_only_tool_reads_a_queue_serve_has_not_upgraded_yet(tmp_path: Path) -> None:
    # A version 6 queue (bodies of their own files) that an upgraded Ferry's `queue
    # show` or `queue check` opens before `ferry serve` has started on it: read-only
    # tools never migrate, and failed here on the missing `segment` column.
    (tmp_path / "q").mkdir()
    conn = sqlite3.connect(tmp_path / "q" / "queue.db", isolation_level=None)
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '6')")
    for step in MIGRATIONS[:5]:
        step(conn)
    conn.execute(
        "INSERT INTO messages(id, sender, size, priority, arrival, expires, status, spool)"
        " VALUES ('0190A1B2C3D00000001', 's@x.test', ?, 1, ?, ?, 'Queued', 1)",
        (len(BIG), T0, T0 + 86400),
    )
    conn.close()
    (tmp_path / "q" / "spool").mkdir()
    (tmp_path / "q" / "spool" / "0190A1B2C3D00000001").write_bytes(BIG)
    q = SqliteQueue(tmp_path / "q", create=False, readonly=True)
    try:
        assert await q.read_message("0190A1B2C3D00000001") == BIG
        assert await q.check_bodies() == []
    finally:
        await q.close()
