"""From outcomes to the queue: retries, expiry, DSNs, statistics (Postfix's bounce/defer).

Sessions hand every transaction's outcomes to ``Recorder.finish`` before their
connection starts another transaction (issue 10.1: a crash may repeat only the
transactions in flight, at most one per connection). ``finish`` returns once they are
committed -- shared: the queue's writer commits every write waiting at the same moment
in one transaction (group commit across connections) -- or, in a worker of a SQLite
queue, once they are in the worker's outcome journal (ferry/queue/journal.py): the
commit then happens behind the session, which goes on at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.config import RelayConfig
from ferry.delivery.bounces import (
    NOTICE_KEY,
    Report,
    double_bounce_envelope,
    dsn_envelope,
    is_postmaster_notice,
)
from ferry.delivery.retry import (
    ExpiryReason,
    after_temporary_failure,
    give_up_time,
    policy_for,
)
from ferry.envelope import EnvelopeIn, Reply, Status
from ferry.events import DoubleBounce, DsnDropped, DsnQueued, GaveUp, emit, outcome_event
from ferry.queue.base import AttemptResult, ClaimedRecipient, MessageInfo, Queue
from ferry.queue.journal import NewMessage, OutcomeJournal


@dataclass(slots=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    claim: ClaimedRecipient
    status: Status  # Delivered / Failed / Deferred (Deferred may become Expired)
    reply: Reply
    remote: str | None = None  # "mx1.example.com[192.0.2.1]:25"
    remote_name: str | None = None  # "mx1.example.com", for the DSN's Remote-MTA
    tls: str | None = None
    synthetic: bool = False  # the reply is ours (no answer from a server)
    transport: bool = False  # the session failed, not this recipient (may fall back)
    route: str = "direct"  # "direct" | "host:h:port" | "smarthost:name"
    relayed_without_dsn: bool = False  # delivered to a hop that does not speak DSN
    tried: tuple[str, ...] = ()  # hosts that failed before ``remote`` in this attempt
    session: str | None = None  # the outbound SMTP connection's ID (in log lines)


@dataclass
class DeliveryStats:
    """Counters in the SMTPy seed's shape, plus a few more."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    expired: int = 0
    bounced: int = 0  # DSNs queued
    double_bounces: int = 0  # undeliverable DSNs (sender <>) reported to the postmaster
    dsn_dropped: int = 0  # postmaster notices that could not be delivered either
    connections: int = 0
    tls_fallbacks: int = 0
    direct_sent: int = 0
    direct_failed: int = 0
    relay_sent: int = 0
    relay_failed: int = 0
    fallbacks: int = 0  # recipients moved to a later hop within an attempt
    dkim_signed: int = 0  # messages signed (once per message and delivery pass)
    dkim_unsigned: int = 0
    dkim_unsigned_reasons: dict[str, int] = field(default_factory=dict)
    by_destination: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )


#: (the DSN's envelope, when it was made, the message it reports on, its reports)
Dsn = tuple[EnvelopeIn, float, MessageInfo, list[Report]]

# With a journal: how many transactions' outcomes may wait for their commit at once
# before sessions wait for it again (the writer is behind: do not run ahead of it).
MAX_UNCOMMITTED = 1000
# With a journal: how long outcomes gather before they are sent to be committed. Larger
# groups, fewer commits: at 1 KB end to end 1,465 -> 2,008 msgs/s with connection reuse
# (0.02 s against one loop turn) and 1,064 -> 1,304 with a new connection per message
# (0.01 s); no change at 100 KB. Measured in bench/side_by_side.py's set-up
# (smtp-source -> Ferry -> smtp-sink, quiet machine), Ferry alone, one run each.
JOURNALED_GATHER_SECONDS = 0.02


@dataclass(slots=True)
class _Entry:
    """One transaction's outcomes, waiting for the commit that records them."""

    message: MessageInfo
    results: list[AttemptResult]
    dsns: list[Dsn]
    now: float
    seq: int | None = None  # its number in the outcome journal


