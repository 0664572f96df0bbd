"""Typed events: everything notable Ferry does is one small frozen dataclass.

``emit(event)`` hands the event to every subscriber. The log is one subscriber
(:mod:`ferry.events.log`: the same ``key=value`` or JSON lines as always); ``ferry.Relay``
hooks are another, and metrics and webhooks subscribe the same way. The classes are in
:mod:`~ferry.events.intake`, :mod:`~ferry.events.delivery` and :mod:`~ferry.events.system`;
the README's event catalogue is generated from them (:mod:`ferry.events.catalogue`).
"""

from __future__ import annotations

from ferry.events.base import EVENT_TYPES, Event, from_dict, to_dict
from ferry.events.bus import Subscriber, Untyped, _subscribers, emit, subscribe
from ferry.events.delivery import (
    ConnectFailed,
    Deferred,
    Delivered,
    DirectDelivery,
    DirectRateLimited,
    DkimSigned,
    DkimUnsigned,
    DoubleBounce,
    DsnDropped,
    DsnQueued,
    Expired,
    Failed,
    GaveUp,
    HopFallback,
    RecipientOutcome,
    RouteFallback,
    RouteInvalid,
    SmartHostFailed,
    SmartHostState,
    SmartHostUnusable,
    SmartRouteSwitched,
    Throttled,
    TlsFallback,
    outcome_event,
)
from ferry.events.http import HttpAuthFailed, HttpListening, WebhookFailed, WebhookRetrying
from ferry.events.intake import (
    Accepted,
    AuthFailed,
    AuthSucceeded,
    Connected,
    ConnectionRejected,
    Disconnected,
    Listening,
    Rejected,
    TlsFailed,
    TlsStarted,
)
from ferry.events.log import JsonFormatter, TextFormatter, log_event, setup_logging
from ferry.events.system import (
    DeliveryTotals,
    ExpiredCleared,
    HookFailed,
    LeasesReleased,
    OperatorAction,
    Purged,
    QueueStorageLost,
    SelfSignedCreated,
    SelfSignedRegenerated,
    Started,
    Stopping,
    WorkerDied,
    WorkerStarted,
)

# The log is the first subscriber, for the life of the process.
subscribe(log_event)

__all__ = [
    "DoubleBounce",
    "GaveUp",
    "Purged",
    "QueueStorageLost",
    "SelfSignedCreated",
    "SelfSignedRegenerated",
    "HttpAuthFailed",
    "HttpListening",
    "WebhookFailed",
    "WebhookRetrying",
    "EVENT_TYPES",
    "Accepted",
    "AuthFailed",
    "AuthSucceeded",
    "ConnectFailed",
    "Connected",
    "ConnectionRejected",
    "Deferred",
    "Delivered",
    "DeliveryTotals",
    "DirectDelivery",
    "DirectRateLimited",
    "Disconnected",
    "DkimSigned",
    "DkimUnsigned",
    "DsnDropped",
    "DsnQueued",
    "Event",
    "Expired",
    "ExpiredCleared",
    "Failed",
    "HookFailed",
    "HopFallback",
    "JsonFormatter",
    "LeasesReleased",
    "Listening",
    "OperatorAction",
    "RecipientOutcome",
    "Rejected",
    "RouteFallback",
    "RouteInvalid",
    "SmartHostFailed",
    "SmartHostState",
    "SmartHostUnusable",
    "SmartRouteSwitched",
    "Started",
    "Stopping",
    "Subscriber",
    "TextFormatter",
    "Throttled",
    "TlsFailed",
    "TlsFallback",
    "TlsStarted",
    "Untyped",
    "WorkerDied",
    "WorkerStarted",
    "_subscribers",
    "emit",
    "from_dict",
    "outcome_event",
    "setup_logging",
    "subscribe",
    "to_dict",
]
