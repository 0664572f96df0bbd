"""RFC 3464 DSNs: built, parsed back, and checked as MIME.

What each DSN says is in tests/cases/dsn (one file per request and its rendered parts,
read by test_dsn_case); the tests above it check properties every DSN must have.
"""

from __future__ import annotations

import email
import re
import tomllib
from dataclasses import replace
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path
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
from ferry.delivery.outcomes import parse_reply_text
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


# -- data-driven cases: tests/cases/dsn (see its README) -----------------------------------

DSN_CASES = Path(__file__).parent / "cases" / "dsn"


def _crlf(text: str) -> str:
    return re.sub(r"\r\n|\r|\n", "\r\n", text)


def _wire_reply(text: str) -> Reply:
    """A reply as it came over the wire ("550-..." lines, then "550 ...")."""
    lines = text.strip("\n").split("\n")
    return parse_reply_text(int(lines[0][:3]), [line[4:] for line in lines])


def load_dsn_case(path: Path) -> dict[str, Any]:
    """A case file as build_dsn's arguments (``request``, ``now``, ``message_id_domain``)
    and ``expected``."""
    case = tomllib.loads(path.read_text(encoding="utf-8"))
    fields = dict(case["request"])
    recipients = []
    for given in fields.pop("recipients"):
        r: dict[str, Any] = {"original_recipient": None, "remote_mta": None, "diagnostic": None}
        r |= {"last_attempt": None} | given
        if r["diagnostic"] is not None:
            r["diagnostic"] = _wire_reply(r["diagnostic"])
        recipients.append(DsnRecipient(**r))
    fields["original"] = _crlf(fields["original"]).encode()
    request = DsnRequest(**({"envid": None, "ret": None} | fields), recipients=tuple(recipients))
    return {
        "request": request,
        "now": float(case["now"]),
        "message_id_domain": case["message_id_domain"],
        "expected": case["expected"],
    }


def rendered_parts(dsn: bytes) -> tuple[Message, list[tuple[Message, bytes]]]:
    """The top-level header section, and each MIME part's headers and exact body bytes."""
    top = email.message_from_bytes(dsn)
    boundary = top.get_boundary()
    assert boundary is not None
    chunks = dsn.split(f"\r\n--{boundary}".encode())
    assert chunks[-1] == b"--\r\n"  # the close delimiter ends the message
    out = []
    for chunk in chunks[1:-1]:
        head, body = chunk.removeprefix(b"\r\n").split(b"\r\n\r\n", 1)
        out.append((email.message_from_bytes(head + b"\r\n\r\n"), body))
    return top, out


def _decode(part: Message, body: bytes) -> str:
    return body.decode(part.get_content_charset() or "utf-8").replace("\r\n", "\n")


@pytest.mark.parametrize("path", sorted(DSN_CASES.glob("*.toml")), ids=lambda p: p.stem)
def test_dsn_case(path: Path) -> None:
    """tests/cases/dsn: one file per DSN request, with the parts it must render to."""
    case = load_dsn_case(path)
    request: DsnRequest = case["request"]
    expected: dict[str, Any] = case["expected"]
    if "error" in expected:
        with pytest.raises(ValueError, match=expected["error"]):
            build_dsn(request, now=case["now"], message_id_domain=case["message_id_domain"])
        return
    dsn = build_dsn(request, now=case["now"], message_id_domain=case["message_id_domain"])
    top, parts_ = rendered_parts(dsn)
    assert top["Subject"] == expected["subject"]
    assert top["To"] == f"<{request.original_sender}>"
    assert top["Content-Transfer-Encoding"] == expected.get("transfer_encoding", "7bit")
    [(text_h, text), (_status_h, status), (returned_h, returned)] = parts_
    assert [h.get_content_type() for h, _ in parts_] == [
        "text/plain",
        "message/delivery-status",
        expected["returned_type"],
    ]
    assert _decode(text_h, text) == expected["text"]
    assert text_h.get_content_charset() == ("us-ascii" if text.isascii() else "utf-8")
    assert status.decode("ascii").replace("\r\n", "\n") == expected["delivery_status"]
    # RFC 5322 §2.1.1: lines of at most 78 characters, in both parts we write.
    assert all(len(line) <= 78 for line in (text + status).decode().split("\r\n"))
    original = request.original
    header_section = original.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert returned == (original if expected["returns"] == "full" else header_section)
    assert returned_h["Content-Transfer-Encoding"] == ("7bit" if returned.isascii() else "8bit")
    # What a mail client reads back agrees with what was written (RFC 3464 §2).
    per_message, per_recipient = parse_dsn(dsn)
    assert per_message["reporting-mta"] == f"dns; {request.reporting_mta}"
    assert [r["action"] for r in per_recipient] == [r.action for r in request.recipients]
    assert [r["status"] for r in per_recipient] == [r.status for r in request.recipients]
