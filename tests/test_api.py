"""The Python API (ferry.Relay, the seed's functions) against the test world.

Every relay here delivers to the test world's DNS and MX servers on 127.0.0.x; tests
wait on state (a message arrived, a hook ran), never on time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import ferry
import ferry.api.seed as seed
import ferry.events
from ferry import (
    AcceptedMessage,
    AlreadyRunning,
    DeliveryResult,
    EmailPriority,
    IncomingMessage,
    Priority,
    Relay,
    RelayConfig,
    Status,
)
from ferry.envelope import Reply
from tests.delivery.relay_world import World
from tests.test_dkim import txt_lookup
from tests.world.wait import async_wait_until


@pytest.fixture(name="world")
def world_fixture(
    tmp_path: Path, dns_server: Any, mx_factory: Any, world_ca: Any
) -> Iterator[World]:
    """The test world (DNS, MX servers, CA) of tests/delivery, for these tests."""
    w = World(tmp_path, dns_server, mx_factory, world_ca)
    yield w
    for svc in list(w.relays):
        w.stop(svc)


def email_message(
    to: str | list[str], sender: str = "alice@sender.test", **headers: str
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to if isinstance(to, str) else ", ".join(to)
    for name, value in headers.items():
        m[name.replace("_", "-")] = value
    m["Subject"] = headers.get("Subject", "Hello")
    m.set_content("Hello from the Ferry API.\n")
    return m


# -- import and public surface ----------------------------------------------------------


def test_import_ferry_has_no_side_effects(tmp_path: Path) -> None:
    probe = """
import json, os, sys, threading
before = sorted(os.listdir("/proc/self/fd"))
import ferry
after = sorted(os.listdir("/proc/self/fd"))
loaded = sorted(m for m in sys.modules if m.startswith("ferry"))
state = {"fds_same": before == after, "threads": threading.active_count(), "loaded": loaded}
ferry.Relay, ferry.send_email_hybrid, ferry.RelayConfig  # resolve the lazy names
state["threads_after_names"] = threading.active_count()
state["fds_after_names"] = sorted(os.listdir("/proc/self/fd")) == after
print(json.dumps(state))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "SMTP_"))}
    # A configuration that cannot be read: importing must not even look at it.
    env["FERRY_CONFIG"] = str(tmp_path / "missing.toml")
    env["SMTP_DELIVERY_MODE"] = "not-a-mode"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert state == {
        "fds_same": True,
        "threads": 1,
        "loaded": ["ferry"],
        "threads_after_names": 1,
        "fds_after_names": True,
    }


def test_every_public_name_resolves_and_is_documented() -> None:
    assert ferry.__all__, "ferry exports nothing"
    for name in ferry.__all__:
        value = getattr(ferry, name)
        if callable(value) and not name.endswith("Hook") and name not in ("MessageLike",):
            assert (value.__doc__ or "").strip(), f"ferry.{name} has no docstring"
    assert "Relay" in dir(ferry)
    with pytest.raises(AttributeError):
        _ = ferry.NoSuchThing  # type: ignore[attr-defined]


def test_one_priority_enum_for_both_seeds() -> None:
    assert EmailPriority is Priority
    # SMTPy's three and Zetian's four, ordered: higher is served first.
    assert Priority.LOW < Priority.NORMAL < Priority.HIGH < Priority.URGENT
    assert Priority.parse("Urgent") is Priority.URGENT


def test_delivery_result_is_truthy_only_when_delivered() -> None:
    ok = DeliveryResult("a@x.test", Status.DELIVERED, route="smarthost:sg")
    assert ok and ok.final and ok.smart_host == "sg"
    for status in (Status.DEFERRED, Status.FAILED, Status.EXPIRED, Status.CANCELLED):
        assert not DeliveryResult("a@x.test", status)
    assert not DeliveryResult("a@x.test", Status.DEFERRED).final


# -- Relay: submit, send, wait ----------------------------------------------------------


