"""Smart mode: choose direct or relay per destination from recent outcomes (pure).

The SMTPy seed's "smart" mode promised to "learn which domains prefer direct vs
relay". Ferry does it per *destination group*: domains hosted by the same provider
share a reputation with us (every Google-hosted domain sees our IP the same way), so
their outcomes are pooled. For each group a sliding window of the last ``window``
direct-delivery outcomes decides:

- while direct works, choose ``"direct"`` (the route is hybrid-like: direct first, the
  relay as the same attempt's fallback);
- once at least ``min_samples`` outcomes are known and the share of *deferred* plus
  *blocked* reaches ``threshold``, the group goes through the relay for ``cooldown``
  seconds (the route is the relay only);
- after the cool-down, one message probes direct again ("probing direct after
  cool-down"); everything else keeps using the relay until the probe reports. A good
  probe clears the window and returns the group to direct; a bad one sends it back to
  the relay for a cool-down ``probe_cooldown_growth`` times longer, up to
  ``max_cooldown``.

A plain ``"failed"`` (a 5xx such as user unknown) is not a reason to switch: the server
judged the recipient, not us. As a probe's outcome it counts as good for the same
reason.

Time is injected (``now``: seconds, any clock that only moves forward); nothing here
sleeps or reads a clock. Every change of decision is logged with its reason, and
:meth:`SmartRouter.stats` shows the current decision and reason per group.

Several nodes (a PostgreSQL queue) share both the windows and the decisions, as values:
each node publishes its own recent direct outcomes per group (:meth:`SmartRouter.
own_outcomes`) and merges the others' into its window (:meth:`SmartRouter.merge`: the
latest ``window`` outcomes of all nodes decide); a decision (relay until, probing,
back to direct) is a :class:`GroupSnapshot` stamped with the time it changed, the
latest change wins (:meth:`SmartRouter.adopt`), and the one probe after a cool-down is
claimed in the database first. A good probe's reset (``since``) tells every node to
forget the outcomes before it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry.domains import domain_key
from ferry.events import SmartRouteSwitched, emit

log = logging.getLogger(__name__)

Choice = Literal["direct", "relay"]
DirectOutcome = Literal["delivered", "deferred", "blocked", "failed"]
OUTCOMES: tuple[str, ...] = ("delivered", "deferred", "blocked", "failed")
_BAD = frozenset({"deferred", "blocked"})

#: Public suffixes of two labels under which registrations happen at the third label
#: ("example.co.uk"). A deliberately small table of the common second-level ones,
#: not the Public Suffix List: a miss only makes a group coarser ("co.xx" for every
#: provider under it), which pools some reputations that could be apart; it never
#: splits one provider in two.
MULTI_LABEL_SUFFIXES: frozenset[str] = frozenset(
    {
        "co.uk", "org.uk", "ac.uk", "gov.uk", "ltd.uk", "plc.uk", "me.uk", "net.uk",
        "com.au", "net.au", "org.au", "edu.au", "gov.au",
        "co.nz", "net.nz", "org.nz",
        "co.jp", "ne.jp", "or.jp", "ac.jp", "ad.jp", "go.jp",
        "co.kr", "or.kr", "ne.kr",
        "com.br", "net.br", "org.br",
        "com.cn", "net.cn", "org.cn",
        "com.tw", "net.tw", "com.hk", "com.sg", "com.my",
        "co.in", "net.in", "org.in", "co.id", "co.th",
        "co.za", "org.za", "co.il", "com.tr", "com.mx", "com.ar", "com.co", "com.ua",
    }
)  # fmt: skip


def destination_group(mx_hosts: Sequence[str]) -> str:
    """The provider behind a domain: the registrable suffix of its most-preferred MX.

    ``mx_hosts`` are in preference order (RFC 5321 §5.1); for a domain without MX the
    caller passes the domain itself (the implicit MX). The group is the last two labels
    of the first host, or three under a known two-label public suffix
    (:data:`MULTI_LABEL_SUFFIXES`)::

        aspmx.l.google.com, alt1.aspmx.l.google.com  -> google.com
        example-com.mail.protection.outlook.com      -> outlook.com
        mx1.example.co.uk                            -> example.co.uk

    An IP literal is its own group.
    """
    if not mx_hosts:
        raise ValueError("no MX hosts to group")
    host = domain_key(mx_hosts[0])
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"not an MX host name: {mx_hosts[0]!r}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    keep = 3 if ".".join(labels[-2:]) in MULTI_LABEL_SUFFIXES else 2
    return ".".join(labels[-keep:])


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """One group's decision as a value, to share with other nodes (see module)."""

    state: Literal["direct", "relay", "probing"]
    changed_at: float  # when the state last changed: the later change wins
    cooldown: float
    relay_until: float | None = None
    probe_started: float | None = None
    reason: str = ""
    since: float = -math.inf  # outcomes before this do not count (a good probe's reset)

    def as_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__ if k != "changed_at"}
        if math.isinf(self.since):
            out["since"] = None  # JSON has no infinity
        return out

    @classmethod
    def from_json(cls, changed_at: float, data: Mapping[str, Any]) -> GroupSnapshot:
        known = {k: data[k] for k in cls.__slots__ if k in data and k != "changed_at"}
        if known.get("state") not in ("direct", "relay", "probing"):
            raise ValueError(f"not a smart-mode state: {data!r}")
        if known.get("since") is None:
            known["since"] = -math.inf
        return cls(changed_at=changed_at, **known)


