"""Relay access decision: may this client hand us mail for this recipient?

A pure function over plain values, so the whole decision table can be tested
without sockets. The SMTP handler calls :func:`decide_rcpt` once per RCPT TO
and answers ``554 5.7.1 Relay access denied`` on :attr:`RcptDecision.DENIED`
(RFC 5321 §3.6.2: a relay must not accept mail it is not authorised to relay).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ferry.domains import domain_key, to_a_labels

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RcptDecision(enum.Enum):
    """What intake does with one recipient."""

    LOCAL = "local"  # a domain we handle ourselves (aliases expand it)
    RELAY = "relay"  # accepted for onward delivery
    DENIED = "denied"  # refused: we would be an open relay


def normalise_domain(domain: str) -> str:
    """The domain in the one form Ferry compares (ferry.domains): ``Bücher.TEST.`` is
    ``xn--bcher-kva.test``. Wildcard patterns keep their ``*.`` or ``.`` prefix."""
    return domain_key(domain)


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """True if ``domain`` matches any pattern, case-insensitively.

    A pattern is exact (``example.com``) or a wildcard (``*.example.com`` or
    ``.example.com``) that matches any subdomain but not the apex itself.
    """
    domain = normalise_domain(domain)
    if not domain:
        return False
    for raw in patterns:
        pattern = normalise_domain(raw)
        if pattern.startswith(("*.", ".")):
            suffix = pattern[pattern.index(".") :]  # keep the dot: "x.com" must not match "ax.com"
            if domain.endswith(suffix) and len(domain) > len(suffix):
                return True
        elif pattern and domain == pattern:
            return True
    return False


def _domain_set(entries: Iterable[str], what: str) -> frozenset[str]:
    out = set()
    for entry in entries:
        # An empty entry or a bare "*." would silently match nothing (or, in a
        # sloppier matcher, everything): reject it so the typo is seen.
        if entry.strip().lower() in ("", "*", "*.", "."):
            raise ValueError(f"{what} entry {entry!r} is not a domain")
        try:
            out.add(to_a_labels(entry))
        except ValueError as exc:
            raise ValueError(f"{what} entry {entry!r} is not a domain: {exc}") from None
    return frozenset(out)


@dataclass(frozen=True)
class RelayPolicy:
    """Which domains we are local for, relay for anyone, and who may relay."""

    local_domains: frozenset[str]
    relay_domains: frozenset[str]
    relay_networks: tuple[IPNetwork, ...]

    @classmethod
    def build(
        cls,
        local_domains: Iterable[str],
        relay_domains: Iterable[str],
        relay_networks: Iterable[str],
    ) -> RelayPolicy:
        """Validate and normalise configuration strings.

        Raises ValueError naming the first bad entry. Networks are parsed
        strictly: ``10.0.0.1/8`` (host bits set) is refused because it is
        ambiguous, and this list is the open-relay boundary.
        """
        networks: list[IPNetwork] = []
        for entry in relay_networks:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(
                    f"relay_networks entry {entry!r} is not a valid network: {exc}"
                ) from exc
        return cls(
            local_domains=_domain_set(local_domains, "local_domains"),
            relay_domains=_domain_set(relay_domains, "relay_domains"),
            relay_networks=tuple(networks),
        )


def client_in_networks(policy: RelayPolicy, client_ip: str | None) -> bool:
    """True if ``client_ip`` lies in one of the policy's relay networks.

    Accepts IPv4, IPv6, IPv4-mapped IPv6 (``::ffff:127.0.0.1`` is checked
    against IPv4 networks too, since a dual-stack listener reports IPv4 peers
    that way) and scoped addresses (``fe80::1%eth0``). None or an unparseable
    string is never trusted.
    """
    if not client_ip:
        return False
    # `in` is False across address families, so mixed lists are safe.
    return any(a in net for a in _addresses(client_ip) for net in policy.relay_networks)


@functools.lru_cache(maxsize=1024)
def _addresses(client_ip: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The address (and its IPv4 form when IPv4-mapped); none when unparseable. Cached:
    asked at every RCPT, and a client sends many from one address."""
    try:
        # The zone index names a local interface; it does not change which
        # network the address belongs to.
        addr = ipaddress.ip_address(client_ip.strip().partition("%")[0])
    except ValueError:
        return ()
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return (addr, addr.ipv4_mapped)
    return (addr,)


def decide_rcpt(
    policy: RelayPolicy,
    *,
    recipient_domain: str,
    client_ip: str | None,
    authenticated: bool,
) -> RcptDecision:
    """Decide one recipient.

    Local domains are always accepted (whoever sends); relay domains are
    relayed for anyone, as a backup MX would; any other domain is relayed
    only for an authenticated client (RFC 4954) or one in relay_networks.
    """
    if domain_matches(recipient_domain, policy.local_domains):
        return RcptDecision.LOCAL
    if domain_matches(recipient_domain, policy.relay_domains):
        return RcptDecision.RELAY
    if authenticated or client_in_networks(policy, client_ip):
        return RcptDecision.RELAY
    return RcptDecision.DENIED