async def test_send_defaults_recipients_from_headers_and_never_stores_bcc(world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    message = email_message("to@example.net", Cc="cc@example.net", Bcc="hidden@example.net")
    async with Relay(world.config()) as relay:
        results = await relay.send(message, timeout=15)
        assert sorted(results) == ["cc@example.net", "hidden@example.net", "to@example.net"]
        assert all(results.values())
        for result in results.values():
            assert result.status is Status.DELIVERED
            assert result.route == "direct"
            assert result.reply is not None and result.reply.code == 250
            assert result.relay == f"mx.example.net[{mx.host}]:{world.mx.port}"
            assert result.attempts == 1
        qid = next(iter(results.values())).queue_id
        assert qid is not None
        stored = await relay.queue.read_message(qid)
    [got] = mx.messages
    assert got.mail_from == "alice@sender.test"
    assert sorted(got.rcpt_tos) == ["cc@example.net", "hidden@example.net", "to@example.net"]
    # What was stored is what was sent; once every recipient is final the body is gone.
    assert b"hidden@" not in got.data and b"Bcc" not in got.data and stored is None
    parsed = got.parsed
    assert parsed["Message-ID"] and parsed["Date"]  # added, as an MTA does
    assert b"\r\n" in got.data and b"\n" not in got.data.replace(b"\r\n", b"")
    assert message["Bcc"] == "hidden@example.net"  # the caller's object is untouched


async def test_submit_bytes_with_explicit_envelope_and_priority(world: World) -> None:
    mx = world.mx("mx.bytes.test").publish(world.dns, "bytes.test")
    raw = (
        b"From: x@sender.test\nTo: not-this@bytes.test\nBcc: secret@bytes.test\n"
        b"\tcontinued\nSubject: raw\n\nbody\n"
    )
    async with Relay(world.config()) as relay:
        qid = await relay.submit(raw, ["one@bytes.test"], "bounce@sender.test", Priority.HIGH)
        info = await relay.queue.get(qid)
        assert info is not None and info.priority is Priority.HIGH
        assert info.sender == "bounce@sender.test"
        assert [r.address for r in info.recipients] == ["one@bytes.test"]
        results = await relay.wait(qid, timeout=15)
    assert results["one@bytes.test"]
    [got] = mx.messages
    assert got.rcpt_tos == ("one@bytes.test",) and got.mail_from == "bounce@sender.test"
    assert b"Bcc" not in got.data and b"continued" not in got.data
    assert b"Subject: raw\r\n\r\nbody\r\n" in got.data


async def test_non_ascii_addresses_travel_with_smtputf8(world: World) -> None:
    mx = world.mx("mx.utf8.test").publish(world.dns, "utf8.test")
    message = email_message("José <josé@utf8.test>", sender="Zoë <zoë@sender.test>")
    async with Relay(world.config(), listen=False) as relay:
        results = await relay.send(message, timeout=15)
    assert list(results) == ["josé@utf8.test"] and all(results.values())
    [got] = mx.messages
    assert got.mail_from == "zoë@sender.test" and "SMTPUTF8" in got.mail_options
    assert "josé@utf8.test".encode() in got.data  # raw UTF-8 headers (RFC 6532)


async def test_submit_rejects_what_cannot_be_mail(world: World) -> None:
    async with Relay(world.config(), listen=False) as relay:
        with pytest.raises(ValueError, match="no recipients"):
            await relay.submit(b"From: a@b.test\r\n\r\nx\r\n")
        with pytest.raises(ValueError, match="not an email address"):
            await relay.submit(b"From: a@b.test\r\n\r\nx\r\n", ["nobody"])
        with pytest.raises(ValueError, match="route"):
            await relay.submit(email_message("a@b.test"), route="no-such-host")
        assert (await relay.queue.statistics()).total_messages == 0
    with pytest.raises(RuntimeError, match="not running"):
        await relay.submit(email_message("a@b.test"))


async def test_send_reports_failures_and_deferrals_with_their_replies(world: World) -> None:
    mx = world.mx("mx.mixed.test").publish(world.dns, "mixed.test")
    mx.on("rcpt", "550 5.1.1 no such user", rcpt="gone@mixed.test")
    mx.on("rcpt", "450 4.2.0 greylisted", rcpt="grey@mixed.test")
    rcpts = ["ok@mixed.test", "gone@mixed.test", "grey@mixed.test"]
    async with Relay(world.config(retry_schedule=["1h"]), listen=False) as relay:
        results = await relay.send(email_message(rcpts), timeout=15, until="attempted")
        ok, gone, grey = (results[r] for r in rcpts)
        assert ok and ok.status is Status.DELIVERED
        assert not gone and gone.status is Status.FAILED and gone.final
        assert gone.reply is not None and (gone.reply.code, gone.reply.enhanced) == (550, "5.1.1")
        assert not grey and grey.status is Status.DEFERRED and not grey.final
        assert grey.reply is not None and grey.reply.code == 450
        # Waiting for final outcomes gives up at the timeout; the message stays queued.
        later = await relay.wait(grey.queue_id or "", timeout=0.2)
        assert later["grey@mixed.test"].status is Status.DEFERRED
        assert (await relay.queue.get(grey.queue_id or "")) is not None
        with pytest.raises(KeyError):
            await relay.wait("0000000000000000000", timeout=1)


async def test_smart_host_route_is_reported(world: World) -> None:
    sg = world.mx("smtp.sendgrid.test", port=0, starttls=True)
    host = world.smart_host(sg, "sendgrid")
    async with Relay(world.config(mode="relay", smart_hosts=[host]), listen=False) as relay:
        results = await relay.send(email_message("a@anywhere.test"), timeout=15)
    [result] = results.values()
    assert result and result.route == "smarthost:sendgrid" and result.smart_host == "sendgrid"
    assert result.tls is not None and result.tls.startswith("TLS")
    assert sg.messages[0].rcpt_tos == ("a@anywhere.test",)


async def test_smtp_listener_and_api_share_one_queue(world: World) -> None:
    mx = world.mx("mx.both.test").publish(world.dns, "both.test")
    accepted: list[AcceptedMessage] = []
    async with Relay(world.config(), on_accepted=accepted.append) as relay:
        host, port, mode = relay.listening[0]
        assert (host, mode) == ("127.0.0.1", "mta") and relay.port() == port
        reader, writer = await asyncio.open_connection(host, port)
        for line in (
            b"EHLO client.test",
            b"MAIL FROM:<s@sender.test>",
            b"RCPT TO:<r@both.test>",
            b"DATA",
        ):
            writer.write(line + b"\r\n")
        writer.write(b"Subject: over SMTP\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        replies = (await reader.read()).decode()
        writer.close()
        await writer.wait_closed()
        assert "250 2.0.0 Ok: queued as" in replies
        await relay.send(email_message("api@both.test"), timeout=15)
        await mx.async_wait_for_messages(2, 15)
        assert len(await relay.queue.get_all()) == 2
        await async_wait_until(lambda: len(accepted) == 2, 10)
    assert [(a.client, a.sender) for a in accepted] == [
        ("127.0.0.1", "s@sender.test"),
        ("api", "alice@sender.test"),
    ]
    assert Relay(world.config(), listen=False).listening == []


async def test_queue_operations_retry_cancel_remove(world: World) -> None:
    mx = world.mx("mx.grey.test").publish(world.dns, "grey.test")
    mx.on("rcpt", "451 4.7.1 try again later")
    config = world.config(retry_schedule=["1h"])
    async with Relay(config, listen=False) as relay:
        first = await relay.submit(email_message("a@grey.test"), priority=Priority.HIGH)
        second = await relay.submit(email_message("b@grey.test"))
        await relay.wait(first, until="attempted", timeout=15)
        await relay.wait(second, until="attempted", timeout=15)

        deferred = await relay.queue.get_by_status(Status.DEFERRED)
        assert {m.id for m in deferred} == {first, second}
        assert [m.id for m in await relay.queue.get_by_status("deferred", limit=1)] == [second]
        stats = await relay.queue.statistics()
        assert (stats.total_messages, stats.deferred_messages) == (2, 2)
        assert stats.messages_by_priority == {"High": 1, "Normal": 1}

        # retry: due now, and attempted again at once (the schedule said an hour)
        assert await relay.queue.retry(first) == 1
        again = await relay.wait(first, until="attempted", timeout=15)
        assert again["a@grey.test"].attempts == 2
        assert mx.commands.count("RCPT TO:<a@grey.test>") == 2

        # cancel: the pending recipient becomes Cancelled and a waiter hears of it
        waiting = asyncio.ensure_future(relay.wait(second, timeout=30))
        assert await relay.queue.cancel(second) == 1
        cancelled = await asyncio.wait_for(waiting, 10)
        assert cancelled["b@grey.test"].status is Status.CANCELLED
        info = await relay.queue.get(second)
        assert info is not None and info.status is Status.CANCELLED

        waiting = asyncio.ensure_future(relay.wait(first, timeout=30))
        # ... once the waiter has read the message (else it would find no such id)
        await async_wait_until(
            lambda: any(w.pending is not None for w in relay._waiters.get(first, [])), 10
        )
        assert await relay.queue.remove(first) is True
        last_known = await asyncio.wait_for(waiting, 10)  # a waiter hears of it too
        assert last_known["a@grey.test"].status is Status.DEFERRED
        assert await relay.queue.get(first) is None
        assert await relay.queue.remove(first) is False
        assert [m.id for m in await relay.queue.get_all()] == [second]
    assert mx.messages == []


async def test_expired_recipients_hook_and_clear_expired(world: World) -> None:
    world.mx("mx.never.test").publish(world.dns, "never.test").on("rcpt", "450 4.2.2 full")
    expired: list[DeliveryResult] = []
    relay = Relay(world.config(max_retries=0), listen=False, on_expired=expired.append)
    async with relay:
        results = await relay.send(email_message("x@never.test"), timeout=15)
        assert results["x@never.test"].status is Status.EXPIRED
        await async_wait_until(lambda: expired, 10, message="no expired hook call")
        assert expired[0].recipient == "x@never.test" and expired[0].status is Status.EXPIRED
        # the DSN to alice@sender.test is a message of its own; it is delivered, not expired
        assert await relay.drain(timeout=15)
        assert await relay.queue.clear_expired() == 1
        assert (await relay.queue.statistics()).expired_messages == 0
    [dsn] = world.bounce_mx.messages
    assert dsn.rcpt_tos == ("alice@sender.test",)


async def test_relay_cleans_up_expired_messages_periodically(world: World) -> None:
    world.mx("mx.gone.test").publish(world.dns, "gone.test").on("rcpt", "450 4.2.2 full")
    config = world.config(max_retries=0, bounces=False)
    async with Relay(config, listen=False, cleanup_interval=0.05) as relay:
        qid = await relay.submit(email_message("x@gone.test"))

        async def removed() -> bool:
            return await relay.queue.get(qid) is None

        await async_wait_until(removed, 15, message="expired message never cleared")


# -- hooks ------------------------------------------------------------------------------


async def test_routing_hook_chooses_priority_and_smart_host(world: World) -> None:
    mx = world.mx("mx.dest.test").publish(world.dns, "dest.test")
    vip_host = world.mx("vip.relay.test", port=0)
    host = world.smart_host(vip_host, "vip")
    seen: list[tuple[str, str | None, str | None]] = []
    relay = Relay(world.config(smart_hosts=[host]))

    @relay.routing
    async def route(message: IncomingMessage) -> None:
        seen.append((message.sender, message.client_address, message.from_address))
        if message.sender.endswith("@vip.test"):
            message.priority = Priority.URGENT
            message.smart_host = "vip"

    async with relay:
        vip = await relay.submit(email_message("a@dest.test", sender="boss@vip.test"))
        plain = await relay.submit(email_message("b@dest.test"))
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port())
        writer.write(
            b"EHLO c.test\r\nMAIL FROM:<ceo@vip.test>\r\nRCPT TO:<c@dest.test>\r\nDATA\r\n"
            b"From: ceo@vip.test\r\nSubject: smtp\r\n\r\nhi\r\n.\r\nQUIT\r\n"
        )
        replies = (await reader.read()).decode()
        writer.close()
        await writer.wait_closed()
        smtp_id = replies.split("queued as ")[1].split()[0]
        for qid in (vip, plain, smtp_id):
            await relay.wait(qid, timeout=15)
        priorities = {qid: (await relay.queue.get(qid)).priority for qid in (vip, plain, smtp_id)}  # type: ignore[union-attr]
    assert priorities == {vip: Priority.URGENT, plain: Priority.NORMAL, smtp_id: Priority.URGENT}
    assert sorted(r for m in vip_host.messages for r in m.rcpt_tos) == [
        "a@dest.test",
        "c@dest.test",
    ]
    assert [m.rcpt_tos for m in mx.messages] == [("b@dest.test",)]
    assert ("boss@vip.test", None, "boss@vip.test") in seen  # API: no client address
    assert ("ceo@vip.test", "127.0.0.1", "ceo@vip.test") in seen


async def test_a_raising_hook_loses_no_mail(world: World, caplog: pytest.LogCaptureFixture) -> None:
    mx = world.mx("mx.safe.test").publish(world.dns, "safe.test")
    delivered: list[str] = []
    relay = Relay(world.config(), listen=False)

    @relay.routing
    def half_done(message: IncomingMessage) -> None:
        message.priority = Priority.URGENT
        raise RuntimeError("routing hook bug")

    @relay.routing
    def bad_route(message: IncomingMessage) -> None:
        message.route = "nowhere"  # not a smart host: ValueError inside the hook

    @relay.on_delivered
    async def broken(result: DeliveryResult) -> None:
        raise RuntimeError("delivered hook bug")

    @relay.on_delivered
    def fine(result: DeliveryResult) -> None:
        delivered.append(result.recipient)

    with caplog.at_level(logging.ERROR, logger="ferry.api"):
        async with relay:
            results = await relay.send(email_message("x@safe.test"), timeout=15)
            await async_wait_until(lambda: delivered, 10, message="second hook never ran")
            info = await relay.queue.get(results["x@safe.test"].queue_id or "")
    assert results["x@safe.test"] and len(mx.messages) == 1
    assert info is not None and info.priority is Priority.NORMAL and "route" not in info.extra
    text = caplog.text
    assert "routing hook bug" in text and "delivered hook bug" in text and "ValueError" in text


async def test_delivery_hooks_per_recipient_and_outcome(world: World) -> None:
    mx = world.mx("mx.hooks.test").publish(world.dns, "hooks.test")
    mx.on("rcpt", "550 5.1.1 unknown", rcpt="bad@hooks.test")
    mx.on("rcpt", "450 4.2.0 greylisted", rcpt="grey@hooks.test", times=1)
    calls: dict[str, list[Any]] = {"accepted": [], "delivered": [], "deferred": [], "failed": []}

    async def record(kind: str, value: Any) -> None:
        await asyncio.sleep(0)  # a coroutine hook, suspended once
        calls[kind].append(value)

    relay = Relay(
        world.config(retry_schedule=["0.1s"]),
        listen=False,
        on_accepted=lambda m: record("accepted", m),
        on_delivered=lambda r: record("delivered", r.recipient),
        on_deferred=lambda r: record("deferred", r.recipient),
        on_failed=lambda r: record("failed", (r.recipient, r.reply.code if r.reply else None)),
    )
    async with relay:
        rcpts = ["ok@hooks.test", "bad@hooks.test", "grey@hooks.test"]
        results = await relay.send(email_message(rcpts), timeout=15)
        assert [bool(results[r]) for r in rcpts] == [True, False, True]
        await async_wait_until(lambda: len(calls["delivered"]) == 3, 10, message=lambda: str(calls))
    [accepted] = calls["accepted"]
    assert isinstance(accepted, AcceptedMessage)
    assert (accepted.sender, accepted.recipients, accepted.client) == (
        "alice@sender.test",
        3,
        "api",
    )
    assert accepted.queue_id == results["ok@hooks.test"].queue_id
    # ... and the DSN about bad@ to the sender is a delivery of its own
    assert sorted(calls["delivered"]) == ["alice@sender.test", "grey@hooks.test", "ok@hooks.test"]
    assert calls["deferred"] == ["grey@hooks.test"]
    assert calls["failed"] == [("bad@hooks.test", 550)]


async def test_hooks_ignore_another_relays_messages(world: World, tmp_path: Path) -> None:
    world.mx("mx.two.test").publish(world.dns, "two.test")
    mine: list[str] = []
    other_config = world.config().model_copy(deep=True)
    other_config.queue.path = str(tmp_path / "other-queue")
    async with (
        Relay(world.config(), listen=False, on_delivered=lambda r: mine.append(r.recipient)) as a,
        Relay(other_config, listen=False) as b,
    ):
        await b.send(email_message("theirs@two.test"), timeout=15)
        await a.send(email_message("mine@two.test"), timeout=15)
        await async_wait_until(lambda: mine, 10)
        await asyncio.gather(*a._hook_tasks)
    assert mine == ["mine@two.test"]


# -- lifecycle and statistics --------------------------------------------------------------


async def test_get_stats_in_the_smtpy_shape(world: World) -> None:
    world.mx("mx.stats.test").publish(world.dns, "stats.test")
    relay = Relay(world.config(), listen=False)
    assert relay.get_stats()["direct_sent"] == 0
    async with relay:
        await relay.send(email_message(["a@stats.test", "b@stats.test"]), timeout=15)
        await relay.send(email_message("c@stats.test"), timeout=15)
        stats = relay.get_stats()
    assert stats["mode"] == "direct"
    assert (stats["direct_sent"], stats["direct_failed"], stats["relay_sent"]) == (3, 0, 0)
    service = stats["direct_service"]
    assert set(service) == {
        "sent",
        "failed",
        "deferred",
        "bounced",
        "mx_lookups",
        "mx_cache_hits",
        "mx_cache_size",
    }
    assert service["sent"] == 3 and service["mx_lookups"] >= 1 and service["mx_cache_size"] == 1
    assert {"dkim_signed", "dkim_unsigned"} <= set(stats)
    assert relay.get_stats()["direct_sent"] == 3  # kept after stop


async def test_one_relay_per_queue_directory(world: World) -> None:
    async with Relay(world.config(), listen=False):
        with pytest.raises(AlreadyRunning):
            await Relay(world.config(), listen=False).start()


async def test_serve_forever_returns_when_stopped(world: World) -> None:
    relay = Relay(world.config())
    async with relay:
        serving = asyncio.ensure_future(relay.serve_forever())
        await asyncio.sleep(0)
        assert not serving.done()
        await relay.stop()
        await asyncio.wait_for(serving, 5)
    assert not relay.running and relay.listening == []


def _ferry_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("ferry"))


