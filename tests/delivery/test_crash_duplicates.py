"""SIGKILL the delivery worker under load: only the transactions in flight are repeated.

Issue 10.1, Postfix's bar: a crash may send again at most one message per open delivery
connection -- the transaction the remote had answered 250 that was not yet recorded.
A real `ferry serve` (intake in the parent, delivery in its worker process) relays
multi-recipient messages from several client connections to one MX sink of the test
world that counts every copy; the worker is SIGKILLed three times while mail flows.

The second kill comes while another process holds the queue's write lock (as
`ferry queue ...` or a slow fsync does): outcomes cannot be committed then, so a relay
that went on delivering before recording them would send every one of them again. The
worker does go on (its outcomes are in its journal, ferry/queue/journal.py): the parent
must record them from the journal after the kill, or this test fails.
"""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
import threading
import time
from typing import Any

import pytest

from tests.delivery.relay_world import World
from tests.harness import delivery_worker_pid, free_port, wait_until, write_toml

DOMAINS = [f"d{i}.crash.test" for i in range(4)]
KILLS = 3
CLIENTS = 4
MESSAGES = 1500  # at most; about 3,000 recipients
DELIVERIES_BETWEEN_KILLS = 250
QUIET = 0.3  # seconds every connection must stay idle to count as stopped


def _message(i: int, rcpts: list[str]) -> bytes:
    return (
        f"From: s@sender.test\r\nTo: {', '.join(rcpts)}\r\nMessage-ID: <{i}@crash>\r\n"
        f"Subject: crash {i}\r\n\r\nbody {i}\r\n"
    ).encode()


def _message_id(data: bytes) -> str:
    return data.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()


@pytest.mark.slow
def test_sigkilled_worker_repeats_at_most_one_transaction_per_open_connection(
    world: World, serve_factory: Any
) -> None:
    sink = world.mx("mx.sink.crash.test")
    for domain in DOMAINS:
        sink.publish(world.dns, domain)
    port = free_port()
    data = world.tmp_path / "data"
    cfg = write_toml(
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
max_concurrent_deliveries = 4
connections_per_destination = 2
connections_per_minute = 1000
retry_schedule = ["1s"]
command_timeout = 30
[dns]
nameservers = ["{world.dns.address}"]
timeout = 2
""",
    )
    proc = serve_factory(cfg, port)
    assert proc.proc is not None
    parent = proc.proc.pid

    # Clients: messages to 1-3 recipients in different domains (a transaction per
    # domain at the sink); every (Message-ID, recipient) that got 250 must arrive.
    acked: set[tuple[str, str]] = set()
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**9))
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                while not stop.is_set():
                    with lock:
                        i = next(counter)
                    if i >= MESSAGES:
                        return
                    rcpts = [f"u{i}@{DOMAINS[(i + k) % len(DOMAINS)]}" for k in range(1 + i % 3)]
                    c.sendmail("s@sender.test", rcpts, _message(i, rcpts))
                    with lock:
                        acked.update((f"{i}@crash", r) for r in rcpts)
        except BaseException as exc:  # the intake never dies here: a failure is a bug
            errors.append(exc)

    def delivered_count() -> int:
        return len(sink.messages)

    def stopped_or_past(since: int) -> bool:
        """With the write lock held: either every connection has gone quiet (outcomes
        wait for their commit), or the sink got far more transactions than there are
        connections (deliveries went on without being recorded)."""
        open_now, busy = world.mx.at_once(lambda: (sink.open_connections, sink.busy_connections))
        if delivered_count() - since > 4 * open_now + 10:
            return True
        if busy:
            quiet_since[0] = None
            return False
        if quiet_since[0] is None:
            quiet_since[0] = time.monotonic()
        return time.monotonic() - quiet_since[0] >= QUIET

    quiet_since: list[float | None] = [None]
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    open_at_kill: list[int] = []
    try:
        for k in range(KILLS):
            pid = wait_until(lambda: delivery_worker_pid(parent), 20, "a delivery worker")
            target = delivered_count() + DELIVERIES_BETWEEN_KILLS
            wait_until(lambda t=target: delivered_count() >= t, 60, f"deliveries before kill {k}")
            holder = None
            if k == 1:
                holder = sqlite3.connect(data / "queue.db", timeout=30, isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
                since = delivered_count()
                quiet_since[0] = None
                wait_until(lambda s=since: stopped_or_past(s), 30, "delivery to stop or run on")

            def kill(pid: int = pid) -> int:
                # On the world's loop: no server answers anything between the count
                # and the kill, so the count is exactly the connections open then.
                n = sink.open_connections
                os.kill(pid, signal.SIGKILL)
                return n

            open_at_kill.append(world.mx.at_once(kill))
            if holder is not None:
                holder.execute("ROLLBACK")
                holder.close()
            wait_until(
                lambda p=pid: delivery_worker_pid(parent) not in (None, p), 20, "a new worker"
            )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors

    def delivered() -> set[tuple[str, str]]:
        return {(_message_id(m.data), r) for m in sink.messages for r in m.rcpt_tos}

    wait_until(lambda: delivered() >= acked, 90, "every accepted recipient delivered")

    # A duplicate is a transaction at the sink carrying a recipient copy it had already.
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    for m in sink.messages:
        pairs = {(_message_id(m.data), r) for r in m.rcpt_tos}
        duplicates += bool(pairs & seen)
        seen |= pairs
    print(
        f"{len(acked)} recipients, {len(sink.messages)} transactions,"
        f" {duplicates} duplicates, open connections at the kills: {open_at_kill}"
    )
    assert duplicates <= sum(open_at_kill), (duplicates, open_at_kill)
