"""Smart hosts: failover and load balancing over a set of upstream relays (pure).

Zetian's smart hosts carry a *priority* (lower is preferred) and a *weight* (a share of
the traffic within one priority). For each attempt, :meth:`SmartHostSet.order` answers
"which hosts, in which order": the most-preferred tier that has a usable host comes
first, its hosts balanced by nginx's smooth weighted round-robin, then the other tiers
as failover.

Each host has a :class:`CircuitBreaker`. Only *transport* failures count against it
(the connection could not be made, TLS failed, the server said 421, AUTH was refused):
those say the host cannot take any mail right now. A 4xx or 5xx for one recipient says
nothing about the host and never opens the breaker. An open breaker takes the host out
of rotation for a cool-down that doubles with each consecutive failure; after it, a
single half-open *probe* attempt decides whether traffic returns.

Everything here is plain state over injected time (``now``, seconds on any clock that
only moves forward): no sockets, no sleeps. It is used from the event loop only, so it
takes no locks.

Several nodes (a PostgreSQL queue) share their breakers: a breaker's state is a plain
value (:class:`BreakerSnapshot`, stamped with the time it last changed); each node
publishes the states that changed and adopts newer ones from the others
(:meth:`CircuitBreaker.adopt`: the latest change wins), and the one half-open probe is
claimed in the database before it is sent. The I/O lives in ``queue.postgres_limits``;
here it is values in, values out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ferry.config import SmartHost
from ferry.delivery.outcomes import ReplyClass, Stage, classify_reply
from ferry.envelope import Reply
from ferry.events import SmartHostState, emit

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
CountStatus = Literal["sent", "failed", "deferred"]


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state as a value, to share with other nodes.

    ``changed_at`` is when it last changed state (opened, handed out a probe, closed):
    of two snapshots of one host's breaker, the later change is the truth.
    """

    state: BreakerState
    changed_at: float
    open_until: float | None = None
    cooldown: float | None = None
    opens: int = 0
    probe_started: float | None = None
    last_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "changed_at"}

    @classmethod
    def from_json(cls, changed_at: float, data: Mapping[str, Any]) -> BreakerSnapshot:
        known = {k: data[k] for k in cls.__slots__ if k in data and k != "changed_at"}
        if known.get("state") not in ("closed", "open", "half_open"):
            raise ValueError(f"not a breaker state: {data!r}")
        return cls(changed_at=changed_at, **known)


def is_transport_failure(reply: Reply | None, *, stage: Stage) -> bool:
    """Whether a failure counts against the host (its breaker), not against a recipient.

    That is :func:`outcomes.classify_reply` saying TRANSPORT: no SMTP reply at all
    (``reply is None``: refused, unreachable, timed out, connection lost, TLS handshake
    failed -- pass None for those whatever the stage, not the synthetic reply
    ``outcomes.transport_failure_reply`` made up: its 451 would read as a recipient's
    temporary failure at MAIL/RCPT/DATA), any negative reply before MAIL FROM, or a
    421 at any stage (RFC 5321 §3.8). A 4xx/5xx at MAIL, RCPT, DATA or the final "."
    judges the message or recipient and returns False, as does a positive reply.
    """
    if reply is not None and reply.is_success:
        return False
    return classify_reply(reply, stage=stage) is ReplyClass.TRANSPORT


