"""RFC 3464 delivery status notifications: values in, bytes out (pure).

:func:`build_dsn` writes the whole report message (RFC 6522 multipart/report)
by hand rather than through ``email.generator``, because the delivery-status
part has a strict line syntax (RFC 3464 §2) and the returned original must go
out byte for byte. :func:`parse_dsn` reads one back, for tests and for
reading reports that other servers send us.

The caller sends the result with the null reverse-path ``<>`` (RFC 5321
§4.5.5, RFC 3461 §6.1) so that a report about a report cannot loop, and
with BODY=8BITMIME when it contains 8-bit bytes (see :func:`build_dsn`).
"""

from __future__ import annotations

import email
import hashlib
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.utils import format_datetime, formataddr, parseaddr
from typing import Literal

from ferry.envelope import Reply, parse_notify

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

# RFC 3461 §4.1 NOTIFY keywords, by the DSN action each one asks to hear about.
_NOTIFY_FOR_ACTION: dict[str, str] = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def needs_dsn(notify: str | None, action: str) -> bool:
    """Whether a recipient with this NOTIFY value should get a DSN for ``action``.

    failed → FAILURE, delayed → DELAY, delivered/relayed/expanded → SUCCESS
    (RFC 3461 §4.1; the actions are defined in RFC 3464 §2.3.3, where
    "relayed" means handed to a server that will not send DSNs itself).
    """
    try:
        keyword = _NOTIFY_FOR_ACTION[action]
    except KeyError:
        raise ValueError(f"unknown DSN action {action!r}") from None
    return keyword in parse_notify(notify)


def never_bounce(sender: str) -> bool:
    """True when no DSN may be sent to ``sender``.

    Only the null reverse-path qualifies (RFC 5321 §4.5.5): DSNs
    themselves are sent from it, so this alone stops report loops. We do not
    also suppress "MAILER-DAEMON@..."-style senders as some MTAs do: that is
    a guess which silently loses reports to real mailboxes, and our own DSNs
    never use such an envelope sender.
    """
    return sender.strip() in ("", "<>")


@dataclass(frozen=True)
class DsnRecipient:
    """One recipient's block in a DSN (RFC 3464 §2.3).

    ``original_recipient`` is the ORCPT parameter as given ("rfc822;a@b");
    ``diagnostic`` is the last reply from the remote MTA, written as
    ``Diagnostic-Code: <diagnostic_type>; <reply>``. Use a diagnostic_type
    such as "x-ferry" for a reply we made up ourselves (a refused connection),
    since "smtp" claims the remote server said it (RFC 3464 §2.3.6).
    """

    final_recipient: str
    original_recipient: str | None
    action: Action
    status: str
    remote_mta: str | None
    diagnostic: Reply | None
    last_attempt: float | None
    will_retry_until: float | None = None
    diagnostic_type: str = "smtp"
    # An expiry's cause ("lifetime" or "max_retries"), so the text says which limit ran out.
    expiry_reason: str | None = None

    def __post_init__(self) -> None:
        if self.action not in _NOTIFY_FOR_ACTION:
            raise ValueError(f"unknown DSN action {self.action!r}")
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"not an RFC 3463 status code: {self.status!r}")
        # RFC 3464 §2.3.9: Will-Retry-Until belongs to "delayed" reports only.
        if self.will_retry_until is not None and self.action != "delayed":
            raise ValueError("will_retry_until is only meaningful for action 'delayed'")


@dataclass(frozen=True)
class DsnRequest:
    """Everything needed to write one DSN about one queued message.

    ``ret`` is the RFC 3461 §4.3 RET parameter; None returns headers only,
    the safe default. ``original`` is the message as queued; if RET=FULL but
    it is larger than ``max_full_size`` bytes, only its headers are returned
    and the text says so.
    """

    reporting_mta: str
    original_sender: str
    bounce_from: str
    envid: str | None
    arrival: float
    queue_id: str
    recipients: tuple[DsnRecipient, ...]
    ret: Literal["FULL", "HDRS"] | None
    original: bytes
    max_full_size: int = 1_000_000

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("a DSN needs at least one recipient")
        if self.ret not in ("FULL", "HDRS", None):
            raise ValueError(f"bad RET value {self.ret!r}")


