"""Message bodies as spool files beside the SQLite queue (ferry/queue/spool.py, issue 12)."""

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


async def test_large_bodies_are_files_small_ones_rows(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")  # the default threshold
    try:
        small = await q.enqueue(env("a@x.test", data=b"Subject: s\r\n\r\nsmall\r\n"))
        big = await q.enqueue(env("b@x.test"))
        assert files(q) == [big]
        assert (q.spool / big).read_bytes() == BIG
        assert await q.read_messages([small, big, "NOSUCH"]) == {
            small: b"Subject: s\r\n\r\nsmall\r\n",
            big: BIG,
        }
        assert await q.read_message(big) == BIG
    finally:
        await q.close()


async def test_a_body_file_without_its_row_is_no_message(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        # What a crash between the body's write and its row's commit leaves behind.
        spool.write_file(q.spool, "0190A1B2C3D00000001", BIG)
        (q.spool / "0190A1B2C3D00000002.tmp").write_bytes(b"half")
        assert await q.read_message("0190A1B2C3D00000001") is None
        assert await q.list() == []
        kept = await q.enqueue(env("a@x.test"))
        assert await q.sweep_spool() == 2
        assert files(q) == [kept]  # the live body stays
        assert await q.read_message(kept) == BIG
    finally:
        await q.close()


async def test_body_file_goes_after_the_commit_that_finishes_its_message(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        qid = await q.enqueue(env("a@x.test", "b@x.test"))
        claimed = await q.claim("w", now=T0, limit=10, lease=60)
        a, b = (c.recipient.id for c in claimed)
        await q.record("w", [AttemptResult(a, Status.DELIVERED, OK)], now=T0)
        assert files(q) == [qid]  # b is still pending: the body is needed
        await q.record("w", [AttemptResult(b, Status.DELIVERED, OK)], now=T0)
        assert files(q) == []
        assert await q.read_message(qid) is None
        # Nothing left to sweep: the history stays, the body is gone.
        assert await q.sweep_spool() == 0
        info = await q.get(qid)
        assert info is not None and info.finished == T0
    finally:
        await q.close()


@pytest.mark.parametrize("relaxed", [False, True], ids=["worker-queue", "relaxed-view"])
async def test_without_fsynced_commits_files_go_in_batches_after_a_wal_fsync(
    tmp_path: Path, relaxed: bool
) -> None:
    # A delivery worker's queue (synchronous=NORMAL), or serve's relaxed() view that
    # writes a worker's outcomes: a power loss could undo the commit that finished a
    # message but not the unlink of its body; so unlinks wait for an fsync of the WAL,
    # done at most every unlink_interval (and at close). The relaxed view failed before:
    # it unlinked at once, after a commit that was not fsynced.
    base = SqliteQueue(tmp_path / "q", spool_threshold=0, durable=relaxed)
    base.unlink_interval = 3600
    q = base.relaxed() if relaxed else base
    try:
        first, second = await q.enqueue(env("a@x.test")), await q.enqueue(env("b@x.test"))
        claimed = {
            c.message.id: c.recipient.id for c in await q.claim("w", now=T0, limit=9, lease=60)
        }
        await q.record("w", [AttemptResult(claimed[first], Status.DELIVERED, OK)], now=T0)
        assert files(q) == [second]  # the first batch goes at once
        await q.record("w", [AttemptResult(claimed[second], Status.DELIVERED, OK)], now=T0)
        assert files(q) == [second]  # the next waits for the interval
        assert await q.read_message(second) is None  # finished: no longer readable
    finally:
        await base.close()
    assert spool.names(tmp_path / "q" / "spool") == []  # close flushes


async def test_remove_cancel_and_bulk_remove_delete_body_files(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        one, two, three = [await q.enqueue(env(f"{n}@x.test")) for n in "abc"]
        assert await q.remove(one)
        assert await q.cancel(two, now=T0) == 1
        assert files(q) == [three]
        result = await q.bulk("remove", Selection(), now=T0, by="test")
        assert result.messages >= 1
        assert files(q) == []
    finally:
        await q.close()


async def test_cancel_with_dsn_reads_the_spooled_body(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    seen: list[bytes] = []

    def make_dsn(message: Any, data: bytes) -> EnvelopeIn:
        seen.append(data)
        return EnvelopeIn("", [RecipientIn("s@example.org")], b"Subject: dsn\r\n\r\nx\r\n")

    try:
        qid = await q.enqueue(env("a@x.test"))
        result = await q.bulk("cancel", Selection(), now=T0, by="test", make_dsn=make_dsn)
        assert result.dsns == 1 and seen == [BIG]
        # The cancelled message's file went after the commit; the DSN is a row (it was
        # queued inside the transaction, not through enqueue).
        assert files(q) == []
        assert await q.read_message(qid) is None
    finally:
        await q.close()


async def test_a_refused_enqueue_leaves_no_file(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q", spool_threshold=0)
    try:
        key = IdempotencyRecord("token:t:k", "fp", "", "250 ok", expires=T0 * 2)
        first = await q.enqueue(env("a@x.test"), idempotency=key)
        with pytest.raises(IdempotencyReplay):
            await q.enqueue(env("a@x.test"), idempotency=key)
        assert files(q) == [first]
    finally:
        await q.close()


def test_directory_fsyncs_are_shared_by_concurrent_writers(tmp_path: Path) -> None:
    d = spool.DirSync(tmp_path)
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
        assert files(q) == [new]
        assert await q.sweep_spool() == 0  # an inline body has no file to miss
        assert await q.check_bodies() == []
        # Delivering the old message drops its row body as before.
        claimed = await q.claim("w", now=T0 + 1, limit=10, lease=60)
        await q.record(
            "w", [AttemptResult(c.recipient.id, Status.DELIVERED, OK) for c in claimed], now=T0
        )
        assert await q.read_messages(["OLD", new]) == {}
        assert files(q) == []
    finally:
        await q.close()


async def test_queue_check_reports_a_missing_body_file(tmp_path: Path) -> None:
    cfg = write_toml(
        tmp_path / "ferry.toml",
        f'[queue]\npath = "{tmp_path}/data"\n',
    )
    q = SqliteQueue(tmp_path / "data", spool_threshold=0)
    try:
        kept = await q.enqueue(env("a@x.test"))
        lost = await q.enqueue(env("b@x.test"))
    finally:
        await q.close()
    ok = run_cli(cfg, "queue", "check", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    (tmp_path / "data" / "spool" / lost).unlink()
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