class CircuitBreaker:
    """Closed → open (cool-down) → half-open (one probe) → closed, or open again.

    - *closed*: traffic flows. ``threshold`` consecutive transport failures open it.
    - *open*: no traffic until ``open_until``. The cool-down is ``base`` seconds for the
      first opening and doubles with each consecutive one (a failed probe), capped at
      ``cap``: a host that stays down is asked less and less often.
    - *half_open*: the cool-down is over; :meth:`allow` has handed out exactly one probe
      and refuses everyone else until that probe reports. A success closes the breaker
      and resets the cool-down; a failure opens it again, for twice as long.

    A probe whose caller never reports (the process lost the session) would lock the
    host out for ever, so after ``probe_timeout`` seconds another probe is allowed. The
    default (15 min) is longer than an SMTP session should take: RFC 5321 §4.5.3.2
    allows 5 min per command and 10 min for the final ".".
    """

    def __init__(
        self,
        *,
        base: float = 30.0,
        cap: float = 600.0,
        threshold: int = 1,
        probe_timeout: float = 900.0,
    ) -> None:
        if not base > 0:
            raise ValueError(f"base cool-down must be positive: {base!r}")
        if not cap >= base:
            raise ValueError(f"cap ({cap!r}) must be at least base ({base!r})")
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1: {threshold!r}")
        if not probe_timeout > 0:
            raise ValueError(f"probe_timeout must be positive: {probe_timeout!r}")
        self.base = base
        self.cap = cap
        self.threshold = threshold
        self.probe_timeout = probe_timeout
        self.state: BreakerState = "closed"
        self.last_error: str | None = None
        self.open_until: float | None = None
        #: The length of the current (or last) open period.
        self.cooldown: float | None = None
        #: Consecutive transport failures while closed.
        self.failures = 0
        #: Consecutive openings without a success in between: sets the cool-down.
        self.opens = 0
        self._probe_started: float | None = None
        #: When the state last changed (-inf: never): orders snapshots between nodes.
        self.changed_at = -math.inf

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            self.state,
            self.changed_at,
            self.open_until,
            self.cooldown,
            self.opens,
            self._probe_started,
            self.last_error,
        )

    def restore(self, snapshot: BreakerSnapshot) -> None:
        """Go back to an earlier state of this breaker (a probe not claimed after all)."""
        self._take(snapshot)

    def adopt(self, other: BreakerSnapshot) -> bool:
        """Take another node's state if it changed later than ours; True if taken.

        Its consecutive-failure count is not shared (a node counts what it saw: with the
        default threshold of 1, one failure anywhere opens the breaker everywhere).
        """
        if other.changed_at <= self.changed_at:
            return False
        self._take(other)
        return True

    def _take(self, other: BreakerSnapshot) -> None:
        self.state = other.state
        self.changed_at = other.changed_at
        self.open_until = other.open_until
        self.cooldown = other.cooldown
        self.opens = other.opens
        self._probe_started = other.probe_started
        if other.last_error is not None:
            self.last_error = other.last_error
        self.failures = 0

    def peek(self, now: float) -> bool:
        """What :meth:`allow` would answer, without taking the probe."""
        if self.state == "closed":
            return True
        if self.state == "open":
            assert self.open_until is not None
            return now >= self.open_until
        # half_open: the probe is out; only a lost one (timed out) frees the slot.
        return self._probe_started is None or now - self._probe_started >= self.probe_timeout

    def allow(self, now: float) -> bool:
        """May a session use the host now? Hands out the one half-open probe."""
        if self.state == "closed":
            return True
        if not self.peek(now):
            return False
        self.state = "half_open"
        self._probe_started = now
        self.changed_at = now
        return True

    @property
    def probing(self) -> bool:
        """True while a half-open probe is outstanding."""
        return self.state == "half_open" and self._probe_started is not None

    def record_success(self, now: float) -> None:
        """The host carried a session (whatever it said about the recipients).

        A success reported while *open* comes from a session that began before the
        breaker opened: it says nothing about the host now, so the cool-down stands.
        """
        if self.state == "open":
            return
        if self.state != "closed":
            self.changed_at = now
        self.state = "closed"
        self.failures = 0
        self.opens = 0
        self.open_until = None
        self._probe_started = None

    def record_failure(self, now: float, reason: str) -> None:
        """A transport failure: count it, and open the breaker when due.

        Failures reported while already *open* (other sessions that were in flight when
        it opened) only update ``last_error``: one outage must not compound into a long
        cool-down just because several connections saw it at once.
        """
        self.last_error = reason
        if self.state == "open":
            return
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self.opens += 1
        # base * 2**(opens-1), capped; the exponent is bounded so a host down for weeks
        # cannot overflow a float.
        self.cooldown = min(self.cap, self.base * 2.0 ** min(self.opens - 1, 64))
        self.open_until = now + self.cooldown
        self.state = "open"
        self.changed_at = now
        self.failures = 0
        self._probe_started = None


