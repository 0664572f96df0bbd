"""The scheduler (Postfix's qmgr): claims due recipients and hands them to sessions.

Loop: claim due recipients from the queue (highest priority first, then oldest), group
them per destination and per message, and start delivery sessions where the limits
allow: ``max_concurrent_deliveries`` in total, ``connections_per_destination`` and
``connections_per_minute`` per destination. A throttled destination simply waits --
its work is not claimed meanwhile (``exclude_domains``) -- and never delays another.
New mail wakes the loop at once (``notify``); otherwise it sleeps until the next
recipient is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.config import RelayConfig
from ferry.delivery.mx import MxResolver
from ferry.delivery.sessions import Delivery, Destination, WorkItem, make_shaper
from ferry.queue import open_limits
from ferry.queue.base import ClaimedRecipient, Queue
from ferry.queue.journal import OutcomeJournal
from ferry.queue.limits import SharedLimits
from ferry.queue.selection import ALL_DESTINATIONS

# How often a scheduler writes its statistics for `ferry stats` (another process).
STATS_INTERVAL = 2.0

# With a full backlog, the shortest time between two claims.
CLAIM_INTERVAL = 0.1

# Most recipients taken in one claim. A claim is a queue write, and sessions wait for
# their outcomes' commit before their next transaction (issue 10.1): a claim of
# thousands of rows would hold every such commit back (measured: ~18 % end to end).
CLAIM_BATCH = 200

# Shortest time between two passes of the scheduler loop.
LOOP_INTERVAL = 0.005

# Longest sleep with nothing due: picks up operator changes made from another process
# (`ferry queue retry`) and expires idle connections.
IDLE_POLL_SECONDS = 2.0

# With other nodes (PostgreSQL): how often smart hosts' breakers and smart mode's
# windows and decisions are shared with them.
SHARE_SECONDS = 1.0

# How often the scheduler re-reads the suspended destinations (`ferry queue suspend`,
# from any process): the longest a suspension takes to be obeyed.
SUSPENSIONS_POLL_SECONDS = 1.0


#: ``Scheduler.stats()`` keys that count what happened (added up across nodes by the
#: PostgreSQL queue); the other keys are states of the moment (sessions open, backlog...).
COUNTERS = (
    "sent",
    "failed",
    "deferred",
    "expired",
    "bounced",
    "double_bounces",
    "dsn_dropped",
    "connections",
    "connections_reused",
    "tls_fallbacks",
    "direct_sent",
    "direct_failed",
    "relay_sent",
    "relay_failed",
    "fallbacks",
    "dkim_signed",
    "dkim_unsigned",
    "mx_lookups",
    "mx_cache_hits",
)
#: The counters in each smart host's entry of ``stats()["smart_hosts"]``.
SMART_HOST_COUNTERS = ("sent", "failed", "deferred", "transport_failures")


def counter_key(*path: str) -> str:
    """A counter's place in ``Scheduler.stats()`` as one text key (a JSON array)."""
    return json.dumps(list(path), ensure_ascii=False, separators=(",", ":"))


def split_stats(
    stats: dict[str, Any], destination_counts: dict[str, dict[str, int]]
) -> tuple[dict[str, int], dict[str, Any]]:
    """``stats()`` as (counters by ``counter_key``, the states left once they are out).

    ``destination_counts``: the per-destination outcome counters (the recorder's), the
    counting part of ``stats()["destinations"]``.
    """
    counters = {counter_key(k): int(stats[k]) for k in COUNTERS}
    for reason, n in stats["dkim_unsigned_reasons"].items():
        counters[counter_key("dkim_unsigned_reasons", reason)] = int(n)
    state = {k: v for k, v in stats.items() if k not in COUNTERS}
    del state["dkim_unsigned_reasons"]
    hosts: dict[str, Any] = {}
    for name, host in stats["smart_hosts"].items():
        for k in SMART_HOST_COUNTERS:
            counters[counter_key("smart_hosts", name, k)] = int(host.get(k) or 0)
        hosts[name] = {k: v for k, v in host.items() if k not in SMART_HOST_COUNTERS}
    state["smart_hosts"] = hosts
    destinations: dict[str, Any] = {}
    for domain, entry in stats["destinations"].items():
        counts = destination_counts.get(domain, {})
        for k, n in counts.items():
            counters[counter_key("destinations", domain, k)] = int(n)
        rest = {k: v for k, v in entry.items() if k not in counts}
        if rest:
            destinations[domain] = rest
    state["destinations"] = destinations
    return counters, state


