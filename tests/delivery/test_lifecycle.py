"""Issue 11.1 and 11.2 end to end: honest give-up times and expiry reasons, bodies that go
when a message is finished, history purged after the retention."""

from __future__ import annotations

import smtplib
import sqlite3
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from ferry.delivery.dsn import parse_dsn
from ferry.delivery.retry import fill_give_up, policy_for
from ferry.envelope import Status
from ferry.events import Event, GaveUp, subscribe
from tests.delivery.relay_world import World, msg
from tests.harness import cli_json, free_port, run_cli, wait_until, write_toml

DAY = 86400.0


def _dsn_text(data: bytes) -> str:
    return data.decode("ascii", "replace").replace("\r\n    ", " ").replace("\r\n", "\n")


def test_delivered_bodies_go_and_history_is_purged_after_the_retention(world: World) -> None:
    world.mx("mx.ok.test").publish(world.dns, "ok.test")
    svc = world.relay()
    ids = [world.send(svc, [f"r{i}@ok.test"]) for i in range(3)]
    for qid in ids:
        world.wait_status(svc, qid, Status.DELIVERED)
    for qid in ids:
        assert svc.call(svc.queue.read_message(qid)) is None  # the body went with the outcome
        m = world.message(svc, qid)  # the history stays for tracing
        assert m.finished is not None and len(m.recipients[0].history) == 1
    retention = svc.service.retention
    assert retention is not None and retention.retention == 7 * DAY  # the default
    now = time.time()
    retention.clock = lambda: now + 7 * DAY - 60  # just before: nothing goes
    assert svc.call(retention.run_once()).messages == 0
    retention.clock = lambda: now + 7 * DAY + 60  # an injected clock, no waiting
    assert svc.call(retention.run_once()).messages == 3
    assert all(world.message(svc, qid) is None for qid in ids)
    assert svc.call(svc.queue.statistics(now=now)).total_messages == 0


def test_expiry_by_max_retries_is_logged_recorded_and_named_in_the_dsn(world: World) -> None:
    world.mx("mx.busy.test").publish(world.dns, "busy.test").on("rcpt", "451 4.2.1 busy")
    events: list[Event] = []
    unsubscribe = subscribe(events.append)
    try:
        svc = world.relay(max_retries=1, retry_schedule=["1s"])
        qid = world.send(svc, ["x@busy.test"])
        m = world.wait_status(svc, qid, Status.EXPIRED, timeout=20)
    finally:
        unsubscribe()
    [r] = m.recipients
    assert (r.attempts, r.expiry_reason) == (2, "max_retries")
    [expired] = [e for e in events if isinstance(e, GaveUp)]
    assert (expired.queue_id, expired.reason, expired.attempts) == (qid, "max_retries", 2)
    [dsn] = world.dsns(1)
    [fields] = parse_dsn(dsn.data)[1]
    assert fields["status"] == "4.4.7"
    assert "allowed number of delivery attempts" in _dsn_text(dsn.data)


def test_expiry_by_lifetime_says_so(world: World) -> None:
    world.mx("mx.down.test").publish(world.dns, "down.test").on("rcpt", "451 4.4.5 full")
    svc = world.relay(retry_schedule=["1s"], message_lifetime="2s")
    qid = world.send(svc, ["x@down.test"])
    m = world.wait_status(svc, qid, Status.EXPIRED, timeout=20)
    assert m.recipients[0].expiry_reason == "lifetime"
    [dsn] = world.dsns(1)
    assert "time in the queue ran out" in _dsn_text(dsn.data)


def _toml(world: World, tmp_path: Path, port: int, delivery: str) -> Path:
    return write_toml(
        tmp_path / "ferry.toml",
        f"""
[server]
hostname = "relay.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
users_file = "{tmp_path}/users"
[queue]
path = "{tmp_path}/data"
[dns]
nameservers = ["{world.dns.address}"]
timeout = 2
[dkim]
keys_dir = "{tmp_path}/dkim"
[delivery]
mx_port = {world.mx.port}
connect_timeout = 5
command_timeout = 5
{delivery}
""",
    )


