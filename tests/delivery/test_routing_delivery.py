"""Smart hosts, failover, weights and the relay / hybrid / smart modes, end to end."""

from __future__ import annotations

import smtplib
from typing import Any

from ferry.delivery.dsn import parse_dsn
from ferry.envelope import Status
from ferry.events import Event, SmartHostFailed, subscribe
from tests.delivery.relay_world import SENDER, World, msg
from tests.harness import wait_until


def send_many(world: World, svc: Any, n: int, domain: str, prefix: str = "m") -> list[str]:
    """Send n messages over one SMTP session; returns their queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", svc.port()) as c:
        for i in range(n):
            c.sendmail(SENDER, [f"u{i}@{domain}"], msg(f"{prefix}{i}"))
            ids.append(c.noop() and "")  # keep the session alive between messages
    return ids


def test_relay_mode_through_a_smart_host_with_auth(world: World, tmp_path: Any) -> None:
    relay = world.mx("smtp.relay.test", starttls=True, auth={"apikey": "SG.secret"})
    secret = tmp_path / "sendgrid.secret"
    secret.write_text("SG.secret\n")
    svc = world.relay(
        mode="relay",
        smart_hosts=[
            world.smart_host(relay, "sendgrid", username="apikey", password_file=str(secret)),
        ],
    )
    qid = world.send(svc, ["bob@anywhere.test"])
    assert relay.wait_for_messages(1, 15)
    got = relay.messages[0]
    assert got.auth_user == "apikey" and got.tls
    m = world.wait_status(svc, qid, Status.DELIVERED)
    assert m.recipients[0].route == "smarthost:sendgrid"
    stats = svc.service.scheduler.stats()
    assert stats["relay_sent"] == 1 and stats["direct_sent"] == 0
    assert stats["smart_hosts"]["sendgrid"]["sent"] == 1


def test_weights_50_30_20(world: World) -> None:
    servers = [world.mx(f"smtp{i}.lb.test") for i in range(3)]
    svc = world.relay(
        mode="relay",
        smart_hosts=[
            world.smart_host(s, f"lb{i}", weight=w, priority=10)
            for i, (s, w) in enumerate(zip(servers, (50, 30, 20), strict=True))
        ],
    )
    n = 1000
    with smtplib.SMTP("127.0.0.1", svc.port()) as c:
        for i in range(n):
            c.sendmail(SENDER, [f"u{i}@lb-dest.test"], msg(f"lb{i}"))
    wait_until(lambda: sum(len(s.messages) for s in servers) == n, 60, "all delivered")
    counts = [len(s.messages) for s in servers]
    for got, share in zip(counts, (0.5, 0.3, 0.2), strict=True):
        assert abs(got - share * n) <= 0.05 * n, counts


def test_failover_to_backup_tier_and_back(world: World) -> None:
    primary = world.mx("primary.relay.test")
    backup = world.mx("backup.relay.test")
    svc = world.relay(
        mode="relay",
        smart_host_cooldown="1s",
        smart_hosts=[
            world.smart_host(primary, "primary", priority=10),
            world.smart_host(backup, "backup", priority=20),
        ],
    )
    world.send(svc, ["a@x.test"], msg("first"))
    assert primary.wait_for_messages(1, 15)
    primary.on("mail", "421 4.3.2 shutting down")  # the primary goes away
    world.send(svc, ["b@x.test"], msg("second"))
    assert backup.wait_for_messages(1, 15)
    assert svc.service.scheduler.stats()["smart_hosts"]["primary"]["state"] == "open"
    primary.reset()  # it comes back; after the cool-down traffic returns
    sched = svc.service.scheduler
    reopens = sched.stats()["smart_hosts"]["primary"]["open_until"]
    wait_until(lambda: sched.clock() >= reopens, 10, "the primary's cool-down")
    world.send(svc, ["c@x.test"], msg("third"))
    assert primary.wait_for_messages(2, 15)
    assert len(backup.messages) == 1


def test_wrong_password_moves_on_and_never_logs_it(world: World, tmp_path: Any) -> None:
    first = world.mx("first.auth.test", starttls=True, auth={"user": "right"})
    second = world.mx("second.auth.test", starttls=True, auth={"user": "right"})
    events: list[Event] = []
    unsubscribe = subscribe(events.append)
    try:
        svc = world.relay(
            mode="relay",
            smart_hosts=[
                world.smart_host(
                    first, "first", priority=10, username="user", password="wrong-Pa55"
                ),
                world.smart_host(second, "second", priority=20, username="user", password="right"),
            ],
        )
        world.send(svc, ["a@x.test"])
        assert second.wait_for_messages(1, 15)
    finally:
        unsubscribe()
    failures = [e for e in events if isinstance(e, SmartHostFailed)]
    assert failures and failures[0].host == "first"
    assert failures[0].reply.code == 535
    assert "wrong-Pa55" not in repr(events)
    assert "wrong-Pa55" not in repr([e.log_fields() for e in events])
    assert first.messages == []


def test_require_tls_never_sends_in_clear(world: World) -> None:
    plain = world.mx("plain.relay.test")  # offers no STARTTLS
    svc = world.relay(
        mode="relay",
        retry_schedule=["1h"],
        smart_hosts=[
            world.smart_host(plain, "strict", tls="starttls", require_tls=True),
        ],
    )
    qid = world.send(svc, ["a@x.test"])
    m = world.wait_status(svc, qid, Status.DEFERRED)
    assert "4.7" in (m.recipients[0].last_reply.enhanced or "")
    assert plain.messages == []
    assert not any(c.upper().startswith("MAIL") for c in plain.commands)


def test_hybrid_temporary_failure_goes_on_through_the_relay(world: World) -> None:
    mx = world.mx("mx.hyb.test").publish(world.dns, "hyb.test")
    mx.on("rcpt", "451 4.7.1 greylisted, try later")
    relay = world.mx("smtp.hyb-relay.test")
    svc = world.relay(mode="hybrid", smart_hosts=[world.smart_host(relay, "fallback")])
    qid = world.send(svc, ["a@hyb.test"])
    assert relay.wait_for_messages(1, 15)
    m = world.wait_status(svc, qid, Status.DELIVERED)
    assert m.recipients[0].route == "smarthost:fallback"
    assert m.recipients[0].attempts == 1  # the same attempt
    assert any(c.upper().startswith("RCPT") for c in mx.commands)


def test_hybrid_user_unknown_bounces_and_is_not_relayed(world: World) -> None:
    world.mx("mx.hyb2.test").publish(world.dns, "hyb2.test").on("rcpt", "550 5.1.1 no such user")
    relay = world.mx("smtp.hyb2-relay.test")
    svc = world.relay(mode="hybrid", smart_hosts=[world.smart_host(relay, "fallback")])
    qid = world.send(svc, ["ghost@hyb2.test"])
    world.wait_status(svc, qid, Status.FAILED)
    [dsn] = world.dsns(1)
    assert parse_dsn(dsn.data)[1][0]["status"] == "5.1.1"
    assert relay.messages == []


def test_hybrid_blocklisted_reply_goes_to_the_relay(world: World) -> None:
    world.mx("mx.hyb3.test").publish(world.dns, "hyb3.test").on(
        "rcpt", "554 5.7.1 Service unavailable; client host blocked using Spamhaus"
    )
    relay = world.mx("smtp.hyb3-relay.test")
    svc = world.relay(mode="hybrid", smart_hosts=[world.smart_host(relay, "fallback")])
    qid = world.send(svc, ["a@hyb3.test"])
    assert relay.wait_for_messages(1, 15)
    world.wait_status(svc, qid, Status.DELIVERED)


def test_smart_mode_switches_a_destination_to_the_relay_and_back(world: World) -> None:
    bad = world.mx("mx.smarta.test").publish(world.dns, "smarta.test")
    bad.on("rcpt", "451 4.7.0 rate limited")
    good = world.mx("mx.smartb.test").publish(world.dns, "smartb.test")
    relay = world.mx("smtp.smart-relay.test")
    svc = world.relay(
        mode="smart",
        smart_window=4,
        smart_min_samples=2,
        smart_threshold=0.5,
        smart_cooldown="1s",
        smart_hosts=[world.smart_host(relay, "relay")],
    )
    sched = svc.service.scheduler
    for i in range(2):  # two deferrals direct: each goes on through the relay
        world.send(svc, [f"u{i}@smarta.test"], msg(f"a{i}"))
        assert relay.wait_for_messages(i + 1, 15)
    routing = sched.stats()["smart_routing"]
    assert routing["smarta.test"]["choice"] == "relay"
    rcpts_before = sum(c.upper().startswith("RCPT") for c in bad.commands)
    world.send(svc, ["u9@smarta.test"], msg("a9"))
    assert relay.wait_for_messages(3, 15)
    assert sum(c.upper().startswith("RCPT") for c in bad.commands) == rcpts_before  # skipped
    world.send(svc, ["x@smartb.test"], msg("b"))  # another destination stays direct
    assert good.wait_for_messages(1, 15)
    bad.reset()  # recovers; after the cool-down direct is probed and wins back
    relay_until = sched.stats()["smart_routing"]["smarta.test"]["relay_until"]
    wait_until(lambda: sched.clock() >= relay_until, 10, "cool-down over")
    world.send(svc, ["u10@smarta.test"], msg("a10"))
    assert bad.wait_for_messages(1, 15)


def test_domain_route_to_its_own_smart_host(world: World) -> None:
    gmail_relay = world.mx("smtp.gmail-relay.test")
    other = world.mx("mx.other.test").publish(world.dns, "other.test")
    svc = world.relay(
        smart_hosts=[world.smart_host(gmail_relay, "gmail-relay")],
        routes={"gmail.test": "gmail-relay"},
    )
    world.send(svc, ["a@gmail.test"], msg("g"))
    world.send(svc, ["b@other.test"], msg("o"))
    assert gmail_relay.wait_for_messages(1, 15)
    assert other.wait_for_messages(1, 15)
    assert list(gmail_relay.messages[0].rcpt_tos) == ["a@gmail.test"]


def test_mx_route_to_a_fixed_host(world: World) -> None:
    internal = world.mx("mail.internal.test")
    world.dns.add_a("mail.internal.test", internal.host)
    svc = world.relay(routes={"*.internal.test": f"mx:mail.internal.test:{internal.port}"})
    qid = world.send(svc, ["a@dept.internal.test"])
    assert internal.wait_for_messages(1, 15)
    assert world.wait_status(svc, qid, Status.DELIVERED).recipients[0].route.startswith("host:")


def test_mx_lookup_failure_falls_back_to_the_default_smart_host(world: World) -> None:
    world.dns.servfail("unresolvable.test")
    relay = world.mx("smtp.fallback.test")
    svc = world.relay(smart_hosts=[world.smart_host(relay, "fallback")])  # direct mode
    world.send(svc, ["a@unresolvable.test"])
    assert relay.wait_for_messages(1, 15)


def test_too_many_reply_backs_the_destination_off(world: World) -> None:
    mx = world.mx("mx.busy.test").publish(world.dns, "busy.test")
    mx.on("rcpt", "452 4.5.3 Too many recipients, slow down", times=1)
    svc = world.relay(retry_schedule=["1h"])
    qid = world.send(svc, ["a@busy.test"])
    world.wait_status(svc, qid, Status.DEFERRED)
    dest = svc.service.scheduler.stats()["destinations"]["busy.test"]
    assert dest["backoffs"] == 1
    assert dest["paused_for"] > 0


def test_shaping_by_mx_group_is_shared_by_its_domains(world: World) -> None:
    a = world.mx("mx1.bigmail.test").publish(world.dns, "a-hosted.test")
    b = world.mx("mx2.bigmail.test").publish(world.dns, "b-hosted.test")
    elsewhere = world.mx("mx.elsewhere.test").publish(world.dns, "elsewhere.test")
    svc = world.relay(
        messages_per_connection=1, shaping={"bigmail.test": {"connections_per_minute": 1}}
    )
    world.send(svc, ["x@a-hosted.test"], msg("a"))
    world.send(svc, ["y@b-hosted.test"], msg("b"))
    world.send(svc, ["z@elsewhere.test"], msg("e"))
    assert elsewhere.wait_for_messages(1, 15)
    wait_until(lambda: len(a.messages) + len(b.messages) >= 1, 15, "one bigmail delivery")
    # both domains are hosted by bigmail.test: one new connection a minute between them
    assert len(a.messages) + len(b.messages) == 1


def test_hybrid_recipient_delivered_at_the_mx_is_recorded_before_the_relay_hop(
    world: World,
) -> None:
    """Issue 10.1: a recipient the MX accepted is recorded with the reply that delivered
    it, before the same message's next transaction (the relay hop for the recipient the
    MX deferred) begins. Before, both waited for the end of the relay's transaction: a
    crash during it sent the first recipient's copy again."""
    mx = world.mx("mx.hyb4.test").publish(world.dns, "hyb4.test")
    mx.on("rcpt", "451 4.7.1 greylisted, try later", rcpt="later@hyb4.test")
    relay = world.mx("smtp.hyb4-relay.test")
    relay.on("data", "354 go ahead", delay=30)  # the relay's transaction hangs
    svc = world.relay(
        mode="hybrid", smart_hosts=[world.smart_host(relay, "fallback")], command_timeout=60
    )
    qid = world.send(svc, ["now@hyb4.test", "later@hyb4.test"])
    wait_until(lambda: any(c.startswith("DATA") for c in relay.commands), 15, "DATA at relay")
    assert mx.wait_for_messages(1, 15)

    def first_recorded() -> bool:
        m = world.message(svc, qid)
        return [r.status for r in m.recipients] == [Status.DELIVERED, Status.IN_PROGRESS]

    wait_until(first_recorded, 10, "the MX's delivery recorded while the relay hop runs")
    assert relay.messages == []
