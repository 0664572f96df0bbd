"""Events of the HTTP API and webhooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ferry.events.base import Event


@dataclass(frozen=True, slots=True)
class HttpListening(Event):
    """The HTTP API listens (``listen``: ``host:port``, comma-separated)."""

    name = "http_started"
    listen: str


@dataclass(frozen=True, slots=True)
class HttpAuthFailed(Event):
    """A request was refused for its token: none, unknown, or lacking the scope.

    ``who`` names the token (never its secret) when one was recognised.
    """

    name = "http_auth_failed"
    level = logging.WARNING
    client: str
    path: str
    reason: str
    who: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookRetrying(Event):
    """A webhook endpoint failed; the batch is tried again after ``wait`` seconds."""

    name = "webhook_retry"
    endpoint: str
    error: str
    wait: float


@dataclass(frozen=True, slots=True)
class WebhookFailed(Event):
    """Events an endpoint did not accept within ``retry_for`` were recorded as failed."""

    name = "webhook_failed"
    level = logging.WARNING
    endpoint: str
    events: int
    error: str
