"""The delivery worker's outcome journal (ferry/queue/journal.py, issue 12) in a real
`ferry serve`: a session goes on once its outcomes are in the journal, and what the
queue could not commit before a crash is recorded from the journal at the next start --
never delivered again."""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
from typing import Any

from ferry.queue.journal import pending
from tests.delivery.relay_world import SENDER, World, msg
from tests.delivery.test_single_writer import _config
from tests.harness import delivery_worker_pid, free_port, process_running, wait_until


def _status(db_path: Any, address: str) -> str | None:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT status FROM recipients WHERE address=?", (address,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def test_an_outcome_the_queue_could_not_commit_is_recorded_from_the_journal_at_restart(
    world: World, serve_factory: Any
) -> None:
    mx1 = world.mx("mx.journal.test").publish(world.dns, "journal.test")
    port = free_port()
    data = world.tmp_path / "data"
    cfg = _config(world, data, port)
    proc = serve_factory(cfg, port)
    worker = wait_until(lambda: delivery_worker_pid(proc.proc.pid), 20, "a delivery worker")
    mx1.on("mail", delay=1.0)  # A's transaction lasts at least a second
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail(SENDER, ["a@journal.test"], msg("A"))
    wait_until(lambda: any(c.startswith("MAIL") for c in mx1.commands), 20, "A's MAIL")
    # Another process holds the write lock: nothing can be committed from now on.
    holder = sqlite3.connect(data / "queue.db", timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert mx1.wait_for_messages(1, 20)  # delivered while the queue is locked
        wait_until(
            lambda: any(entries for _paths, entries in pending(data / "journal")),
            20,
            "A's outcome in the worker's journal",
        )
        os.kill(worker, signal.SIGKILL)  # both processes die, nothing committed
        proc.kill()
        wait_until(lambda: not process_running(worker), 20, "the worker gone")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _status(data / "queue.db", "a@journal.test") == "InProgress"

    mx1.reset()
    serve_factory(cfg, port)  # the next start records A from the journal ...
    wait_until(
        lambda: _status(data / "queue.db", "a@journal.test") == "Delivered", 20, "A recorded"
    )
    # ... instead of handing its lease back and delivering it a second time.
    assert len(mx1.messages) == 1
    assert not list((data / "journal").glob("*.journal")) or not any(
        entries for _paths, entries in pending(data / "journal")
    )