@dataclass
class _Group:
    """One destination group's window and decision."""

    outcomes: deque[str]
    cooldown: float  # the next relay period's length
    state: Literal["direct", "relay", "probing"] = "direct"
    relay_until: float | None = None
    probe_started: float | None = None
    reason: str = "no recent direct outcomes"
    choice: Choice = "direct"
    switches: int = 0
    changed_at: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    # Shared with other nodes: this node's own outcomes (time, outcome), when the state
    # last changed, and since when outcomes count.
    mine: deque[tuple[float, str]] = field(default_factory=deque)
    state_at: float = -math.inf
    since: float = -math.inf


class SmartRouter:
    """Per destination group: direct while it works, the relay for a while when not.

    ``window`` outcomes are remembered per group; a switch needs ``min_samples`` of them
    and a deferred+blocked share of at least ``threshold``. The first relay period lasts
    ``cooldown`` seconds; each failed probe multiplies it by ``probe_cooldown_growth``,
    up to ``max_cooldown``. A probe that never reports (its session was lost) is
    replaced by another after ``probe_timeout`` seconds.
    """

    def __init__(
        self,
        *,
        window: int = 20,
        min_samples: int = 5,
        threshold: float = 0.5,
        cooldown: float = 1800.0,
        probe_cooldown_growth: float = 2.0,
        max_cooldown: float = 6 * 3600,
        probe_timeout: float = 900.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1: {window!r}")
        if not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be in 1..window ({window}): {min_samples!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1]: {threshold!r}")
        if not cooldown > 0:
            raise ValueError(f"cooldown must be positive: {cooldown!r}")
        if not probe_cooldown_growth >= 1:
            raise ValueError(f"probe_cooldown_growth must be at least 1: {probe_cooldown_growth!r}")
        if not max_cooldown >= cooldown:
            raise ValueError(f"max_cooldown ({max_cooldown!r}) must be >= cooldown ({cooldown!r})")
        if not probe_timeout > 0:
            raise ValueError(f"probe_timeout must be positive: {probe_timeout!r}")
        self.window = window
        self.min_samples = min_samples
        self.threshold = threshold
        self.cooldown = cooldown
        self.growth = probe_cooldown_growth
        self.max_cooldown = max_cooldown
        self.probe_timeout = probe_timeout
        self._groups: dict[str, _Group] = {}
        #: Groups whose state changed here, and whose own outcomes grew, since
        #: :meth:`changes` / :meth:`own_outcomes` last took them.
        self._changed: set[str] = set()
        self._grown: set[str] = set()

    def _group(self, group: str) -> _Group:
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(
                deque(maxlen=self.window), self.cooldown, mine=deque(maxlen=self.window)
            )
        return g

    def _state_changed(self, group: str, g: _Group, now: float) -> None:
        g.state_at = now
        self._changed.add(group)

    def _set(self, name: str, g: _Group, choice: Choice, reason: str, now: float) -> None:
        if choice != g.choice:
            g.switches += 1
            g.changed_at = now
            emit(SmartRouteSwitched(name, choice, reason))
        g.choice = choice
        g.reason = reason

    def choose(self, group: str, now: float) -> tuple[Choice, str]:
        """Direct or relay for the next message to ``group``, and why.

        After a cool-down the first call returns ``"direct"`` (the probe); later calls
        return ``"relay"`` until :meth:`record_direct` reports the probe's outcome.
        """
        g = self._group(group)
        if g.state == "relay":
            assert g.relay_until is not None
            if now < g.relay_until:
                return "relay", g.reason
            g.state = "probing"
            g.probe_started = None
        if g.state == "probing":
            if g.probe_started is None or now - g.probe_started >= self.probe_timeout:
                g.probe_started = now
                self._state_changed(group, g, now)
                self._set(group, g, "direct", "probing direct after cool-down", now)
                return "direct", g.reason
            return "relay", "relay while a direct probe is outstanding"
        return "direct", g.reason

    def record_direct(self, group: str, now: float, outcome: DirectOutcome) -> None:
        """Record the outcome of one direct delivery (one recipient) to ``group``.

        ``"blocked"`` is a 5xx that blames our standing (``outcomes.is_blocked_reply``);
        ``"failed"`` any other 5xx; ``"deferred"`` a 4xx or a transport failure.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown direct outcome {outcome!r}")
        g = self._group(group)
        g.outcomes.append(outcome)
        g.counts[outcome] += 1
        g.mine.append((now, outcome))
        self._grown.add(group)
        if g.state == "probing":
            if outcome in _BAD:
                g.cooldown = min(self.max_cooldown, g.cooldown * self.growth)
                self._relay(group, g, now, f"direct probe {outcome}")
            else:
                # Good probe: forget the bad spell; the probe's outcome starts afresh.
                g.outcomes.clear()
                g.outcomes.append(outcome)
                g.since = now  # every node forgets the bad spell, not only this one
                g.cooldown = self.cooldown
                g.state = "direct"
                g.relay_until = None
                g.probe_started = None
                self._state_changed(group, g, now)
                self._set(group, g, "direct", f"direct probe {outcome}: back to direct", now)
            return
        if g.state == "relay":
            # A session that began before the switch: it joins the window (stats) but
            # the decision waits for the cool-down and the probe.
            return
        self._decide(group, g, now)

    def _decide(self, group: str, g: _Group, now: float) -> None:
        """While direct: switch to the relay when the window says so."""
        bad = sum(1 for o in g.outcomes if o in _BAD)
        n = len(g.outcomes)
        summary = self._summary(g)
        if n >= self.min_samples and bad / n >= self.threshold:
            self._relay(group, g, now, summary)
        else:
            self._set(group, g, "direct", summary, now)

    def _summary(self, g: _Group) -> str:
        n = len(g.outcomes)
        deferred = sum(1 for o in g.outcomes if o == "deferred")
        blocked = sum(1 for o in g.outcomes if o == "blocked")
        parts = [f"{deferred}/{n} deferred"]
        if blocked:
            parts.append(f"{blocked}/{n} blocked")
        return " + ".join(parts)

    def _relay(self, name: str, g: _Group, now: float, why: str) -> None:
        g.state = "relay"
        g.relay_until = now + g.cooldown
        g.probe_started = None
        self._state_changed(name, g, now)
        self._set(name, g, "relay", f"{why}; relay for {g.cooldown:.0f}s", now)

    # -- shared with other nodes ------------------------------------------------------

    def snapshot(self, group: str) -> GroupSnapshot:
        g = self._group(group)
        return GroupSnapshot(
            g.state, g.state_at, g.cooldown, g.relay_until, g.probe_started, g.reason, g.since
        )

    def changes(self) -> dict[str, GroupSnapshot]:
        """The groups whose decision changed here since the last call."""
        out = {name: self.snapshot(name) for name in sorted(self._changed)}
        self._changed.clear()
        return out

    def unshared(self, groups: Iterable[str]) -> None:
        """These could not be shared: offer them again at the next :meth:`changes`."""
        self._changed.update(g for g in groups if g in self._groups)

    def own_outcomes(self) -> dict[str, list[tuple[float, str]]]:
        """Per group whose window grew here since the last call: this node's own recent
        direct outcomes (time, outcome), oldest first."""
        out = {name: list(self._groups[name].mine) for name in sorted(self._grown)}
        self._grown.clear()
        return out

    def restore(self, group: str, snapshot: GroupSnapshot) -> None:
        """Go back to an earlier decision (a probe not claimed after all)."""
        self._take(group, self._group(group), snapshot, snapshot.changed_at)

    def adopt(self, group: str, snapshot: GroupSnapshot, now: float) -> bool:
        """Another node's decision for ``group``, taken if it changed later than ours."""
        g = self._group(group)
        if snapshot.changed_at <= g.state_at:
            return False
        self._changed.discard(group)
        self._take(group, g, snapshot, now)
        return True

    def _take(self, group: str, g: _Group, s: GroupSnapshot, now: float) -> None:
        g.state, g.state_at, g.cooldown = s.state, s.changed_at, s.cooldown
        g.relay_until, g.probe_started = s.relay_until, s.probe_started
        if s.since > g.since:
            g.since = s.since
            while g.mine and g.mine[0][0] < s.since:
                g.mine.popleft()
            g.outcomes = deque((o for _, o in g.mine), maxlen=self.window)
        choice: Choice = "relay" if s.state == "relay" else "direct"
        if s.state == "probing":
            choice = "direct" if g.probe_started is None else "relay"
        self._set(group, g, choice, s.reason or g.reason, now)

    def merge(self, group: str, others: Iterable[tuple[float, str]], now: float) -> None:
        """The window of ``group`` becomes the latest ``window`` outcomes of this node and
        the others (``others``: theirs, with their times); outcomes before the last reset
        do not count. While direct, the merged window may switch the group to the relay
        (no single node need have seen enough)."""
        g = self._group(group)
        pooled = [(t, o) for t, o in (*g.mine, *others) if t >= g.since and o in OUTCOMES]
        pooled.sort(key=lambda e: e[0])
        g.outcomes = deque((o for _, o in pooled[-self.window :]), maxlen=self.window)
        if g.state == "direct":
            self._decide(group, g, now)

    def stats(self) -> dict[str, dict[str, object]]:
        """Per group: choice, state, reason, window counts, relay_until, cool-down."""
        out: dict[str, dict[str, object]] = {}
        for name, g in self._groups.items():
            window = dict.fromkeys(OUTCOMES, 0)
            for o in g.outcomes:
                window[o] += 1
            out[name] = {
                "choice": g.choice,
                "state": g.state,
                "reason": g.reason,
                "window": window,
                "samples": len(g.outcomes),
                "relay_until": g.relay_until,
                "cooldown": g.cooldown,
                "switches": g.switches,
                "changed_at": g.changed_at,
                "totals": dict(g.counts),
            }
        return out
