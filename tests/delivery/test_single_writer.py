"""One writer per SQLite database (issue 12): the delivery worker process never opens
queue.db for writing; the `ferry serve` process writes for it, and an outcome it
acknowledges is committed, or in the worker's outcome journal, before the connection's
next transaction (issue 10.1)."""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
from pathlib import Path
from typing import Any

from ferry.envelope import Status
from ferry.queue.journal import pending
from tests.delivery.relay_world import SENDER, World, msg
from tests.harness import (
    delivery_worker_pid,
    free_port,
    process_running,
    wait_until,
    write_toml,
)


def _open_files(pid: int) -> list[tuple[str, int]]:
    """(path, open flags) of every file descriptor of process ``pid``."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        flags = next(int(ln.split()[1], 8) for ln in info.splitlines() if ln.startswith("flags:"))
        out.append((target, flags))
    return out


def test_the_worker_opens_the_database_read_only_and_the_parent_writes(world: World) -> None:
    mx1 = world.mx("mx1.one.test").publish(world.dns, "one.test")
    svc = world.relay(workers=1)
    [worker] = svc.service.workers
    commits = svc.queue.commits
    ids = [world.send(svc, [f"u{i}@one.test"], msg(f"w{i}")) for i in range(5)]
    assert mx1.wait_for_messages(5, 15)
    for qid in ids:
        world.wait_status(svc, qid, Status.DELIVERED)
    # Every claim and outcome was the parent's write ...
    assert worker.server is not None and worker.server.requests >= 2  # a claim, an outcome
    assert svc.queue.commits > commits + 5
    # ... and the worker cannot write at all: a SQLite connection whose database file
    # is open read-only is read-only (SQLITE_READONLY), so it never takes the write lock.
    db = str(Path(svc.config.queue.path).resolve() / "queue.db")
    files = [(path, flags) for path, flags in _open_files(worker.proc.pid) if path == db]
    assert files, "the worker reads the queue"
    assert all(flags & os.O_ACCMODE == os.O_RDONLY for _p, flags in files), files


def _config(world: World, data: Path, port: int) -> Path:
    return write_toml(
        world.tmp_path / "ferry.toml",
        f"""
[server]
hostname = "relay.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
users_file = "{world.tmp_path}/users"
[queue]
path = "{data}"
[delivery]
workers = 1
mx_port = {world.mx.port}
connections_per_destination = 1
max_concurrent_deliveries = 1
command_timeout = 120
[dns]
nameservers = ["{world.dns.address}"]
""",
    )


def _a_delivered_then_b_in_flight(world: World, serve_factory: Any) -> tuple[Any, int, Path]:
    """`ferry serve` whose worker delivered message A and is in B's transaction on the
    same destination (one connection): so A's outcome was acknowledged (issue 10.1)."""
    mx1 = world.mx("mx.ack.test").publish(world.dns, "ack.test")
    port = free_port()
    data = world.tmp_path / "data"
    proc = serve_factory(_config(world, data, port), port)
    parent = proc.proc.pid
    worker = wait_until(lambda: delivery_worker_pid(parent), 20, "a delivery worker")
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail(SENDER, ["a@ack.test"], msg("A"))
    assert mx1.wait_for_messages(1, 20)
    mx1.on("mail", "250 ok", delay=120)  # B's transaction hangs at MAIL
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail(SENDER, ["b@ack.test"], msg("B"))
    wait_until(lambda: sum(c.startswith("MAIL") for c in mx1.commands) == 2, 20, "B's MAIL")
    return proc, worker, data


def test_an_acknowledged_outcome_survives_killing_both_processes(
    world: World, serve_factory: Any
) -> None:
    proc, worker, data = _a_delivered_then_b_in_flight(world, serve_factory)
    os.kill(worker, signal.SIGKILL)
    proc.kill()
    db = sqlite3.connect(f"file:{data / 'queue.db'}?mode=ro", uri=True)
    try:
        rows = {a: (i, s) for i, a, s in db.execute("SELECT id, address, status FROM recipients")}
    finally:
        db.close()
    assert rows["b@ack.test"][1] == "InProgress"
    # A's outcome is committed, or still in the worker's outcome journal, which the next
    # start records (ferry/queue/journal.py; tests/delivery/test_outcome_journal.py).
    a_id, a_status = rows["a@ack.test"]
    journaled = {
        r.recipient_id
        for _paths, entries in pending(data / "journal")
        for e in entries
        for r in e.results
        if r.status is Status.DELIVERED
    }
    assert a_status == "Delivered" or (a_status == "InProgress" and a_id in journaled), (
        rows,
        journaled,
    )


def test_the_worker_stops_when_the_serve_process_is_sigkilled(
    world: World, serve_factory: Any
) -> None:
    proc, worker, _data = _a_delivered_then_b_in_flight(world, serve_factory)
    try:
        proc.kill()  # SIGKILL: no goodbye; the worker sees its socket's end-of-file
        wait_until(lambda: not process_running(worker), 20, "the orphaned worker to exit")
    finally:
        if process_running(worker):
            os.kill(worker, signal.SIGKILL)