async def test_start_stop_fifty_times_leaks_nothing(world: World) -> None:
    world.mx("mx.leak.test").publish(world.dns, "leak.test")
    config = world.config()

    async def cycle(n: int) -> None:
        async with Relay(config) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port())
            assert (await reader.readline()).startswith(b"220")
            writer.close()
            await writer.wait_closed()
            if n % 10 == 0:
                results = await relay.send(email_message(f"n{n}@leak.test"), timeout=15)
                assert all(results.values())

    await cycle(0)  # warm-up: first-run files, executor threads, imports
    fds = sorted(os.listdir("/proc/self/fd"))
    tasks = asyncio.all_tasks()
    subscribers = len(ferry.events._subscribers)
    for n in range(1, 51):
        await cycle(n)
    # The world's MX servers share this process: their side of the last connection
    # may close a moment after ours, hence a wait rather than one look.
    await async_wait_until(
        lambda: sorted(os.listdir("/proc/self/fd")) == fds,
        10,
        message=lambda: f"file descriptors {fds} became {sorted(os.listdir('/proc/self/fd'))}",
    )
    assert asyncio.all_tasks() == tasks
    assert len(ferry.events._subscribers) == subscribers
    assert _ferry_threads() == []


# -- the SMTPy seed's functions ------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps (records every sleep)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


