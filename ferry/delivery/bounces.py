"""From delivery outcomes to DSN messages ready to queue (the Postfix ``bounce`` role).

Two rules beyond building the report:

- A DSN that is itself undeliverable (a message from ``<>`` failed) is a *double
  bounce*. As Postfix does, it becomes a notice to the postmaster
  (``delivery.postmaster``) with the failed report attached; the notice is marked so that
  its own failure is dropped, never bounced again (RFC 5321 §4.5.5: no loops).
- A report about an internationalised message (RFC 6531) to an ASCII address is written
  so that it needs neither SMTPUTF8 nor 8BITMIME (RFC 6533): the returned original is
  typed message/global-headers or message/global and every 8-bit part is base64, which
  RFC 6532 §3.5/§3.7 allows for those types. A report to a UTF-8 address cannot avoid
  SMTPUTF8 (its envelope needs it) and stays as built.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from ferry.delivery.dsn import Action, DsnRecipient, DsnRequest, build_dsn, needs_dsn, never_bounce
from ferry.delivery.outcomes import enhanced_from_reply
from ferry.envelope import EnvelopeIn, Priority, RecipientIn, Reply
from ferry.queue.base import MessageInfo, RecipientInfo


@dataclass(frozen=True, slots=True)
class Report:
    """One recipient's line in a DSN-to-be."""

    recipient: RecipientInfo
    action: Action
    reply: Reply | None
    remote_mta: str | None
    at: float
    synthetic: bool = False  # the reply is ours (refused connection...), not the server's
    status: str | None = None  # overrides the status derived from the reply (e.g. 4.4.7)
    retry_until: float | None = None  # "delayed": the real give-up time (retry.give_up_time)
    expiry_reason: str | None = None  # "failed" by expiry: "lifetime" or "max_retries"


# ``extra`` marker of a postmaster notice about a double bounce: never bounced itself.
NOTICE_KEY = "notice"
DOUBLE_BOUNCE = "double-bounce"


def is_postmaster_notice(message: MessageInfo) -> bool:
    return message.extra.get(NOTICE_KEY) == DOUBLE_BOUNCE


def wanted(report: Report, sender: str) -> bool:
    """Does this recipient's NOTIFY ask for this report, and may we send one?"""
    # RFC 3461 §4.1 and RFC 5321 §4.5.5: never report on a message from <>.
    return not never_bounce(sender) and needs_dsn(report.recipient.notify, report.action)


def dsn_envelope(
    message: MessageInfo,
    original: bytes,
    reports: list[Report],
    *,
    hostname: str,
    bounce_from: str,
    now: float,
) -> EnvelopeIn | None:
    """The DSN message for ``reports`` about ``message``, or None when none is due."""
    chosen = [r for r in reports if wanted(r, message.sender)]
    if not chosen:
        return None
    ret = message.ret if message.ret in ("FULL", "HDRS") else None
    return _report(
        message,
        original,
        _dsn_recipients(chosen, message),
        to=message.sender,
        ret=ret,
        hostname=hostname,
        bounce_from=bounce_from,
        now=now,
    )


def double_bounce_envelope(
    message: MessageInfo,
    original: bytes,
    reports: list[Report],
    *,
    hostname: str,
    bounce_from: str,
    postmaster: str,
    now: float,
) -> EnvelopeIn:
    """The postmaster notice for ``message``, a report from ``<>`` that failed.

    Whatever the failed report's NOTIFY (DSNs go out with NEVER), the postmaster hears
    of it, with the whole failed report attached (it is small: headers of the original).
    """
    envelope = _report(
        message,
        original,
        _dsn_recipients([r for r in reports if r.action == "failed"], message),
        to=postmaster,
        ret="FULL",
        hostname=hostname,
        bounce_from=bounce_from,
        now=now,
        subject="Postmaster Copy: Undeliverable delivery report (double bounce)",
    )
    envelope.extra[NOTICE_KEY] = DOUBLE_BOUNCE
    envelope.extra["about"] = message.id
    return envelope


def _dsn_recipients(chosen: list[Report], message: MessageInfo) -> tuple[DsnRecipient, ...]:
    return tuple(
        DsnRecipient(
            final_recipient=r.recipient.address,
            original_recipient=r.recipient.orcpt,
            action=r.action,
            status=r.status or _status(r),
            remote_mta=r.remote_mta,
            diagnostic=r.reply,
            last_attempt=r.at,
            will_retry_until=(r.retry_until or message.expires) if r.action == "delayed" else None,
            expiry_reason=r.expiry_reason,
            diagnostic_type="x-ferry" if r.synthetic else "smtp",
        )
        for r in chosen
    )


