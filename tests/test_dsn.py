"""RFC 3464 DSNs: built, parsed back, and checked as MIME."""

from __future__ import annotations

import email
import re
from dataclasses import replace
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any, cast

import pytest

from ferry.delivery.dsn import (
    DsnRecipient,
    DsnRequest,
    build_dsn,
    needs_dsn,
    never_bounce,
    parse_dsn,
)
from ferry.envelope import Reply

NOW = 1_700_000_000.0
ARRIVAL = NOW - 3600
ORIGINAL = (
    b"Received: from app.example.com\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Quarterly report\r\n"
    b"\r\n"
    b"The body of the message.\r\n"
)

FAILED = DsnRecipient(
    final_recipient="bob@example.net",
    original_recipient=None,
    action="failed",
    status="5.1.1",
    remote_mta="mx.example.net",
    diagnostic=Reply(550, "5.1.1", "<bob@example.net>: Recipient address rejected: User unknown"),
    last_attempt=NOW - 60,
)
DELAYED = DsnRecipient(
    final_recipient="carol@example.org",
    original_recipient=None,
    action="delayed",
    status="4.4.1",
    remote_mta=None,
    diagnostic=Reply(451, "4.4.1", "connection refused: mx.example.org[192.0.2.7]:25"),
    last_attempt=NOW - 30,
    will_retry_until=ARRIVAL + 4 * 86400,
    diagnostic_type="x-ferry",
)
DELIVERED = DsnRecipient(
    final_recipient="dave@example.com",
    original_recipient=None,
    action="delivered",
    status="2.0.0",
    remote_mta="mx.example.com",
    diagnostic=Reply(250, "2.0.0", "Ok: queued as 4XyZ"),
    last_attempt=NOW - 10,
)
REQUEST = DsnRequest(
    reporting_mta="relay.example.com",
    original_sender="alice@example.com",
    bounce_from="MAILER-DAEMON@relay.example.com",
    envid=None,
    arrival=ARRIVAL,
    queue_id="Q1A2B3",
    recipients=(FAILED,),
    ret=None,
    original=ORIGINAL,
)


def build(request: DsnRequest = REQUEST, **changes: Any) -> bytes:
    return build_dsn(replace(request, **changes), now=NOW, message_id_domain="relay.example.com")


def parts(dsn: bytes) -> list[Message]:
    message = email.message_from_bytes(dsn)
    payload = message.get_payload()
    assert isinstance(payload, list)
    return cast(list[Message], payload)