@pytest.fixture
def seed_config(world: World) -> Iterator[RelayConfig]:
    """The seed's functions configured for the test world; reset afterwards."""
    config = world.config()
    seed.configure(config)
    yield config
    seed.configure(None)


async def test_direct_service_send_email_and_bulk(world: World, seed_config: RelayConfig) -> None:
    mx = world.mx("mx.example.test", starttls=True).publish(world.dns, "example.test")
    mx.on("rcpt", "550 5.1.1 no such user", rcpt="user2@example.test")
    service = ferry.get_direct_smtp_service()
    assert service is ferry.get_direct_smtp_service()
    ok = await service.send_email(
        message=email_message("user@example.test"),
        recipient="user@example.test",
        mail_from="noreply@sender.test",
    )
    results = await service.send_email_bulk(
        message=email_message(["user1@example.test", "user2@example.test"]),
        recipients=["user1@example.test", "user2@example.test"],
        mail_from="noreply@sender.test",
    )
    assert ok is True
    assert results == {"user1@example.test": True, "user2@example.test": False}
    assert [m.rcpt_tos for m in mx.messages] == [("user@example.test",), ("user1@example.test",)]
    assert all(m.tls for m in mx.messages)  # STARTTLS whenever offered
    stats = service.get_stats()
    assert stats == {
        "sent": 2,
        "failed": 1,
        "deferred": 0,
        "bounced": 1,
        "mx_lookups": 1,
        "mx_cache_hits": 1,
        "mx_cache_size": 1,
    }


