"""Delivery sessions: queued work for one destination, carried over the plan's next hops.

The scheduler hands a ``Destination`` (a recipient domain: its pending work and limits)
to ``run_session``. For each message the session asks the routing plan where to go --
the domain's MX hosts, a fixed host, the smart host set, in order -- and moves each
recipient on to the next hop only when the plan allows it (hybrid mode: a deferral or a
blocklisting at the MX goes on through the relay in the same attempt; a 550 "user
unknown" does not). Connections are opened lazily, reused while the session lasts and
returned to the pool afterwards. Outcomes go to the ``Recorder``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import random
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry.config import RelayConfig, SmartHost
from ferry.delivery import credentials
from ferry.delivery.client import (
    ClientOptions,
    RcptSpec,
    SmtpClient,
    SmtpError,
    mx_options,
    session_options,
)
from ferry.delivery.mx import MxError, MxHost, MxResolver, mx_targets
from ferry.delivery.outcomes import (
    Stage,
    classify_reply,
    is_blocked_reply,
    transport_failure_reply,
)
from ferry.delivery.pool import ConnectionPool
from ferry.delivery.recorder import DeliveryStats, Outcome, Recorder
from ferry.delivery.routes import NextHop
from ferry.delivery.routing import (
    RoutePlan,
    hop_smart_host_names,
    match_route,
    plan_route,
    should_fall_back,
)
from ferry.delivery.shaping import DestinationShaper, is_throttle_reply
from ferry.delivery.smart_mode import (
    DirectOutcome,
    GroupSnapshot,
    SmartRouter,
    destination_group,
)
from ferry.delivery.smarthosts import (
    BreakerSnapshot,
    CountStatus,
    SmartHostSet,
    is_transport_failure,
)
from ferry.dkim import KeyStore, Signer
from ferry.dkim.keys import SERVE_RECHECK_NS
from ferry.envelope import Reply, Status
from ferry.events import (
    ConnectFailed,
    DkimUnsigned,
    HopFallback,
    RouteFallback,
    RouteInvalid,
    SmartHostFailed,
    SmartHostUnusable,
    Throttled,
    TlsFallback,
    emit,
)
from ferry.message import MAX_HOPS, count_received, header_block
from ferry.queue.base import ClaimedRecipient, MessageInfo, Queue
from ferry.queue.journal import OutcomeJournal
from ferry.queue.limits import LocalLimits, SharedLimits, Slot

# How long a host whose TLS handshake failed is spoken to in plain text (opportunistic
# TLS only: a broken STARTTLS must not block delivery forever, nor be retried each time).
TLS_FALLBACK_SECONDS = 3600.0

# With limits shared by several nodes (``queue.limits``): how soon a destination whose
# connection slots are all taken (by any node) is looked at again...
SLOT_RETRY_SECONDS = 0.25
# ...how long an idle pooled connection may keep its slot from the other nodes...
SHARED_IDLE_SECONDS = 2.0
# ...and how long a transaction waits for a smart host's slot before trying the next.
SMART_SLOT_WAIT_SECONDS = 30.0
# Shared smart-mode windows are read again from a little before the newest one seen: a
# node's clock may lag, and a row may commit after a later-stamped one.
WINDOW_READ_SLACK = 10.0


@dataclass(slots=True)
class WorkItem:
    """One message's recipients at one destination."""

    message: MessageInfo
    claims: list[ClaimedRecipient]


@dataclass(slots=True)
class Destination:
    """Work waiting for one recipient domain, and that domain's limits."""

    domain: str
    shaper: DestinationShaper
    relayed: bool = False  # its route starts at a smart host: domain limits do not apply
    pending: collections.deque[WorkItem] = field(default_factory=collections.deque)

    @property
    def key(self) -> str:
        return self.domain

    def take_all(self) -> list[WorkItem]:
        items = list(self.pending)
        self.pending.clear()
        return items


@dataclass(slots=True)
class _Conn:
    """A connection held by a session."""

    client: SmtpClient
    key: tuple[object, ...]
    name: str  # the server's host name
    remote: str  # "name[ip]:port"
    route: str
    limit: int  # messages per connection
    smart_host: str | None = None


class _Stop(Exception):
    """End the session now (throttled); the current item has been put back."""


@dataclass
class _Session:
    conns: dict[str, _Conn] = field(default_factory=dict)
    dead: dict[str, Reply] = field(default_factory=dict)  # hops that could not connect
    # MX answers for this session's destination (the resolver caches too, but asking
    # it per message costs more than the message itself on a fast link)
    mx: dict[str, list[MxHost] | MxError] = field(default_factory=dict)
    # Hosts that failed, per hop: "host[ip]:port reply" (recorded with each attempt).
    tried: dict[str, list[str]] = field(default_factory=dict)
    # Queue IDs a connection failure now affects (the message in hand and the next ones).
    affected: str = ""


