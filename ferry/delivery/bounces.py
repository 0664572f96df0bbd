"""From delivery outcomes to DSN messages ready to queue (the Postfix ``bounce`` role)."""

from __future__ import annotations

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
    recipients = tuple(
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
    ret = message.ret if message.ret in ("FULL", "HDRS") else None
    data = build_dsn(
        DsnRequest(
            reporting_mta=hostname,
            original_sender=message.sender,
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
    return EnvelopeIn(
        sender="",  # RFC 3464 §4 / RFC 5321 §4.5.5: DSNs are sent from the null path
        recipients=[RecipientIn(message.sender, notify="NEVER")],
        data=data,
        priority=Priority.HIGH,
        body_8bit=not data.isascii(),
        smtputf8=not message.sender.isascii(),
    )


def _status(report: Report) -> str:
    if report.reply is not None:
        status = enhanced_from_reply(report.reply)
        if report.action == "failed" and status.startswith("4"):
            return "5" + status[1:]  # a failure reported as final is permanent
        return status
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(report.action, "2.0.0")