async def test_direct_service_retries_temporary_failures_with_backoff(
    world: World, seed_config: RelayConfig
) -> None:
    mx = world.mx("mx.retry.test").publish(world.dns, "retry.test")
    mx.on("rcpt", "451 4.3.0 try later", times=2)
    fake = FakeTime()
    service = ferry.DirectSmtpService(seed_config, sleep=fake.sleep, clock=fake.clock)
    assert await service.send_email(email_message("a@retry.test"), "a@retry.test", "s@sender.test")
    assert fake.sleeps == [2.0, 4.0]  # the seed's 2 s, 4 s (8 s would come next)
    assert len(mx.messages) == 1

    mx.on("rcpt", "451 4.3.0 try later", times=3)
    fake.sleeps.clear()
    results = await service.deliver(email_message("b@retry.test"), "b@retry.test", "s@sender.test")
    assert fake.sleeps == [2.0, 4.0]  # three attempts, no wait after the last
    [result] = results.values()
    assert not result and result.status is Status.DEFERRED and result.attempts == 3
    assert service.get_stats()["deferred"] == 5 and service.get_stats()["failed"] == 1


async def test_direct_service_does_not_retry_permanent_failures(
    world: World, seed_config: RelayConfig
) -> None:
    mx = world.mx("mx.perm.test").publish(world.dns, "perm.test")
    mx.on("rcpt", "550 5.7.1 go away")
    world.dns.nxdomain("nowhere.test")
    fake = FakeTime()
    service = ferry.DirectSmtpService(seed_config, sleep=fake.sleep, clock=fake.clock)
    results = await service.deliver(
        email_message(["a@perm.test", "b@nowhere.test"]), None, "s@sender.test"
    )
    assert fake.sleeps == []
    assert results["a@perm.test"].reply is not None and results["a@perm.test"].reply.code == 550
    assert results["b@nowhere.test"].status is Status.FAILED
    assert mx.commands.count("RCPT TO:<a@perm.test>") == 1


