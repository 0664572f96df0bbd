"""Routes and next hops: the one parser for route strings (a shared leaf).

A *route target* says where a recipient's mail goes next: ``"direct"`` (the domain's
MX hosts, RFC 5321 §5.1), ``"mx:host[:port]"`` (a fixed host; IPv6 as
``"mx:[2001:db8::1]:25"``) or the name of a configured smart host; a ``[routes]`` value
may list several. :func:`parse_route_target` is the only code that reads one: the
configuration validator (``ferry config check`` and ``ferry serve`` alike), the delivery
engine's route plans (``ferry.delivery.routing``) and the Python API's per-message
routes all call it, so they cannot disagree about what a route means.

This module is a leaf (plain values, no I/O) so that ``ferry.config`` may use it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ferry.domains import domain_key, to_a_labels

HopKind = Literal["mx", "host", "smarthost"]

#: A ``[routes]`` value as written: one target or a list of them.
RouteTarget = str | list[str]

#: The name of the smarthost hop meaning "every configured smart host".
ALL_SMART_HOSTS = "*"

# RFC 1035 §2.3.1 labels (underscores tolerated, as resolvers do), at most 253 octets.
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
)


@dataclass(frozen=True, slots=True)
class NextHop:
    """A place to connect to: a domain's MX set, a fixed host, or a named smart host."""

    kind: HopKind
    name: str  # the domain (mx), the host name (host), the smart host's name (smarthost)
    port: int

    @property
    def label(self) -> str:
        """How the hop appears in logs, history and ``messages_by_smart_host``."""
        if self.kind == "mx":
            return f"mx:{self.name}"
        if self.kind == "host":
            return f"host:{self.name}:{self.port}"
        return f"smarthost:{self.name}"


def normalize_domain(domain: str) -> str:
    """The one form of ferry.domains ("Bücher.COM." -> "xn--bcher-kva.com")."""
    return domain_key(domain)


def direct_hop(domain: str, mx_port: int) -> NextHop:
    """RFC 5321 §5.1: the domain's MX hosts (or the domain itself without MX)."""
    return NextHop("mx", normalize_domain(domain), mx_port)


def smarthost_hop(names: Sequence[str] | None = None) -> NextHop:
    """The hop for the smart host set: all hosts (``None``) or the named ones."""
    if names is None:
        return NextHop("smarthost", ALL_SMART_HOSTS, 0)
    if not names:
        raise ValueError("a smarthost hop needs at least one name")
    for name in names:
        if not name or "," in name or name == ALL_SMART_HOSTS:
            raise ValueError(f"smart host name {name!r} cannot be used in a route")
    return NextHop("smarthost", ",".join(names), 0)


def _parse_mx_target(item: str, spec: str, mx_port: int) -> NextHop:
    """``host``, ``host:port``, ``[ip-literal]`` or ``[ip-literal]:port``."""
    port = mx_port
    if spec.startswith("["):
        # RFC 5321 §4.1.3 address literal, as in "mx:[2001:db8::1]:25"
        literal, sep, rest = spec[1:].partition("]")
        if not sep:
            raise ValueError(f"route target {item!r}: unclosed '['")
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            raise ValueError(f"route target {item!r}: {literal!r} is not an IP address") from None
        host = literal
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"route target {item!r}: expected ':port' after ']'")
            port = _parse_port(item, rest[1:])
    else:
        host, sep, port_text = spec.rpartition(":")
        if not sep:
            host = spec
        else:
            port = _parse_port(item, port_text)
        if ":" in host:
            raise ValueError(f"route target {item!r}: write an IPv6 address as [address]")
        try:
            host = to_a_labels(host)
        except ValueError:
            raise ValueError(f"route target {item!r}: {host!r} is not a host name") from None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"route target {item!r}: {host!r} is not a host name")
    return NextHop("host", host, port)


def _parse_port(item: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"route target {item!r}: {text!r} is not a port (1-65535)")
    return int(text)