# Bodies fetched ahead per session: enough to batch reads, small enough for big mail.
PREFETCH_MESSAGES = 50
PREFETCH_BYTES = 8_000_000


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
        limits: SharedLimits | None = None,
        journal: OutcomeJournal | None = None,
    ) -> None:
        d = config.delivery
        self.config = config
        #: Slots and rates shared with other nodes; LocalLimits (nothing more than this
        #: process's own counts) with one node.
        self.limits: SharedLimits = limits or LocalLimits()
        self.queue = queue
        self.resolver = resolver
        self.owner = owner
        self.clock = clock
        self.ca_file = ca_file
        self.pool = ConnectionPool(max_transactions=d.messages_per_connection)
        self.tls_fallback: dict[str, float] = {}
        self.hostname = config.server.hostname
        self.smart_hosts = SmartHostSet(config.smart_hosts, base_cooldown=d.smart_host_cooldown)
        self.smart_host_names = [h.name for h in config.smart_hosts]
        self.smart_slots = {
            h.name: asyncio.Semaphore(h.max_connections) for h in config.smart_hosts
        }
        self.router = SmartRouter(
            window=d.smart_window,
            min_samples=d.smart_min_samples,
            threshold=d.smart_threshold,
            cooldown=d.smart_cooldown,
        )
        self.block_patterns = tuple(d.block_patterns)
        self._bodies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.signer = make_signer(config, SERVE_RECHECK_NS)  # no stat calls per message
        self.group_shapers: dict[str, DestinationShaper] = {}
        # Other nodes' smart-mode windows (row name -> group, outcomes) and how far read.
        self._windows: dict[str, tuple[str, list[tuple[float, str]]]] = {}
        self._windows_read = -math.inf
        self.recorder = Recorder(
            config,
            queue,
            owner=owner,
            read_body=self._body,
            clock=clock,
            rng=rng,
            on_enqueue=on_enqueue,
            journal=journal,
        )

    # The scheduler's view -----------------------------------------------------------

    @property
    def stats(self) -> DeliveryStats:
        return self.recorder.stats

    @property
    def held(self) -> set[int]:
        return self.recorder.held

    async def flush(self) -> None:
        await self.recorder.flush()

    async def share_state(self) -> None:
        """With other nodes: publish this node's breaker changes and adopt theirs (the
        latest change wins). Nothing to do for one node."""
        if not self.limits.shared or not self.smart_hosts:
            return
        changed = self.smart_hosts.changes()
        records = {n: (b.changed_at, b.as_json()) for n, b in changed.items()}
        shared = await self.limits.share("breaker", records)
        if changed and not shared:
            self.smart_hosts.unshared(changed)  # not stored: say it again next time
        for name, (at, data) in shared.items():
            try:
                snapshot = BreakerSnapshot.from_json(at, data)
            except (TypeError, ValueError):
                continue  # a record this version cannot read: keep our own view
            self.smart_hosts.adopt(name, snapshot)
        if self.config.delivery.mode == "smart":
            await self._share_smart_mode()

    async def _share_smart_mode(self) -> None:
        """Smart mode's decisions (the latest change wins) and windows (each node's own
        outcomes, merged) with the other nodes."""
        now = self.clock()
        changed = self.router.changes()
        records = {g: (s.changed_at, s.as_json()) for g, s in changed.items()}
        shared = await self.limits.share("smart", records)
        if changed and not shared:
            self.router.unshared(changed)
        for group, (at, data) in shared.items():
            with contextlib.suppress(TypeError, ValueError):
                self.router.adopt(group, GroupSnapshot.from_json(at, data), now)
        own = self.router.own_outcomes()
        rows = {
            f"{group}\n{self.owner}": (
                outcomes[-1][0],
                {"group": group, "outcomes": [[t, o] for t, o in outcomes]},
            )
            for group, outcomes in own.items()
        }
        theirs = await self.limits.share(
            "smart-window", rows, after=self._windows_read - WINDOW_READ_SLACK
        )
        touched: set[str] = set()
        for row, (at, data) in theirs.items():
            if row.endswith(f"\n{self.owner}"):
                continue  # our own, already in the window
            try:
                group = str(data["group"])
                outcomes = [(float(t), str(o)) for t, o in data["outcomes"]]
            except (KeyError, TypeError, ValueError):
                continue
            self._windows[row] = (group, outcomes)
            self._windows_read = max(self._windows_read, at)
            touched.add(group)
        for group in sorted(touched):
            others = [e for g, outcomes in self._windows.values() if g == group for e in outcomes]
            self.router.merge(group, others, now)

    async def _claim_smart_probe(self, group: str, before: GroupSnapshot) -> bool:
        """This node just took ``group``'s direct probe: claim it for all nodes (else
        back to ``before``, and the newer state if known)."""
        now = self.router.snapshot(group)
        stands = await self.limits.claim(
            "smart", group, before.changed_at, (now.changed_at, now.as_json())
        )
        if stands is None:
            return True
        self.router.restore(group, before)
        with contextlib.suppress(TypeError, ValueError):
            self.router.adopt(group, GroupSnapshot.from_json(*stands), self.clock())
        return False

    async def _claim_probe(self, name: str, before: BreakerSnapshot) -> bool:
        """This node just took host ``name``'s half-open probe: claim it for all nodes.

        Claimed only if nobody changed the breaker since ``before`` (what this node
        knew); else the breaker goes back to ``before`` and takes the newer state."""
        breaker = self.smart_hosts.breakers[name]
        now = breaker.snapshot()
        stands = await self.limits.claim(
            "breaker", name, before.changed_at, (now.changed_at, now.as_json())
        )
        if stands is None:
            return True
        breaker.restore(before)
        with contextlib.suppress(TypeError, ValueError):
            self.smart_hosts.adopt(name, BreakerSnapshot.from_json(*stands))
        return False

    def is_relayed(self, domain: str) -> bool:
        """Does this domain's route start at a smart host (known without DNS)?"""
        plan = self._base_plan(domain)
        return plan.hops[0].kind == "smarthost"

    # -- the session ---------------------------------------------------------------

    async def run_session(self, dest: Destination) -> None:
        """Deliver ``dest.pending`` until it is empty or the destination is throttled.

        If the session is cancelled (shutdown), what it still holds stays leased in the
        queue and is handed back when the scheduler releases its leases.
        """
        session = _Session()
        try:
            while dest.pending:
                # Take the item before any await: other sessions of this destination
                # pop from the same deque meanwhile (issue 10.7).
                item = dest.pending.popleft()
                try:
                    await self._prefetch(item, dest)
                    await self._deliver(dest, item, session)
                except _Stop:
                    return  # the item is back in dest.pending or recorded
                except Exception:
                    # Never leave a claimed recipient silent: a bug here defers the
                    # message (retried later) instead of stranding it InProgress.
                    logging.getLogger("ferry.delivery").exception("delivery failed")
                    reply = Reply(451, "4.3.0", "Internal error during delivery; will retry")
                    await self._finish(
                        item,
                        [Outcome(c, Status.DEFERRED, reply, synthetic=True) for c in item.claims],
                    )
        finally:
            for conn in session.conns.values():
                self.pool.give(conn.key, conn.client)

    async def _prefetch(self, first: WorkItem, dest: Destination) -> None:
        """Read this message's bytes and the next ones' in one queue read, not one each."""
        if first.message.id in self._bodies:
            return  # already read ahead
        wanted: list[str] = []
        size = 0
        # The snapshot is taken without an await: the deque cannot change under it.
        for item in itertools.chain(
            (first,), itertools.islice(dest.pending, PREFETCH_MESSAGES - 1)
        ):
            mid = item.message.id
            if mid not in self._bodies and mid not in wanted:
                if wanted and size + item.message.size > PREFETCH_BYTES:
                    break
                wanted.append(mid)
                size += item.message.size
        if len(wanted) > 1:
            for mid, data in (await self.queue.read_messages(wanted)).items():
                self._remember(mid, data)

    def _remember(self, message_id: str, data: bytes) -> None:
        self._bodies[message_id] = data
        while len(self._bodies) > 2 * PREFETCH_MESSAGES * 4:
            self._bodies.popitem(last=False)

    def _base_plan(self, domain: str, **kw: object) -> RoutePlan:
        d = self.config.delivery
        kw.setdefault("routes", self.config.routes)
        return plan_route(
            domain,
            mode=d.mode,
            smart_hosts=self.smart_host_names,
            mx_port=d.mx_port,
            **kw,  # type: ignore[arg-type]
        )

    async def _plan(
        self, domain: str, override: str | None = None, session: _Session | None = None
    ) -> tuple[RoutePlan, list[MxHost] | None, str | None] | Outcome:
        """The route for one message at ``domain`` (an Outcome template when none).

        ``override`` is a per-message route set by an embedder's hook: a smart host
        name, "direct" or "mx:host[:port]", as in ``[routes]``.
        """
        routes = self.config.routes
        if override:
            routes = {domain: override}
            try:
                self._base_plan(domain, routes=routes)
            except ValueError:
                emit(RouteInvalid(domain, override))
                routes = self.config.routes
        plan = self._base_plan(domain, routes=routes)
        smart = (
            self.config.delivery.mode == "smart"
            and match_route(domain, routes) is None
            and bool(self.smart_host_names)
        )
        if not smart and not any(h.kind == "mx" for h in plan.hops):
            return plan, None, None
        try:
            known = session.mx.get(domain) if session is not None else None
            if isinstance(known, MxError):
                raise known
            mx_hosts = known if known is not None else await self.resolver.resolve(domain)
            if session is not None:
                session.mx[domain] = mx_hosts
        except MxError as exc:
            if session is not None:
                session.mx[domain] = exc
            if exc.permanent:  # NXDOMAIN, null MX: answers, not failures
                return _template(Status.FAILED, exc.reply)
            fallback = self._base_plan(domain, routes=routes, mx_failed=True)
            if any(h.kind == "mx" for h in fallback.hops):
                return _template(Status.DEFERRED, exc.reply)
            emit(RouteFallback(domain, fallback.reason))
            return fallback, None, None
        group = None
        if smart:
            group = destination_group([h.name for h in mx_hosts])
            before = self.router.snapshot(group) if self.limits.shared else None
            choice, why = self.router.choose(group, self.clock())
            if (
                before is not None
                and self.router.snapshot(group) != before
                and not await self._claim_smart_probe(group, before)
            ):
                choice, why = "relay", "relay while a direct probe is outstanding"
            plan = self._base_plan(domain, routes=routes, smart_choice=choice, smart_reason=why)
        return plan, mx_hosts, group

    async def _deliver(self, dest: Destination, item: WorkItem, session: _Session) -> None:
        message = item.message
        data = await self._body(message.id)
        if data is None:  # removed by an operator meanwhile
            self.recorder.drop(item.claims)
            return
        signed = self._sign(message, data)
        if signed is None:
            reply = Reply(451, "4.7.0", "DKIM signing is required for this domain and failed")
            await self._finish(
                item, [Outcome(c, Status.DEFERRED, reply, synthetic=True) for c in item.claims]
            )
            return
        if count_received(header_block(data)) > MAX_HOPS:
            # RFC 5321 §6.3: a message that has crossed this many relays is looping.
            reply = Reply(554, "5.4.6", "Too many hops (mail loop detected)")
            await self._finish(
                item, [Outcome(c, Status.FAILED, reply, synthetic=True) for c in item.claims]
            )
            return
        planned = await self._plan(dest.domain, message.extra.get("route"), session)
        if isinstance(planned, Outcome):
            await self._finish(
                item,
                [Outcome(c, planned.status, planned.reply, synthetic=True) for c in item.claims],
            )
            return
        plan, mx_hosts, group = planned
        if mx_hosts and self.config.shaping and dest.domain not in self.config.shaping:
            self._join_group(dest, group or destination_group([h.name for h in mx_hosts]))
        now = self.clock()
        rated = plan.hops[0].kind != "smarthost"
        if rated:
            if dest.shaper.send_wait(now) > 0 or not await self._shared_rate(
                dest, "msg", dest.shaper.message_rates(), now
            ):
                dest.pending.appendleft(item)  # over this destination's message rate
                raise _Stop
            # Spend the slot now, before the transfer's awaits: the other sessions of
            # this destination must not all see the last free one (issue 10.7).
            dest.shaper.reserve_send(now)
        open_claims = list(item.claims)
        final: list[Outcome] = []
        session.affected = ",".join(
            [message.id, *(w.message.id for w in itertools.islice(dest.pending, 9))]
        )
        recorded = False  # some outcomes of this item are already in the queue
        decided: list[Outcome] = []  # every outcome recorded, for the throttle check
        for i, hop in enumerate(plan.hops):
            last = i == len(plan.hops) - 1
            try:
                results = await self._via(hop, dest, item, open_claims, signed, mx_hosts, session)
            except _Stop:
                # Throttled before this hop could connect. Nothing decided yet: the item
                # waits in the destination's queue. Some recipients decided at an
                # earlier hop: those are recorded, the rest deferred to a later attempt.
                if not recorded and not final and len(open_claims) == len(item.claims):
                    dest.pending.appendleft(item)
                else:
                    reply = Reply(451, "4.4.5", "Destination throttled; will retry")
                    await self._finish(
                        item,
                        final
                        + [Outcome(c, Status.DEFERRED, reply, synthetic=True) for c in open_claims],
                    )
                raise
            if hop.kind == "mx" and group is not None:
                self.router.record_direct(
                    group, self.clock(), _summary(results, self.block_patterns)
                )
            carried = []
            for o in results:
                if (
                    not last
                    and o.status is not Status.DELIVERED
                    and should_fall_back(
                        plan,
                        transport_failure=o.transport,
                        reply=None if o.transport else o.reply,
                        block_patterns=self.block_patterns,
                    )
                ):
                    carried.append(o.claim)
                    self.stats.fallbacks += 1
                    emit(
                        HopFallback(
                            queue_id=message.id,
                            recipient=o.claim.recipient.address,
                            route=o.route,
                            reply=o.reply,
                            next_hop=plan.hops[i + 1].label,
                            reason=plan.reason,
                        )
                    )
                else:
                    final.append(o)
            open_claims = carried
            if not open_claims:
                break
            if final:
                # Issue 10.1: what this hop settled (delivered, above all) is recorded
                # before the next hop's transaction starts, so a crash there cannot
                # send it twice.
                await self._finish(item, final)
                decided += final
                final, recorded = [], True
        await self._finish(item, final)
        decided += final
        if any(
            is_throttle_reply(o.reply.code, o.reply.text) and o.route == "direct" for o in decided
        ):
            pause = dest.shaper.throttled(self.clock())
            emit(Throttled(dest.domain, pause, dest.shaper.allowed_connections))
            raise _Stop
        dest.shaper.sent(self.clock(), reserved=rated)

    def _join_group(self, dest: Destination, group: str) -> None:
        """``[shaping."google.com"]``: every domain hosted there shares one set of limits."""
        if group not in self.config.shaping:
            return
        shared = self.group_shapers.get(group)
        if shared is None:
            shared = self.group_shapers[group] = make_shaper(self.config, group)
        if dest.shaper is not shared:
            shared.active += dest.shaper.active  # this session now counts there
            dest.shaper = shared

    def _sign(self, message: MessageInfo, data: bytes) -> bytes | None:
        """The bytes to send: DKIM-Signature fields + the message; None = must defer.

        RFC 6376: signed at delivery time, after every change Ferry makes, for each
        transaction (~0.3 ms), so a rotated or new key is used at the next attempt.
        """
        result = self.signer.sign(data, envelope_sender=message.sender)
        stats = self.stats
        if result.signed:
            stats.dkim_signed += 1
        else:
            stats.dkim_unsigned += 1
            code = getattr(result, "reason_code", None) or "error"
            stats.dkim_unsigned_reasons[code] = stats.dkim_unsigned_reasons.get(code, 0) + 1
            if result.notable:  # not when DKIM is disabled or no key exists at all
                emit(
                    DkimUnsigned(
                        result.unsigned_reason, queue_id=message.id, required=result.required
                    )
                )
        if result.signed or not result.required:
            return result.headers + data
        return None

    async def _finish(self, item: WorkItem, outcomes: list[Outcome]) -> None:
        """Record outcomes; returns once they are committed or in the outcome journal
        (issue 10.1: the session's connection starts no new transaction before its last
        one is recorded)."""
        if outcomes:
            await self.recorder.finish(item.message, outcomes)

    # -- one hop -------------------------------------------------------------------

    async def _via(
        self,
        hop: NextHop,
        dest: Destination,
        item: WorkItem,
        claims: list[ClaimedRecipient],
        data: bytes,
        mx_hosts: list[MxHost] | None,
        session: _Session,
    ) -> list[Outcome]:
        if hop.kind == "smarthost":
            return await self._via_smart_hosts(hop, item, claims, data, session)
        route = "direct" if hop.kind == "mx" else hop.label
        if hop.kind == "mx":
            targets = mx_targets(mx_hosts or [])
        else:
            try:
                targets = [(hop.name, a) for a in await self.resolver.host_addresses(hop.name)]
            except MxError as exc:
                return _all(claims, Status.DEFERRED, exc.reply, route=route, transport=True)
        conn = await self._mx_conn(hop, route, dest, targets, session)
        tried = tuple(session.tried.get(hop.label, ()))
        if isinstance(conn, Reply):
            return _with_tried(
                _all(claims, Status.DEFERRED, conn, route=route, transport=True), tried
            )
        return _with_tried(
            await self._transfer(conn, item, claims, data, session, hop.label), tried
        )

    async def _mx_conn(
        self,
        hop: NextHop,
        route: str,
        dest: Destination,
        targets: list[tuple[str, str]],
        session: _Session,
    ) -> _Conn | Reply:
        """The session's connection for this hop, or the first MX address that answers."""
        held = session.conns.get(hop.label)
        if held is not None:
            if self._reusable(held):
                return held
            del session.conns[hop.label]
            self.pool.give(held.key, held.client)
        if hop.label in session.dead:
            return session.dead[hop.label]
        last: Reply = transport_failure_reply("refused", f"no usable address for {hop.name}")
        now = self.clock()
        limit = self.config.delivery.messages_per_connection
        tried = False
        slot: Slot | None = None  # taken before the first new connection, kept on failure
        try:
            for name, ip in targets:  # RFC 5321 §5.1: in preference order
                now = self.clock()  # not the time before the last target's connect attempt
                plain = self.tls_fallback.get(ip, 0) > now
                key = (hop.label, ip, hop.port, plain)
                remote = f"{name}[{ip}]:{hop.port}"
                pooled = self.pool.take(key)
                if pooled is not None:
                    if slot is not None:
                        slot.release()  # the pooled connection holds its own
                        slot = None
                    conn = _Conn(pooled, key, name, remote, route, limit)  # type: ignore[arg-type]
                    session.conns[hop.label] = conn
                    return conn
                if not (
                    dest.shaper.new_connections.allowed(now) and now >= dest.shaper.paused_until
                ) or (slot is None and (slot := await self._destination_slot(dest, now)) is None):
                    if tried:
                        break  # some hosts failed and the rate is spent: this attempt is over
                    raise _Stop  # the connection rate is spent: wait, as the scheduler will
                tried = True
                # Counted when decided, not when connected: concurrent sessions sharing these
                # limits (an MX group) must not all see the last free slot.
                dest.shaper.opened(now)
                try:
                    client = await self._open(ip, hop.port, name, plain)
                except SmtpError as exc:
                    if not (exc.tls_handshake_failed and not plain):
                        last = exc.reply
                        self._log_connect_failure(remote, exc, session.affected)
                        _note_tried(session, hop.label, remote, exc.reply)
                        continue
                    # Opportunistic TLS: retry this host in clear and remember it.
                    self.tls_fallback[ip] = now + TLS_FALLBACK_SECONDS
                    self.stats.tls_fallbacks += 1
                    emit(TlsFallback(remote, exc.reply))
                    key = (hop.label, ip, hop.port, True)
                    try:
                        client = await self._open(ip, hop.port, name, True)
                    except SmtpError as exc2:
                        last = exc2.reply
                        self._log_connect_failure(remote, exc2, session.affected)
                        _note_tried(session, hop.label, remote, exc2.reply)
                        continue
                self._hold(client, slot)
                conn = _Conn(client, key, name, remote, route, limit)
                session.conns[hop.label] = conn
                return conn
        except BaseException:
            if slot is not None:
                slot.release()  # not tied to a connection yet
            raise
        if slot is not None:
            slot.release()  # no connection came of it
        session.dead[hop.label] = last
        return last

    def _reusable(self, conn: _Conn) -> bool:
        """May a session's connection carry its next message?"""
        return (
            conn.client.usable
            and conn.client.transactions < conn.limit
            and not self.pool.slot_lost(conn.client)
        )

    def _hold(self, client: SmtpClient, slot: Slot | None) -> None:
        """Tie a shared slot to the connection it was taken for (released at close)."""
        if slot is not None and self.limits.shared:
            self.pool.hold(client, slot, idle_timeout=SHARED_IDLE_SECONDS)

    async def _destination_slot(self, dest: Destination, now: float) -> Slot | None:
        """A connection slot of ``dest`` shared with the other nodes, and one place in
        its shared connection rate (None: wait; the scheduler comes back later).

        One node alone: a free slot (its sessions are counted by the scheduler)."""
        if not self.limits.shared:
            return await self.limits.take_slot(dest.shaper.key, dest.shaper.max_connections)
        slot = await self.limits.take_slot(f"dest:{dest.shaper.key}", dest.shaper.max_connections)
        if slot is None:
            dest.shaper.wait_shared(now + SLOT_RETRY_SECONDS)
            return None
        cpm = dest.shaper.new_connections
        if not await self._shared_rate(dest, "conn", [(cpm.limit, cpm.period)], now):
            slot.release()
            return None
        return slot

    async def _shared_rate(
        self, dest: Destination, kind: str, windows: list[tuple[int, float]], now: float
    ) -> bool:
        """Count one ``kind`` event in the rates shared with other nodes (True: go)."""
        if not self.limits.shared or not windows:
            return True
        wait = await self.limits.take_rate(f"{kind}:{dest.shaper.key}", windows, now)
        if wait > 0:
            dest.shaper.wait_shared(now + wait)
            return False
        return True

    async def _via_smart_hosts(
        self,
        hop: NextHop,
        item: WorkItem,
        claims: list[ClaimedRecipient],
        data: bytes,
        session: _Session,
    ) -> list[Outcome]:
        """Through the smart host set: by priority and weight, failing over on transport
        errors (which open that host's circuit breaker)."""
        names = hop_smart_host_names(hop, self.smart_host_names)

        def tried() -> tuple[str, ...]:
            return tuple(t for n in names for t in session.tried.get(f"smarthost:{n}", ()))

        last = transport_failure_reply("refused", "no smart host is available")
        final: list[Outcome] = []
        broken: list[Outcome] = []
        breakers = self.smart_hosts.breakers
        before = {n: breakers[n].snapshot() for n in names} if self.limits.shared else {}
        for host in self.smart_hosts.order(self.clock(), names):
            breaker = breakers[host.name]
            if breaker.state == "open":
                # Its circuit opened while this session was busy with an earlier host
                # (another session saw it fail): the order is older than that news.
                continue
            if (
                before
                and breaker.probing
                and breaker.snapshot() != before[host.name]
                and not await self._claim_probe(host.name, before[host.name])
            ):
                continue  # another node probes it (or none can say): not this one
            # The slot first, then the connection: a held connection checked as usable
            # and then left waiting for a slot may have timed out by the time it is used.
            async with self.smart_slots[host.name]:
                conn = await self._smart_conn(host, session)
                if isinstance(conn, Reply):
                    last = conn
                    continue
                outcomes = await self._transfer(conn, item, claims, data, session, conn.route)
            now = self.clock()
            broken = [o for o in outcomes if o.transport]
            if broken:
                _note_tried(session, f"smarthost:{host.name}", conn.remote, broken[0].reply)
                self.smart_hosts.report(
                    host.name,
                    now,
                    ok=False,
                    transport_failure=True,
                    error=str(broken[0].reply)[:200],
                )
            else:
                self.smart_hosts.report(host.name, now, ok=True)
            for o in outcomes:
                if not o.transport:
                    self.smart_hosts.count(host.name, _count_name(o.status))
                    final.append(o)
            if not broken:
                return _with_tried(final, tried())
            # The session broke (421, lost connection): the rest try the next host now.
            claims = [o.claim for o in broken]
        if broken:
            return _with_tried(final + broken, tried())
        return _with_tried(
            final
            + _all(claims, Status.DEFERRED, last, route=f"smarthost:{hop.name}", transport=True),
            tried(),
        )

    async def _smart_conn(self, host: SmartHost, session: _Session) -> _Conn | Reply:
        label = f"smarthost:{host.name}"
        held = session.conns.get(label)
        if held is not None:
            if self._reusable(held):
                return held
            del session.conns[label]
            self.pool.give(held.key, held.client)
        if label in session.dead:
            return session.dead[label]
        now = self.clock()
        slot: Slot | None = None
        try:
            addresses = await self.resolver.host_addresses(host.host)
        except MxError as exc:
            self.smart_hosts.report(
                host.name, now, ok=False, transport_failure=True, error=exc.text
            )
            session.dead[label] = exc.reply
            return exc.reply
        last: Reply = transport_failure_reply("refused", f"no address for {host.host}")
        try:
            for ip in addresses:
                key = (label, ip, host.port)
                remote = f"{host.host}[{ip}]:{host.port}"
                pooled = self.pool.take(key)
                if pooled is not None:
                    if slot is not None:
                        slot.release()  # the pooled connection holds its own
                        slot = None
                    conn = _Conn(
                        pooled,  # type: ignore[arg-type]
                        key,
                        host.host,
                        remote,
                        label,
                        host.max_messages_per_connection,
                        host.name,
                    )
                    session.conns[label] = conn
                    return conn
                if slot is None:
                    slot = await self._smart_slot(host)
                    if slot is None:
                        # Every node's connections to it are busy: not the host's fault.
                        return Reply(
                            451,
                            "4.4.5",
                            f"smart host {host.name}: all {host.max_connections} connections"
                            " (shared by every node) are busy; will retry",
                        )
                try:
                    client = await self._open_smart(ip, host)
                except credentials.CredentialError as exc:
                    last = transport_failure_reply("protocol", str(exc))
                    _note_tried(session, label, remote, last)
                    emit(SmartHostUnusable(host.name, str(exc), ids=session.affected or None))
                    break
                except SmtpError as exc:
                    last = exc.reply
                    _note_tried(session, label, remote, exc.reply)
                    # The reply and the host, never the credentials (they are not in exc).
                    emit(
                        SmartHostFailed(
                            host.name,
                            remote,
                            exc.stage,
                            exc.kind,
                            exc.reply,
                            ids=session.affected or None,
                        )
                    )
                    continue
                self._hold(client, slot)
                conn = _Conn(
                    client,
                    key,
                    host.host,
                    remote,
                    label,
                    host.max_messages_per_connection,
                    host.name,
                )
                session.conns[label] = conn
                return conn
        except BaseException:
            if slot is not None:
                slot.release()  # not tied to a connection yet
            raise
        if slot is not None:
            slot.release()
        self.smart_hosts.report(
            host.name, now, ok=False, transport_failure=True, error=str(last)[:200]
        )
        session.dead[label] = last
        return last

    async def _smart_slot(self, host: SmartHost) -> Slot | None:
        """A slot of ``host``'s ``max_connections`` shared by every node, waited for up
        to SMART_SLOT_WAIT_SECONDS (one node alone: its semaphore already counted)."""
        key, cap = f"smarthost:{host.name}", host.max_connections
        if not self.limits.shared:
            return await self.limits.take_slot(key, cap)
        deadline = time.monotonic() + SMART_SLOT_WAIT_SECONDS
        while True:
            slot = await self.limits.take_slot(key, cap)
            if slot is not None or time.monotonic() >= deadline:
                return slot
            # Another node holds them: nothing here would say when one frees.
            await asyncio.sleep(SLOT_RETRY_SECONDS)

    def _options(self, **kw: object) -> ClientOptions:
        return session_options(self.config, **kw)

    async def _open(self, ip: str, port: int, name: str, plain: bool) -> SmtpClient:
        self.stats.connections += 1
        options = mx_options(self.config, name, plain=plain, ca_file=self.ca_file)
        return await SmtpClient.connect(ip, port, options)

    async def _open_smart(self, ip: str, host: SmartHost) -> SmtpClient:
        self.stats.connections += 1
        tls = {"implicit": "implicit", "none": "none"}.get(host.tls) or (
            "required" if host.require_tls else "opportunistic"
        )
        mechanisms = {"plain": ("PLAIN",), "login": ("LOGIN",), "xoauth2": ("XOAUTH2",)}
        # a token command may take a while: never on the event loop
        token = await asyncio.to_thread(credentials.oauth_token, host)
        options = self._options(
            group=host.name,
            tls=tls,
            verify_certificate=host.verify_certificate,
            ca_file=host.ca_file or self.ca_file,
            server_name=host.host,
            username=host.username or None,
            password=credentials.password(host),
            oauth_token=token,
            auth_mechanisms=mechanisms.get(host.auth, ("PLAIN", "LOGIN")),
        )
        return await SmtpClient.connect(ip, host.port, options)

    def _log_connect_failure(self, remote: str, exc: SmtpError, ids: str = "") -> None:
        emit(ConnectFailed(remote, exc.reply, stage=exc.stage, kind=exc.kind, ids=ids or None))

    async def _body(self, message_id: str) -> bytes | None:
        data = self._bodies.get(message_id)
        if data is None:
            data = await self.queue.read_message(message_id)
            if data is None:
                return None
            self._remember(message_id, data)
        return data

    # -- one transaction -------------------------------------------------------------

    async def _transfer(
        self,
        conn: _Conn,
        item: WorkItem,
        claims: list[ClaimedRecipient],
        data: bytes,
        session: _Session,
        label: str,
    ) -> list[Outcome]:
        """One SMTP transaction for these recipients of one message."""
        message = item.message
        client = conn.client
        specs = [
            RcptSpec(c.recipient.address, c.recipient.notify, c.recipient.orcpt) for c in claims
        ]
        common = {
            "remote": conn.remote,
            "remote_name": conn.name,
            "route": conn.route,
            "session": outbound_session_id(client),
        }
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
            session.conns.pop(label, None)
            self.pool.give(conn.key, client)  # not usable: the pool closes it
            # Replies already final when the session died (a RCPT refused) stand; the
            # rest are deferred with the session's error and may try the next hop.
            partial = exc.partial or [None] * len(claims)
            stages = exc.partial_stages or ["rcpt"] * len(claims)
            transport = is_transport_failure(
                exc.reply if exc.kind == "reply" else None, stage=exc.stage
            )
            outcomes = []
            for c, got, got_at in zip(claims, partial, stages, strict=True):
                if got is None:
                    outcomes.append(
                        Outcome(
                            c,
                            Status.DEFERRED,
                            exc.reply,
                            tls=client.tls,
                            synthetic=exc.kind != "reply",
                            transport=transport,
                            **common,  # type: ignore[arg-type]
                        )
                    )
                else:
                    outcomes.append(
                        Outcome(
                            c,
                            _status_for(got, got_at),
                            got,
                            tls=client.tls,
                            **common,  # type: ignore[arg-type]
                        )
                    )
            return outcomes
        dsn_capable = "DSN" in client.extensions
        outcomes = []
        for claim, reply, stage in zip(claims, result.replies, result.stages, strict=True):
            status = _status_for(reply, stage)
            outcomes.append(
                Outcome(
                    claim,
                    status,
                    reply,
                    tls=client.tls,
                    relayed_without_dsn=status is Status.DELIVERED and not dsn_capable,
                    **common,  # type: ignore[arg-type]
                )
            )
        return outcomes