async def test_direct_service_tries_the_next_mx(world: World, seed_config: RelayConfig) -> None:
    world.mx.refusing("mx1.two.test").publish(world.dns, "two.test", preference=10)
    mx2 = world.mx("mx2.two.test").publish(world.dns, "two.test", preference=20)
    service = ferry.DirectSmtpService(seed_config)
    results = await service.deliver(email_message("a@two.test"), None, "s@sender.test")
    assert results["a@two.test"].relay == f"mx2.two.test[{mx2.host}]:{world.mx.port}"
    assert len(mx2.messages) == 1


async def test_direct_service_rate_limits_connections_per_domain(
    world: World, seed_config: RelayConfig
) -> None:
    world.mx("mx.rate.test").publish(world.dns, "rate.test")
    other = world.mx("mx.other.test").publish(world.dns, "other.test")
    fake = FakeTime()
    service = ferry.DirectSmtpService(seed_config, rate_limit=2, sleep=fake.sleep, clock=fake.clock)
    for n in range(2):
        assert await service.send_email(
            email_message("a@rate.test"), f"{n}@rate.test", "s@sender.test"
        )
    assert await service.send_email(email_message("a@other.test"), "x@other.test", "s@sender.test")
    assert fake.sleeps == [] and len(other.messages) == 1
    assert await service.send_email(email_message("a@rate.test"), "2@rate.test", "s@sender.test")
    assert fake.sleeps == [60.0]  # the third connection to rate.test waited for the window