def parse_route_target(
    target: RouteTarget,
    smart_host_names: set[str] | frozenset[str],
    *,
    domain: str,
    mx_port: int,
) -> list[NextHop]:
    """Parse a route target into hops for ``domain``.

    Each item is ``"direct"`` (the domain's MX, on ``mx_port``), ``"mx:host[:port]"``
    (a fixed host, default port ``mx_port``; IPv6 as ``mx:[2001:db8::1]:25``) or the
    name of a configured smart host. A list gives several items in order; consecutive
    smart host names become one smarthost hop (one balanced set). Keywords are
    case-insensitive; smart host names are exact ("direct" as a keyword wins over a
    smart host of that name). Raises ValueError naming the bad value.
    """
    items = [target] if isinstance(target, str) else target
    if not isinstance(items, list) or not items:
        raise ValueError(f"route target {target!r}: expected a name or a non-empty list")
    hops: list[NextHop] = []
    pending: list[str] = []  # consecutive smart host names, merged into one hop
    seen: set[str] = set()

    def flush() -> None:
        if pending:
            hops.append(smarthost_hop(list(pending)))
            pending.clear()

    for raw in items:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"route target {raw!r}: expected a non-empty string")
        item = raw.strip()
        lowered = item.lower()
        key = lowered if lowered == "direct" or lowered.startswith("mx:") else item
        if key in seen:
            raise ValueError(f"route target {item!r} is listed twice")
        seen.add(key)
        if lowered == "direct":
            flush()
            hops.append(direct_hop(domain, mx_port))
        elif lowered.startswith("mx:"):
            flush()
            spec = item[3:].strip()
            if not spec:
                raise ValueError(f"route target {item!r}: missing host after 'mx:'")
            hops.append(_parse_mx_target(item, spec, mx_port))
        elif item in smart_host_names:
            pending.append(item)
        else:
            known = ", ".join(sorted(smart_host_names)) or "none configured"
            raise ValueError(
                f"route target {item!r} is not 'direct', 'mx:host[:port]' or a smart host "
                f"(smart hosts: {known})"
            )
    flush()
    if len(set(hops)) != len(hops):  # e.g. "mx:a" and "mx:a:25" with mx_port 25
        raise ValueError(f"route target {target!r} names the same hop twice")
    return hops


#: A stand-in recipient domain for checking a target that is not tied to one domain
#: yet (a per-message route); "direct" parses the same for every domain.
_ANY_DOMAIN = "example.invalid"


def check_route_target(
    target: RouteTarget, smart_host_names: Sequence[str] | set[str] | frozenset[str]
) -> RouteTarget:
    """``target`` with surrounding blanks removed, if :func:`parse_route_target` accepts it.

    For routes chosen per message (the Python API) where no recipient domain is known
    yet. Raises the parser's ValueError.
    """
    parse_route_target(target, frozenset(smart_host_names), domain=_ANY_DOMAIN, mx_port=25)
    return target.strip() if isinstance(target, str) else [t.strip() for t in target]


def check_route_key(key: str) -> str:
    """The normalized ``[routes]`` key: a domain, ``*.domain`` or ``*``; else ValueError."""
    k = normalize_domain(key)
    if k != "*":
        bare = k[2:] if k.startswith("*.") else k
        if not _HOSTNAME.fullmatch(bare):
            raise ValueError(
                f"{key!r} is not a domain, '*.domain' or '*' "
                "(a wildcard may only be the whole first label)"
            )
    return k


def validate_routes(
    routes: Mapping[str, RouteTarget], smart_host_names: set[str] | frozenset[str], *, mx_port: int
) -> None:
    """Check every ``[routes]`` key and target; the ValueError starts ``routes.<key>: ``."""
    seen: dict[str, str] = {}
    for key, target in routes.items():
        try:
            k = check_route_key(key)
            if k in seen:
                raise ValueError(f"{key!r} and {seen[k]!r} are the same key")
            seen[k] = key
            parse_route_target(
                target, smart_host_names, domain=k.removeprefix("*.").lstrip("*"), mx_port=mx_port
            )
        except ValueError as exc:
            raise ValueError(f"routes.{key}: {exc}") from None
