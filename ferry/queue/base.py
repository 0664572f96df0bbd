"""The queue contract: the one source of truth, with more than one implementation.

Every change to a recipient's state happens in one committed transaction, so any
process may die at any instruction: nothing that got a 250 is lost, and nothing stays
"in progress" forever (claims are leases that expire).

The dataclasses here are what crosses the contract; the SQLite and PostgreSQL backends
implement it, and the same contract tests run against both (tests/queue/test_contract.py).
"""

from __future__ import annotations

import abc
import itertools
import os
import secrets
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.domains import address_domain
from ferry.envelope import EnvelopeIn, Priority, Reply, Status
from ferry.queue.selection import Suspension

# The 8 hex digits after the time: a 12-bit number drawn once per process and a 20-bit
# counter that starts at a random value. Drawing 4 random bytes per message cost a
# read of /dev/urandom each (a system call, 2-6 % of the intake process): now one per
# process. Within a process two ids can only repeat after 2**20 ids in one millisecond;
# two processes (or a restart within the same millisecond) collide only when both the
# random prefixes and the counters line up (about 2**-32, as with 32 random bits).
_COUNTER_BITS = 20
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_id_prefix = 0
_id_counter: Iterator[int] = itertools.count()


def _seed_queue_ids() -> None:
    """Draw this process's prefix and counter start (again in a forked child)."""
    global _id_prefix, _id_counter
    bits = secrets.randbits(32)
    _id_prefix = bits & ~_COUNTER_MASK
    _id_counter = itertools.count(bits & _COUNTER_MASK)


_seed_queue_ids()
os.register_at_fork(after_in_child=_seed_queue_ids)  # a fork must not repeat our ids