# --- building -------------------------------------------------------------

_SUBJECTS = (
    ("failed", "Undelivered Mail Returned to Sender"),
    ("delayed", "Delayed Mail (still being retried)"),
)
_SUCCESS_SUBJECT = "Successful Mail Delivery Report"

# Advice for the sender, by the status code's "subject.detail" (RFC 3463 §3),
# then by subject alone.
_ADVICE = {
    "1.1": "The address does not exist there. Check it for typos.",
    "1.2": "The recipient's domain does not exist. Check the part after the @.",
    "1.10": "The recipient's domain does not accept mail at all (null MX).",
    "2.1": "The recipient's mailbox is disabled and not accepting messages.",
    "2.2": "The recipient's mailbox is full. Try again later or reach them another way.",
    "3.4": "The message is too big for the recipient's server. Send it smaller,"
    " or share large files by link.",
    "4.7": "The message could not be delivered in time and has expired.",
    "1": "There is a problem with the recipient's address.",
    "4": "The recipient's mail server could not be reached.",
    "7": "The recipient's server refused the message by policy. If its reply"
    " mentions a block list or reputation, please tell the postmaster of this"
    " mail system.",
}
# An expiry says which limit ran out (delivery.message_lifetime or delivery.max_retries).
_EXPIRY_ADVICE = {
    "lifetime": "The message could not be delivered before its time in the queue ran out,"
    " and has expired.",
    "max_retries": "The message could not be delivered within the allowed number of delivery"
    " attempts, and has expired.",
}
_DEFAULT_ADVICE = (
    "If the problem persists, contact the postmaster of this mail system and include this report."
)

_CRLF = re.compile(rb"\r\n|\r|\n")


def _date(epoch: float) -> str:
    """An RFC 5322 §3.3 date in UTC ("+0000", not the obsolete "GMT")."""
    return format_datetime(datetime.fromtimestamp(epoch, UTC))


def _one_line(text: str) -> str:
    """Collapse whitespace, so caller-supplied text cannot start a new header line."""
    return " ".join(text.split())


def _ascii(text: str) -> str:
    """One line of printable ASCII: delivery-status fields are US-ASCII (RFC 3464 §2.1.1)."""
    return "".join(c if " " <= c <= "~" else "?" for c in _one_line(text))


def _address_field(address: str) -> str:
    """A Final-Recipient value: "rfc822; a@b", or RFC 6533 §3 "utf-8; " xtext.

    An internationalised address cannot go in a US-ASCII field as is, so it
    uses the utf-8 address type with each non-ASCII (and xtext-special)
    character written as \\x{HEX}, which is the form RFC 6533 allows in a
    plain message/delivery-status.
    """
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in address
    )


def _fold(name: str, value: str) -> str:
    """``name: value`` folded at spaces to lines of about 78 characters (RFC 5322 §2.2.3)."""
    lines: list[str] = []
    line = f"{name}:"
    for i, word in enumerate(value.split(" ")):
        if i and len(line) + 1 + len(word) > 78:
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    return "\r\n".join(lines)


def _reply_text(reply: Reply) -> str:
    """A reply on one line, as "550 5.1.1 User unknown"."""
    parts = [str(reply.code), reply.enhanced or "", " ".join(reply.text.split("\n"))]
    return _one_line(" ".join(parts))