async def test_direct_service_judges_replies_as_the_engine_does(
    world: World, seed_config: RelayConfig
) -> None:
    # A host that refuses the session (554 greeting) says nothing about the recipient:
    # the engine defers and retries, and so does the seed's service (it used to bounce).
    mx = world.mx("mx.closed.test").publish(world.dns, "closed.test")
    mx.on("greeting", "554 5.7.1 no SMTP service here")
    fake = FakeTime()
    service = ferry.DirectSmtpService(seed_config, sleep=fake.sleep, clock=fake.clock)
    [result] = (await service.deliver(email_message("a@closed.test"), None, "s@x.test")).values()
    assert (result.status, result.attempts, fake.sleeps) == (Status.DEFERRED, 3, [2.0, 4.0])
    assert result.reply is not None and result.reply.code == 554
    assert service.get_stats()["bounced"] == 0


def _dkim_dns(world: World) -> Any:
    """dkimpy's TXT lookup, asking the test world's DNS server."""
    return txt_lookup(world.dns)


def _publish_key(world: World, config: RelayConfig, domain: str) -> None:
    from ferry.dkim import KeyStore, dns_record, txt_chunks

    key = KeyStore(config.dkim.keys_dir).generate(domain, selector="ferry", bits=1024)
    name, value = dns_record(key)
    world.dns.add_txt(name, txt_chunks(value))


async def test_sign_email_dkim_signs_with_the_domain_key(
    world: World, seed_config: RelayConfig
) -> None:
    import dkim

    unsigned = await ferry.sign_email_dkim(email_message("a@x.test"), "alice@sender.test")
    assert unsigned["DKIM-Signature"] is None  # no key yet: unsigned, not an error
    _publish_key(world, seed_config, "sender.test")
    signed = await ferry.sign_email_dkim(email_message("a@x.test"), mail_from="alice@sender.test")
    assert isinstance(signed, EmailMessage)
    assert "d=sender.test" in str(signed["DKIM-Signature"]).replace(" ", "")
    assert dkim.verify(signed.as_bytes(policy=ferry.api.relay._POLICY), dnsfunc=_dkim_dns(world))


async def test_send_direct_signs_and_delivers(world: World, seed_config: RelayConfig) -> None:
    import dkim

    mx = world.mx("mx.example.test").publish(world.dns, "example.test")
    _publish_key(world, seed_config, "sender.test")
    message = email_message("test@example.test")
    results = await ferry.send_direct(message, ["test@example.test"])
    assert results == {"test@example.test": True}
    [got] = mx.messages
    assert got.mail_from == "alice@sender.test"
    assert got.data.startswith(b"DKIM-Signature:")
    assert dkim.verify(got.data, dnsfunc=_dkim_dns(world))  # intact on the wire


async def test_send_direct_never_sends_unsigned_mail_for_a_required_domain(
    world: World, seed_config: RelayConfig
) -> None:
    mx = world.mx("mx.example.test").publish(world.dns, "example.test")
    config = seed_config.model_copy(deep=True)
    config.dkim.required_domains = ["sender.test"]
    seed.configure(config)
    results = await ferry.send_direct(email_message("a@example.test"), ["a@example.test"])
    assert results == {"a@example.test": False}  # no key for sender.test: not sent
    assert mx.connections == 0
    _publish_key(world, config, "sender.test")
    assert await ferry.send_direct(email_message("a@example.test"), ["a@example.test"]) == {
        "a@example.test": True
    }
    assert mx.messages[0].data.startswith(b"DKIM-Signature:")


