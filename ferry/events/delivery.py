"""Events of delivery: routes, connections, smart hosts, DKIM, outcomes and DSNs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from ferry.envelope import Reply, Status
from ferry.events.base import Event, cut

# -- routes and connections -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteInvalid(Event):
    """A message's own route (set by a hook) does not parse: the configured routes apply."""

    name = "route_invalid"
    level = logging.WARNING
    domain: str
    route: str


@dataclass(frozen=True, slots=True)
class RouteFallback(Event):
    """The MX lookup for ``domain`` failed and its route goes on without MX hops."""

    name = "route"
    domain: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class HopFallback(Event):
    """A recipient moves to the route's next hop within the same attempt."""

    name = "fallback"
    queue_id: str
    recipient: str
    route: str
    reply: Reply
    next_hop: str
    reason: str | None

    def log_fields(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "rcpt": self.recipient,
            "route": self.route,
            "reply": cut(self.reply, 200),
            "next": self.next_hop,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Throttled(Event):
    """A destination signalled overload: its connections pause for ``pause`` seconds."""

    name = "throttled"
    level = logging.WARNING
    destination: str
    pause: float
    connections: int

    def log_fields(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "pause": round(self.pause, 1),
            "connections": self.connections,
        }


@dataclass(frozen=True, slots=True)
class ConnectFailed(Event):
    """A connection to a next hop failed (``host`` is ``name[ip]``, with ``:port`` from
    the engine). ``stage`` and ``kind`` are None from the seed's direct service."""

    name = "connect_failed"
    host: str
    reply: Reply
    stage: str | None = None
    kind: str | None = None
    #: The queue IDs waiting on this connection (up to ten, comma-separated).
    ids: str | None = None

    def log_fields(self) -> dict[str, Any]:
        if self.stage is None and self.kind is None:
            return {"host": self.host, "reply": cut(self.reply, 300)}
        return {
            "ids": self.ids,
            "host": self.host,
            "stage": self.stage,
            "kind": self.kind,
            "reply": cut(self.reply, 300),
        }


@dataclass(frozen=True, slots=True)
class TlsFallback(Event):
    """STARTTLS to a host failed: it is retried in clear (opportunistic TLS).

    ``reply`` is what failed (None from the seed's direct service)."""

    name = "tls_fallback"
    host: str
    reply: Reply | None = None

    def log_level(self) -> int:
        return logging.INFO if self.reply is None else logging.WARNING

    def log_fields(self) -> dict[str, Any]:
        if self.reply is None:
            return {"host": self.host}
        return {"host": self.host, "reason": cut(self.reply.text, 200)}


@dataclass(frozen=True, slots=True)
class SmartHostFailed(Event):
    """A session with a smart host failed (``stage``, ``kind``); the next one is tried."""

    name = "smarthost_failed"
    level = logging.WARNING
    host: str
    remote: str
    stage: str
    kind: str
    reply: Reply
    ids: str | None = None  # the queue IDs waiting on this session

    def log_fields(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ids": self.ids,
            "remote": self.remote,
            "stage": self.stage,
            "kind": self.kind,
            "reply": cut(self.reply, 300),
        }


@dataclass(frozen=True, slots=True)
class SmartHostUnusable(Event):
    """A smart host cannot be used at all (its credentials cannot be read)."""

    name = "smarthost_failed"
    level = logging.ERROR
    host: str
    reason: str
    ids: str | None = None  # the queue IDs waiting on this session


# -- DKIM ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimSigned(Event):
    """The seed API signed a message for ``domain`` (the engine only counts signatures)."""

    name = "dkim_signed"
    domain: str | None
    selectors: tuple[str, ...]

    def log_fields(self) -> dict[str, Any]:
        return {"domain": self.domain, "selectors": ",".join(self.selectors)}


@dataclass(frozen=True, slots=True)
class DkimUnsigned(Event):
    """A message leaves unsigned. ``required``: its domain requires a signature (the
    message is deferred); ``failed``: signing raised (the seed API sends it unsigned)."""

    name = "dkim_unsigned"
    reason: str | None
    queue_id: str | None = None
    domain: str | None = None
    required: bool | None = None
    failed: bool = False

    def log_level(self) -> int:
        return logging.WARNING if self.required or self.failed else logging.INFO

    def log_fields(self) -> dict[str, Any]:
        if self.queue_id is not None:  # the engine
            return {"id": self.queue_id, "reason": self.reason, "required": self.required}
        if self.failed:
            return {"reason": self.reason}
        return {"domain": self.domain, "reason": self.reason}


# -- outcomes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipientOutcome(Event):
    """One recipient's outcome of one attempt: Delivered, Deferred, Failed or Expired.

    ``next_hop`` is the server that answered (``mx1.example.com[192.0.2.1]:25``), None
    when none did; ``reply`` is its whole reply (or Ferry's own, when none answered);
    ``delay`` the seconds since the message arrived; ``retry_in`` the seconds until the
    next attempt (Deferred only).
    """

    status: ClassVar[Status]
    queue_id: str
    recipient: str
    route: str
    next_hop: str | None
    tls: str | None
    reply: Reply
    attempt: int
    delay: float
    retry_in: float | None = None
    #: The outbound SMTP connection's session ID (one per connection, in every line).
    session: str | None = None

    def log_fields(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "rcpt": self.recipient,
            "status": self.status.value,
            "route": self.route,
            "relay": self.next_hop or "none",
            "session": self.session,
            "tls": self.tls,
            "reply": cut(self.reply, 300),
            "attempt": self.attempt,
            "delay": round(self.delay, 3),
            "next": round(self.retry_in, 1) if self.retry_in else None,
        }


@dataclass(frozen=True, slots=True)
class Delivered(RecipientOutcome):
    """The recipient's server (or smart host) accepted the message."""

    name = "delivery"
    status = Status.DELIVERED


@dataclass(frozen=True, slots=True)
class Deferred(RecipientOutcome):
    """A temporary failure: the recipient will be retried in ``retry_in`` seconds."""

    name = "delivery"
    status = Status.DEFERRED


@dataclass(frozen=True, slots=True)
class Failed(RecipientOutcome):
    """A permanent failure: the recipient is given up on (a DSN follows)."""

    name = "delivery"
    status = Status.FAILED


@dataclass(frozen=True, slots=True)
class Expired(RecipientOutcome):
    """A temporary failure after the message's lifetime or retries ran out (a DSN follows)."""

    name = "delivery"
    status = Status.EXPIRED


_OUTCOMES: dict[Status, type[RecipientOutcome]] = {
    Status.DELIVERED: Delivered,
    Status.DEFERRED: Deferred,
    Status.FAILED: Failed,
    Status.EXPIRED: Expired,
}


def outcome_event(
    status: Status,
    *,
    queue_id: str,
    recipient: str,
    route: str,
    next_hop: str | None,
    tls: str | None,
    reply: Reply,
    attempt: int,
    delay: float,
    retry_in: float | None = None,
    session: str | None = None,
) -> RecipientOutcome:
    """The outcome event for ``status`` (Delivered, Deferred, Failed or Expired)."""
    return _OUTCOMES[status](
        queue_id, recipient, route, next_hop, tls, reply, attempt, delay, retry_in, session
    )


@dataclass(frozen=True, slots=True)
class DirectDelivery(Event):
    """One recipient's attempt by the seed API's direct service (no queue: no id)."""

    name = "direct_delivery"
    recipient: str
    status: Status
    next_hop: str | None
    tls: str | None
    reply: Reply
    attempt: int

    def log_fields(self) -> dict[str, Any]:
        return {
            "rcpt": self.recipient,
            "status": self.status.value,
            "relay": self.next_hop or "none",
            "tls": self.tls,
            "reply": cut(self.reply, 300),
            "attempt": self.attempt,
        }


@dataclass(frozen=True, slots=True)
class DirectRateLimited(Event):
    """The seed API's direct service waits ``wait`` seconds before connecting to ``domain``."""

    name = "direct_rate_limited"
    domain: str
    wait: float

    def log_fields(self) -> dict[str, Any]:
        return {"domain": self.domain, "wait": round(self.wait, 3)}


# -- DSNs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DsnQueued(Event):
    """A DSN (RFC 3464) about message ``about`` is queued as message ``queue_id``.

    ``action`` (RFC 3464 §2.3.3) ``failed`` is a bounce, ``delayed`` a delay warning,
    ``relayed`` a notice that the message went on to a server that does not speak DSN.
    """

    name = "dsn"
    queue_id: str
    about: str
    to: str
    action: str
    recipients: tuple[str, ...]

    def log_fields(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "about": self.about,
            "to": self.to,
            "action": self.action,
            "rcpts": len(self.recipients),
        }


@dataclass(frozen=True, slots=True)
class DsnDropped(Event):
    """A postmaster notice about a double bounce failed too: it is dropped, never bounced
    (RFC 5321 §4.5.5); the failed DSN stays in the queue's history."""

    name = "dsn_dropped"
    level = logging.WARNING
    queue_id: str
    recipient: str
    reply: Reply | None

    def log_fields(self) -> dict[str, Any]:
        return {"id": self.queue_id, "rcpt": self.recipient, "reply": cut(self.reply, 300)}


# -- smart hosts and smart mode ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmartHostState(Event):
    """A smart host's circuit breaker changed state: ``open`` (out of rotation for
    ``cooldown`` seconds after ``error``), ``half_open`` (cool-down over: one probe),
    ``closed`` (recovered, back in rotation)."""

    name = "smarthost_state"
    logger = "ferry.delivery.smarthosts"
    host: str
    state: str
    cooldown: float | None = None
    error: str | None = None

    def log_level(self) -> int:
        return logging.WARNING if self.state == "open" else logging.INFO

    def log_message(self) -> str:
        # The sentence these lines have always been (operators grep for it).
        if self.state == "open":
            return (
                f"smart host {self.host}: circuit open for {self.cooldown or 0.0:.0f}s"
                f" after {self.error}"
            )
        if self.state == "half_open":
            return f"smart host {self.host}: cool-down over, probing"
        return f"smart host {self.host}: recovered, back in rotation"

    def log_fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class SmartRouteSwitched(Event):
    """Smart mode switched a destination group between ``direct`` and ``relay``."""

    name = "smart_routing"
    logger = "ferry.delivery.smart_mode"
    group: str
    choice: str
    reason: str

    def log_message(self) -> str:
        return f"smart routing: {self.group} -> {self.choice}: {self.reason}"

    def log_fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class GaveUp(Event):
    """A recipient's time ran out: ``reason`` is ``lifetime`` (``message_lifetime``) or
    ``max_retries``; ``age`` is seconds since arrival (an Expired outcome and DSN follow)."""

    name = "expired"
    level = logging.WARNING
    queue_id: str
    recipient: str
    reason: str
    attempts: int
    age: float

    def log_fields(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "rcpt": self.recipient,
            "reason": self.reason,
            "attempts": self.attempts,
            "age": round(self.age, 3),
        }


@dataclass(frozen=True, slots=True)
class DoubleBounce(Event):
    """A DSN (to the null sender ``<>``) could not be delivered: a notice about message
    ``about`` goes to ``delivery.postmaster`` as message ``queue_id`` (never bounced)."""

    name = "double_bounce"
    level = logging.WARNING
    queue_id: str
    about: str
    to: str
    recipients: int
    reply: Reply | None

    def log_fields(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "about": self.about,
            "to": self.to,
            "rcpts": self.recipients,
            "reply": cut(self.reply, 300) if self.reply else None,
        }


@dataclass(frozen=True, slots=True)
class ConnectionOpened(Event):
    """An outbound SMTP session is ready (greeting, EHLO, TLS, AUTH done) to ``host``;
    ``group`` is the smart host's name, or ``mx`` for direct delivery."""

    name = "connection_opened"
    level = logging.DEBUG
    host: str
    group: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """An outbound SMTP session opened earlier is closed (after QUIT, idle or lost)."""

    name = "connection_closed"
    level = logging.DEBUG
    host: str
    group: str


@dataclass(frozen=True, slots=True)
class TransactionDone(Event):
    """One mail transaction (MAIL FROM to the reply to the final dot) took ``seconds``
    on a connection to ``host`` for ``recipients`` recipients."""

    name = "transaction"
    level = logging.DEBUG
    host: str
    group: str
    seconds: float
    recipients: int