def _all(
    claims: list[ClaimedRecipient], status: Status, reply: Reply, *, route: str, transport: bool
) -> list[Outcome]:
    return [
        Outcome(c, status, reply, synthetic=True, transport=transport, route=route) for c in claims
    ]


def _count_name(status: Status) -> CountStatus:
    if status is Status.DELIVERED:
        return "sent"
    return "failed" if status is Status.FAILED else "deferred"


_outbound_ids: weakref.WeakKeyDictionary[SmtpClient, str] = weakref.WeakKeyDictionary()


def outbound_session_id(client: SmtpClient) -> str:
    """A short ID for one outbound SMTP connection, the same in every log line about it."""
    sid = _outbound_ids.get(client)
    if sid is None:
        sid = _outbound_ids[client] = secrets.token_hex(5)
    return sid


def _note_tried(session: _Session, label: str, remote: str, reply: Reply) -> None:
    """Remember a host that failed, for the attempt's record (`ferry queue show`)."""
    entries = session.tried.setdefault(label, [])
    if len(entries) < 20:  # a session is bounded, but keep the record short
        entries.append(f"{remote} {str(reply).splitlines()[0][:200]}")


def _with_tried(outcomes: list[Outcome], tried: tuple[str, ...]) -> list[Outcome]:
    if tried:
        for o in outcomes:
            o.tried = tried
    return outcomes


