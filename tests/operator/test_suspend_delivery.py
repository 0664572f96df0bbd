"""Suspending destinations and holding delivery, through the queue, seen by a live relay."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ferry.envelope import Status
from ferry.queue.sqlite import SqliteQueue
from tests.delivery.relay_world import World, msg
from tests.harness import ThreadedService, run_cli, wait_until, write_toml


def _cli_config(world: World) -> Path:
    """A config file naming the relay's data directory, for the `ferry` CLI, and the
    queue there (as `ferry serve` makes it: the CLI never creates one)."""
    asyncio.run(SqliteQueue(world.tmp_path / "data").close())
    return write_toml(world.tmp_path / "cli.toml", f'[queue]\npath = "{world.tmp_path / "data"}"\n')


def _status(world: World, svc: ThreadedService, qid: str) -> Status:
    return world.message(svc, qid).recipients[0].status  # type: ignore[no-any-return]


def test_suspended_domain_waits_while_others_flow_then_resumes(world: World) -> None:
    mx_a = world.mx("mx.a.test").publish(world.dns, "a.test")
    mx_b = world.mx("mx.b.test").publish(world.dns, "b.test")
    cfg = _cli_config(world)
    res = run_cli(cfg, "queue", "suspend", "a.test", "--for", "2h", "--reason", "asked to slow")
    assert res.returncode == 0, res.stderr
    assert "suspended a.test until" in res.stdout
    svc = world.relay()
    qa = world.send(svc, ["bob@a.test"], msg("to a"))
    qb = world.send(svc, ["bob@b.test"], msg("to b"))
    world.wait_status(svc, qb, Status.DELIVERED)
    assert mx_b.messages
    # b went out after a was queued: the scheduler had a's work and left it alone.
    assert mx_a.messages == [] and _status(world, svc, qa) is Status.QUEUED
    listed = run_cli(cfg, "queue", "suspended")
    assert listed.stdout.startswith("a.test ") and "asked to slow" in listed.stdout
    assert run_cli(cfg, "queue", "resume", "a.test").returncode == 0
    world.wait_status(svc, qa, Status.DELIVERED)
    assert mx_a.wait_for_messages(1, 5)
    assert run_cli(cfg, "queue", "resume", "a.test").returncode == 1  # nothing to resume


def test_delivery_hold_is_the_all_destinations_suspension(world: World) -> None:
    mx_a = world.mx("mx.a.test").publish(world.dns, "a.test")
    cfg = _cli_config(world)
    svc = world.relay(hold=True)
    scheduler = svc.service.scheduler
    assert scheduler is not None  # delivery runs; it claims nothing while held
    qid = world.send(svc, ["bob@a.test"])
    wait_until(lambda: "*" in scheduler.suspended, 10, "the hold to be read")
    shown = run_cli(cfg, "queue", "suspended").stdout
    assert shown.startswith("* (every destination)") and "delivery.hold" in shown
    assert "HELD" in run_cli(cfg, "queue", "list").stdout.splitlines()[0]
    assert _status(world, svc, qid) is Status.QUEUED and mx_a.messages == []
    # Lifted without a restart.
    assert run_cli(cfg, "queue", "resume", "*").returncode == 0
    world.wait_status(svc, qid, Status.DELIVERED)
    world.stop(svc)
    # A restart with hold = false lifts a hold the configuration had set.
    svc = world.relay(hold=True)
    world.stop(svc)
    svc = world.relay()
    assert "(no destination is suspended)" in run_cli(cfg, "queue", "suspended").stdout


def test_held_message_is_not_delivered_until_released(world: World) -> None:
    mx_a = world.mx("mx.a.test").publish(world.dns, "a.test")
    cfg = _cli_config(world)
    svc = world.relay(hold=True)
    qid = world.send(svc, ["bob@a.test"])
    res = run_cli(cfg, "queue", "hold", qid)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "hold: 1 messages, 1 recipients"
    assert run_cli(cfg, "queue", "resume", "*").returncode == 0
    mx_b = world.mx("mx.b.test").publish(world.dns, "b.test")
    qb = world.send(svc, ["bob@b.test"], msg("b"))
    world.wait_status(svc, qb, Status.DELIVERED)
    assert mx_b.messages and mx_a.messages == []
    assert _status(world, svc, qid) is Status.HELD
    assert run_cli(cfg, "queue", "release", qid).returncode == 0
    world.wait_status(svc, qid, Status.DELIVERED)


def test_show_lists_every_host_tried(world: World) -> None:
    world.mx.refusing("mx1.b.test").publish(world.dns, "b.test", preference=10)
    mx2 = world.mx("mx2.b.test").publish(world.dns, "b.test", preference=20)
    cfg = _cli_config(world)
    svc = world.relay()
    qid = world.send(svc, ["bob@b.test"])
    assert mx2.wait_for_messages(1, 15)
    m = world.wait_status(svc, qid, Status.DELIVERED)
    [attempt] = m.recipients[0].history
    assert attempt.next_hop.startswith("mx2.b.test[")
    [tried] = attempt.tried
    assert tried.startswith("mx1.b.test[") and " 4" in tried  # the refusal's 4xx reply
    shown = run_cli(cfg, "queue", "show", qid).stdout
    assert "attempt 1" in shown and "tried first: mx1.b.test[" in shown
