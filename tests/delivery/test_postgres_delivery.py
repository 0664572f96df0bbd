"""The relay on a PostgreSQL queue, end to end: SMTP in, the test world's MX servers out."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ferry.envelope import Status
from ferry.queue.postgres import PostgresQueue
from tests.delivery.relay_world import SENDER, World, msg
from tests.harness import ThreadedService, cli_json, free_port, run_cli, wait_until, write_toml
from tests.queue.backends import fresh_schema


def test_relay_on_postgres_accepts_delivers_and_bounces(world: World, pg_dsn: str) -> None:
    ok = world.mx("mx.pgok.test").publish(world.dns, "pgok.test")
    bad = world.mx("mx.pgbad.test").publish(world.dns, "pgbad.test")
    bad.on("rcpt", "550 5.1.1 no such user")
    config = world.config()
    config.queue.backend = "postgres"
    config.queue.dsn = type(config.queue.dsn)(fresh_schema(pg_dsn))
    svc = ThreadedService(config).__enter__()
    world.relays.append(svc)
    assert isinstance(svc.queue, PostgresQueue)
    good = world.send(svc, ["a@pgok.test", "b@pgok.test"], msg("pg one"))
    failed = world.send(svc, ["x@pgbad.test"], msg("pg two"))
    assert ok.wait_for_messages(1, 15)
    assert b"Subject: pg one" in ok.messages[0].data
    world.wait_status(svc, good, Status.DELIVERED)
    m = world.wait_status(svc, failed, Status.FAILED)
    assert m.recipients[0].last_reply.code == 550
    [dsn] = world.dsns(1)  # the bounce went through the PostgreSQL queue too
    assert (dsn.mail_from, dsn.rcpt_tos) == ("", (SENDER,))
    # The body is gone once a message is finished; its history stays.
    assert svc.call(svc.queue.read_message(good)) is None
    stats = svc.call(svc.queue.statistics(now=0))
    assert stats.delivered_messages >= 1 and stats.failed_messages == 1


def _serve_config(
    world: World, dsn: str, port: int, name: str, delivery: str = "", tail: str = ""
) -> Path:
    # The password in a file beside the config, the DSN without it (as the README says).
    parts = conninfo_to_dict(dsn)
    password = str(parts.pop("password"))
    (world.tmp_path / f"{name}.pgpass").write_text(password + "\n")
    bare = make_conninfo("", **parts)
    return write_toml(
        world.tmp_path / f"{name}.toml",
        f"""
