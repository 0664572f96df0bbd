"""Events of intake: listeners, SMTP sessions, authentication, messages accepted or refused."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ferry.envelope import Priority, Reply
from ferry.events.base import Event, cut


@dataclass(frozen=True, slots=True)
class Listening(Event):
    """A listener is open (at start, once per address and port)."""

    name = "listen"
    address: str
    port: int
    mode: str


@dataclass(frozen=True, slots=True)
class OnConnection(Event):
    """Events about one SMTP connection: the line starts with the connection's ``session``
    ID (every such event has a ``session`` field), then the event's own fields."""

    def log_fields(self) -> dict[str, Any]:
        return {"session": getattr(self, "session", None), **self.line_fields()}

    def line_fields(self) -> dict[str, Any]:
        """The line's fields after ``session``: by default every other field."""
        return {k: v for k, v in Event.log_fields(self).items() if k != "session"}


@dataclass(frozen=True, slots=True)
class Connected(OnConnection):
    """An SMTP client connected and is greeted."""

    name = "connect"
    client: str
    mode: str
    tls: str | None
    session: str | None = None  # the SMTP connection's session ID


@dataclass(frozen=True, slots=True)
class Disconnected(OnConnection):
    """An SMTP client's connection closed."""

    name = "disconnect"
    level = logging.DEBUG
    client: str
    session: str | None = None  # the SMTP connection's session ID


@dataclass(frozen=True, slots=True)
class ConnectionRejected(OnConnection):
    """A connection is refused or closed with ``code`` (too many connections or errors)."""

    name = "reject"
    client: str
    code: int
    reason: str
    session: str | None = None  # the SMTP connection's session ID


@dataclass(frozen=True, slots=True)
class Rejected(OnConnection):
    """A command was refused with ``reply`` (relay denied, unknown user, too big ...)."""

    name = "reject"
    client: str
    reply: Reply
    command: str | None = None
    rcpt: str | None = None
    size: int | None = None
    error: str | None = None
    session: str | None = None  # the SMTP connection's session ID

    def line_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "client": self.client,
            "code": self.reply.code,
            "status": self.reply.enhanced,
            "reason": self.reply.text,
        }
        for key in ("command", "rcpt", "size", "error"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class TlsStarted(OnConnection):
    """STARTTLS succeeded; ``tls`` is the protocol and cipher."""

    name = "tls"
    client: str
    tls: str | None
    session: str | None = None  # the SMTP connection's session ID


@dataclass(frozen=True, slots=True)
class TlsFailed(OnConnection):
    """A STARTTLS handshake with a client failed."""

    name = "tls_failed"
    level = logging.WARNING
    client: str
    error: str
    session: str | None = None  # the SMTP connection's session ID

    def line_fields(self) -> dict[str, Any]:
        return {"client": self.client, "error": cut(self.error, 200)}


@dataclass(frozen=True, slots=True)
class AuthSucceeded(OnConnection):
    """A client authenticated as ``user``."""

    name = "auth"
    client: str
    user: str
    mechanism: str
    session: str | None = None  # the SMTP connection's session ID

    def line_fields(self) -> dict[str, Any]:
        return {
            **OnConnection.line_fields(self),
            "result": "ok",
        }


@dataclass(frozen=True, slots=True)
class AuthFailed(OnConnection):
    """An authentication failed; ``failures`` counts this client's recent failures."""

    name = "auth"
    level = logging.WARNING
    client: str
    user: str
    mechanism: str
    failures: int
    session: str | None = None  # the SMTP connection's session ID

    def line_fields(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "user": cut(self.user, 64),
            "mechanism": self.mechanism,
            "result": "fail",
            "failures": self.failures,
        }


@dataclass(frozen=True, slots=True)
class Accepted(Event):
    """A message is durably queued (the 250, or :meth:`ferry.Relay.submit` returning).

    ``client`` is the SMTP client's address, or ``"api"`` for the Python API.
    """

    name = "accept"
    queue_id: str
    client: str
    sender: str
    recipients: tuple[str, ...]
    size: int
    priority: Priority
    user: str | None = None
    tls: str | None = None
    message_id: str | None = None  # the message's Message-ID header, if any
    session: str | None = None  # the SMTP connection's session ID

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.queue_id,
            "message_id": self.message_id,
            "client": self.client,
            "sender": self.sender or "<>",
            "rcpts": len(self.recipients),
            "size": self.size,
            "priority": self.priority.name.lower(),
        }
        if self.client != "api":  # no SMTP session behind an API submission
            out["user"] = self.user
            out["tls"] = self.tls
            out["session"] = self.session
        return out