class SmoothWeightedRR:
    """nginx's smooth weighted round-robin (ngx_http_upstream_get_peer).

    Each pick: every candidate's ``current`` grows by its weight, the largest
    ``current`` wins (ties: the first candidate in the given order), and the winner's
    ``current`` drops by the candidates' total weight. Over any run of ``sum(weights)``
    picks each host is chosen exactly ``weight`` times, and the picks are interleaved
    (5/1/1 gives a a b a c a a, not a a a a a b c). Deterministic: no randomness.

    :meth:`pick` chooses among a subset (the usable hosts of a tier); hosts outside it
    keep their ``current`` untouched, so a host that comes back resumes where it was.
    """

    def __init__(self, weights: Mapping[str, int]) -> None:
        for name, weight in weights.items():
            if weight < 1:
                raise ValueError(f"weight of {name!r} must be at least 1: {weight!r}")
        self.weights = dict(weights)
        self.current: dict[str, int] = dict.fromkeys(self.weights, 0)

    def pick(self, candidates: Iterable[str]) -> str:
        """Choose one of ``candidates`` (names known to this balancer)."""
        names = list(candidates)
        if not names:
            raise ValueError("no candidates to pick from")
        total = 0
        best: str | None = None
        for name in names:
            try:
                weight = self.weights[name]
            except KeyError:
                raise ValueError(f"unknown candidate {name!r}") from None
            self.current[name] += weight
            total += weight
            if best is None or self.current[name] > self.current[best]:
                best = name
        assert best is not None
        self.current[best] -= total
        return best