def text_of(part: Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode()


def date_of(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


@pytest.mark.parametrize(
    ("recipient", "subject"),
    [
        (FAILED, "Undelivered Mail Returned to Sender"),
        (DELAYED, "Delayed Mail (still being retried)"),
        (DELIVERED, "Successful Mail Delivery Report"),
    ],
)
def test_round_trip_per_action(recipient: DsnRecipient, subject: str) -> None:
    dsn = build(recipients=(recipient,))
    per_message, per_recipient = parse_dsn(dsn)

    assert per_message["reporting-mta"] == "dns; relay.example.com"
    assert date_of(per_message["arrival-date"]) == ARRIVAL
    assert per_message["x-ferry-queue-id"] == "Q1A2B3"
    [fields] = per_recipient
    assert fields["final-recipient"] == f"rfc822; {recipient.final_recipient}"
    assert fields["action"] == recipient.action
    assert fields["status"] == recipient.status
    assert date_of(fields["last-attempt-date"]) == recipient.last_attempt
    assert recipient.diagnostic is not None
    reply = recipient.diagnostic
    expected = f"{recipient.diagnostic_type}; {reply.code} {reply.enhanced} {reply.text}"
    assert fields["diagnostic-code"] == expected
    assert ("remote-mta" in fields) == (recipient.remote_mta is not None)
    if recipient.remote_mta:
        assert fields["remote-mta"] == f"dns; {recipient.remote_mta}"
    assert ("will-retry-until" in fields) == (recipient.action == "delayed")
    if recipient.will_retry_until:
        assert date_of(fields["will-retry-until"]) == recipient.will_retry_until
    assert email.message_from_bytes(dsn)["Subject"] == subject


def test_mixed_report_keeps_recipient_order_and_leads_with_failure() -> None:
    dsn = build(recipients=(DELIVERED, FAILED, DELAYED))
    _, per_recipient = parse_dsn(dsn)
    assert [(r["final-recipient"], r["action"], r["status"]) for r in per_recipient] == [
        ("rfc822; dave@example.com", "delivered", "2.0.0"),
        ("rfc822; bob@example.net", "failed", "5.1.1"),
        ("rfc822; carol@example.org", "delayed", "4.4.1"),
    ]
    assert email.message_from_bytes(dsn)["Subject"] == "Undelivered Mail Returned to Sender"
    text = text_of(parts(dsn)[0])
    for address in ("<dave@example.com>", "<bob@example.net>", "<carol@example.org>"):
        assert address in text


def test_delayed_and_delivered_report_is_a_delay_warning() -> None:
    dsn = build(recipients=(DELIVERED, DELAYED))
    assert email.message_from_bytes(dsn)["Subject"] == "Delayed Mail (still being retried)"


def test_report_is_a_well_formed_multipart_report() -> None:
    dsn = build(recipients=(FAILED, DELAYED))
    message = email.message_from_bytes(dsn)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(dsn)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert all(not p.defects for p in message.walk())
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert message["To"] == "<alice@example.com>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[^@<>\s]+@relay\.example\.com>", message["Message-ID"])
    assert date_of(message["Date"]) == NOW


def test_every_line_ends_in_crlf() -> None:
    dsn = build(original=ORIGINAL.replace(b"\r\n", b"\n"), ret="FULL")
    assert b"\n" not in dsn.replace(b"\r\n", b"")
    assert b"\r" not in dsn.replace(b"\r\n", b"")
    assert dsn.endswith(b"\r\n")


def test_delivery_status_part_follows_rfc3464_syntax() -> None:
    dsn = build(recipients=(FAILED, DELAYED), envid="ENV-42")
    boundary = email.message_from_bytes(dsn).get_boundary()
    assert boundary is not None
    section = dsn.split(f"--{boundary}".encode())[2]
    _, body = section.split(b"\r\n\r\n", 1)
    groups = body.removesuffix(b"\r\n").split(b"\r\n\r\n")  # one blank line between groups
    assert [g.split(b":", 1)[0] for g in groups] == [
        b"Original-Envelope-Id",
        b"Final-Recipient",
        b"Final-Recipient",
    ]
    assert body.isascii()
    assert all(len(line) <= 78 for line in body.split(b"\r\n"))


@pytest.mark.parametrize(("envid", "present"), [("ENV-42", True), (None, False)])
def test_envid_present_or_absent(envid: str | None, present: bool) -> None:
    per_message, _ = parse_dsn(build(envid=envid))
    assert per_message.get("original-envelope-id") == envid
    assert ("original-envelope-id" in per_message) == present


@pytest.mark.parametrize("orcpt", ["rfc822;Bob@Example.NET", "rfc822;bob+tag2Bx@example.net", None])
def test_orcpt_is_passed_through(orcpt: str | None) -> None:
    recipient = replace(FAILED, original_recipient=orcpt)
    _, [fields] = parse_dsn(build(recipients=(recipient,)))
    assert fields.get("original-recipient") == orcpt


def test_ret_full_returns_the_whole_original() -> None:
    dsn = build(ret="FULL")
    returned = parts(dsn)[2]
    assert returned.get_content_type() == "message/rfc822"
    [inner] = cast(list[Message], returned.get_payload())
    assert inner["Subject"] == "Quarterly report"
    assert inner.get_payload() == "The body of the message.\r\n"
    assert ORIGINAL in dsn


@pytest.mark.parametrize("ret", ["HDRS", None])
def test_headers_only_returns_the_header_section(ret: str | None) -> None:
    dsn = build(ret=ret)
    returned = parts(dsn)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: Quarterly report\r\n" in dsn
    assert b"The body of the message." not in dsn


def test_oversize_full_returns_headers_and_says_so() -> None:
    dsn = build(ret="FULL", max_full_size=len(ORIGINAL) - 1)
    text, _, returned = parts(dsn)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"The body of the message." not in dsn
    assert f"larger than {len(ORIGINAL) - 1} bytes" in text_of(text)
    # exactly at the limit the whole message still goes back
    assert parts(build(ret="FULL", max_full_size=len(ORIGINAL)))[2].get_content_type() == (
        "message/rfc822"
    )


@pytest.mark.parametrize(("ret", "cte"), [("FULL", "8bit"), ("HDRS", "7bit")])
def test_eight_bit_body_is_returned_verbatim_as_8bit(ret: str, cte: str) -> None:
    original = ORIGINAL.replace(b"The body", "Ünïcödé body".encode())
    dsn = build(original=original, ret=ret)
    message = email.message_from_bytes(dsn)
    assert message["Content-Transfer-Encoding"] == cte
    assert parts(dsn)[2]["Content-Transfer-Encoding"] == cte
    assert (original in dsn) == (ret == "FULL")
    assert [p.get_content_type() for p in parts(dsn)][1] == "message/delivery-status"


def test_eight_bit_headers_only_is_8bit_too() -> None:
    original = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    dsn = build(original=original, ret="HDRS")
    assert parts(dsn)[2]["Content-Transfer-Encoding"] == "8bit"
    assert "Subject: Grüße\r\n".encode() in dsn


def test_plain_ascii_original_is_7bit() -> None:
    message = email.message_from_bytes(build(ret="FULL"))
    assert message["Content-Transfer-Encoding"] == "7bit"


def test_boundary_never_occurs_in_the_content() -> None:
    first = email.message_from_bytes(build(ret="FULL")).get_boundary()
    original = ORIGINAL + f"--{first}\r\nA line that looks like a boundary.\r\n".encode()
    dsn = build(ret="FULL", original=original)
    second = email.message_from_bytes(dsn).get_boundary()
    assert second != first
    assert original in dsn
    assert len(parts(dsn)) == 3


def test_build_is_deterministic_and_varies_with_time() -> None:
    assert build() == build()
    later = build_dsn(REQUEST, now=NOW + 1, message_id_domain="relay.example.com")
    ids = {email.message_from_bytes(d)["Message-ID"] for d in (build(), later)}
    assert len(ids) == 2


def test_human_text_names_the_server_reply_and_gives_advice() -> None:
    text = text_of(parts(build(recipients=(FAILED, DELAYED)))[0])
    assert "This is the mail system at host relay.example.com." in text
    assert "The mail server mx.example.net said: 550 5.1.1 <bob@example.net>:" in text
    assert "typos" in text  # advice for 5.1.1
    # our own diagnostic is not attributed to a remote server
    assert "Reason: 451 4.4.1 connection refused" in text
    assert "keep trying until" in text
    assert all(len(line) <= 78 for line in text.split("\r\n"))


def test_non_ascii_diagnostic_and_address_stay_ascii_in_the_report() -> None:
    recipient = replace(
        FAILED,
        final_recipient="josé@exämple.net",
        diagnostic=Reply(550, "5.1.1", "Boîte inconnue"),
    )
    dsn = build(recipients=(recipient,))
    _, [fields] = parse_dsn(dsn)
    # RFC 6533 §3 utf-8 address type with \x{HEX} escapes
    assert fields["final-recipient"] == r"utf-8; jos\x{E9}@ex\x{E4}mple.net"
    assert fields["diagnostic-code"] == "smtp; 550 5.1.1 Bo?te inconnue"
    text = parts(dsn)[0]
    assert text.get_content_charset() == "utf-8"
    assert "Boîte inconnue" in text_of(text)


def test_caller_text_cannot_inject_headers() -> None:
    dsn = build(
        envid="env\r\nBcc: victim@example.com",
        recipients=(replace(FAILED, original_recipient="rfc822;x\r\nX-Evil: 1"),),
        bounce_from="MAILER-DAEMON@relay.example.com\r\nX-Evil: 1",
    )
    assert not re.search(rb"^(Bcc|X-Evil):", dsn, re.MULTILINE)
    per_message, [fields] = parse_dsn(dsn)
    assert per_message["original-envelope-id"] == "env Bcc: victim@example.com"
    assert fields["original-recipient"] == "rfc822;x X-Evil: 1"


def test_bounce_from_keeps_a_configured_display_name() -> None:
    dsn = build(bounce_from="Example Postmaster <postmaster@example.com>")
    assert email.message_from_bytes(dsn)["From"] == "Example Postmaster <postmaster@example.com>"


@pytest.mark.parametrize("sender", ["", "<>"])
def test_build_refuses_the_null_sender(sender: str) -> None:
    with pytest.raises(ValueError):
        build(original_sender=sender)


def test_parse_dsn_rejects_a_message_without_a_report() -> None:
    with pytest.raises(ValueError):
        parse_dsn(ORIGINAL)


@pytest.mark.parametrize(
    ("notify", "action", "expected"),
    [
        (None, "failed", True),  # RFC 3461 §4.1 default: FAILURE,DELAY
        (None, "delayed", True),
        (None, "delivered", False),
        ("NEVER", "failed", False),
        ("NEVER", "delayed", False),
        ("never", "delivered", False),
        ("SUCCESS", "delivered", True),
        ("SUCCESS", "relayed", True),
        ("SUCCESS", "expanded", True),
        ("SUCCESS", "failed", False),
        ("FAILURE", "failed", True),
        ("FAILURE", "delayed", False),
        ("DELAY", "delayed", True),
        ("DELAY", "failed", False),
        ("success,failure", "failed", True),
        ("SUCCESS, DELAY", "delayed", True),
        ("SUCCESS,DELAY", "failed", False),
    ],
)
def test_needs_dsn(notify: str | None, action: str, expected: bool) -> None:
    assert needs_dsn(notify, action) is expected


@pytest.mark.parametrize(
    ("notify", "action"),
    [("NEVER,SUCCESS", "failed"), ("BOGUS", "failed"), ("", "failed"), (None, "bounced")],
)
def test_needs_dsn_rejects_bad_values(notify: str | None, action: str) -> None:
    with pytest.raises(ValueError):
        needs_dsn(notify, action)


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("", True),
        ("<>", True),
        ("alice@example.com", False),
        ("MAILER-DAEMON@example.com", False),  # a real mailbox: see never_bounce
        ("postmaster@example.com", False),
    ],
)
def test_never_bounce(sender: str, expected: bool) -> None:
    assert never_bounce(sender) is expected


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "bounced"},
        {"status": "5.1"},
        {"status": "3.0.0"},
        {"status": "5.1.1 "},
        {"will_retry_until": NOW},  # only for "delayed"
    ],
)
def test_recipient_rejects_nonsense(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(FAILED, **changes)


@pytest.mark.parametrize("changes", [{"recipients": ()}, {"ret": "BOTH"}])
def test_request_rejects_nonsense(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(REQUEST, **changes)