[server]
hostname = "{name}.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
users_file = "{world.tmp_path}/users"
[queue]
path = "{world.tmp_path / name}"
backend = "postgres"
dsn = "{bare}"
password_file = "{name}.pgpass"
lease_seconds = 3
[delivery]
mx_port = {world.mx.port}
command_timeout = 60
{delivery}
[dns]
nameservers = ["{world.dns.address}"]
{tail}
""",
    )


def _recipient_state(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT status, lease_owner FROM recipients").fetchall()


def test_serve_on_postgres_and_a_killed_node_s_work_taken_over(
    world: World, pg_dsn: str, serve_factory: Any
) -> None:
    """Two `ferry serve` nodes on one database: the first is SIGKILLed mid-delivery; its
    lease runs out and the second node delivers the message."""
    dsn = fresh_schema(pg_dsn)
    mx = world.mx("mx.pgkill.test").publish(world.dns, "pgkill.test")
    mx.on("data", "354 go ahead", delay=30)  # hold the first transaction open
    port1, port2 = free_port(), free_port()
    first = serve_factory(_serve_config(world, dsn, port1, "node1"), port1)
    with smtplib.SMTP("127.0.0.1", port1) as c:
        c.sendmail(SENDER, ["x@pgkill.test"], msg("kill pg"))

    def in_flight() -> bool:
        rows = _recipient_state(dsn)
        return len(rows) == 1 and rows[0][0] == "InProgress" and bool(rows[0][1])

    wait_until(in_flight, 15, "the delivery to be in flight")
    wait_until(lambda: any(c.startswith("DATA") for c in mx.commands), 15, "DATA at the MX")
    first.kill()
    assert mx.messages == []
    mx.reset()
    second = _serve_config(world, dsn, port2, "node2")
    serve_factory(second, port2)
    assert mx.wait_for_messages(1, 30)
    wait_until(lambda: _recipient_state(dsn) == [("Delivered", None)], 15, "Delivered")
    # The queue commands work from any node's configuration.
    [listed] = cli_json(second, "queue", "list", "--all")["messages"]
    assert listed["status"] == "Delivered"
    assert cli_json(second, "queue", "stats")["delivered_messages"] == 1
    # Both nodes announced themselves; the killed one holds nothing any more.
    listed = {n["id"].split(":")[0]: n for n in cli_json(second, "nodes")}
    assert set(listed) == {"node1.ferry.test", "node2.ferry.test"}
    assert listed["node1.ferry.test"]["in_hand"] == 0


def test_cli_never_creates_a_postgres_queue(world: World, pg_dsn: str) -> None:
    empty = fresh_schema(pg_dsn)
    config = _serve_config(world, empty, free_port(), "nobody")
    res = run_cli(config, "queue", "list")
    assert res.returncode == 1
    assert "no queue exists" in res.stderr
    password = str(conninfo_to_dict(empty)["password"])
    assert password not in res.stderr + res.stdout
    with psycopg.connect(empty) as conn:
        assert conn.execute("SELECT to_regclass('meta')").fetchone() == (None,)


def _slots(dsn: str, *nodes: str) -> set[tuple[int, int]]:
    """Connection slots (advisory locks: key, slot) held by these nodes' delivery now."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT l.classid::bigint, l.objid::bigint FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND a.application_name LIKE ANY(%s)",
            ([f"ferry limits {n}.ferry.test:%" for n in nodes],),
        ).fetchall()
    return {(int(k), int(s)) for k, s in rows}


#: Issue 14.5: one cap for all nodes. Delivery runs in the serve process (workers = 0),
#: so the SIGKILL below kills the very process whose database session holds the slots.
CAP = 2
MULTI_DELIVERY = f"""
workers = 0
connections_per_destination = {CAP}
connections_per_minute = 1000
"""


def test_three_nodes_one_killed_mid_delivery_lose_nothing(
    world: World, pg_dsn: str, serve_factory: Any
) -> None:
    """Three `ferry serve` nodes on one database, mail injected into all three, one node
    SIGKILLed while it holds deliveries: every accepted message arrives, and duplicates
    are bounded by the transactions the dead node had in flight. The destination's
    connection cap (2) holds across the nodes all along -- the MX counts the sessions
    open at once -- and the dead node's slots come back to the others."""
    dsn = fresh_schema(pg_dsn)
    mx = world.mx("mx.multi.test").publish(world.dns, "multi.test")
    mx.on("dot", "250 2.0.0 queued", delay=0.2)  # deliveries stay in flight a while
    ports = [free_port() for _ in range(3)]
    nodes = [
        serve_factory(_serve_config(world, dsn, port, f"node{i}", MULTI_DELIVERY), port)
        for i, port in enumerate(ports)
    ]
    accepted: set[bytes] = set()
    for n in range(60):
        port = ports[n % 3]
        mid = f"<multi{n}@sender.test>".encode()
        data = msg(f"multi{n}")
        assert mid in data
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo("client.test")
            c.sendmail(SENDER, [f"u{n}@multi.test"], data)  # raises unless 250
        accepted.add(mid)

    def held_by_node0() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM recipients WHERE status = 'InProgress'"
                " AND lease_owner LIKE 'node0.ferry.test:%'"
            ).fetchone()
        return int(row[0]) if row else 0

    wait_until(
        lambda: held_by_node0() and _slots(dsn, "node0"),
        20,
        "node0 to hold deliveries and a connection slot",
    )
    held = held_by_node0()
    dead_slots = _slots(dsn, "node0")
    nodes[0].kill()
    # The server ends the dead node's session, and its locks with it...
    wait_until(lambda: not _slots(dsn, "node0"), 10, "node0's slots to come free")
    # ...and the others take them.
    wait_until(
        lambda: dead_slots & _slots(dsn, "node1", "node2"),
        30,
        "node1 or node2 to hold a slot node0 held",
    )

    def every_message_arrived() -> bool:
        got = {m.data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0] for m in mx.messages}
        return accepted <= got

    wait_until(every_message_arrived, 60, "every accepted message at the MX")
    wait_until(lambda: _recipient_state(dsn) == [("Delivered", None)] * 60, 30, "all 60 Delivered")
    duplicates = len(mx.messages) - len(accepted)
    print(f"node0 held {held} recipients when killed; {duplicates} arrived twice")
    # Only a transaction in flight on the dead node can arrive twice: at most one per
    # connection it had open, and it could hold no more than the cap.
    assert 0 <= duplicates <= CAP, (duplicates, held)
    # Never more sessions at once than the cap, across the three nodes...
    assert 1 <= mx.peak_connections <= CAP, mx.peak_connections
    # ...and the survivors used the dead node's slots (they delivered the rest).
    assert mx.connections > CAP