def new_queue_id(now: float | None = None) -> str:
    """A short, time-sortable, unique id: 11 hex digits of ms + 8 of process and counter.

    No system call: ``next()`` on :func:`itertools.count` is atomic under the GIL, so
    threads share the counter safely.
    """
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:011X}{_id_prefix | (next(_id_counter) & _COUNTER_MASK):08X}"


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A client's idempotency key, stored in the same transaction as its message.

    ``key`` is scoped by whoever presented it (``"token:NAME:key"``, ``"smtp:USER:key"``):
    two clients never share one. ``fingerprint`` is a hash of the request that carried
    it; ``response`` the answer given (replayed for a repeat with the same fingerprint).
    """

    key: str
    fingerprint: str
    queue_id: str
    response: str
    expires: float


class IdempotencyReplay(Exception):
    """The key was already used before it expired: ``record`` is the first use."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__(f"idempotency key already used for {record.queue_id}")
        self.record = record

    def __reduce__(self) -> tuple[type[IdempotencyReplay], tuple[IdempotencyRecord]]:
        # Raised in `ferry serve` for an intake process: it crosses as itself.
        return (type(self), (self.record,))


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt for one recipient (the recipient's history)."""

    at: float
    reply: Reply | None
    outcome: Status
    next_hop: str | None = None  # e.g. "mx1.example.com[192.0.2.1]:25" or "smarthost:sendgrid"
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" or None for plain text
    # Hosts tried before ``next_hop`` in this attempt, each "host[ip]:port reply".
    tried: tuple[str, ...] = ()


@dataclass(slots=True)
class RecipientInfo:
    """A recipient as the queue holds it."""

    id: int
    message_id: str
    address: str
    orcpt: str | None
    notify: str | None
    status: Status
    attempts: int
    next_attempt: float | None
    last_reply: Reply | None
    route: str | None
    delay_warned: bool = False
    history: list[Attempt] = field(default_factory=list)
    expiry_reason: str | None = None  # an Expired recipient: "lifetime" or "max_retries"
    # A pending recipient: when Ferry gives up at the latest, and which limit says so
    # (filled by ferry.delivery.retry.fill_give_up from the retry policy, not stored).
    gives_up: float | None = None
    gives_up_reason: str | None = None

    @property
    def domain(self) -> str:
        return address_domain(self.address)


@dataclass(slots=True)
class MessageInfo:
    """A message with its envelope; ``recipients`` is filled by ``get``."""

    id: str
    sender: str
    size: int
    priority: Priority
    arrival: float
    expires: float
    status: Status
    client_address: str | None
    client_helo: str | None
    auth_user: str | None
    envid: str | None
    ret: str | None
    smtputf8: bool
    extra: dict[str, str] = field(default_factory=dict)  # e.g. {"route": "sendgrid"}
    recipients: list[RecipientInfo] = field(default_factory=list)
    # When its last recipient became final (its body is gone from then on; the history
    # stays for queue.history_retention). None while work is left.
    finished: float | None = None
    # Work left: when its last pending recipient will be given up on (fill_give_up).
    # ``expires`` is the end of its lifetime alone; this is the real give-up time.
    gives_up: float | None = None


@dataclass(slots=True)
class ClaimedRecipient:
    """A due recipient leased to a delivery worker, with what delivery needs."""

    recipient: RecipientInfo
    message: MessageInfo
    lease_until: float


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What a worker reports for one claimed recipient.

    ``status`` is the recipient's new state: Delivered / Failed / Expired are final;
    Deferred needs ``next_attempt``. ``counts_as_attempt`` is False when the worker
    gave the recipient back untouched (e.g. throttled), so no retry is spent.
    """

    recipient_id: int
    status: Status
    reply: Reply | None
    next_attempt: float | None = None
    next_hop: str | None = None
    route: str | None = None
    tls: str | None = None
    counts_as_attempt: bool = True
    delay_warned: bool = False  # a "delayed" DSN has been sent for this recipient
    tried: tuple[str, ...] = ()  # hosts that failed before ``next_hop`` in this attempt
    expiry_reason: str | None = None  # status Expired: "lifetime" or "max_retries"


@dataclass(slots=True)
class QueueStats:
    """Zetian's queue statistics fields."""

    total_messages: int = 0
    queued_messages: int = 0
    in_progress_messages: int = 0
    deferred_messages: int = 0
    delivered_messages: int = 0
    partially_delivered_messages: int = 0
    failed_messages: int = 0
    expired_messages: int = 0
    cancelled_messages: int = 0
    total_size: int = 0
    oldest_message_time: float | None = None
    oldest_pending_recipient_time: float | None = None
    average_queue_time: float | None = None
    average_retry_count: float | None = None
    messages_by_priority: dict[str, int] = field(default_factory=dict)
    messages_by_smart_host: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Queue(abc.ABC):
    """The durable queue contract. All methods are coroutine functions."""

    @abc.abstractmethod
    async def enqueue(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> str:
        """Store a message durably (fsynced) and return its queue id.

        ``queue_id`` lets intake name the id in the Received: header it prepends.
        ``expires`` defaults to four days after arrival. With ``idempotency``, the key
        is written in the same transaction as the message; if an unexpired record with
        that key exists, nothing is stored and :class:`IdempotencyReplay` is raised
        with the existing record, so two requests with one key never both enqueue.
        """

    @abc.abstractmethod
    async def idempotency(self, key: str, *, now: float) -> IdempotencyRecord | None:
        """The unexpired record stored under ``key``, if any."""

    @abc.abstractmethod
    async def claim(
        self,
        owner: str,
        *,
        now: float,
        limit: int,
        lease: float,
        exclude_domains: Collection[str] = (),
    ) -> list[ClaimedRecipient]:
        """Lease up to ``limit`` due recipients: highest priority first, then oldest.

        ``exclude_domains`` skips destinations the caller cannot serve right now
        (throttled or with enough work in hand), so their work stays in the queue.
        """

    @abc.abstractmethod
    async def record(
        self,
        owner: str,
        results: list[AttemptResult],
        *,
        now: float,
        new_messages: Sequence[tuple[EnvelopeIn, float, Sequence[int]]] = (),
    ) -> list[str | None]:
        """Record outcomes for leased recipients and release their leases.

        A message whose every recipient is now final is finished at ``now``: its body
        is deleted in the same transaction (a DSN about it is built before, and queued
        here with its own copy of what it needs); its history stays until ``purge``.
        The same holds wherever recipients become final (``cancel``).

        ``new_messages`` (envelope, expiry, the recipient ids it reports on) are queued
        in the same transaction -- the DSNs these outcomes call for, so a failure is
        never recorded without its bounce -- but only when at least one of those
        outcomes was recorded. Returns their queue ids (None for one left out).
        """

    @abc.abstractmethod
    async def read_message(self, message_id: str) -> bytes | None:
        """The stored message bytes (with Ferry's Received: header)."""

    async def read_messages(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        """Several messages' bytes at once (missing ids are left out)."""
        out = {}
        for mid in message_ids:
            data = await self.read_message(mid)
            if data is not None:
                out[mid] = data
        return out

    @abc.abstractmethod
    async def get(self, message_id: str) -> MessageInfo | None:
        """One message with its recipients and their attempt history."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        status: Status | None = None,
        domain: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[MessageInfo]:
        """Messages, newest first, filtered; recipients included (without history).

        A pending ``status`` (Queued, Deferred, InProgress) matches every message with a
        recipient in that state; a final one matches the message's derived status.
        """

    @abc.abstractmethod
    async def retry(self, message_id: str, *, now: float) -> int:
        """Make every pending recipient of the message due now; returns how many."""

    @abc.abstractmethod
    async def cancel(self, message_id: str, *, now: float) -> int:
        """Cancel every not-yet-final recipient; returns how many."""

    @abc.abstractmethod
    async def remove(self, message_id: str) -> bool:
        """Delete the message and everything about it."""

    @abc.abstractmethod
    async def clear_expired(self) -> int:
        """Delete messages whose every recipient is final and at least one expired."""

    @abc.abstractmethod
    async def purge(self, *, before: float, limit: int) -> int:
        """Delete up to ``limit`` finished messages (every recipient final) with their
        recipients and attempt history, those finished before ``before``, oldest first;
        returns how many. Callers repeat it in small batches (``ferry.queue.retention``).
        """

    async def reclaim_space(self, *, pages: int) -> int:
        """Give back up to ``pages`` free pages to the file system; returns how many.

        A backend whose engine reclaims space itself (PostgreSQL's autovacuum) keeps
        this default and returns 0.
        """
        return 0

    async def free_space(self) -> tuple[int, int]:
        """(free pages, total pages) of the store, for deciding when to reclaim."""
        return (0, 0)

    async def compact_spool(self) -> int:
        """Free the disk that finished mail holds in shared body storage (SQLite's spool
        segments); returns how many segments were emptied. A backend without such
        storage keeps this default."""
        return 0

    async def checkpoint(self) -> None:
        """Let the file system see what ``reclaim_space`` gave back (SQLite: a WAL
        checkpoint, without waiting for anyone); a no-op where nothing is needed."""
        return None

    @abc.abstractmethod
    async def extend_leases(self, owner: str, recipient_ids: Sequence[int], *, until: float) -> int:
        """Renew ``owner``'s leases on recipients it is still working on."""

    @abc.abstractmethod
    async def release_leases(self, owner: str | None = None) -> int:
        """Return leased recipients to the due queue (all owners when None)."""

    @abc.abstractmethod
    async def next_due(self, *, exclude_domains: Collection[str] = ()) -> float | None:
        """When the earliest pending recipient becomes due (None: nothing pending)."""

    @abc.abstractmethod
    async def statistics(self, *, now: float) -> QueueStats:
        """Counts and ages, in Zetian's shape."""

    async def webhook_turn(self, endpoint: str) -> bool:
        """Whether this process is the one that sends ``endpoint``'s events now.

        Several nodes sharing a queue (PostgreSQL) all run webhook senders; only one
        sends each endpoint at a time, another takes over when it stops or dies. One
        node (SQLite): always True.
        """
        return True

    async def add_delivery_stats(
        self,
        owner: str,
        counters: Mapping[str, int],
        state: Mapping[str, Any] | None,
        *,
        now: float,
    ) -> bool:
        """Keep a scheduler's delivery statistics in the queue, where ``ferry stats`` adds
        up every node's: ``counters`` are increments since its last call (key: the
        counter's path as a JSON array), ``state`` its current states (None: it stopped).

        False: this backend keeps none (SQLite: one node, whose schedulers publish files
        in its data directory instead).
        """
        return False

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release resources."""

    # Operator tools (ferry/queue/selection.py has the values): the list, summary, bulk
    # and suspension methods; delivery only needs this one.
    @abc.abstractmethod
    async def suspensions(self, *, now: float) -> Sequence[Suspension]:
        """Destinations whose delivery is paused now (``*``: every destination)."""