def _status_part(req: DsnRequest) -> str:
    """The message/delivery-status body, exactly per RFC 3464 §2."""
    # §2.2: the per-message fields, in the grammar's order.
    groups = [
        [
            *([f"Original-Envelope-Id: {_ascii(req.envid)}"] if req.envid else []),
            f"Reporting-MTA: dns; {_ascii(req.reporting_mta)}",
            f"Arrival-Date: {_date(req.arrival)}",
            # §2.4 extension field: lets a postmaster find the message in our logs.
            f"X-Ferry-Queue-ID: {_ascii(req.queue_id)}",
        ]
    ]
    for r in req.recipients:  # §2.3: one group per recipient, in the grammar's order
        group = []
        if r.original_recipient:
            group.append(f"Original-Recipient: {_ascii(r.original_recipient)}")
        group += [
            f"Final-Recipient: {_address_field(r.final_recipient)}",
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            group.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")
        if r.diagnostic:
            value = f"{_ascii(r.diagnostic_type)}; {_ascii(_reply_text(r.diagnostic))}"
            group.append(_fold("Diagnostic-Code", value))
        if r.last_attempt is not None:
            group.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.will_retry_until is not None:
            group.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
        groups.append(group)
    # §2.1: groups are separated by a blank line; every field ends in CRLF.
    return "\r\n".join("".join(f"{field}\r\n" for field in g) for g in groups)


def _advice(r: DsnRecipient) -> str | None:
    if r.action == "delayed":
        until = f" until {_date(r.will_retry_until)}" if r.will_retry_until else ""
        return f"No action is needed: we will keep trying{until}."
    if r.action != "failed":
        return None
    _, subject, detail = r.status.split(".")
    if r.expiry_reason in _EXPIRY_ADVICE:
        return _EXPIRY_ADVICE[r.expiry_reason]
    return _ADVICE.get(f"{subject}.{detail}") or _ADVICE.get(subject) or _DEFAULT_ADVICE


def _text_part(req: DsnRequest, returned: str) -> str:
    """The human-readable first part: what happened, and what the sender can do."""
    actions = {r.action for r in req.recipients}
    out = [f"This is the mail system at host {req.reporting_mta}.", ""]
    if "failed" in actions:
        out += [
            "I'm sorry to have to tell you that your message could not be delivered"
            " to one or more recipients.",
            "",
        ]
    if "delayed" in actions:
        out += [
            "Your message has not yet been delivered to one or more recipients."
            " This is only a warning: you do not need to send it again.",
            "",
        ]
    if actions & {"delivered", "relayed", "expanded"}:
        out += ["Your message was delivered to one or more of the recipients below.", ""]
    out += [returned, ""]
    verbs = {
        "failed": "delivery failed",
        "delayed": "delivery delayed",
        "delivered": "delivered",
        "relayed": "passed on to a server that will not send further reports",
        "expanded": "delivered and forwarded to further addresses",
    }
    for r in req.recipients:
        out.append(f"<{r.final_recipient}>: {verbs[r.action]} (status {r.status})")
        if r.diagnostic:
            who = r.remote_mta if r.remote_mta and r.diagnostic_type == "smtp" else None
            said = f"The mail server {who} said" if who else "Reason"
            out.append(f"    {said}: {_reply_text(r.diagnostic)}")
        elif r.remote_mta:
            out.append(f"    Mail server: {r.remote_mta}")
        advice = _advice(r)
        if advice:
            out.append(f"    {advice}")
        out.append("")
    # Wrap to RFC 5322 §2.1.1's recommended 78 characters, keeping each
    # line's indent; a multi-line remote reply can otherwise run to kilobytes.
    wrapped: list[str] = []
    for line in out:
        indent = line[: len(line) - len(line.lstrip())]
        wrapped += textwrap.wrap(
            line.replace("\r", " ").replace("\n", " "),
            76,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        ) or [""]
    return "\r\n".join(wrapped)


def _header_section(message: bytes) -> bytes:
    """The header section of a message, through its last header line's CRLF."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def _cte(data: bytes) -> str:
    return "7bit" if data.isascii() else "8bit"


def _subject(req: DsnRequest) -> str:
    actions = {r.action for r in req.recipients}
    return next((s for a, s in _SUBJECTS if a in actions), _SUCCESS_SUBJECT)


def build_dsn(req: DsnRequest, *, now: float, message_id_domain: str) -> bytes:
    """Write the DSN for ``req`` as a complete RFC 5322 message with CRLF line endings.

    A multipart/report (RFC 6522) of three parts: a text/plain explanation,
    the message/delivery-status (RFC 3464 §2), and the original, either whole
    as message/rfc822 (RET=FULL and not over ``max_full_size``) or its header
    section as text/rfc822-headers (RFC 6522 §4). An original with 8-bit
    bytes is returned unaltered under Content-Transfer-Encoding 8bit (allowed
    for message/rfc822 by RFC 2046 §5.2.1): re-encoding it would break the
    sender's DKIM signature and could not be undone for an SMTPUTF8 message.
    The top level then also says 8bit and the caller must send with
    BODY=8BITMIME (RFC 6152). The subject reflects the gravest action:
    failed, then delayed, then success.

    Deterministic: the Message-ID and MIME boundary are derived from the
    inputs, so equal inputs give equal bytes. Raises ValueError when the
    sender is one that must never get a report (:func:`never_bounce`).
    """
    if never_bounce(req.original_sender):
        raise ValueError("never send a DSN to the null reverse-path (RFC 5321 §4.5.5)")
    original = _CRLF.sub(b"\r\n", req.original)
    full = req.ret == "FULL" and len(original) <= req.max_full_size
    if full:
        returned_note = "Your message is attached below."
        part3 = original
        part3_headers = "Content-Type: message/rfc822\r\nContent-Description: Original message"
    else:
        part3 = _header_section(original)
        part3_headers = (
            "Content-Type: text/rfc822-headers\r\nContent-Description: Original message headers"
        )
        returned_note = "The headers of your message are attached below."
        if req.ret == "FULL":
            returned_note = (
                f"Your message was larger than {req.max_full_size} bytes, so only its"
                " headers are attached below."
            )
    text = _text_part(req, returned_note).encode()
    status = _status_part(req).encode("ascii")

    digest = hashlib.sha256(
        repr((req.queue_id, now, [(r.final_recipient, r.action) for r in req.recipients])).encode()
    ).hexdigest()
    body_parts = (text, status, part3)
    boundary = f"=_ferry_{digest[:24]}"
    salt = 0
    while any(boundary.encode() in p for p in body_parts):  # RFC 2046 §5.1.1
        salt += 1
        boundary = f"=_ferry_{hashlib.sha256(f'{digest}{salt}'.encode()).hexdigest()[:24]}"

    name, address = parseaddr(_one_line(req.bounce_from))
    queue_token = re.sub(r"[^A-Za-z0-9.-]", "", req.queue_id) or "q"
    headers = [
        f"From: {formataddr((name or 'Mail Delivery System', address or req.bounce_from))}",
        f"To: <{_one_line(req.original_sender)}>",
        f"Subject: {_subject(req)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_token}.{digest[:16]}@{_one_line(message_id_domain)}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {_cte(text + part3)}",
    ]
    text_headers = (
        f"Content-Type: text/plain; charset={'us-ascii' if text.isascii() else 'utf-8'}\r\n"
        f"Content-Description: Notification\r\nContent-Transfer-Encoding: {_cte(text)}"
    )
    sections = (
        (text_headers, text),
        ("Content-Type: message/delivery-status\r\nContent-Description: Delivery report", status),
        (f"{part3_headers}\r\nContent-Transfer-Encoding: {_cte(part3)}", part3),
    )
    out = [("\r\n".join(headers) + "\r\n\r\n").encode()]
    out.append(b"This is a MIME-encapsulated message (a delivery status notification).\r\n")
    for part_headers, content in sections:
        out.append(f"\r\n--{boundary}\r\n{part_headers}\r\n\r\n".encode() + content)
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out)


# --- parsing --------------------------------------------------------------


def _fields(block: Message) -> dict[str, str]:
    # Unfold (RFC 5322 §2.2.3: remove the CRLF, keep the whitespace).
    return {k.lower(): re.sub(r"\r?\n(?=[ \t])", "", v).strip() for k, v in block.items()}


def parse_dsn(data: bytes) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Read the delivery-status part of a DSN: (per-message fields, per-recipient fields).

    Field names are lower-cased ("status", "final-recipient") and values
    unfolded and stripped. Raises ValueError if there is no
    message/delivery-status part (the stdlib parser splits its groups).
    """
    message = email.message_from_bytes(data)
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            payload = part.get_payload()
            blocks = (
                [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []
            )
            if blocks:
                return _fields(blocks[0]), [_fields(b) for b in blocks[1:]]
    raise ValueError("no delivery-status part in this message")
