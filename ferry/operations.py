"""What operators do to the queue, for every front end (the CLI today, the HTTP API later).

The CLI parses options and prints; this module turns the options into a selection,
applies bulk actions with their operator event, suspends destinations and builds the
DSN a cancelled message's sender gets. One function per act, so `ferry queue hold`
and ``POST /v1/messages/hold`` can never disagree.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ferry.durations import parse_duration
from ferry.envelope import EnvelopeIn, Reply, Status
from ferry.queue.selection import (
    BulkAction,
    BulkResult,
    Selection,
    Suspension,
    normal_domain,
)

if TYPE_CHECKING:
    from ferry.config import RelayConfig
    from ferry.queue.base import MessageInfo
    from ferry.queue.selection import ListedMessage
    from ferry.queue.sqlite import SqliteQueue

#: The reply a cancelled recipient's DSN reports (RFC 3463 X.0.0: other, permanent).
CANCELLED_REPLY = Reply(550, "5.0.0", "Delivery cancelled by the mail system's operator")


def operator_name() -> str:
    """Who is acting: the login behind sudo if any, and the machine."""
    user = os.environ.get("SUDO_USER") or _login()
    return f"{user}@{socket.gethostname()}"


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def selection(
    *,
    status: str | None = None,
    domain: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    older_than: str | None = None,
    newer_than: str | None = None,
    reply: str | None = None,
    ids: tuple[str, ...] = (),
    everything: bool = False,
) -> Selection:
    """A selection from an operator's words; ValueError names the bad one."""
    try:
        st = Status.parse(status) if status else None
    except ValueError as exc:
        raise ValueError(f"--status: {exc}") from None
    ages: dict[str, float | None] = {}
    for name, text in (("older-than", older_than), ("newer-than", newer_than)):
        try:
            ages[name] = parse_duration(text) if text is not None else None
        except ValueError as exc:
            raise ValueError(f"--{name}: {exc}") from None
    return Selection(
        status=st,
        domain=domain,
        sender=sender,
        recipient=recipient,
        older_than=ages["older-than"],
        newer_than=ages["newer-than"],
        reply=reply,
        ids=ids,
        # An explicit status or explicit IDs say what to look at: no implicit filter.
        waiting_only=not (everything or ids or (st is not None and st.is_final)),
    )


def cancel_dsn(
    config: RelayConfig, now: float
) -> Callable[[MessageInfo, bytes], EnvelopeIn | None]:
    """The DSN builder for ``cancel --dsn``: a "failed" report per cancelled recipient
    (NOTIFY and the null sender are honoured by ``dsn_envelope``)."""
    from ferry.delivery.bounces import Report, dsn_envelope

    hostname = config.server.hostname
    bounce_from = config.delivery.bounce_sender or f"MAILER-DAEMON@{hostname}"

    def build(message: MessageInfo, original: bytes) -> EnvelopeIn | None:
        reports = [
            Report(r, "failed", CANCELLED_REPLY, None, now, synthetic=True, status="5.0.0")
            for r in message.recipients
        ]
        return dsn_envelope(
            message, original, reports, hostname=hostname, bounce_from=bounce_from, now=now
        )

    return build


async def bulk(
    queue: SqliteQueue,
    config: RelayConfig,
    action: BulkAction,
    sel: Selection,
    *,
    dsn: bool = False,
    by: str | None = None,
    now: float | None = None,
) -> BulkResult:
    """Apply one bulk action; the queue records the operator event in the same
    transaction, and `ferry serve` writes it to its log."""
    now = time.time() if now is None else now
    who = by or operator_name()
    result = await queue.bulk(
        action,
        sel,
        now=now,
        by=who,
        make_dsn=cancel_dsn(config, now) if dsn and action == "cancel" else None,
        dsn_lifetime=parse_duration(config.delivery.message_lifetime),
    )
    return result