def _report(
    message: MessageInfo,
    original: bytes,
    recipients: tuple[DsnRecipient, ...],
    *,
    to: str,
    ret: str | None,
    hostname: str,
    bounce_from: str,
    now: float,
    subject: str | None = None,
) -> EnvelopeIn:
    data = build_dsn(
        DsnRequest(
            reporting_mta=hostname,
            original_sender=to,
            bounce_from=bounce_from,
            envid=message.envid,
            arrival=message.arrival,
            queue_id=message.id,
            recipients=recipients,
            ret=ret,  # type: ignore[arg-type]
            original=original,
        ),
        now=now,
        message_id_domain=hostname,
    )
    if subject is not None:
        data = _set_subject(data, subject)
    international = (
        message.smtputf8
        or not message.sender.isascii()
        or not all(r.final_recipient.isascii() for r in recipients)
        or not _header_section(original).isascii()
    )
    if to.isascii() and international and not data.isascii():
        data = seven_bit(data)  # RFC 6533: deliverable without SMTPUTF8 where it can be
    return EnvelopeIn(
        sender="",  # RFC 3464 §4 / RFC 5321 §4.5.5: DSNs are sent from the null path
        recipients=[RecipientIn(to, notify="NEVER")],
        data=data,
        priority=Priority.HIGH,
        body_8bit=not data.isascii(),
        smtputf8=not to.isascii(),
    )


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def _set_subject(data: bytes, subject: str) -> bytes:
    """``data`` with the Subject: of its top-level header section replaced."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = [
        b"Subject: " + subject.encode() if line.lower().startswith(b"subject:") else line
        for line in head.split(b"\r\n")
    ]
    return b"\r\n".join(lines) + sep + body


_BOUNDARY = re.compile(rb'boundary="([^"]+)"', re.IGNORECASE)
_CTE = re.compile(rb"^Content-Transfer-Encoding:[^\r]*$", re.IGNORECASE | re.MULTILINE)
# RFC 6533 §6.3 / RFC 6532 §3.7: the types for returned content with UTF-8 headers.
_GLOBAL_TYPES = (
    (b"text/rfc822-headers", b"message/global-headers"),
    (b"message/rfc822", b"message/global"),
)


def seven_bit(report: bytes) -> bytes:
    """A multipart report with 8-bit parts rewritten to 7 bit (RFC 6533, RFC 6532).

    Each part whose content is not ASCII is base64-encoded; returned content typed
    text/rfc822-headers or message/rfc822 becomes message/global-headers or
    message/global (the types for UTF-8 header fields, which unlike their ASCII
    counterparts may carry a content-transfer-encoding: RFC 6532 §3.5). The top-level
    header section must be ASCII (a report to an ASCII address is). Parts that are
    ASCII stay byte for byte.
    """
    head, sep, body = report.partition(b"\r\n\r\n")
    found = _BOUNDARY.search(head)
    if not sep or found is None or not head.isascii():
        raise ValueError("not a multipart message with an ASCII header section")
    delimiter = b"\r\n--" + found.group(1)
    chunks = body.split(delimiter)
    out = [chunks[0]]
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the close delimiter and the epilogue
            out.append(chunk)
            continue
        part_head, part_sep, content = chunk.partition(b"\r\n\r\n")
        if content.isascii() or not part_sep:
            out.append(chunk)
            continue
        for old, new in _GLOBAL_TYPES:
            part_head = re.sub(
                rb"(Content-Type:\s*)" + re.escape(old), rb"\g<1>" + new, part_head, flags=re.I
            )
        part_head = _CTE.sub(b"", part_head).replace(b"\r\n\r\n", b"\r\n").rstrip(b"\r\n")
        encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")  # 76-char lines
        out.append(
            part_head + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded.rstrip(b"\r\n")
        )
    head = _CTE.sub(b"Content-Transfer-Encoding: 7bit", head)
    return head + sep + delimiter.join(out)


def _status(report: Report) -> str:
    if report.reply is not None:
        status = enhanced_from_reply(report.reply)
        if report.action == "failed" and status.startswith("4"):
            return "5" + status[1:]  # a failure reported as final is permanent
        return status
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(report.action, "2.0.0")
