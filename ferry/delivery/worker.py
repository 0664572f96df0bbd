"""One delivery session: a connection to a destination carrying queued work.

The scheduler hands a ``Destination`` (its pending work and limits) to ``run_session``;
the session resolves the next hop, connects to the first MX host that answers, sends
message after message over that connection, and turns every reply into an outcome.
Outcomes become queue records, retries, expiries and DSNs in ``Delivery.finish``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry.config import RelayConfig
from ferry.delivery.bounces import Report, dsn_envelope
from ferry.delivery.client import ClientOptions, RcptSpec, SmtpClient, SmtpError
from ferry.delivery.mx import MxError, MxResolver
from ferry.delivery.outcomes import transport_failure_reply
from ferry.delivery.pool import ConnectionPool
from ferry.delivery.retry import RetryPolicy, after_temporary_failure, parse_duration
from ferry.delivery.routes import NextHop
from ferry.delivery.shaping import DestinationShaper
from ferry.envelope import Reply, Status
from ferry.events import emit
from ferry.intake.message import MAX_HOPS, count_received, header_block
from ferry.queue.base import AttemptResult, ClaimedRecipient, MessageInfo, Queue

# How long a host whose TLS handshake failed is spoken to in plain text (opportunistic
# TLS only: a broken STARTTLS must not block delivery forever, nor be retried each time).
TLS_FALLBACK_SECONDS = 3600.0


@dataclass(slots=True)
class WorkItem:
    """One message's recipients at one destination: one SMTP transaction."""

    message: MessageInfo
    claims: list[ClaimedRecipient]


@dataclass(slots=True)
class Destination:
    """Work waiting for one next hop, and that hop's limits."""

    hop: NextHop
    shaper: DestinationShaper
    pending: collections.deque[WorkItem] = field(default_factory=collections.deque)

    @property
    def key(self) -> str:
        return self.hop.label

    def take_all(self) -> list[WorkItem]:
        items = list(self.pending)
        self.pending.clear()
        return items