async def test_send_email_hybrid_falls_back_and_counts(world: World) -> None:
    world.mx("mx.ok.test").publish(world.dns, "ok.test")
    world.mx("mx.grey.test").publish(world.dns, "grey.test").on("rcpt", "450 4.2.0 greylisted")
    gmail = world.mx("smtp.gmail.test", port=0, starttls=True, auth={"me": "app-password"})
    host = world.smart_host(gmail, "default", username="me", password="app-password")
    seed.configure(world.config(mode="hybrid", smart_hosts=[host]))
    try:
        results = await ferry.send_email_hybrid(
            message=email_message(["u@ok.test", "v@grey.test"]),
            recipients=["u@ok.test", "v@grey.test"],
            mail_from="noreply@sender.test",
            priority=EmailPriority.NORMAL,
        )
        assert results == {"u@ok.test": True, "v@grey.test": True}
        relay = ferry.get_hybrid_relay()
        assert relay.running and not relay.listening
        stats = relay.get_stats()
        assert stats["mode"] == "hybrid"
        assert (stats["direct_sent"], stats["relay_sent"]) == (1, 1)
        assert stats["direct_service"]["mx_lookups"] == 2
        assert [m.rcpt_tos for m in gmail.messages] == [("v@grey.test",)]
        with pytest.raises(RuntimeError, match="running"):
            seed.configure(None)
    finally:
        await ferry.get_hybrid_relay().stop()
        seed.configure(None)


def test_hybrid_relay_stops_when_its_loop_ends(world: World) -> None:
    world.mx("mx.loop.test").publish(world.dns, "loop.test")
    seed.configure(world.config())
    try:
        for n in range(2):  # a second asyncio.run starts it again on the new loop
            results = asyncio.run(
                ferry.send_email_hybrid(
                    email_message("a@loop.test"), [f"{n}@loop.test"], "s@sender.test"
                )
            )
            assert results == {f"{n}@loop.test": True}
            assert not ferry.get_hybrid_relay().running
            assert _ferry_threads() == []
    finally:
        seed.configure(None)


async def test_hooks_receive_the_whole_multiline_reply(world: World) -> None:
    """A long multi-line reply reaches the hook as the server sent it (no 300-char cut)."""
    mx = world.mx("mx.long.test").publish(world.dns, "long.test")
    texts = [f"line {n}: " + "x" * 70 for n in range(6)]  # ~480 characters in all
    wire = "\r\n".join(
        f"550{'-' if n < len(texts) - 1 else ' '}5.7.1 {text}" for n, text in enumerate(texts)
    )
    mx.on("rcpt", wire, rcpt="long@long.test")
    failed: list[DeliveryResult] = []
    async with Relay(world.config(), listen=False, on_failed=failed.append) as relay:
        results = await relay.send(email_message("long@long.test"), timeout=15)
        await async_wait_until(lambda: len(failed) == 1, 10, message=lambda: str(failed))
    [result] = failed
    expected = Reply(550, "5.7.1", "\n".join(texts))
    assert len(str(expected)) > 300
    assert result.reply == expected
    assert result.relay is not None and result.relay.startswith("mx.long.test[")
    assert results["long@long.test"].reply == expected


async def test_queue_operations_are_operator_events(world: World) -> None:
    world.mx("mx.ops.test").publish(world.dns, "ops.test").on("rcpt", "451 4.7.1 later")
    seen: list[ferry.events.Event] = []
    unsubscribe = ferry.events.subscribe(seen.append)
    try:
        async with Relay(world.config(retry_schedule=["1h"]), listen=False) as relay:
            queue_id = await relay.submit(email_message("a@ops.test"))
            await relay.wait(queue_id, until="attempted", timeout=15)
            await relay.queue.cancel(queue_id)
            await relay.queue.remove(queue_id)
    finally:
        unsubscribe()
    actions = [e for e in seen if isinstance(e, ferry.events.OperatorAction)]
    assert [(a.action, a.queue_id, a.count, a.via) for a in actions] == [
        ("cancel", queue_id, 1, "api"),
        ("remove", queue_id, 1, "api"),
    ]
    [deferred] = [e for e in seen if isinstance(e, ferry.events.Deferred)]
    assert deferred.reply == Reply(451, "4.7.1", "later") and deferred.retry_in is not None