def flat_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The counters of ``Scheduler.stats()`` without the nested tables (for a log line)."""
    return {k: v for k, v in stats.items() if not isinstance(v, (dict, list))}


def stats_dir(config: RelayConfig) -> Path:
    """Where running schedulers publish their statistics."""
    return Path(config.queue.path) / "stats"


class Scheduler:
    """Claims work and runs delivery sessions until stopped."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        *,
        resolver: MxResolver | None = None,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        ca_file: str | None = None,
        limits: SharedLimits | None = None,
        journal: OutcomeJournal | None = None,
    ) -> None:
        """``journal``: the worker's outcome journal (SQLite queue, ferry/queue/journal.py)."""
        d = config.delivery
        self.config = config
        self.queue = queue
        self.owner = owner or f"{config.server.hostname}:{uuid.uuid4().hex[:12]}"
        # Connection slots and rates shared with the other nodes of a PostgreSQL queue.
        self.limits = limits if limits is not None else open_limits(config, name=self.owner)
        self.clock = clock
        self.resolver = resolver or MxResolver(
            config.dns.nameservers, timeout=config.dns.timeout, max_ttl=config.dns.mx_cache_ttl
        )
        self.delivery = Delivery(
            config,
            queue,
            self.resolver,
            owner=self.owner,
            clock=clock,
            rng=rng,
            ca_file=ca_file,
            on_enqueue=self.notify,
            limits=self.limits,
            journal=journal,
        )
        self.max_concurrent = d.max_concurrent_deliveries
        # Work held in memory (claimed, not yet sent): enough to keep every session busy,
        # small enough that nothing sits leased for long.
        self.max_backlog = max(200, 4 * d.max_concurrent_deliveries * d.messages_per_connection)
        self.per_destination_backlog = d.connections_per_destination * d.messages_per_connection
        self.destinations: dict[str, Destination] = {}
        self.sessions: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_claim = 0.0
        self._last_renewal = time.monotonic()
        self._last_share = -math.inf
        self.suspended: frozenset[str] = frozenset()
        self._suspensions_read = -math.inf
        # Counters already added to the queue's (PostgreSQL: `ferry stats` of all nodes).
        self._shared_counters: dict[str, int] = {}
        self._shares_stats = True  # until the queue says it keeps none

    # -- control -------------------------------------------------------------------

    def notify(self) -> None:
        """New work may be due (a message was accepted): look at once."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ferry-scheduler")

    async def flush(self) -> None:
        """Wait until every outcome so far is written to the queue."""
        await self.delivery.flush()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.gather(*self.sessions, return_exceptions=True)
        try:
            # Outcomes still being written: wait, but not forever (a dead disk must not
            # hang shutdown; unwritten outcomes' leases are released below and redone).
            await asyncio.wait_for(self.delivery.flush(), 30)
        except TimeoutError:
            logging.getLogger("ferry.delivery").error("outcomes not written at shutdown")
        self.write_stats()
        try:
            await asyncio.wait_for(self.share_stats(stopping=True), 10)
        except TimeoutError:
            logging.getLogger("ferry.delivery").warning("statistics not shared at shutdown")
        await self.delivery.pool.close()
        await self.limits.close()  # after the pool: its connections held the slots
        # Whatever was claimed but not finished goes back to the queue now.
        await self.queue.release_leases(self.owner)

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        last_stats = 0.0
        while not self._stopping:
            started = time.monotonic()
            self._wake.clear()
            try:
                claimed = await self._claim()
                self._dispatch()
                self.delivery.pool.expire()
                if time.monotonic() - last_stats >= STATS_INTERVAL:
                    last_stats = time.monotonic()
                    self.write_stats()
                    await self.share_stats()
                await self._renew_leases()
                if time.monotonic() - self._last_share >= SHARE_SECONDS:
                    self._last_share = time.monotonic()
                    await self.delivery.share_state()
                timeout = await self._sleep_time(claimed)
            except asyncio.CancelledError:
                raise
            except Exception:
                logging.getLogger("ferry.delivery").exception("scheduler error")
                timeout = 1.0
            # Under a stream of new mail, wake-ups come per accepted message; pacing the
            # loop lets one claim gather many of them (fewer queue writes, less locking).
            pause = LOOP_INTERVAL - (time.monotonic() - started)
            if pause > 0:
                await asyncio.sleep(pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _renew_leases(self) -> None:
        """Keep the leases of work in hand alive (throttled, or a long transfer), so no
        other worker takes it over while this one still has it."""
        lease = self.config.queue.lease_seconds
        now = time.monotonic()
        if now - self._last_renewal < lease / 3 or not self.delivery.held:
            return
        self._last_renewal = now
        await self.queue.extend_leases(
            self.owner, sorted(self.delivery.held), until=self.clock() + lease
        )

    def _backlog(self) -> int:
        return sum(len(d.pending) for d in self.destinations.values())

    def _working_backlog(self, now: float) -> int:
        """Work in hand that can move now: a paused or rate-limited destination's queue
        does not count, so it cannot crowd out every other destination's claims."""
        return sum(
            len(d.pending)
            for d in self.destinations.values()
            if (d.relayed or d.shaper.active or d.shaper.open_wait(now) <= 0)
            and not self._is_suspended(d.domain)
        )

    def _full(self) -> list[str]:
        """Domains with enough work in hand: leave the rest of theirs in the queue."""
        return [
            d.domain
            for d in self.destinations.values()
            if len(d.pending) >= self.per_destination_backlog
        ]

    async def _read_suspensions(self) -> frozenset[str]:
        """The destinations operators suspended (re-read at most every second)."""
        now = time.monotonic()
        if now - self._suspensions_read >= SUSPENSIONS_POLL_SECONDS:
            self._suspensions_read = now
            found = await self.queue.suspensions(now=self.clock())
            self.suspended = frozenset(s.domain for s in found)
        return self.suspended

    def _is_suspended(self, domain: str) -> bool:
        return ALL_DESTINATIONS in self.suspended or domain in self.suspended

    async def _claim(self) -> bool:
        """Claim due work if there is room; False when this pass did not claim."""
        suspended = await self._read_suspensions()
        if ALL_DESTINATIONS in suspended:
            return False  # delivery held: nothing is claimed
        backlog = self._working_backlog(self.clock())
        room = self.max_backlog - backlog
        if room <= 0:
            return False
        # A claim is a queue write, competing with intake's: with plenty in hand, claim
        # at most every CLAIM_INTERVAL instead of at every wake-up.
        now = time.monotonic()
        if backlog >= self.max_backlog // 4 and now - self._last_claim < CLAIM_INTERVAL:
            return False
        self._last_claim = now
        claimed = await self.queue.claim(
            self.owner,
            now=self.clock(),
            limit=min(room, CLAIM_BATCH),
            lease=self.config.queue.lease_seconds,
            exclude_domains=[*self._full(), *suspended],
        )
        self._add(claimed)
        return True

    def _add(self, claimed: list[ClaimedRecipient]) -> None:
        # Group per destination, then per message: one transaction per message there.
        held = self.delivery.held
        groups: dict[tuple[str, str], WorkItem] = {}
        for c in claimed:
            if c.recipient.id in held:
                continue  # its lease ran out while it waited here; we still have it
            held.add(c.recipient.id)
            domain = c.recipient.domain
            key = (domain, c.message.id)
            item = groups.get(key)
            if item is None:
                item = groups[key] = WorkItem(c.message, [])
                self._destination(domain).pending.append(item)
            item.claims.append(c)

    def _destination(self, domain: str) -> Destination:
        dest = self.destinations.get(domain)
        if dest is None:
            shaper = make_shaper(self.config, domain)
            dest = Destination(domain, shaper, relayed=self.delivery.is_relayed(domain))
            self.destinations[domain] = dest
        return dest

    def _dispatch(self) -> None:
        now = self.clock()
        for dest in list(self.destinations.values()):
            shaper = dest.shaper
            if self._is_suspended(dest.domain):
                continue  # its claimed work waits (leases renewed) until resumed
            # More sessions for a destination only when its backlog calls for them.
            while (
                dest.pending
                and len(self.sessions) < self.max_concurrent
                and (dest.relayed or shaper.active < shaper.allowed_connections)
                and (shaper.active == 0 or len(dest.pending) > 10 * shaper.active)
                and (
                    dest.relayed
                    or (shaper.can_open(now) and shaper.send_wait(now) <= 0)
                    or self.delivery.pool.has_idle(f"mx:{dest.domain}")
                )
            ):
                self._start_session(dest)
            if not dest.pending and shaper.active == 0 and len(self.destinations) > 1000:
                del self.destinations[dest.key]

    def _start_session(self, dest: Destination) -> None:
        dest.shaper.session_started()
        task = asyncio.get_running_loop().create_task(self.delivery.run_session(dest))
        self.sessions.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.sessions.discard(t)
            dest.shaper.session_ended()
            if not t.cancelled() and t.exception() is not None:
                logging.getLogger("ferry.delivery").error(
                    "delivery session failed", exc_info=t.exception()
                )
            self._wake.set()

        task.add_done_callback(done)

    async def _sleep_time(self, claimed: bool = True) -> float:
        now = self.clock()
        waits = [IDLE_POLL_SECONDS]
        for dest in self.destinations.values():
            if dest.pending and not dest.relayed and not self._is_suspended(dest.domain):
                w = max(dest.shaper.open_wait(now), dest.shaper.send_wait(now))
                if not math.isinf(w):
                    waits.append(max(0.0, w))
        due = None
        if ALL_DESTINATIONS not in self.suspended:
            due = await self.queue.next_due(exclude_domains=[*self._full(), *self.suspended])
        if due is not None:
            # Due work we did not claim this pass (no room, or pacing) is looked at
            # again after CLAIM_INTERVAL -- sooner would only spin; a session ending
            # wakes us anyway.
            waits.append(max(0.0 if claimed else CLAIM_INTERVAL, due - now))
        return max(0.0, min(waits))

    # -- statistics ------------------------------------------------------------------

    def write_stats(self) -> None:
        """Publish ``stats()`` as a file for `ferry stats` (atomic replace)."""
        d = stats_dir(self.config)
        try:
            d.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-." else "_" for c in self.owner)
            tmp = d / f".{safe}.tmp"
            tmp.write_text(json.dumps({"owner": self.owner, "at": time.time(), **self.stats()}))
            os.replace(tmp, d / f"{safe}.json")
        except OSError:
            logging.getLogger("ferry.delivery").warning("cannot write statistics", exc_info=True)

    async def share_stats(self, *, stopping: bool = False) -> None:
        """Add what was counted since the last call to the queue's counters, with the
        current states (PostgreSQL: where `ferry stats` adds up every node's). A failed
        write is retried with the next one: the increments are only forgotten once kept.
        """
        if not self._shares_stats:
            return
        counters, state = split_stats(self.stats(), self.delivery.recorder.destination_stats())
        increments = {
            k: v - self._shared_counters.get(k, 0)
            for k, v in counters.items()
            if v != self._shared_counters.get(k, 0)
        }
        try:
            kept = await self.queue.add_delivery_stats(
                self.owner, increments, None if stopping else state, now=time.time()
            )
        except Exception:
            logging.getLogger("ferry.delivery").warning("cannot share statistics", exc_info=True)
            return
        if not kept:
            self._shares_stats = False
            return
        self._shared_counters = counters

    def stats(self) -> dict[str, Any]:
        """The SMTPy seed's ``direct_service`` block, plus scheduler state."""
        s = self.delivery.stats
        mx = self.resolver.stats()
        return {
            "sent": s.sent,
            "failed": s.failed,
            "deferred": s.deferred,
            "expired": s.expired,
            "bounced": s.bounced,
            "double_bounces": s.double_bounces,
            "dsn_dropped": s.dsn_dropped,
            "connections": s.connections,
            "connections_reused": self.delivery.pool.reused,
            "tls_fallbacks": s.tls_fallbacks,
            "direct_sent": s.direct_sent,
            "direct_failed": s.direct_failed,
            "relay_sent": s.relay_sent,
            "relay_failed": s.relay_failed,
            "fallbacks": s.fallbacks,
            "dkim_signed": s.dkim_signed,
            "dkim_unsigned": s.dkim_unsigned,
            "dkim_unsigned_reasons": dict(s.dkim_unsigned_reasons),
            "mx_lookups": mx.get("mx_lookups", 0),
            "mx_cache_hits": mx.get("mx_cache_hits", 0),
            "mx_cache_size": mx.get("mx_cache_size", 0),
            "active_sessions": len(self.sessions),
            "suspended": sorted(self.suspended),
            "backlog": self._backlog(),
            "smart_hosts": self.delivery.smart_hosts.stats(),
            "smart_routing": self.delivery.router.stats(),
            "destinations": self._destination_stats(),
        }

    def _destination_stats(self) -> dict[str, Any]:
        now = self.clock()
        counts = self.delivery.recorder.destination_stats()
        out: dict[str, Any] = {}
        for domain in sorted(set(counts) | set(self.destinations)):
            entry: dict[str, Any] = dict(counts.get(domain, {}))
            dest = self.destinations.get(domain)
            if dest is not None:
                entry.update(dest.shaper.state(now), pending=len(dest.pending))
            out[domain] = entry
        return out
