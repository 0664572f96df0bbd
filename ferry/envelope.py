"""Value types shared by every stage: addresses, priorities, statuses, replies.

These are plain immutable values with no I/O, so intake, queue and delivery can
pass them around and tests can build them freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Delivery priority; a higher value is served first.

    Zetian's four priorities (Urgent/High/Normal/Low) and SMTPy's three
    (HIGH/NORMAL/LOW) map onto this one enum.
    """

    LOW = 0
    NORMAL = 1
    HIGH = 2
    URGENT = 3

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        """Accept a name ("high", "Urgent") or a number."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        return cls[value.strip().upper()]

    @classmethod
    def from_mt_priority(cls, level: int) -> Priority:
        """Map an RFC 6710 MT-PRIORITY level (-9..9, 0 = normal)."""
        if level >= 5:
            return cls.URGENT
        if level > 0:
            return cls.HIGH
        if level < 0:
            return cls.LOW
        return cls.NORMAL


class Status(enum.StrEnum):
    """State of one recipient, or (derived) of a whole message.

    A recipient is in one of these except PartiallyDelivered, which only a whole
    message can be.
    """

    QUEUED = "Queued"
    IN_PROGRESS = "InProgress"
    DEFERRED = "Deferred"
    DELIVERED = "Delivered"
    FAILED = "Failed"
    EXPIRED = "Expired"
    CANCELLED = "Cancelled"
    PARTIALLY_DELIVERED = "PartiallyDelivered"
    # Put aside by an operator (`ferry queue hold`): never claimed until released.
    HELD = "Held"

    @classmethod
    def parse(cls, value: str) -> Status:
        """Case-insensitive, with or without the underscore/space."""
        key = value.replace("_", "").replace(" ", "").replace("-", "").lower()
        for member in cls:
            if member.value.lower() == key:
                return member
        raise ValueError(f"unknown status {value!r}")

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.DELIVERED, Status.FAILED, Status.EXPIRED, Status.CANCELLED})
#: Recipient states a delivery worker may still act on.
PENDING_STATUSES = frozenset({Status.QUEUED, Status.DEFERRED, Status.IN_PROGRESS})


def message_status(recipient_statuses: list[Status] | tuple[Status, ...]) -> Status:
    """Derive a message's status from its recipients' statuses.

    Mixed results stay mixed: some delivered and some not is
    PartiallyDelivered, never "failed".
    """
    states = set(recipient_statuses)
    if not states:
        return Status.CANCELLED
    if len(states) == 1:
        return next(iter(states))
    if Status.IN_PROGRESS in states:
        return Status.IN_PROGRESS
    if Status.DELIVERED in states:
        return Status.PARTIALLY_DELIVERED
    for pending in (Status.DEFERRED, Status.QUEUED, Status.HELD):
        if pending in states:
            return pending
    for final in (Status.FAILED, Status.EXPIRED, Status.CANCELLED):
        if final in states:
            return final
    raise AssertionError(states)  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status (RFC 3463) and human text."""

    code: int
    enhanced: str | None
    text: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply as wire lines (without CRLF), multi-line aware."""
        texts = self.text.split("\n") or [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{text}")
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope address split at the last '@' (domain lower-cased)."""

    local: str
    domain: str

    @classmethod
    def parse(cls, text: str) -> Address:
        local, sep, domain = text.rpartition("@")
        if not sep or not local or not domain:
            raise ValueError(f"not an address: {text!r}")
        return cls(local, domain.lower())

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(slots=True)
class RecipientIn:
    """A recipient as intake hands it to the queue (RFC 3461 parameters kept)."""

    address: str
    orcpt: str | None = None
    notify: str | None = None  # e.g. "SUCCESS,FAILURE" or "NEVER"; None = default

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(slots=True)
class EnvelopeIn:
    """Everything intake knows about one accepted message."""

    sender: str  # "" for the null reverse-path <>
    recipients: list[RecipientIn]
    data: bytes  # the message as stored (Received: already prepended)
    priority: Priority = Priority.NORMAL
    client_address: str | None = None
    client_helo: str | None = None
    auth_user: str | None = None
    envid: str | None = None
    ret: str | None = None  # "FULL" | "HDRS" | None
    smtputf8: bool = False
    body_8bit: bool = False
    extra: dict[str, str] = field(default_factory=dict)