async def suspend(
    queue: SqliteQueue,
    domain: str,
    *,
    duration: str | None = None,
    reason: str = "",
    by: str | None = None,
    now: float | None = None,
) -> Suspension:
    """Pause delivery to ``domain`` (``*`` = all) for ``duration`` (None: until resumed)."""
    now = time.time() if now is None else now
    until = now + parse_duration(duration) if duration else None
    who = by or operator_name()
    await queue.suspend(domain, now=now, until=until, reason=reason, by=who)
    found = [s for s in await queue.suspensions(now=now) if s.domain == normal_domain(domain)]
    return found[0]


async def resume(queue: SqliteQueue, domain: str, *, by: str | None = None) -> bool:
    return await queue.resume(domain, logged_by=by or operator_name())


# -- listings (one JSON shape for `ferry queue list --json` and GET /v1/messages) ------


def iso_time(value: float) -> str:
    """An epoch time as the listings print it (UTC, to the second)."""
    import datetime

    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def gives_up(m: ListedMessage, policy: Any) -> float | None:
    """The message's real give-up time (its last waiting recipient's), as `queue show`
    computes it: ``ferry.delivery.retry.give_up_time``; None when nothing waits."""
    from ferry.delivery.retry import give_up_time

    times = [
        give_up_time(policy, expires=m.expires, attempts=r.attempts, next_attempt=r.next_attempt).at
        for r in m.recipients
        if not r.status.is_final
    ]
    return max(times) if times else None


def listed_json(m: ListedMessage, now: float, policy: Any = None) -> dict[str, Any]:
    until = gives_up(m, policy) if policy is not None else None
    return {
        "id": m.id,
        "status": m.status.value,
        "arrival": iso_time(m.arrival),
        "expires": iso_time(until) if until is not None else None,
        "age_seconds": round(now - m.arrival, 1),
        "size": m.size,
        "sender": m.sender,
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt": iso_time(r.next_attempt) if r.next_attempt else None,
                "last_reply": reply_text(r.last_code, r.last_enhanced, r.last_text),
            }
            for r in m.recipients
        ],
    }


def reply_text(code: int | None, enhanced: str | None, text: str | None) -> str | None:
    if code is None:
        return None
    return " ".join(str(x) for x in (code, enhanced, (text or "").replace("\r\n", " ")) if x)


def message_json(m: MessageInfo, history: bool = False) -> dict[str, Any]:
    """A message as plain data (the shape of every --json output)."""
    return {
        "id": m.id,
        "status": m.status.value,
        "sender": m.sender,
        "size": m.size,
        "priority": m.priority.name.lower(),
        "arrival": iso_time(m.arrival),
        # The real give-up time (issue 11.1): retry.fill_give_up; None once finished.
        "expires": iso_time(m.gives_up) if m.gives_up is not None else None,
        "finished": iso_time(m.finished) if m.finished is not None else None,
        "client_address": m.client_address,
        "client_helo": m.client_helo,
        "auth_user": m.auth_user,
        "envid": m.envid,
        "ret": m.ret,
        "smtputf8": m.smtputf8,
        "recipients": [
            {
                "address": r.address,
                "original_recipient": r.orcpt,
                "notify": r.notify,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt": iso_time(r.next_attempt) if r.next_attempt else None,
                "gives_up": iso_time(r.gives_up) if r.gives_up is not None else None,
                "gives_up_reason": r.gives_up_reason,
                "expiry_reason": r.expiry_reason,
                "last_reply": str(r.last_reply) if r.last_reply else None,
                "route": r.route,
                **(
                    {
                        "history": [
                            {
                                "at": iso_time(a.at),
                                "outcome": a.outcome.value,
                                "next_hop": a.next_hop,
                                "hosts_tried": list(a.tried),
                                "tls": a.tls,
                                "reply": str(a.reply) if a.reply else None,
                            }
                            for a in r.history
                        ]
                    }
                    if history
                    else {}
                ),
            }
            for r in m.recipients
        ],
    }