def _node_stats(world: World, name: str) -> dict[str, Any]:
    """What ``name``'s scheduler last published for `ferry stats` ({} before it did)."""
    files = list((world.tmp_path / name / "stats").glob("*.json"))
    return json.loads(files[0].read_text()) if files else {}


def test_a_smart_host_breaker_opened_on_one_node_is_open_on_all(
    world: World, pg_dsn: str, serve_factory: Any
) -> None:
    """Issue 14.5: one node finds the smart host down; the others take it out of rotation
    too, without trying it themselves (the host saw one connection, not one per node)."""
    dsn = fresh_schema(pg_dsn)
    relay = world.mx("relay.breaker.test").publish(world.dns)
    relay.on("greeting", "421 4.3.2 down for maintenance")
    smart = f"""
[[smart_hosts]]
name = "relay"
host = "relay.breaker.test"
port = {world.mx.port}
tls = "none"
require_tls = false
"""
    delivery = 'workers = 0\nmode = "relay"\nsmart_host_cooldown = "10m"'
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        serve_factory(_serve_config(world, dsn, port, f"node{i}", delivery, smart), port)
    with smtplib.SMTP("127.0.0.1", ports[0]) as c:
        c.sendmail(SENDER, ["x@anywhere.test"], msg("via the relay"))

    def states() -> list[object]:
        return [
            _node_stats(world, f"node{i}").get("smart_hosts", {}).get("relay", {}).get("state")
            for i in range(3)
        ]

    wait_until(lambda: states() == ["open"] * 3, 20, "the breaker open on every node")
    assert relay.connections == 1  # found down once, by one node
    assert relay.messages == []


def test_smart_mode_decides_once_for_every_node(
    world: World, pg_dsn: str, serve_factory: Any
) -> None:
    """Issue 14.5: smart mode's window and decision are shared. Four deferrals at a
    group's MX (wherever they were seen) send the group through the relay on all three
    nodes, the nodes that never tried it directly included."""
    dsn = fresh_schema(pg_dsn)
    mx = world.mx("mx.smartgroup.test").publish(world.dns, "smartgroup.test")
    mx.on("rcpt", "451 4.7.1 try again later")
    relay = world.mx("relay.smartmode.test").publish(world.dns)
    smart = f"""
[[smart_hosts]]
name = "relay"
host = "relay.smartmode.test"
port = {world.mx.port}
tls = "none"
require_tls = false
"""
    delivery = "\n".join(
        [
            "workers = 0",
            'mode = "smart"',
            "smart_window = 4",
            "smart_min_samples = 4",
            'smart_cooldown = "10m"',
        ]
    )
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        serve_factory(_serve_config(world, dsn, port, f"node{i}", delivery, smart), port)
    for n in range(4):
        with smtplib.SMTP("127.0.0.1", ports[n % 3]) as c:
            c.sendmail(SENDER, [f"u{n}@smartgroup.test"], msg(f"smart{n}"))
    # Deferred directly, each went on through the relay in the same attempt.
    relay.wait_for_messages(4, 30)

    def choices() -> list[object]:
        return [
            _node_stats(world, f"node{i}")
            .get("smart_routing", {})
            .get("smartgroup.test", {})
            .get("choice")
            for i in range(3)
        ]

    wait_until(lambda: choices() == ["relay"] * 3, 20, "the relay chosen on every node")
    direct_tries = sum(1 for c in mx.commands if c.startswith("RCPT"))
    assert direct_tries == 4
    # The next message goes straight to the relay, whichever node takes it.
    with smtplib.SMTP("127.0.0.1", ports[2]) as c:
        c.sendmail(SENDER, ["late@smartgroup.test"], msg("smart late"))
    relay.wait_for_messages(5, 30)
    assert sum(1 for c in mx.commands if c.startswith("RCPT")) == 4


