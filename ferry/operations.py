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
from typing import TYPE_CHECKING

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
