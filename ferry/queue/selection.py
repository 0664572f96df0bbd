"""What operators select and change in the queue: filters, pages, summaries, suspensions.

Plain values shared by the queue backends, the CLI and (later) the HTTP API, so one
filter means the same thing everywhere (``ferry queue list --domain x`` and
``ferry queue hold --domain x`` select the same recipients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ferry.envelope import Status

#: Recipient states that still wait for delivery (Held ones wait for an operator).
WAITING = (Status.QUEUED, Status.DEFERRED, Status.IN_PROGRESS, Status.HELD)

#: The whole-queue suspension ("hold all destinations"); `delivery.hold` sets it too.
ALL_DESTINATIONS = "*"

BulkAction = Literal["retry", "hold", "release", "cancel", "remove"]

#: qshape's age buckets, in minutes: a recipient falls in the first bucket it is younger
#: than; the last column is everything older.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which recipients an operator means. Every field narrows; None means any.

    ``waiting_only`` (the default) keeps recipients still waiting for delivery
    (queued, deferred, in progress or held); ``--all`` clears it. Ages are seconds
    since arrival. ``reply`` is a case-insensitive substring of the last reply.
    """

    status: Status | None = None
    domain: str | None = None
    sender: str | None = None
    recipient: str | None = None
    older_than: float | None = None
    newer_than: float | None = None
    reply: str | None = None
    ids: tuple[str, ...] = ()  # these messages only (queue IDs)
    waiting_only: bool = True

    def describe(self) -> str:
        """The filter as an operator would type it (for logs and confirmations)."""
        parts = []
        for name in ("status", "domain", "sender", "recipient", "reply"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"--{name} {value}")
        parts.extend(self.ids)
        if self.older_than is not None:
            parts.append(f"--older-than {int(self.older_than)}s")
        if self.newer_than is not None:
            parts.append(f"--newer-than {int(self.newer_than)}s")
        if not self.waiting_only:
            parts.append("--all")
        return " ".join(parts) or "(everything waiting)"


@dataclass(frozen=True, slots=True)
class ListedRecipient:
    address: str
    status: Status
    attempts: int
    next_attempt: float | None
    last_code: int | None
    last_enhanced: str | None
    last_text: str | None


@dataclass(frozen=True, slots=True)
class ListedMessage:
    """One line of ``ferry queue list`` (mailq's shape)."""

    id: str
    arrival: float
    size: int
    sender: str
    status: Status
    recipients: tuple[ListedRecipient, ...]
    expires: float = 0.0  # end of life (arrival + lifetime); the display's give-up time
    # comes from ferry.delivery.retry.give_up_time, as for `queue show`


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``after`` continues it (keyset pagination), None at the end."""

    messages: tuple[ListedMessage, ...]
    after: str | None


@dataclass(frozen=True, slots=True)
class Counts:
    """Waiting recipients and messages, read from indexes (no history scan)."""

    waiting_recipients: int
    held_recipients: int
    deferred_recipients: int


@dataclass(frozen=True, slots=True)
class Summary:
    """qshape: waiting recipients per destination domain and age bucket, and per reply."""

    now: float
    by_domain: dict[str, list[int]] = field(default_factory=dict)  # len(AGE_BUCKETS) + 1
    by_reply: dict[tuple[int | None, str | None], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BulkResult:
    action: BulkAction
    messages: int
    recipients: int
    dsns: int = 0


@dataclass(frozen=True, slots=True)
class Suspension:
    """Delivery to ``domain`` (or every domain: ``*``) is paused until ``until``."""

    domain: str
    since: float
    until: float | None  # None: until resumed
    reason: str
    by: str

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now


def age_bucket(age_seconds: float) -> int:
    """The index of the qshape column for a recipient this old."""
    minutes = age_seconds / 60
    for i, limit in enumerate(AGE_BUCKETS):
        if minutes < limit:
            return i
    return len(AGE_BUCKETS)


def normal_domain(domain: str) -> str:
    """A destination as suspensions store it: lower case, no root dot; ``all`` = ``*``."""
    d = domain.strip().lower().rstrip(".")
    return ALL_DESTINATIONS if d in ("*", "all") else d