def test_a_smart_host_s_max_connections_holds_across_nodes(
    world: World, pg_dsn: str, serve_factory: Any
) -> None:
    """Issue 14.5: a smart host's ``max_connections = 1`` is one connection from all the
    nodes together, not one per node."""
    dsn = fresh_schema(pg_dsn)
    relay = world.mx("relay.maxconn.test").publish(world.dns)
    relay.on("dot", "250 2.0.0 queued", delay=0.2)  # transactions overlap if allowed
    smart = f"""
[[smart_hosts]]
name = "relay"
host = "relay.maxconn.test"
port = {world.mx.port}
tls = "none"
require_tls = false
max_connections = 1
"""
    delivery = 'workers = 0\nmode = "relay"'
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        serve_factory(_serve_config(world, dsn, port, f"node{i}", delivery, smart), port)
    for n in range(12):
        with smtplib.SMTP("127.0.0.1", ports[n % 3]) as c:
            c.sendmail(SENDER, [f"u{n}@anywhere.test"], msg(f"maxconn{n}"))
    relay.wait_for_messages(12, 60)
    assert relay.peak_connections == 1
    wait_until(lambda: _recipient_state(dsn) == [("Delivered", None)] * 12, 15, "Delivered")


def test_ferry_stats_adds_up_every_node_once(world: World, pg_dsn: str, serve_factory: Any) -> None:
    """`ferry stats` from any node's configuration (here a third, with no `ferry serve`)
    counts the deliveries of both nodes, each once; a node that stops keeps its share."""
    dsn = fresh_schema(pg_dsn)
    mx = world.mx("mx.pgstats.test").publish(world.dns, "pgstats.test")
    ports = [free_port(), free_port()]
    nodes = [
        serve_factory(_serve_config(world, dsn, port, f"stats{i}"), port)
        for i, port in enumerate(ports)
    ]
    for n in range(8):
        with smtplib.SMTP("127.0.0.1", ports[n % 2]) as c:
            c.sendmail(SENDER, [f"u{n}@pgstats.test"], msg(f"stats{n}"))
    assert mx.wait_for_messages(8, 30)
    reader = _serve_config(world, dsn, free_port(), "reader")

    def stats() -> dict[str, Any]:
        data: dict[str, Any] = cli_json(reader, "stats")
        return data

    wait_until(lambda: stats()["delivery"]["sent"] == 8, 30, "8 sent in ferry stats")
    data = stats()
    assert data["direct_sent"] == 8 and data["destinations"]["pgstats.test"]["delivered"] == 8
    running = {k: v for k, v in data["nodes"].items() if v["heartbeat"] is not None}
    assert sorted(k.split(":")[0] for k in running) == ["stats0.ferry.test", "stats1.ferry.test"]
    assert sum(v["sent"] for v in data["nodes"].values()) == 8
    assert data["workers"] == 2
    # A clean stop: the node leaves, its counts stay (under the stopped nodes).
    nodes[0].stop()
    wait_until(lambda: "(stopped nodes)" in stats()["nodes"], 30, "the stopped node folded")
    after = stats()
    assert after["delivery"]["sent"] == 8 and after["workers"] == 1
    assert sum(v["sent"] for v in after["nodes"].values()) == 8
    text = run_cli(reader, "stats")
    assert text.returncode == 0 and "stopped" in text.stdout, text.stdout + text.stderr
