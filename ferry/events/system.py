"""Events of the running relay: start and stop, delivery workers, hooks, operators."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ferry.events.base import Event


@dataclass(frozen=True, slots=True)
class Started(Event):
    """The relay is running (queue open, delivery started, listeners open)."""

    name = "started"
    hostname: str
    mode: str
    queue: str
    version: str = ""
    config: str = ""
    listeners: str = ""
    workers: int = 0
    hold: str = "no"
    suspended: str | None = None
    intake_workers: int = 0  # processes running the SMTP sessions (0: in ferry serve)

    def log_fields(self) -> dict[str, Any]:
        return {
            "version": self.version or None,
            "config": self.config or None,
            "data_dir": self.queue,
            "hostname": self.hostname,
            "listeners": self.listeners or None,
            "intake_workers": self.intake_workers,
            "mode": self.mode,
            "workers": self.workers,
            "hold": self.hold,
            "suspended": self.suspended,
        }


@dataclass(frozen=True, slots=True)
class Stopping(Event):
    """``ferry serve`` was asked to stop (SIGINT or SIGTERM)."""

    name = "stopping"


@dataclass(frozen=True, slots=True)
class LeasesReleased(Event):
    """At start, leases a previous (crashed) run left behind were handed back."""

    name = "leases_released"
    count: int


@dataclass(frozen=True, slots=True)
class OutcomesReplayed(Event):
    """Outcomes a dead delivery worker had journaled but not seen committed were recorded
    from its journal (``owner``: that worker; none: left by a crashed run, at start)."""

    name = "outcomes_replayed"
    count: int
    owner: str | None


@dataclass(frozen=True, slots=True)
class DeliveryTotals(Event):
    """A scheduler stopped: its statistics counters (as ``ferry stats`` shows them)."""

    name = "delivery_stats"
    counters: Mapping[str, Any]

    def log_fields(self) -> dict[str, Any]:
        return dict(self.counters)


@dataclass(frozen=True, slots=True)
class WorkerStarted(Event):
    """A delivery worker process started (``owner`` names its leases)."""

    name = "delivery_worker"
    pid: int
    owner: str


@dataclass(frozen=True, slots=True)
class WorkerDied(Event):
    """A delivery worker process exited unasked: its leases go back, it is restarted."""

    name = "delivery_worker_died"
    level = logging.ERROR
    pid: int
    code: int


@dataclass(frozen=True, slots=True)
class IntakeWorkerStarted(Event):
    """An intake process started: it runs SMTP sessions on the connections ``ferry serve``
    accepts and hands it (``server.workers``)."""

    name = "intake_worker"
    pid: int
    index: int


@dataclass(frozen=True, slots=True)
class IntakeWorkerDied(Event):
    """An intake process exited unasked: its ``connections`` are lost (their clients
    retry; nothing they were told 250 for), and it is restarted."""

    name = "intake_worker_died"
    level = logging.ERROR
    pid: int
    code: int
    connections: int


@dataclass(frozen=True, slots=True)
class HookFailed(Event):
    """A ``ferry.Relay`` hook raised; what it was called for goes on unchanged."""

    name = "hook_failed"
    level = logging.WARNING
    hook: str
    function: str
    error: str
    queue_id: str | None = None

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hook": self.hook, "function": self.function}
        if self.queue_id is not None:  # a routing hook runs before there is an id
            out["id"] = self.queue_id
        out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class ExpiredCleared(Event):
    """Messages that ended Expired were deleted (``ferry.Relay`` cleanup)."""

    name = "expired_cleared"
    count: int


@dataclass(frozen=True, slots=True)
class OperatorAction(Event):
    """An operator acted on a message: ``retry``, ``cancel`` or ``remove``.

    ``count`` is how many recipients (or messages, for ``remove``) it changed; ``via``
    says from where (``api`` for ``ferry.Relay.queue``).
    """

    name = "operator"
    action: Literal["retry", "cancel", "remove", "hold", "release"]
    queue_id: str
    count: int
    via: str

    def log_fields(self) -> dict[str, Any]:
        return {"action": self.action, "id": self.queue_id, "count": self.count, "via": self.via}


@dataclass(frozen=True, slots=True)
class SelfSignedCreated(Event):
    """No certificate is configured: a self-signed pair was made for STARTTLS."""

    name = "tls_selfsigned_created"
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class SelfSignedRegenerated(Event):
    """The self-signed pair Ferry made earlier was unreadable (``reason``): made anew."""

    name = "tls_selfsigned_regenerated"
    level = logging.WARNING
    cert: str
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class QueueStorageLost(Event):
    """The queue database was deleted or replaced under the running relay: every write
    is refused (``451 4.3.0``) until an operator acts (``action`` says what)."""

    name = "queue_storage_lost"
    level = logging.ERROR
    path: str
    reason: str
    action: str


@dataclass(frozen=True, slots=True)
class Purged(Event):
    """The history purge removed finished ``messages`` past ``queue.history_retention``
    and gave ``pages`` of free space back to the file system."""

    name = "purged"
    messages: int
    pages: int


@dataclass(frozen=True, slots=True)
class OperatorBulkAction(Event):
    """An operator's bulk action from the CLI or the API (``ferry queue hold ...``),
    recorded in the queue with it and logged by ``ferry serve``: who, what, the filter
    (``selection``) and how many messages and recipients it changed."""

    name = "operator"
    by: str
    action: str
    selection: str
    messages: int
    recipients: int


@dataclass(frozen=True, slots=True)
class HostnameNotFqdn(Event):
    """``server.hostname`` is not a fully qualified domain name (MX, HELO and bounces'
    ``MAILER-DAEMON@`` use it)."""

    name = "hostname_not_fqdn"
    level = logging.WARNING
    hostname: str
    advice: str