def test_delay_dsn_and_queue_show_give_the_same_real_give_up_time(
    world: World, tmp_path: Path
) -> None:
    world.mx("mx.slow.test").publish(world.dns, "slow.test").on("rcpt", "451 4.2.1 later")
    svc = world.relay(max_retries=3, retry_schedule=["1h"], delay_warning_after="0s")
    qid = world.send(svc, ["x@slow.test"])
    [dsn] = world.dsns(1)
    [fields] = parse_dsn(dsn.data)[1]
    assert fields["action"] == "delayed"
    until = parsedate_to_datetime(fields["will-retry-until"]).timestamp()
    m = world.wait_status(svc, qid, Status.DEFERRED)
    fill_give_up(policy_for(svc.config), m)
    [r] = m.recipients
    # Three retries an hour apart (+10 % jitter at most), not the 4-day lifetime.
    assert r.gives_up_reason == "max_retries" and m.gives_up == r.gives_up
    assert abs(until - r.gives_up) <= 1  # the DSN's date has whole seconds
    assert r.next_attempt + 2 * 3600 <= until <= r.next_attempt + 2 * 3600 * 1.1 + 1
    assert until < m.expires - 3 * DAY
    # `ferry queue show` and `queue list` print the same time, from the same function.
    cfg = _toml(world, tmp_path, free_port(), 'max_retries = 3\nretry_schedule = ["1h"]')
    cfg.write_text(cfg.read_text().replace(f"{tmp_path}/data", str(svc.config.queue.path)))
    shown = cli_json(cfg, "queue", "show", qid)
    assert shown["recipients"][0]["gives_up_reason"] == "max_retries"
    assert shown["expires"] == shown["recipients"][0]["gives_up"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.gives_up))
    assert shown["expires"] == stamp
    listing = cli_json(cfg, "queue", "list")["messages"]
    [listed] = [m for m in listing if m["id"] == qid]  # not the DSN
    assert listed["expires"] == stamp


def test_serve_drops_bodies_and_queue_purge_clears_history(
    world: World, tmp_path: Path, serve_factory: Any
) -> None:
    world.mx("mx.ok.test").publish(world.dns, "ok.test")
    port = free_port()
    cfg = _toml(world, tmp_path, port, "workers = 1")
    serve_factory(cfg, port)
    with smtplib.SMTP("127.0.0.1", port) as c:
        for i in range(3):
            c.sendmail("alice@sender.test", [f"r{i}@ok.test"], msg(f"m{i}"))

    def all_delivered() -> list[dict[str, Any]] | None:
        listing: list[dict[str, Any]] = cli_json(cfg, "queue", "list", "--all")["messages"]
        return listing if [m["status"] for m in listing] == ["Delivered"] * 3 else None

    listing = wait_until(all_delivered, 30, "three messages delivered")
    shown = cli_json(cfg, "queue", "show", listing[0]["id"])
    assert shown["finished"] is not None and shown["expires"] is None
    db = sqlite3.connect(f"file:{tmp_path}/data/queue.db?mode=ro", uri=True)
    try:
        assert db.execute("SELECT COUNT(*) FROM bodies").fetchone() == (0,)
    finally:
        db.close()
    assert cli_json(cfg, "queue", "purge") == {"purged": 0, "pages_freed": 0}  # within 7 days
    res = run_cli(cfg, "queue", "purge", "--older-than", "0s")
    assert res.returncode == 0 and res.stdout.startswith("3 finished messages purged"), res
    assert cli_json(cfg, "queue", "list", "--all")["messages"] == []
    assert cli_json(cfg, "queue", "stats")["total_messages"] == 0
    assert run_cli(cfg, "queue", "purge", "--older-than", "soon").returncode != 0