@dataclass(slots=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    claim: ClaimedRecipient
    status: Status  # Delivered / Failed / Deferred (Deferred may become Expired)
    reply: Reply
    remote: str | None = None  # "mx1.example.com[192.0.2.1]:25"
    remote_name: str | None = None  # "mx1.example.com", for the DSN's Remote-MTA
    tls: str | None = None
    synthetic: bool = False
    relayed_without_dsn: bool = False  # delivered to a hop that does not speak DSN


@dataclass
class DeliveryStats:
    """Counters in the SMTPy seed's ``direct_service`` shape, plus a few more."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    expired: int = 0
    bounced: int = 0  # DSNs queued
    dsn_dropped: int = 0  # DSNs (sender <>) that could not be delivered
    connections: int = 0
    tls_fallbacks: int = 0


class Delivery:
    """Everything a session needs, shared by all sessions of one scheduler."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        resolver: MxResolver,
        *,
        owner: str,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        ca_file: str | None = None,
        on_enqueue: Callable[[], None] | None = None,
    ) -> None:
        d = config.delivery
        self.config = config
        self.queue = queue
        self.resolver = resolver
        self.owner = owner
        self.clock = clock
        self.rng = rng or random.Random()
        self.ca_file = ca_file
        self.on_enqueue = on_enqueue
        self.policy = RetryPolicy.from_config(
            d.retry_schedule, max_retries=d.max_retries, message_lifetime=d.message_lifetime
        )
        self.delay_warning_after = parse_duration(d.delay_warning_after)
        self.pool = ConnectionPool(max_transactions=d.messages_per_connection)
        self.stats = DeliveryStats()
        self.tls_fallback: dict[str, float] = {}
        self.hostname = config.server.hostname
        self.bounce_from = d.bounce_sender or f"MAILER-DAEMON@{self.hostname}"
        self._bodies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.held: set[int] = set()  # recipient ids claimed and not yet recorded
        self._outbox: list[
            tuple[MessageInfo, list[AttemptResult], list[Report], list[Report], list[Report], float]
        ] = []
        self._recorder: asyncio.Task[None] | None = None

    # -- the session ---------------------------------------------------------------

    async def run_session(self, dest: Destination) -> None:
        """Drain ``dest.pending`` over one connection at a time.

        If the session is cancelled (shutdown), what it still holds stays leased in the
        queue and is handed back when the scheduler releases its leases.
        """
        while dest.pending:
            try:
                hosts = await self.resolver.resolve(dest.hop.name)
            except MxError as exc:
                status = Status.FAILED if exc.permanent else Status.DEFERRED
                await self._finish_all(dest.take_all(), status, exc.reply, synthetic=True)
                return
            targets = [(h.name, a) for h in hosts for a in h.addresses]
            connected = await self._connect(dest, targets)
            if isinstance(connected, Reply):
                # Every host failed: the destination is down for this round.
                await self._finish_all(
                    dest.take_all(), Status.DEFERRED, connected, synthetic=connected.code == 451
                )
                return
            client, key, name, remote = connected
            try:
                limit = self.config.delivery.messages_per_connection
                while dest.pending and client.usable and client.transactions < limit:
                    item = dest.pending.popleft()
                    await self._transfer(client, item, name, remote)
            finally:
                self.pool.give(key, client)

    async def _connect(
        self, dest: Destination, targets: list[tuple[str, str]]
    ) -> tuple[SmtpClient, tuple[object, ...], str, str] | Reply:
        """The first MX address that gives us a session (RFC 5321 §5.1 order)."""
        last: Reply = transport_failure_reply("refused", f"no usable address for {dest.hop.name}")
        now = self.clock()
        for name, ip in targets:
            plain = self.tls_fallback.get(ip, 0) > now
            key = (dest.key, ip, dest.hop.port, plain)
            pooled = self.pool.take(key)
            remote = f"{name}[{ip}]:{dest.hop.port}"
            if pooled is not None:
                return pooled, key, name, remote  # type: ignore[return-value]
            try:
                client = await self._open(ip, dest.hop.port, name, plain)
            except SmtpError as exc:
                if exc.tls_handshake_failed and not plain:
                    # Opportunistic TLS: retry this host in clear and remember it.
                    self.tls_fallback[ip] = now + TLS_FALLBACK_SECONDS
                    self.stats.tls_fallbacks += 1
                    emit(
                        "tls_fallback",
                        level=logging.WARNING,
                        host=remote,
                        reason=exc.reply.text[:200],
                    )
                    key = (dest.key, ip, dest.hop.port, True)
                    try:
                        client = await self._open(ip, dest.hop.port, name, True)
                    except SmtpError as exc2:
                        last = exc2.reply
                        self._log_connect_failure(remote, exc2)
                        continue
                else:
                    last = exc.reply
                    self._log_connect_failure(remote, exc)
                    continue
            dest.shaper.opened(self.clock())
            return client, key, name, remote
        return last

    async def _open(self, ip: str, port: int, name: str, plain: bool) -> SmtpClient:
        d = self.config.delivery
        self.stats.connections += 1
        options = ClientOptions(
            helo_name=self.hostname,
            tls="none" if plain else "opportunistic",
            verify_certificate=False,
            ca_file=self.ca_file,
            server_name=name,
            source_address=d.source_address or None,
            connect_timeout=d.connect_timeout,
            greeting_timeout=d.command_timeout,
            command_timeout=d.command_timeout,
            data_init_timeout=min(d.command_timeout, 120.0),
            data_block_timeout=min(d.command_timeout, 180.0),
            final_timeout=max(d.command_timeout, 600.0)
            if d.command_timeout >= 300
            else d.command_timeout,
        )
        return await SmtpClient.connect(ip, port, options)

    def _log_connect_failure(self, remote: str, exc: SmtpError) -> None:
        emit(
            "connect_failed",
            level=logging.INFO,
            host=remote,
            stage=exc.stage,
            kind=exc.kind,
            reply=str(exc.reply)[:300],
        )

    async def _body(self, message_id: str) -> bytes | None:
        data = self._bodies.get(message_id)
        if data is None:
            data = await self.queue.read_message(message_id)
            if data is None:
                return None
            self._bodies[message_id] = data
            while len(self._bodies) > 64:
                self._bodies.popitem(last=False)
        return data

    async def _transfer(self, client: SmtpClient, item: WorkItem, name: str, remote: str) -> None:
        """One SMTP transaction for one message's recipients at this destination."""
        message = item.message
        data = await self._body(message.id)
        if data is None:  # removed by an operator meanwhile
            self.held.difference_update(c.recipient.id for c in item.claims)
            return
        if count_received(header_block(data)) > MAX_HOPS:
            # RFC 5321 §6.3: a message that has crossed this many relays is looping.
            reply = Reply(554, "5.4.6", "Too many hops (mail loop detected)")
            await self.finish(
                item, [Outcome(c, Status.FAILED, reply, synthetic=True) for c in item.claims]
            )
            return
        specs = [
            RcptSpec(c.recipient.address, c.recipient.notify, c.recipient.orcpt)
            for c in item.claims
        ]
        try:
            result = await client.send(
                message.sender,
                specs,
                data,
                envid=message.envid,
                ret=message.ret,
                smtputf8=message.smtputf8
                or not message.sender.isascii()
                or any(not s.address.isascii() for s in specs),
                body_8bit=not data.isascii(),
            )
        except SmtpError as exc:
            # Replies already final when the session died (a RCPT refused) stand; the
            # rest are deferred with the session's error.
            partial = exc.partial or [None] * len(item.claims)
            outcomes = []
            for c, got in zip(item.claims, partial, strict=True):
                if got is None:
                    outcomes.append(
                        Outcome(
                            c,
                            Status.DEFERRED,
                            exc.reply,
                            remote,
                            name,
                            client.tls,
                            synthetic=exc.kind != "reply",
                        )
                    )
                else:
                    outcomes.append(
                        Outcome(c, _status_for(got, final=False), got, remote, name, client.tls)
                    )
            await self.finish(item, outcomes)
            return
        dsn_capable = "DSN" in client.extensions
        outcomes = []
        for claim, reply in zip(item.claims, result.replies, strict=True):
            status = _status_for(reply, final=reply == result.data_reply)
            outcomes.append(
                Outcome(
                    claim,
                    status,
                    reply,
                    remote,
                    name,
                    client.tls,
                    relayed_without_dsn=status is Status.DELIVERED and not dsn_capable,
                )
            )
        await self.finish(item, outcomes)

    async def _finish_all(
        self, items: list[WorkItem], status: Status, reply: Reply, *, synthetic: bool
    ) -> None:
        for item in items:
            await self.finish(
                item, [Outcome(c, status, reply, synthetic=synthetic) for c in item.claims]
            )

    # -- outcomes → queue, retries, DSNs --------------------------------------------

    async def finish(self, item: WorkItem, outcomes: list[Outcome]) -> None:
        """Record one transaction's outcomes; schedule retries; queue DSNs."""
        now = self.clock()
        message = item.message
        results: list[AttemptResult] = []
        failed: list[Report] = []
        delayed: list[Report] = []
        relayed: list[Report] = []
        lifetime = self.policy.message_lifetime
        for o in outcomes:
            rcpt = o.claim.recipient
            status, next_attempt, dsn_status = o.status, None, None
            warned = False
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
                    status, dsn_status = Status.EXPIRED, "4.4.7"
                else:
                    next_attempt = decision.at
                    if not rcpt.delay_warned and now - message.arrival >= self.delay_warning_after:
                        warned = True
                        delayed.append(
                            Report(rcpt, "delayed", o.reply, o.remote_name, now, o.synthetic)
                        )
            if status in (Status.FAILED, Status.EXPIRED):
                failed.append(
                    Report(rcpt, "failed", o.reply, o.remote_name, now, o.synthetic, dsn_status)
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
                    route="direct",
                    tls=o.tls,
                    delay_warned=warned,
                )
            )
            self._count(status)
            emit(
                "delivery",
                id=message.id,
                rcpt=rcpt.address,
                status=status.value,
                relay=o.remote or "none",
                tls=o.tls,
                reply=str(o.reply)[:300],
                attempt=rcpt.attempts + 1,
                delay=round(now - message.arrival, 3),
                next=round(next_attempt - now, 1) if next_attempt else None,
            )
        # Recording is handed to the recorder task: the session goes on to its next
        # transaction at once, and many transactions share one queue write.
        self._outbox.append((message, results, failed, delayed, relayed, now))
        self._ensure_recorder()

    # -- the recorder ------------------------------------------------------------------

    def _ensure_recorder(self) -> None:
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.get_running_loop().create_task(self._record_loop())

    async def _record_loop(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            results = [r for entry in batch for r in entry[1]]
            await self.queue.record(self.owner, results, now=max(e[5] for e in batch))
            self.held.difference_update(r.recipient_id for r in results)
            if self.config.delivery.bounces:
                for message, _results, failed, delayed, relayed, now in batch:
                    await self._reports(message, failed, delayed, relayed, now)

    async def flush(self) -> None:
        """Wait until every outcome so far is recorded (shutdown, tests)."""
        while self._outbox or (self._recorder is not None and not self._recorder.done()):
            if self._recorder is None or self._recorder.done():
                self._ensure_recorder()
            await asyncio.shield(self._recorder)  # type: ignore[arg-type]

    async def _reports(
        self,
        message: MessageInfo,
        failed: list[Report],
        delayed: list[Report],
        relayed: list[Report],
        now: float,
    ) -> None:
        if message.sender == "" and failed:
            # A DSN that cannot be delivered is dropped (never bounce a bounce).
            self.stats.dsn_dropped += len(failed)
            for r in failed:
                emit(
                    "dsn_dropped",
                    level=logging.WARNING,
                    id=message.id,
                    rcpt=r.recipient.address,
                    reply=str(r.reply)[:300],
                )
            return
        for reports in (failed, delayed, relayed):
            if reports:
                await self._send_dsn(message, reports, now)

    async def _send_dsn(self, message: MessageInfo, reports: list[Report], now: float) -> None:
        original = await self._body(message.id) or b""
        envelope = dsn_envelope(
            message,
            original,
            reports,
            hostname=self.hostname,
            bounce_from=self.bounce_from,
            now=now,
        )
        if envelope is None:
            return
        qid = await self.queue.enqueue(envelope, expires=now + self.policy.message_lifetime)
        self.stats.bounced += 1
        emit(
            "dsn",
            id=qid,
            about=message.id,
            to=message.sender,
            action=reports[0].action,
            rcpts=len(reports),
        )
        if self.on_enqueue is not None:
            self.on_enqueue()

    def _count(self, status: Status) -> None:
        s = self.stats
        if status is Status.DELIVERED:
            s.sent += 1
        elif status is Status.FAILED:
            s.failed += 1
        elif status is Status.EXPIRED:
            s.expired += 1
        else:
            s.deferred += 1


def _status_for(reply: Reply, *, final: bool) -> Status:
    """Recipient status from its reply (RFC 5321 §4.2.1 classes)."""
    if 200 <= reply.code < 300:
        return Status.DELIVERED
    if reply.code >= 500:
        # RFC 5321 §4.5.3.1.10: 552 to RCPT ("too many recipients") is temporary; a size
        # refusal (5.3.4) stays permanent.
        if reply.code == 552 and not final and reply.enhanced != "5.3.4":
            return Status.DEFERRED
        return Status.FAILED
    return Status.DEFERRED