class Recorder:
    """Turns outcomes into queue records, retries and DSNs."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        *,
        owner: str,
        read_body: Callable[[str], Awaitable[bytes | None]],
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_enqueue: Callable[[], None] | None = None,
        journal: OutcomeJournal | None = None,
    ) -> None:
        """``journal``: write each transaction's outcomes there and go on without
        waiting for their commit (a worker of a SQLite queue, ferry/queue/journal.py)."""
        d = config.delivery
        self.config = config
        self.queue = queue
        self.owner = owner
        self.read_body = read_body
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_enqueue = on_enqueue
        self.journal = journal
        self.policy = policy_for(config)
        self.delay_warning_after = d.delay_warning_after  # seconds, parsed at load
        self.hostname = config.server.hostname
        self.bounce_from = d.bounce_sender or f"MAILER-DAEMON@{self.hostname}"
        self.postmaster = d.postmaster or f"postmaster@{self.hostname}"
        self.stats = DeliveryStats()
        self.held: set[int] = set()  # recipient ids claimed and not yet recorded
        self._writing: set[asyncio.Task[None]] = set()  # outcomes being recorded
        self._gathering: list[_Entry] | None = None  # the write this turn's outcomes join
        self._gather_task: asyncio.Task[None] | None = None

    async def finish(self, message: MessageInfo, outcomes: list[Outcome]) -> None:
        """Record one transaction's outcomes; returns once they are committed, or with a
        journal once they are written there (either survives a crash of this process).

        Retries are decided now; the write is shared with every other session's
        outcomes waiting at the same moment. Cancelling the caller does not cancel
        the write.
        """
        now = self.clock()
        results: list[AttemptResult] = []
        failed: list[Report] = []
        delayed: list[Report] = []
        relayed: list[Report] = []
        lifetime = self.policy.message_lifetime
        for o in outcomes:
            rcpt = o.claim.recipient
            status, next_attempt, dsn_status = o.status, None, None
            warned = False
            expiry: ExpiryReason | None = None
            if status is Status.DEFERRED:
                decision = after_temporary_failure(
                    self.policy,
                    attempts=rcpt.attempts + 1,
                    # expiry is the message's own, fixed when it arrived
                    arrival=message.expires - lifetime,
                    now=now,
                    rand=self.rng.random(),
                )
                if decision.kind == "expire":
                    status, dsn_status = Status.EXPIRED, "4.4.7"  # RFC 3463: X.4.7
                    expiry = decision.reason or "lifetime"
                    emit(
                        GaveUp(
                            message.id,
                            rcpt.address,
                            expiry,
                            rcpt.attempts + 1,
                            now - message.arrival,
                        )
                    )
                else:
                    next_attempt = decision.at
                    if not rcpt.delay_warned and now - message.arrival >= self.delay_warning_after:
                        warned = True
                        # RFC 3464 §2.3.9: the real give-up time, the one `queue show` shows.
                        until = give_up_time(
                            self.policy,
                            expires=message.expires,
                            attempts=rcpt.attempts + 1,
                            next_attempt=next_attempt,
                        ).at
                        delayed.append(
                            Report(
                                rcpt,
                                "delayed",
                                o.reply,
                                o.remote_name,
                                now,
                                o.synthetic,
                                retry_until=until,
                            )
                        )
            if status in (Status.FAILED, Status.EXPIRED):
                failed.append(
                    Report(
                        rcpt,
                        "failed",
                        o.reply,
                        o.remote_name,
                        now,
                        o.synthetic,
                        dsn_status,
                        expiry_reason=expiry,
                    )
                )
            if o.relayed_without_dsn:
                relayed.append(Report(rcpt, "relayed", o.reply, o.remote_name, now))
            results.append(
                AttemptResult(
                    rcpt.id,
                    status,
                    o.reply,
                    next_attempt=next_attempt,
                    next_hop=o.remote,
                    route=o.route,
                    tls=o.tls,
                    delay_warned=warned,
                    tried=o.tried,
                    expiry_reason=expiry,
                )
            )
            self._count(status, o.route, rcpt.domain)
            emit(
                outcome_event(
                    status,
                    queue_id=message.id,
                    recipient=rcpt.address,
                    route=o.route,
                    next_hop=o.remote,
                    tls=o.tls,
                    reply=o.reply,
                    attempt=rcpt.attempts + 1,
                    delay=now - message.arrival,
                    retry_in=next_attempt - now if next_attempt else None,
                    session=o.session,
                )
            )
        dsns: list[Dsn] = []
        if self.config.delivery.bounces and (failed or delayed or relayed):
            try:
                dsns = await self._dsns(message, failed, delayed, relayed, now)
            except Exception:  # a bug in a report must not stop the record
                logging.getLogger("ferry.delivery").exception(
                    "building a DSN for %s failed", message.id
                )
        entry = _Entry(message, results, dsns, now)
        if self.journal is not None:
            entry.seq = self.journal.append(results, now, self._new_messages(dsns))
        if self._gathering is None:
            # The first outcome of this turn of the event loop starts a write; the
            # other sessions finishing in the same turn join it (one queue job).
            self._gathering = []
            self._gather_task = asyncio.get_running_loop().create_task(
                self._record(self._gathering)
            )
            self._writing.add(self._gather_task)
            self._gather_task.add_done_callback(self._writing.discard)
        self._gathering.append(entry)
        assert self._gather_task is not None
        if (
            entry.seq is not None
            and self.journal is not None
            and self.journal.in_flight <= MAX_UNCOMMITTED
        ):
            return  # in the journal: the connection may start its next transaction
        # Shielded: a cancelled session (shutdown) must not cancel the write itself.
        await asyncio.shield(self._gather_task)

    def _new_messages(self, dsns: list[Dsn]) -> list[NewMessage]:
        """The DSNs as ``Queue.record`` queues them: envelope, expiry, recipients reported."""
        life = self.policy.message_lifetime
        return [
            (env, now + life, [r.recipient.id for r in reports]) for env, now, _m, reports in dsns
        ]

    def drop(self, claims: list[ClaimedRecipient]) -> None:
        """Forget claims that need no record (their message was removed meanwhile)."""
        self.held.difference_update(c.recipient.id for c in claims)

    async def _record(self, batch: list[_Entry]) -> None:
        """Write these transactions' outcomes and the DSNs they call for, in one queue
        transaction. A write goes to the queue at once (not behind the previous one);
        the queue's writer commits every write waiting at that moment together (group
        commit), so waiting for it costs about one commit."""
        if self.journal is not None and not self.journal.broken:
            # Nobody waits for this commit (the outcomes are in the journal): gather a
            # few milliseconds' worth, so the writer commits them in fewer, larger
            # transactions (each commit writes the index pages it touched once).
            await asyncio.sleep(JOURNALED_GATHER_SECONDS)
        else:
            await asyncio.sleep(0)  # let the sessions finishing in this turn join
        if self._gathering is batch:
            self._gathering, self._gather_task = None, None
        dsns = [d for e in batch for d in e.dsns]
        results = [r for e in batch for r in e.results]
        delay = 0.5
        while True:
            try:
                ids = await self.queue.record(
                    self.owner,
                    results,
                    now=max(e.now for e in batch),
                    new_messages=self._new_messages(dsns),
                )
                break
            except Exception:
                # Keep the outcomes (and the leases: the ids stay held) and try again;
                # dropping them would strand the recipients InProgress.
                logging.getLogger("ferry.delivery").exception("recording outcomes failed")
                await asyncio.sleep(delay)  # back off, not a synchronisation point
                delay = min(delay * 2, 30.0)
        self.held.difference_update(r.recipient_id for r in results)
        if self.journal is not None:
            self.journal.done([e.seq for e in batch if e.seq is not None])
        for qid, (env, _now, message, reports) in zip(ids, dsns, strict=True):
            if qid is None:
                continue  # its outcomes were discarded (cancelled meanwhile)
            if NOTICE_KEY in env.extra:
                self.stats.double_bounces += 1
                emit(DoubleBounce(qid, message.id, self.postmaster, len(reports), reports[0].reply))
                continue
            self.stats.bounced += 1
            emit(
                DsnQueued(
                    queue_id=qid,
                    about=message.id,
                    to=message.sender,
                    action=reports[0].action,
                    recipients=tuple(r.recipient.address for r in reports),
                )
            )
        if any(ids) and self.on_enqueue is not None:
            self.on_enqueue()

    async def flush(self) -> None:
        """Wait until every outcome so far is recorded (shutdown, tests)."""
        while self._writing:
            await asyncio.gather(*(asyncio.shield(t) for t in list(self._writing)))

    async def _dsns(
        self,
        message: MessageInfo,
        failed: list[Report],
        delayed: list[Report],
        relayed: list[Report],
        now: float,
    ) -> list[Dsn]:
        """The DSN messages these reports call for; for a failed message from <> (a
        double bounce), the postmaster's notice."""
        if message.sender == "" and failed:
            # RFC 5321 §4.5.5: a report is never bounced to its (null) sender. Postfix's
            # answer: tell the postmaster -- unless this is that notice failing in turn.
            if not is_postmaster_notice(message):
                original = await self.read_body(message.id) or b""
                notice = double_bounce_envelope(
                    message,
                    original,
                    failed,
                    hostname=self.hostname,
                    bounce_from=self.bounce_from,
                    postmaster=self.postmaster,
                    now=now,
                )
                return [(notice, now, message, failed)]
            self.stats.dsn_dropped += len(failed)
            for r in failed:
                emit(DsnDropped(message.id, r.recipient.address, r.reply))
            return []
        out = []
        for reports in (failed, delayed, relayed):
            if not reports:
                continue
            original = await self.read_body(message.id) or b""
            envelope = dsn_envelope(
                message,
                original,
                reports,
                hostname=self.hostname,
                bounce_from=self.bounce_from,
                now=now,
            )
            if envelope is not None:
                out.append((envelope, now, message, reports))
        return out

    def _count(self, status: Status, route: str, domain: str) -> None:
        s = self.stats
        relay = route.startswith("smarthost:")
        if status is Status.DELIVERED:
            s.sent += 1
            if relay:
                s.relay_sent += 1
            else:
                s.direct_sent += 1
        elif status in (Status.FAILED, Status.EXPIRED):
            if status is Status.FAILED:
                s.failed += 1
            else:
                s.expired += 1
            if relay:
                s.relay_failed += 1
            else:
                s.direct_failed += 1
        else:
            s.deferred += 1
        s.by_destination[domain][status.value.lower()] += 1

    def destination_stats(self) -> dict[str, Any]:
        return {d: dict(c) for d, c in self.stats.by_destination.items()}
