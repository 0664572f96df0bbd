"""Ferry: a self-hosted SMTP relay and outbound MTA, usable as a Python library.

::

    import asyncio
    from email.message import EmailMessage
    from ferry import Relay, RelayConfig

    async def main() -> None:
        config = RelayConfig.from_file("ferry.toml")
        async with Relay(config, listen=False) as relay:
            message = EmailMessage()
            message["From"], message["To"] = "me@example.org", "you@example.net"
            message["Subject"] = "Hello"
            message.set_content("Hello from Ferry.")
            results = await relay.send(message)
            print({rcpt: r.status for rcpt, r in results.items()})

    asyncio.run(main())

The names below are imported on first use, so ``import ferry`` is cheap and has no
side effects: it opens no socket, starts no thread and reads no configuration.

- :class:`Relay` -- the whole service in-process (listeners, queue, delivery, hooks);
  :class:`DeliveryResult`, :class:`IncomingMessage`, :class:`AcceptedMessage`.
- The SMTPy seed's functions: :func:`get_direct_smtp_service`, :func:`send_direct`,
  :func:`sign_email_dkim`, :func:`send_email_hybrid`, :func:`get_hybrid_relay`,
  :data:`EmailPriority`.
- Configuration and values: :class:`RelayConfig`, :class:`SmartHost`,
  :class:`Priority`, :class:`Status`, :class:`Reply`, :class:`MessageInfo`,
  :class:`QueueStats`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ferry.api.relay import AcceptedHook as AcceptedHook
    from ferry.api.relay import AcceptedMessage as AcceptedMessage
    from ferry.api.relay import DeliveryHook as DeliveryHook
    from ferry.api.relay import DeliveryResult as DeliveryResult
    from ferry.api.relay import IncomingMessage as IncomingMessage
    from ferry.api.relay import MessageLike as MessageLike
    from ferry.api.relay import QueueId as QueueId
    from ferry.api.relay import Relay as Relay
    from ferry.api.relay import RelayQueue as RelayQueue
    from ferry.api.relay import RoutingHook as RoutingHook
    from ferry.api.seed import DirectSmtpService as DirectSmtpService
    from ferry.api.seed import EmailPriority as EmailPriority
    from ferry.api.seed import get_direct_smtp_service as get_direct_smtp_service
    from ferry.api.seed import get_hybrid_relay as get_hybrid_relay
    from ferry.api.seed import send_direct as send_direct
    from ferry.api.seed import send_email_hybrid as send_email_hybrid
    from ferry.api.seed import sign_email_dkim as sign_email_dkim
    from ferry.config import ConfigError as ConfigError
    from ferry.config import RelayConfig as RelayConfig
    from ferry.config import SmartHost as SmartHost
    from ferry.envelope import Priority as Priority
    from ferry.envelope import Reply as Reply
    from ferry.envelope import Status as Status
    from ferry.queue.base import Attempt as Attempt
    from ferry.queue.base import MessageInfo as MessageInfo
    from ferry.queue.base import QueueStats as QueueStats
    from ferry.queue.base import RecipientInfo as RecipientInfo
    from ferry.service import AlreadyRunning as AlreadyRunning

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "AcceptedHook": "ferry.api.relay",
    "AcceptedMessage": "ferry.api.relay",
    "DeliveryHook": "ferry.api.relay",
    "DeliveryResult": "ferry.api.relay",
    "IncomingMessage": "ferry.api.relay",
    "MessageLike": "ferry.api.relay",
    "QueueId": "ferry.api.relay",
    "Relay": "ferry.api.relay",
    "RelayQueue": "ferry.api.relay",
    "RoutingHook": "ferry.api.relay",
    "ConfigError": "ferry.config",
    "RelayConfig": "ferry.config",
    "SmartHost": "ferry.config",
    "Priority": "ferry.envelope",
    "Reply": "ferry.envelope",
    "Status": "ferry.envelope",
    "Attempt": "ferry.queue.base",
    "MessageInfo": "ferry.queue.base",
    "QueueStats": "ferry.queue.base",
    "RecipientInfo": "ferry.queue.base",
    "DirectSmtpService": "ferry.api.seed",
    "EmailPriority": "ferry.api.seed",
    "get_direct_smtp_service": "ferry.api.seed",
    "get_hybrid_relay": "ferry.api.seed",
    "send_direct": "ferry.api.seed",
    "send_email_hybrid": "ferry.api.seed",
    "sign_email_dkim": "ferry.api.seed",
    "AlreadyRunning": "ferry.service",
}

__all__ = [
    "AcceptedHook",
    "AcceptedMessage",
    "AlreadyRunning",
    "Attempt",
    "ConfigError",
    "DeliveryHook",
    "DeliveryResult",
    "DirectSmtpService",
    "EmailPriority",
    "IncomingMessage",
    "MessageInfo",
    "MessageLike",
    "Priority",
    "QueueId",
    "QueueStats",
    "RecipientInfo",
    "Relay",
    "RelayConfig",
    "RelayQueue",
    "Reply",
    "RoutingHook",
    "SmartHost",
    "Status",
    "get_direct_smtp_service",
    "get_hybrid_relay",
    "send_direct",
    "send_email_hybrid",
    "sign_email_dkim",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ferry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
