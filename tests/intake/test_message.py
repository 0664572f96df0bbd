"""Header helpers over a received message's bytes (ferry/message.py), without sockets."""

from __future__ import annotations

import pytest

from ferry.envelope import Priority
from ferry.message import (
    MAX_HOPS,
    count_received,
    header_block,
    header_values,
    needs_smtputf8,
    priority_from_headers,
    protocol_name,
    received_header,
)


@pytest.mark.parametrize(
    ("data", "block"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2"),
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2"),
        (b"A: 1\r\n", b"A: 1\r\n"),  # no body: the whole message
        (b"\r\nbody", b""),
    ],
)
def test_header_block(data: bytes, block: bytes) -> None:
    assert header_block(data) == block


def test_header_values_unfold_and_ignore_case() -> None:
    block = b"Subject: one\r\nX-Tag: a\r\n\tb\r\n  c\r\nx-tag: d\r\nX-Tagged: no"
    assert header_values(block, "X-TAG") == ["a b c", "d"]
    assert header_values(block, "subject") == ["one"]
    assert header_values(block, "missing") == []
    assert header_values(b"Bad: \xff", "bad") == ["\ufffd"]


def test_count_received() -> None:
    block = b"Received: a\r\nreceived: b\r\nX-Received: c\r\nSubject: Received: d"
    assert count_received(block) == 2
    assert MAX_HOPS == 30  # RFC 5321 §6.3 leaves the number to us; Postfix uses 50


PRIORITIES = [
    (b"Priority: urgent", Priority.URGENT),
    (b"Priority: non-urgent", Priority.LOW),
    (b"Priority: normal", Priority.NORMAL),
    (b"X-Priority: 1 (Highest)", Priority.HIGH),
    (b"X-Priority: 2", Priority.HIGH),
    (b"X-Priority: 3", Priority.NORMAL),
    (b"X-Priority: 5 (Lowest)", Priority.LOW),
    (b"X-Priority: high", None),
    (b"Importance: High", Priority.HIGH),
    (b"Importance: low", Priority.LOW),
    (b"Importance: normal", Priority.NORMAL),
    (b"Priority: urgent\r\nX-Priority: 5", Priority.URGENT),  # Priority: wins
    (b"Subject: x", None),
]


@pytest.mark.parametrize(("headers", "priority"), PRIORITIES)
def test_priority_from_headers(headers: bytes, priority: Priority | None) -> None:
    assert priority_from_headers(headers) is priority


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        ({"esmtp": False, "tls": False, "auth": False, "utf8": False}, "SMTP"),
        ({"esmtp": True, "tls": False, "auth": False, "utf8": False}, "ESMTP"),
        ({"esmtp": True, "tls": True, "auth": False, "utf8": False}, "ESMTPS"),
        ({"esmtp": True, "tls": True, "auth": True, "utf8": False}, "ESMTPSA"),
        ({"esmtp": True, "tls": False, "auth": True, "utf8": False}, "ESMTPA"),
        ({"esmtp": True, "tls": True, "auth": True, "utf8": True}, "UTF8SMTPSA"),
    ],
)
def test_protocol_name(flags: dict[str, bool], name: str) -> None:
    # RFC 3848 and RFC 6531 §3.7.3
    assert protocol_name(**flags) == name


def test_received_header_is_folded_and_clean() -> None:
    header = received_header(
        helo="evil\r\nBcc: x (y)",
        client_ip="2001:db8::1",
        hostname="mx.ferry.test",
        protocol="ESMTPS",
        queue_id="QID1",
        recipient="bob@example.net",
        tls="TLSv1.3",
        now=0.0,
    )
    assert header == (
        b"Received: from evil??Bcc: x ?y? ([IPv6:2001:db8::1])\r\n"
        b"\tby mx.ferry.test (Ferry)\r\n"
        b"\twith ESMTPS id QID1 (TLSv1.3)\r\n"
        b"\tfor <bob@example.net>; Thu, 01 Jan 1970 00:00:00 -0000\r\n"
    )


def test_received_header_without_helo_or_recipient() -> None:
    header = received_header(
        helo=None,
        client_ip="192.0.2.1",
        hostname="mx",
        protocol="SMTP",
        queue_id="Q",
        recipient=None,
        tls=None,
        now=0.0,
    )
    assert header.startswith(b"Received: from unknown ([192.0.2.1])\r\n")
    assert b"for <" not in header
    assert header.endswith(b"\twith SMTP id Q; Thu, 01 Jan 1970 00:00:00 -0000\r\n")


def test_needs_smtputf8_looks_at_headers_only() -> None:
    assert needs_smtputf8("Subject: grüße\r\n\r\nx".encode())
    assert not needs_smtputf8("Subject: x\r\n\r\ngrüße".encode())
