"""Routing: from a recipient domain to an ordered list of next hops (pure).

:func:`plan_route` maps (recipient domain, delivery mode, ``[routes]``, the configured
smart hosts, smart mode's choice, whether the MX lookup failed) to a :class:`RoutePlan`:
the hops one attempt tries in order, and when a recipient moves from one hop to the
next. The delivery engine does the I/O; everything here is plain values.

Next-hop conventions (kinds are those of ``routes.HopKind``):

- ``NextHop("mx", domain, mx_port)`` — the domain's MX hosts (RFC 5321 §5.1), "direct".
- ``NextHop("host", "mail.internal.example", 25)`` — a fixed host from a route
  ``"mx:host[:port]"``: its A/AAAA records, no MX lookup.
- ``NextHop("smarthost", "*", 0)`` — the default smart host set (every configured
  smart host). ``NextHop("smarthost", "a,b", 0)`` — the set restricted to the named
  hosts (a route naming one host or a list). The port is 0: it lives in each smart
  host's configuration. One smarthost hop is ONE logical relay: the engine asks
  ``SmartHostSet.order(now, names=hop_smart_host_names(hop, ...))`` for the hosts to
  try and moves from one host to the next on a *transport* failure only (the set's own
  failover); priority and weight decide the order, not the order names are listed in.

``RoutePlan.fallback_on`` says when a recipient moves from hop *i* to hop *i + 1* within
the same attempt (a subset of :data:`FALLBACK_ALL`):

- ``"transport"`` — the hop never judged the recipient: no connection, TLS failure,
  421, AUTH failure, connection lost, DNS failure for the hop's hosts;
- ``"temporary"`` — the hop answered 4xx for the recipient;
- ``"blocked"`` — the hop answered 5xx and :func:`outcomes.is_blocked_reply` says it
  blames our IP/domain's standing ("blocked, try the relay").

Any other 5xx is final: a recipient its own MX rejected is not relayed (hybrid mode's
rule). A plan with one hop has an empty ``fallback_on`` (there is nowhere to go);
plans with several hops (hybrid, smart, a route listing several targets) use
:data:`FALLBACK_ALL`. When the last hop fails, the recipient is deferred or failed as
usual.

MX lookup failure: the engine plans with ``mx_failed=False``; if the first hop is an
``mx`` hop and the lookup fails *temporarily* (SERVFAIL, timeout), it plans again with
``mx_failed=True`` and gets the default smart hosts when any are configured (Zetian's MX
routing fallback). NXDOMAIN and a null MX (RFC 7505) are answers, not failures: they
must not be relayed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ferry.config import DEFAULT_BLOCK_PATTERNS, DeliveryMode
from ferry.delivery.outcomes import is_blocked_reply
from ferry.envelope import Reply

# Route strings are parsed in one place, the shared leaf ferry.routes (the configuration
# validator uses the same parser); these names are re-exported for the engine.
from ferry.routes import (
    ALL_SMART_HOSTS,
    NextHop,
    RouteTarget,
    direct_hop,
    normalize_domain,
    parse_route_target,
    smarthost_hop,
    validate_routes,
)

__all__ = [
    "ALL_SMART_HOSTS",
    "FALLBACK_ALL",
    "NO_FALLBACK",
    "RoutePlan",
    "RouteTarget",
    "hop_smart_host_names",
    "match_route",
    "normalize_domain",
    "parse_route_target",
    "plan_route",
    "should_fall_back",
    "smarthost_hop",
    "validate_routes",
]

Fallback = Literal["transport", "temporary", "blocked"]
FALLBACK_ALL: frozenset[str] = frozenset({"transport", "temporary", "blocked"})
NO_FALLBACK: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RoutePlan:
    """Where one attempt sends a recipient, in order, and when it moves on.

    ``hops`` are tried in order within ONE attempt; ``fallback_on`` (a subset of
    :data:`FALLBACK_ALL`) says which failures move a recipient from one hop to the
    next (see the module docstring); ``reason`` is the human explanation for logs and
    stats ("route *.example.com -> gmail-relay", "hybrid: direct then relay", ...).
    """

    hops: tuple[NextHop, ...]
    fallback_on: frozenset[str]
    reason: str

    def __post_init__(self) -> None:
        if not self.hops:
            raise ValueError("a route plan needs at least one hop")
        unknown = self.fallback_on - FALLBACK_ALL
        if unknown:
            raise ValueError(f"unknown fallback kinds: {sorted(unknown)}")


def hop_smart_host_names(hop: NextHop, configured: Sequence[str]) -> list[str]:
    """The smart host names a ``smarthost`` hop stands for ("*" = all ``configured``)."""
    if hop.kind != "smarthost":
        raise ValueError(f"not a smarthost hop: {hop.label}")
    if hop.name == ALL_SMART_HOSTS:
        return list(configured)
    return hop.name.split(",")


def match_route(domain: str, routes: Mapping[str, RouteTarget]) -> tuple[str, RouteTarget] | None:
    """The ``[routes]`` entry for ``domain``: ``(key as written, target)`` or None.

    An exact key beats any wildcard; among wildcards the longest wins. ``*.example.com``
    matches ``sub.example.com`` and ``a.b.example.com`` but not ``example.com`` (write
    both keys for both). A lone ``*`` matches every domain, below every other key.
    Case-insensitive; a trailing root dot is ignored on both sides.
    """
    wanted = normalize_domain(domain)
    best: tuple[str, RouteTarget] | None = None
    best_len = -1
    for key, target in routes.items():
        k = normalize_domain(key)
        if k == wanted and not k.startswith("*"):
            return key, target
        if k == "*":
            length = 0
        elif k.startswith("*.") and wanted.endswith(k[1:]):
            length = len(k)
        else:
            continue
        if length > best_len:
            best, best_len = (key, target), length
    return best


def _describe(target: RouteTarget) -> str:
    return target.strip() if isinstance(target, str) else ", ".join(t.strip() for t in target)


def plan_route(
    domain: str,
    *,
    mode: DeliveryMode,
    routes: Mapping[str, RouteTarget],
    smart_hosts: Sequence[str],
    mx_port: int,
    smart_choice: Literal["direct", "relay"] | None = None,
    smart_reason: str = "",
    mx_failed: bool = False,
) -> RoutePlan:
    """The hops for a recipient at ``domain`` and when to move between them.

    ``smart_hosts`` are the names of every configured smart host (the default set).
    A matching ``[routes]`` entry overrides the mode for its domain; it is followed even
    when the MX lookup failed (a route pinning "direct" means never relay), except that
    an MX hop is dropped when the route lists something after it. Without a route:

    ======  ========================================  ===============  ================
    mode    hops                                      fallback_on      mx_failed
    ======  ========================================  ===============  ================
    direct  [mx]                                      {}               [smarthost *]
    relay   [smarthost *]                             {}               (no MX lookup)
    hybrid  [mx, smarthost *]                         all              [smarthost *]
    smart   choice "relay": [smarthost *]             {}               [smarthost *]
            otherwise like hybrid
    ======  ========================================  ===============  ================

    With no smart host configured every mode delivers direct (config validation is
    where a relay-mode config without smart hosts is refused). ``smart_choice`` and
    ``smart_reason`` come from ``SmartRouter.choose`` for the domain's MX group.
    """
    domain = normalize_domain(domain)
    names = set(smart_hosts)
    mx = direct_hop(domain, mx_port)
    relay = smarthost_hop()

    matched = match_route(domain, routes)
    if matched is not None:
        key, target = matched
        hops = parse_route_target(target, names, domain=domain, mx_port=mx_port)
        reason = f"route {key} -> {_describe(target)}"
        if mx_failed:
            without_mx = [h for h in hops if h != mx]
            if without_mx and len(without_mx) < len(hops):
                hops = without_mx
                reason += " (MX lookup failed: skipping direct)"
            elif not without_mx:
                reason += " (MX lookup failed; the route allows only direct)"
        return RoutePlan(tuple(hops), FALLBACK_ALL if len(hops) > 1 else NO_FALLBACK, reason)

    if not smart_hosts:
        if mode == "direct":
            reason = "direct: MX delivery"
            if mx_failed:
                reason = "direct: MX lookup failed and no smart host is configured"
        else:
            reason = f"{mode}: no smart hosts configured, delivering direct"
        return RoutePlan((mx,), NO_FALLBACK, reason)

    if mode == "relay":
        return RoutePlan((relay,), NO_FALLBACK, "relay: default smart hosts")
    if mx_failed:
        # Zetian's MX routing fallback: a domain we cannot resolve right now still
        # leaves through the default smart hosts, whose resolvers may do better.
        return RoutePlan(
            (relay,), NO_FALLBACK, f"{mode}: MX lookup failed, via the default smart hosts"
        )
    if mode == "direct":
        return RoutePlan((mx,), NO_FALLBACK, "direct: MX delivery")
    if mode == "hybrid":
        return RoutePlan((mx, relay), FALLBACK_ALL, "hybrid: direct then relay")
    if mode == "smart":
        why = f" ({smart_reason})" if smart_reason else ""
        if smart_choice == "relay":
            return RoutePlan((relay,), NO_FALLBACK, f"smart: {domain} via relay{why}")
        return RoutePlan((mx, relay), FALLBACK_ALL, f"smart: {domain} direct then relay{why}")
    raise ValueError(f"unknown delivery mode {mode!r}")


def should_fall_back(
    plan: RoutePlan,
    *,
    transport_failure: bool,
    reply: Reply | None,
    block_patterns: Sequence[str] = DEFAULT_BLOCK_PATTERNS,
) -> bool:
    """Should a recipient that just failed at one hop go on to the plan's next hop?

    - a transport failure (``transport_failure=True``, or a 421: RFC 5321 §3.8, the
      server is closing the channel, which is about the session, not the recipient)
      → if ``"transport"`` is in ``plan.fallback_on``;
    - a 4xx → if ``"temporary"``;
    - a 5xx → only if ``"blocked"`` and the reply blames our standing
      (:func:`is_blocked_reply`); a 5xx such as "550 5.1.1 user unknown" is final;
    - a 2xx/3xx → never (there is nothing to recover from).

    The caller checks that a next hop exists; this only answers "does this failure
    allow moving on".
    """
    if transport_failure:
        return "transport" in plan.fallback_on
    if reply is None:
        raise ValueError("without a transport failure there must be a reply")
    if reply.is_success:
        return False
    if reply.code == 421:
        return "transport" in plan.fallback_on
    if reply.is_transient:
        return "temporary" in plan.fallback_on
    return "blocked" in plan.fallback_on and is_blocked_reply(reply, block_patterns)
