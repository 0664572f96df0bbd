"""No bounce dropped silently (issue 10.8): double bounces go to the postmaster, and
reports about internationalised mail travel without SMTPUTF8 where RFC 6533 allows."""

from __future__ import annotations

import email
import smtplib
from typing import Any

from ferry.delivery.dsn import parse_dsn
from ferry.envelope import Status
from tests.delivery.relay_world import SENDER, World, msg
from tests.harness import wait_until

UTF8_MESSAGE = (
    "From: Alice <alice@sender.test>\r\nTo: José <josé@utf8.test>\r\nSubject: Olá\r\n"
    "Message-ID: <utf8@sender.test>\r\n\r\nOi!\r\n"
).encode()


def _send_utf8(svc: Any, sender: str, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", svc.port()) as c:
        c.ehlo("client.test")
        code, text = c.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250, text
        code, text = c.rcpt(rcpt)
        assert code == 250, text
        code, text = c.data(UTF8_MESSAGE)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def _notices(svc: Any) -> list[Any]:
    return [m for m in svc.call(svc.queue.list()) if m.extra.get("notice") == "double-bounce"]


def test_double_bounce_goes_to_the_postmaster(world: World) -> None:
    """A report (a message from <>) that cannot be delivered: never bounced to its null
    sender, but the postmaster is told, with the failed report; it stays in the queue
    with its history, and `double_bounces` counts it. Before: dropped with a log line."""
    world.mx("mx.reject.test").publish(world.dns, "reject.test").on("rcpt", "550 5.1.1 no")
    pm = world.mx("mx.pm.test").publish(world.dns, "pm.test")
    svc = world.relay(postmaster="postmaster@pm.test")
    qid = world.send(svc, ["x@reject.test"], msg("bounce"), sender="")
    failed = world.wait_status(svc, qid, Status.FAILED)
    [got] = pm.wait_for_messages(1, 15)
    assert got.mail_from == "" and list(got.rcpt_tos) == ["postmaster@pm.test"]
    notice = email.message_from_bytes(got.data)
    assert notice["Subject"].startswith("Postmaster Copy:")
    meta, [rcpt] = parse_dsn(got.data)
    assert meta["x-ferry-queue-id"] == qid
    assert (rcpt["final-recipient"], rcpt["status"]) == ("rfc822; x@reject.test", "5.1.1")
    assert b"Subject: bounce" in got.data  # the failed report itself, attached
    # The failed report stays visible, with its attempt; nothing went to anyone else.
    [h] = failed.recipients[0].history
    assert h.outcome is Status.FAILED and h.reply.code == 550
    assert world.bounce_mx.messages == []
    [n] = _notices(svc)
    assert n.extra["about"] == qid
    world.wait_status(svc, n.id, Status.DELIVERED)
    stats = svc.service.scheduler.stats()
    assert (stats["double_bounces"], stats["dsn_dropped"], stats["bounced"]) == (1, 0, 0)


def test_postmaster_notice_is_never_bounced_itself(world: World) -> None:
    world.mx("mx.reject2.test").publish(world.dns, "reject2.test").on("rcpt", "550 5.1.1 no")
    world.mx("mx.pm2.test").publish(world.dns, "pm2.test").on("rcpt", "550 5.1.1 no pm")
    svc = world.relay(postmaster="postmaster@pm2.test")
    qid = world.send(svc, ["x@reject2.test"], msg("bounce2"), sender="")
    world.wait_status(svc, qid, Status.FAILED)
    wait_until(lambda: svc.service.scheduler.stats()["dsn_dropped"] == 1, 15, "notice dropped")
    [n] = _notices(svc)
    # The counter ticks as the outcome is handed to the queue; the status lands with
    # the commit a moment later, so wait on the status itself.
    assert world.wait_status(svc, n.id, Status.FAILED).status is Status.FAILED
    assert {m.id for m in svc.call(svc.queue.list())} == {qid, n.id}  # nothing more
    stats = svc.service.scheduler.stats()
    assert (stats["double_bounces"], stats["bounced"]) == (1, 0)


def test_report_about_utf8_mail_reaches_a_sender_mx_without_smtputf8(world: World) -> None:
    """RFC 6533: the report about a UTF-8 message to an ASCII sender is written in 7 bit
    (message/global-headers, base64), so an MX offering neither SMTPUTF8 nor 8BITMIME
    takes it. Before: refused (5.6.3) on our side, then dropped as a bounce of <>."""
    world.mx("mx.utf8.test", smtputf8=False).publish(world.dns, "utf8.test")
    world.bounce_mx.smtputf8 = False
    world.bounce_mx.eightbitmime = False
    svc = world.relay()
    qid = _send_utf8(svc, SENDER, "josé@utf8.test")
    m = world.wait_status(svc, qid, Status.FAILED)
    assert m.recipients[0].last_reply.enhanced == "5.6.7"
    [dsn] = world.dsns(1)
    assert dsn.mail_from == "" and list(dsn.rcpt_tos) == [SENDER]
    assert dsn.data.isascii()
    assert not any("SMTPUTF8" in o.upper() for o in dsn.mail_options)
    assert b"Content-Type: message/global-headers" in dsn.data
    [rcpt] = parse_dsn(dsn.data)[1]
    assert (rcpt["final-recipient"], rcpt["status"]) == ("utf-8; jos\\x{E9}@utf8.test", "5.6.7")
    assert svc.service.scheduler.stats()["double_bounces"] == 0


def test_utf8_sender_through_a_relay_without_smtputf8(world: World) -> None:
    """The case from the field: a message with UTF-8 addresses relayed through a smart
    host without SMTPUTF8 fails 5.6.7; its report (to a UTF-8 sender, so it needs
    SMTPUTF8) fails the same way; the postmaster's notice, ASCII and 7-bit, gets
    through the same smart host. Before: the report was dropped and nobody heard."""
    relay = world.mx("smtp.ascii-relay.test", smtputf8=False, eightbitmime=False)
    svc = world.relay(
        mode="relay",
        smart_hosts=[world.smart_host(relay, "ascii")],
        postmaster="postmaster@ops.test",
    )
    qid = _send_utf8(svc, "anã@remetente.test", "josé@utf8.test")
    world.wait_status(svc, qid, Status.FAILED)
    [got] = relay.wait_for_messages(1, 20)
    assert list(got.rcpt_tos) == ["postmaster@ops.test"] and got.mail_from == ""
    assert got.data.isascii()
    _meta, [rcpt] = parse_dsn(got.data)
    assert rcpt["final-recipient"] == "utf-8; an\\x{E3}@remetente.test"
    assert rcpt["status"] == "5.6.7"
    wait_until(lambda: svc.service.scheduler.stats()["double_bounces"] == 1, 10, "counted")
