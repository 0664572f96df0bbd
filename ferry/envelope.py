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


def split_address(text: str) -> tuple[str, str]:
    """``(local part, domain)`` of ``local@domain``: the one address split.

    At the *last* '@', since a quoted local part may contain '@' (RFC 5321 §4.1.2)
    while a domain cannot. The domain comes back as written. Raises ValueError when
    there is no '@'; either part may be empty, for callers that allow it (an alias key
    "@domain"). :class:`Address` is the strict form.
    """
    local, sep, domain = text.rpartition("@")
    if not sep:
        raise ValueError(f"not an address: {text!r}")
    return local, domain


def domain_of(address: str) -> str:
    """The domain of an address in the one form (A-labels, lower case); "" when none."""
    # Imported here: ferry.domains needs dnspython, which `ferry --help` must not load.
    from ferry.domains import address_domain

    return address_domain(address)


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope address split at the last '@' (domain lower-cased)."""

    local: str
    domain: str

    @classmethod
    def parse(cls, text: str) -> Address:
        """Both parts must be there; raises ValueError otherwise."""
        local, domain = split_address(text)
        if not local or not domain:
            raise ValueError(f"not an address: {text!r}")
        return cls(local, domain.lower())

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


# -- RFC 3461 §4.1 NOTIFY -----------------------------------------------------------

#: The keywords a NOTIFY list may hold (NEVER stands alone).
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
#: RFC 3461 §4.1: without a NOTIFY parameter an MTA may act as if it were FAILURE or
#: FAILURE,DELAY; we take the second, so senders hear of delays.
DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})


def _notify_words(value: str) -> list[str]:
    words = [w.strip().upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return []
    # RFC 3461 §4.1: "NEVER" or a list of SUCCESS, FAILURE, DELAY; a keyword twice
    # (or NEVER among others) means the client is confused: refuse rather than guess.
    if not set(words) <= NOTIFY_KEYWORDS or len(set(words)) != len(words):
        raise ValueError(f"bad NOTIFY value {value!r}: NEVER, or SUCCESS,FAILURE,DELAY")
    return words


def parse_notify(value: str | None) -> frozenset[str]:
    """The keywords of an RFC 3461 §4.1 NOTIFY value: the one NOTIFY parser.

    Intake validates the RCPT parameter with it (:func:`normalize_notify`), delivery
    reads the stored value with it (``dsn.needs_dsn``). None (no parameter) gives
    DEFAULT_NOTIFY, "NEVER" the empty set; keywords are case-insensitive. Raises
    ValueError on an empty value, an unknown keyword, a keyword twice, or NEVER with
    others.
    """
    if value is None:
        return DEFAULT_NOTIFY
    return frozenset(_notify_words(value))


def normalize_notify(value: str) -> str:
    """A NOTIFY value as stored and passed on: "NEVER", or the keywords upper-cased
    in the order given ("SUCCESS,FAILURE"). Raises ValueError as :func:`parse_notify`."""
    return ",".join(_notify_words(value)) or "NEVER"


@dataclass(slots=True)
class RecipientIn:
    """A recipient as intake hands it to the queue (RFC 3461 parameters kept)."""

    address: str
    orcpt: str | None = None
    notify: str | None = None  # e.g. "SUCCESS,FAILURE" or "NEVER"; None = default

    @property
    def domain(self) -> str:
        return domain_of(self.address)


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