def _template(status: Status, reply: Reply) -> Outcome:
    return Outcome(None, status, reply)  # type: ignore[arg-type]


def _summary(outcomes: list[Outcome], patterns: tuple[str, ...]) -> DirectOutcome:
    """One direct attempt's result for smart mode's window."""
    if any(o.status is Status.DELIVERED for o in outcomes):
        return "delivered"
    if any(o.reply.is_permanent and is_blocked_reply(o.reply, patterns) for o in outcomes):
        return "blocked"
    if any(o.transport or o.reply.is_transient for o in outcomes):
        return "deferred"
    return "failed"


def _status_for(reply: Reply, stage: Stage) -> Status:
    """Recipient status from the reply that decided it at ``stage`` (the one classifier)."""
    return classify_reply(reply, stage=stage).status


def make_signer(config: RelayConfig, recheck_ns: int = 0) -> Signer:
    """The DKIM signer the configuration describes (``recheck_ns``: see KeyStore)."""
    k = config.dkim
    store = KeyStore(
        k.keys_dir, default_selector=k.selector, extra_keys=k.keys or None, recheck_ns=recheck_ns
    )
    return Signer(
        store,
        enabled=k.enabled,
        default_domain=k.default_domain or None,
        required_domains=k.required_domains,
    )


def make_shaper(config: RelayConfig, key: str) -> DestinationShaper:
    """The limits for a destination: [delivery]'s defaults, overridden by [shaping.<key>]."""
    d = config.delivery
    limits = config.shaping.get(key)

    def pick(name: str, default: int) -> int:
        value = getattr(limits, name, None) if limits is not None else None
        return default if value is None else int(value)

    return DestinationShaper(
        key=key,
        max_connections=pick("connections", d.connections_per_destination),
        connections_per_minute=pick("connections_per_minute", d.connections_per_minute),
        messages_per_minute=pick("messages_per_minute", d.messages_per_minute),
        messages_per_hour=pick("messages_per_hour", d.messages_per_hour),
    )
