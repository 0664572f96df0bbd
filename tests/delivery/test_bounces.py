"""Bounces as values: double-bounce notices and reports that need no SMTPUTF8 (pure)."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import Message
from typing import Any

import pytest

from ferry.delivery.bounces import (
    DOUBLE_BOUNCE,
    NOTICE_KEY,
    Report,
    double_bounce_envelope,
    dsn_envelope,
    is_postmaster_notice,
    seven_bit,
)
from ferry.delivery.dsn import parse_dsn
from ferry.envelope import Priority, Reply, Status
from ferry.queue.base import MessageInfo, RecipientInfo

NOW = 1_790_000_000.0
UTF8_HEADERS = "From: Ana <ana@sender.test>\r\nTo: José <josé@utf8.test>\r\nSubject: Olá\r\n"


def _message(sender: str, *, smtputf8: bool = False, extra: dict[str, str] | None = None) -> Any:
    return MessageInfo(
        id="1ABCDEF",
        sender=sender,
        size=100,
        priority=Priority.NORMAL,
        arrival=NOW - 60,
        expires=NOW + 86400,
        status=Status.FAILED,
        client_address=None,
        client_helo=None,
        auth_user=None,
        envid=None,
        ret=None,
        smtputf8=smtputf8,
        extra=extra or {},
    )


def _failed(address: str, reply: Reply | None = None) -> Report:
    rcpt = RecipientInfo(1, "1ABCDEF", address, None, None, Status.FAILED, 1, None, None, None)
    reply = reply or Reply(553, "5.6.7", "mx.utf8.test does not support SMTPUTF8")
    return Report(rcpt, "failed", reply, "mx.utf8.test", NOW, synthetic=True)


def _parts(data: bytes) -> list[Message]:
    """The report's parts (the top level's payload; message/* parts are not opened)."""
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    parts = parsed.get_payload()
    assert isinstance(parts, list)
    return parts


def _base64_content(data: bytes, content_type: str) -> bytes:
    """The decoded content of the base64 part of this type (read from the raw bytes:
    the stdlib parser opens message/* parts instead of decoding them)."""
    marker = f"Content-Type: {content_type}\r\n".encode()
    part = data.split(marker, 1)[1]
    headers, _, content = part.partition(b"\r\n\r\n")
    assert b"Content-Transfer-Encoding: base64" in headers
    return base64.b64decode(content.split(b"\r\n--", 1)[0])


def test_report_about_a_utf8_message_to_an_ascii_sender_needs_no_smtputf8() -> None:
    """RFC 6533: returned UTF-8 headers go as message/global-headers, base64; the text
    part too: the report is 7-bit, deliverable without SMTPUTF8 or 8BITMIME."""
    original = (UTF8_HEADERS + "\r\nOi!\r\n").encode()
    env = dsn_envelope(
        _message("ana@sender.test", smtputf8=True),
        original,
        [_failed("josé@utf8.test")],
        hostname="relay.test",
        bounce_from="MAILER-DAEMON@relay.test",
        now=NOW,
    )
    assert env is not None
    assert env.data.isascii()
    assert (env.smtputf8, env.body_8bit) == (False, False)
    text, status, returned = _parts(env.data)
    assert text["Content-Transfer-Encoding"] == "base64"
    assert "josé@utf8.test" in text.get_payload(decode=True).decode()
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "message/global-headers"
    assert _base64_content(env.data, "message/global-headers") == UTF8_HEADERS.encode()
    # RFC 6533 §3: the utf-8 address type, xtext-escaped in the ASCII status part
    [rcpt] = parse_dsn(env.data)[1]
    assert rcpt["final-recipient"] == "utf-8; jos\\x{E9}@utf8.test"
    assert rcpt["status"] == "5.6.7"


def test_full_return_of_a_utf8_message_is_message_global() -> None:
    original = (UTF8_HEADERS + "\r\nOi!\r\n").encode()
    message = _message("ana@sender.test", smtputf8=True)
    message.ret = "FULL"
    env = dsn_envelope(
        message, original, [_failed("josé@utf8.test")], hostname="r", bounce_from="m@r", now=NOW
    )
    assert env is not None and env.data.isascii()
    returned = _parts(env.data)[-1]
    assert returned.get_content_type() == "message/global"
    assert _base64_content(env.data, "message/global") == original


def test_ascii_report_is_left_as_built() -> None:
    original = b"From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n"
    env = dsn_envelope(
        _message("a@sender.test"),
        original,
        [_failed("bob@ascii.test", Reply(550, "5.1.1", "no such user"))],
        hostname="r",
        bounce_from="m@r",
        now=NOW,
    )
    assert env is not None and env.data.isascii()
    assert _parts(env.data)[-1].get_content_type() == "text/rfc822-headers"


def test_report_to_a_utf8_sender_keeps_smtputf8() -> None:
    """Its envelope recipient needs SMTPUTF8 whatever the content: nothing to gain."""
    original = (UTF8_HEADERS + "\r\nOi!\r\n").encode()
    env = dsn_envelope(
        _message("ana@remetente.test".replace("ana", "anã"), smtputf8=True),
        original,
        [_failed("josé@utf8.test")],
        hostname="r",
        bounce_from="m@r",
        now=NOW,
    )
    assert env is not None
    assert env.smtputf8 and env.body_8bit
    assert _parts(env.data)[-1].get_content_type() == "text/rfc822-headers"


def test_double_bounce_notice_goes_to_the_postmaster_and_is_marked() -> None:
    failed_dsn = (
        "From: MAILER-DAEMON@relay.test\r\nTo: <anã@remetente.test>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n\r\nreport\r\n"
    ).encode()
    message = _message("")
    notice = double_bounce_envelope(
        message,
        failed_dsn,
        [_failed("anã@remetente.test")],
        hostname="relay.test",
        bounce_from="MAILER-DAEMON@relay.test",
        postmaster="postmaster@relay.test",
        now=NOW,
    )
    assert notice.sender == ""
    assert [(r.address, r.notify) for r in notice.recipients] == [
        ("postmaster@relay.test", "NEVER")
    ]
    assert notice.extra == {NOTICE_KEY: DOUBLE_BOUNCE, "about": "1ABCDEF"}
    # an ASCII postmaster gets it without SMTPUTF8, the failed report attached whole
    assert notice.data.isascii() and not notice.smtputf8
    parsed = email.message_from_bytes(notice.data)
    assert parsed["Subject"].startswith("Postmaster Copy:")
    assert parsed["To"] == "<postmaster@relay.test>"
    returned = _parts(notice.data)[-1]
    assert returned.get_content_type() == "message/global"
    assert _base64_content(notice.data, "message/global") == failed_dsn
    [rcpt] = parse_dsn(notice.data)[1]
    assert rcpt["action"] == "failed"
    assert is_postmaster_notice(_message("", extra=dict(notice.extra)))
    assert not is_postmaster_notice(message)


def test_seven_bit_needs_a_multipart_with_ascii_headers() -> None:
    with pytest.raises(ValueError):
        seven_bit(b"Subject: x\r\n\r\nplain body \xc3\xa9\r\n")


def test_seven_bit_keeps_ascii_parts_byte_for_byte() -> None:
    report = (
        b'Content-Type: multipart/report; boundary="b"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\npreamble\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nascii text\r\n"
        b"--b\r\nContent-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\nSubject: \xc3\xa9\r\n"
        b"\r\n--b--\r\n"
    )
    out = seven_bit(report)
    assert out.isascii()
    assert b"--b\r\nContent-Type: text/plain\r\n\r\nascii text\r\n--b\r\n" in out
    assert b"Content-Transfer-Encoding: 7bit\r\n\r\npreamble" in out
    assert out.endswith(b"\r\n--b--\r\n")
    [_, headers] = _parts(out)
    assert headers.get_content_type() == "message/global-headers"
    assert _base64_content(out, "message/global-headers") == b"Subject: \xc3\xa9\r\n"