@dataclass
class HostCounters:
    """Per-host statistics (Zetian's per-smart-host counters)."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    transport_failures: int = 0
    last_error: str | None = None


class SmartHostSet:
    """The configured smart hosts, their breakers, balancer and statistics.

    Two kinds of reports, kept apart so nothing is counted twice:

    - :meth:`report` — once per session/transaction outcome — feeds the breaker:
      ``transport_failure=True`` counts against the host; anything else (delivered, or a
      4xx/5xx for a recipient) shows the host is carrying sessions and counts for it.
    - :meth:`count` — once per recipient — feeds the sent/failed/deferred counters.
    """

    def __init__(
        self,
        hosts: Sequence[SmartHost],
        *,
        base_cooldown: float = 30.0,
        max_cooldown: float = 600.0,
        failure_threshold: int = 1,
        probe_timeout: float = 900.0,
    ) -> None:
        seen: set[str] = set()
        for host in hosts:
            if host.name in seen:
                raise ValueError(f"duplicate smart host name {host.name!r}")
            seen.add(host.name)
        self.hosts: list[SmartHost] = list(hosts)
        self._by_name = {h.name: h for h in self.hosts}
        self._index = {h.name: i for i, h in enumerate(self.hosts)}
        self.breakers: dict[str, CircuitBreaker] = {
            h.name: CircuitBreaker(
                base=base_cooldown,
                cap=max_cooldown,
                threshold=failure_threshold,
                probe_timeout=probe_timeout,
            )
            for h in self.hosts
        }
        self.balancer = SmoothWeightedRR({h.name: h.weight for h in self.hosts})
        self.counters: dict[str, HostCounters] = {h.name: HostCounters() for h in self.hosts}
        #: Hosts whose breaker changed here since :meth:`changes` last took them.
        self._changed: set[str] = set()

    @property
    def names(self) -> list[str]:
        """Host names in configuration order."""
        return [h.name for h in self.hosts]

    def __len__(self) -> int:
        return len(self.hosts)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> SmartHost:
        """The configuration of host ``name`` (KeyError if unknown)."""
        return self._by_name[self._known(name)]

    def _known(self, name: str) -> str:
        if name not in self._by_name:
            raise KeyError(f"unknown smart host {name!r}")
        return name

    def order(self, now: float, names: Collection[str] | None = None) -> list[SmartHost]:
        """The hosts to try for ONE attempt, in order (empty: none usable, defer).

        ``names`` restricts the choice to some hosts (a route naming a list); their
        priorities and weights still apply. Tiers are visited by priority, lowest
        first. Within a tier, the first host is the weighted pick among its healthy
        (closed) hosts, then the others by weight, largest first. Hosts whose breaker
        is open are left out.

        A host whose cool-down is over is *probed*: if its tier is the first with any
        usable host, it goes first in the list, so the attempt really tries it and its
        report decides (recovered: traffic returns; still down: the attempt moves on to
        the next host at once). Taking the probe is what makes a second call leave the
        host out until the probe reports. A probe-able host in a later tier is left out
        without taking its probe: while a more preferred tier works, its health does
        not matter, and it will be probed when traffic reaches it.
        """
        if names is None:
            selected = self.hosts
        else:
            wanted = {self._known(n) for n in names}
            selected = [h for h in self.hosts if h.name in wanted]
        result: list[SmartHost] = []
        for priority in sorted({h.priority for h in selected}):
            tier = [h for h in selected if h.priority == priority]
            healthy = [h for h in tier if self.breakers[h.name].state == "closed"]
            by_weight = sorted(healthy, key=lambda h: (-h.weight, self._index[h.name]))
            probe = None
            if not result:
                probe = next(
                    (
                        h
                        for h in sorted(tier, key=lambda h: (-h.weight, self._index[h.name]))
                        if self.breakers[h.name].state != "closed"
                        and self.breakers[h.name].peek(now)
                    ),
                    None,
                )
            if probe is not None:
                self.breakers[probe.name].allow(now)
                self._changed.add(probe.name)
                emit(SmartHostState(probe.name, "half_open"))
                # The probe leads; the healthy ones follow by weight. The balancer is
                # not advanced: this attempt's traffic is the probe's.
                result.append(probe)
                result.extend(by_weight)
            elif healthy:
                first = self._by_name[self.balancer.pick(h.name for h in healthy)]
                result.append(first)
                result.extend(h for h in by_weight if h is not first)
        return result

    def report(
        self,
        name: str,
        now: float,
        *,
        ok: bool,
        transport_failure: bool = False,
        error: str | None = None,
    ) -> None:
        """How a session with host ``name`` went (see :func:`is_transport_failure`).

        ``transport_failure=True`` (connect error, TLS failure, 421, AUTH failure) counts
        against the breaker. ``ok=False`` without it is a recipient-level 4xx/5xx: the
        host answered, so for the breaker it is a success (it even closes a half-open
        breaker: the probe reached the point of judging a recipient); only
        ``last_error`` records it.
        """
        self._known(name)
        if ok and transport_failure:
            raise ValueError("a report cannot be both ok and a transport failure")
        breaker = self.breakers[name]
        counters = self.counters[name]
        before = breaker.state
        if error is not None and not ok:
            counters.last_error = error
        if transport_failure:
            counters.transport_failures += 1
            breaker.record_failure(now, error or "transport failure")
        else:
            breaker.record_success(now)
        if breaker.state != before:
            self._changed.add(name)
            if breaker.state == "open":
                emit(SmartHostState(name, "open", breaker.cooldown, breaker.last_error))
            elif breaker.state == "closed":
                emit(SmartHostState(name, "closed"))

    def changes(self) -> dict[str, BreakerSnapshot]:
        """The breakers that changed here since the last call (to share with others)."""
        out = {n: self.breakers[n].snapshot() for n in sorted(self._changed)}
        self._changed.clear()
        return out

    def unshared(self, names: Iterable[str]) -> None:
        """These changes could not be shared: offer them again at the next :meth:`changes`."""
        self._changed.update(n for n in names if n in self.breakers)

    def adopt(self, name: str, snapshot: BreakerSnapshot) -> None:
        """Another node's view of host ``name``'s breaker, taken if it is newer."""
        if name not in self.breakers:
            return  # a host this node's configuration does not have
        breaker = self.breakers[name]
        before = breaker.state
        if not breaker.adopt(snapshot):
            return
        self._changed.discard(name)  # theirs is newer than what we had to say
        if breaker.state != before:
            if breaker.state == "open":
                emit(SmartHostState(name, "open", breaker.cooldown, breaker.last_error))
            else:
                emit(SmartHostState(name, breaker.state))

    def count(self, name: str, status: CountStatus) -> None:
        """Count one recipient's outcome through host ``name``."""
        counters = self.counters[self._known(name)]
        if status == "sent":
            counters.sent += 1
        elif status == "failed":
            counters.failed += 1
        elif status == "deferred":
            counters.deferred += 1
        else:
            raise ValueError(f"unknown status {status!r}")

    def stats(self) -> dict[str, dict[str, object]]:
        """Per host: sent, failed, deferred, health state, last error and settings."""
        out: dict[str, dict[str, object]] = {}
        for host in self.hosts:
            c = self.counters[host.name]
            b = self.breakers[host.name]
            out[host.name] = {
                "sent": c.sent,
                "failed": c.failed,
                "deferred": c.deferred,
                "transport_failures": c.transport_failures,
                "state": b.state,
                "last_error": c.last_error,
                "open_until": b.open_until,
                "priority": host.priority,
                "weight": host.weight,
            }
        return out
