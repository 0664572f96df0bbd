"""DKIM end to end: mail through Ferry to a test MX, verified from the bytes it received."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest

from ferry.dkim import KeyStore
from ferry.envelope import Status
from tests.delivery.relay_world import World
from tests.harness import wait_until
from tests.test_dkim import publish, signatures, txt_lookup, verify_all

AUTHOR = "alice@signed.test"
BODIES = {
    "ascii": b"Plain text.\r\n",
    "8bit": "Grüße aus Köln, ½ € \r\n".encode(),
    "trailing": b"lines\r\n\r\n\r\n  \r\n",
}
LONG = "Subject: " + " ".join(["a fairly long subject word"] * 12)


def message(body: bytes, *, utf8: bool = False, long_header: bool = False) -> bytes:
    sender = "Ålice <alice@signed.test>" if utf8 else f"Alice <{AUTHOR}>"
    head = f"From: {sender}\r\nTo: bob@dest.test\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
    head += "Message-ID: <dkim-e2e@signed.test>\r\n"
    if long_header:
        # folded over several lines, as a mail client writes it
        head += LONG[:70] + "\r\n\t" + LONG[70:150] + "\r\n\t" + LONG[150:] + "\r\n"
    else:
        head += "Subject: hello\r\n"
    head += "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    head += "Content-Transfer-Encoding: 8bit\r\n"
    return head.encode() + b"\r\n" + body


@pytest.fixture
def signed_world(world: World) -> tuple[World, Any, KeyStore]:
    store = KeyStore(world.tmp_path / "dkim")
    mx = world.mx("mx.dest.test", smtputf8=True).publish(world.dns, "dest.test")
    return world, mx, store


def send(world: World, svc: Any, data: bytes, utf8: bool = False) -> None:
    with smtplib.SMTP("127.0.0.1", svc.port()) as c:
        c.ehlo("client.test")
        c.sendmail(AUTHOR, ["bob@dest.test"], data, mail_options=["SMTPUTF8"] if utf8 else [])


@pytest.mark.parametrize("kinds", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
@pytest.mark.parametrize("variant", ["ascii", "8bit", "utf8-header", "long-header", "trailing"])
def test_delivered_mail_verifies(signed_world: Any, kinds: tuple[str, ...], variant: str) -> None:
    world, mx, store = signed_world
    for i, kind in enumerate(kinds):
        publish(world.dns, store.generate("signed.test", selector=f"s{i}", kind=kind))
    svc = world.relay(dkim={"keys_dir": str(store.keys_dir)})
    body = BODIES.get(variant, BODIES["8bit"])
    data = message(body, utf8=variant == "utf8-header", long_header=variant == "long-header")
    send(world, svc, data, utf8=variant == "utf8-header")
    [got] = mx.wait_for_messages(1, 15)
    assert signatures(got.data) == len(kinds)
    assert verify_all(got.data, txt_lookup(world.dns)) == [True] * len(kinds)
    # the verifier is real: a header changed after signing fails
    tampered = got.data.replace(b"To: bob@dest.test", b"To: eve@dest.test")
    assert verify_all(tampered, txt_lookup(world.dns)) == [False] * len(kinds)
    stats = svc.service.scheduler.stats()
    assert (stats["dkim_signed"], stats["dkim_unsigned"]) == (1, 0)


def test_no_key_sends_unsigned_and_counts_it(signed_world: Any) -> None:
    world, mx, store = signed_world
    svc = world.relay(dkim={"keys_dir": str(store.keys_dir)})
    send(world, svc, message(BODIES["ascii"]))
    [got] = mx.wait_for_messages(1, 15)
    assert signatures(got.data) == 0
    stats = svc.service.scheduler.stats()
    assert stats["dkim_unsigned"] == 1
    assert stats["dkim_unsigned_reasons"] == {"no_key": 1}


def test_required_domain_defers_instead_of_sending_unsigned(signed_world: Any) -> None:
    world, mx, store = signed_world
    svc = world.relay(
        retry_schedule=["1h"],
        dkim={"keys_dir": str(store.keys_dir), "required_domains": ["signed.test"]},
    )
    send(world, svc, message(BODIES["ascii"]))
    qid = svc.call(svc.queue.list())[0].id
    m = world.wait_status(svc, qid, Status.DEFERRED)
    assert m.recipients[0].last_reply.enhanced == "4.7.0"
    assert mx.messages == []


def test_dsn_is_signed_with_the_bounce_domain_key(signed_world: Any) -> None:
    world, mx, store = signed_world
    publish(world.dns, store.generate("relay.ferry.test", kind="ed25519"))
    mx.on("rcpt", "550 5.1.1 no such user")
    bounce_mx = world.mx("mx.signed.test").publish(world.dns, "signed.test")
    svc = world.relay(dkim={"keys_dir": str(store.keys_dir)})
    send(world, svc, message(BODIES["ascii"]))
    [dsn] = bounce_mx.wait_for_messages(1, 15)
    assert dsn.mail_from == ""
    assert b"d=relay.ferry.test" in dsn.data
    assert verify_all(dsn.data, txt_lookup(world.dns)) == [True]
    wait_until(lambda: svc.service.scheduler.stats()["dkim_signed"] >= 1)


def test_no_key_anywhere_is_counted_without_a_log_line(world: World) -> None:
    # Issue 12: DKIM not set up (no key at all) logged one dkim_unsigned line per message.
    from ferry import events

    mx = world.mx("mx.dest.test").publish(world.dns, "dest.test")
    seen: list[object] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        svc = world.relay(dkim={"keys_dir": str(world.tmp_path / "no-keys")})
        send(world, svc, message(BODIES["ascii"]))
        [got] = mx.wait_for_messages(1, 15)
        wait_until(lambda: any(isinstance(e, events.RecipientOutcome) for e in seen), 15)
        stats = svc.service.scheduler.stats()
        assert stats["dkim_unsigned_reasons"] == {"no_key": 1}
    finally:
        unsubscribe()
    assert signatures(got.data) == 0
    assert not [e for e in seen if isinstance(e, events.DkimUnsigned)]
