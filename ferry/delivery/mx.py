"""MX resolution for direct delivery (RFC 5321 §5.1, RFC 7505 null MX).

The ordering rules are pure functions (:func:`order_mx`, :func:`is_null_mx`);
:class:`MxResolver` is the thin I/O edge around dnspython, adding what a
busy MTA needs on top of it: a TTL-honouring cache with negative caching,
and single-flight, so a burst of messages to one domain sends one query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ferry.domains import to_a_labels
from ferry.envelope import Reply
from ferry.resolver import parse_nameserver

__all__ = [
    "MxError",
    "MxHost",
    "MxResolver",
    "is_null_mx",
    "mx_targets",
    "order_mx",
    "parse_nameserver",
    "to_a_labels",
]


@dataclass(frozen=True)
class MxHost:
    """One next hop for a domain: an MX host (or the domain itself) and its IPs."""

    preference: int
    name: str
    addresses: tuple[str, ...]  # IPv6 then IPv4, each in the order received


class MxError(Exception):
    """Why a domain has no usable mail host: permanent (bounce) or not (retry)."""

    def __init__(self, permanent: bool, enhanced: str, text: str) -> None:
        super().__init__(f"{enhanced} {text}")
        self.permanent = permanent
        self.enhanced = enhanced
        self.text = text

    @property
    def code(self) -> int:
        """The SMTP code to report: RFC 7505 §4.1 registers 556 for null MX."""
        if self.enhanced == "5.1.10":
            return 556
        return 550 if self.permanent else 451

    @property
    def reply(self) -> Reply:
        return Reply(self.code, self.enhanced, self.text)


# -- pure helpers ----------------------------------------------------------------


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first; equal preferences in random order (RFC 5321 §5.1),
    so load spreads over equally preferred hosts."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda record: record[0])  # stable: keeps the shuffle


def mx_targets(hosts: Sequence[MxHost]) -> list[tuple[str, str]]:
    """(host name, address) pairs to try, in order: each host by preference, each of its
    addresses as resolved (RFC 5321 §5.1: try each address until one succeeds)."""
    return [(h.name, a) for h in hosts for a in h.addresses]


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """True if the domain declares it accepts no mail (RFC 7505: ``MX 0 .``).

    A "." among real hosts is a misconfiguration; the real hosts are then used.
    """
    return bool(records) and all(host in ("", ".") for _, host in records)


# -- the resolver ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """One query's outcome, as cached."""

    records: tuple[Any, ...] = ()  # (preference, host) for MX; IP strings for A / AAAA
    nxdomain: bool = False
    failure: str | None = None  # a temporary failure, never cached


def _negative_ttl(response: dns.message.Message | None) -> int | None:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA minimum)."""
    for rrset in response.authority if response is not None else ():
        if rrset.rdtype == dns.rdatatype.SOA:
            return int(min(rrset.ttl, rrset[0].minimum))
    return None


class MxResolver:
    """Resolves a domain to its ordered mail hosts, with cache and single-flight.

    ``nameservers``: ``"ip"`` / ``"ip:port"`` strings, each with its own port
    (empty: the system's resolvers). ``timeout``: lifetime of each DNS query,
    retries included. ``clock`` and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 10.0,
        max_ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_entries: int = 100_000,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        self._resolver.cache = None  # ours knows about negative answers and single-flight
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)  # per try: a lost UDP packet is retried
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._rng = rng or random.Random()
        self._max_entries = max_entries
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[_Answer]] = {}
        self._stats: Counter[str] = Counter()

    async def resolve(self, domain: str) -> list[MxHost]:
        """The domain's mail hosts, most preferred first; raises :class:`MxError`."""
        try:
            name = to_a_labels(domain)
        except ValueError as exc:
            raise MxError(True, "5.1.2", str(exc)) from None
        mx = await self._query(name, "MX")
        if mx.failure:
            raise MxError(False, "4.4.3", f"MX lookup for {name} failed: {mx.failure}")
        if mx.nxdomain:
            raise MxError(True, "5.1.2", f"domain {name} does not exist")
        if is_null_mx(mx.records):
            raise MxError(True, "5.1.10", f"domain {name} accepts no mail (null MX)")
        # RFC 5321 §5.1: with no MX at all, the domain itself is the one host.
        implicit = not mx.records
        candidates = [(0, name)] if implicit else order_mx(mx.records, self._rng)
        candidates = [(pref, host) for pref, host in candidates if host not in ("", ".")]
        looked_up = await asyncio.gather(*(self._addresses(host) for _, host in candidates))
        hosts = [
            MxHost(pref, host, addresses)
            for (pref, host), (addresses, _) in zip(candidates, looked_up, strict=True)
            if addresses
        ]
        if hosts:
            return hosts
        failures = [failure for _, failure in looked_up if failure]
        if failures:
            raise MxError(False, "4.4.3", f"address lookup for {name} failed: {failures[0]}")
        if implicit:
            raise MxError(True, "5.4.4", f"domain {name} has no MX and no address records")
        raise MxError(False, "4.4.4", f"no MX host of {name} has an address")

    def stats(self) -> dict[str, int]:
        """Counters: queries sent, cache hits, lookups joined in flight, cache size."""
        now = self._clock()
        size = sum(
            1 for (_, rdtype), (exp, _) in self._cache.items() if rdtype == "MX" and exp > now
        )
        keys = ("mx_lookups", "mx_cache_hits", "mx_joined", "address_lookups", "address_cache_hits")
        return {key: self._stats[key] for key in keys} | {"mx_cache_size": size}

    async def host_addresses(self, host: str) -> list[str]:
        """A host's addresses (IP literals pass through); raises :class:`MxError`.

        For fixed next hops (smart hosts, ``mx:host`` routes), where no MX lookup applies.
        """
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        try:
            name = to_a_labels(host)
        except ValueError as exc:
            raise MxError(True, "5.1.2", str(exc)) from None
        addresses, failure = await self._addresses(name)
        if addresses:
            return list(addresses)
        if failure:
            raise MxError(False, "4.4.3", f"address lookup for {name} failed: {failure}")
        raise MxError(False, "4.4.4", f"host {name} has no address")

    async def _addresses(self, host: str) -> tuple[tuple[str, ...], str | None]:
        """A host's IPv6 and IPv4 addresses (looked up together), and any failure."""
        v6, v4 = await asyncio.gather(self._query(host, "AAAA"), self._query(host, "A"))
        return v6.records + v4.records, v6.failure or v4.failure

    async def _query(self, name: str, rdtype: str) -> _Answer:
        """One query through the cache, joining an identical one already in flight."""
        kind = "mx" if rdtype == "MX" else "address"
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                self._stats[f"{kind}_cache_hits"] += 1
                return cached[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            self._stats[f"{kind}_lookups"] += 1
            task = asyncio.ensure_future(self._fetch(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        elif kind == "mx":
            self._stats["mx_joined"] += 1
        # shield: one caller giving up (cancelled) must not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _fetch(self, name: str, rdtype: str) -> _Answer:
        qname = dns.name.from_text(name)
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = exc.responses().get(qname)  # type: ignore[no-untyped-call]
            return self._store(name, rdtype, _Answer(nxdomain=True), self._negative(response))
        except dns.resolver.NoNameservers:
            return _Answer(failure="no nameserver answered (SERVFAIL or refused)")
        except dns.exception.Timeout:
            return _Answer(failure="timed out")
        except dns.exception.DNSException as exc:
            return _Answer(failure=f"{type(exc).__name__}: {exc}")
        if answer.rrset is None:  # NODATA
            return self._store(name, rdtype, _Answer(), self._negative(answer.response))
        if rdtype == "MX":
            records: tuple[Any, ...] = tuple(
                (rd.preference, rd.exchange.to_text(omit_final_dot=True).lower())
                for rd in answer.rrset
            )
        else:
            records = tuple(rd.address for rd in answer.rrset)
        ttl = min(answer.chaining_result.minimum_ttl, self._max_ttl)
        if rdtype == "MX" and is_null_mx(records):
            ttl = min(ttl, self._negative_ttl)  # a null MX is a negative answer too
        return self._store(name, rdtype, _Answer(records), ttl)

    def _negative(self, response: dns.message.Message | None) -> float:
        soa_ttl = _negative_ttl(response)
        return self._negative_ttl if soa_ttl is None else min(soa_ttl, self._negative_ttl)

    def _store(self, name: str, rdtype: str, answer: _Answer, ttl: float) -> _Answer:
        if ttl > 0:
            if len(self._cache) >= self._max_entries:
                self._evict()
            self._cache[name, rdtype] = (self._clock() + ttl, answer)
        return answer

    def _evict(self) -> None:
        """Drop expired entries, then the oldest, so the cache stays bounded."""
        now = self._clock()
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]
        while len(self._cache) >= self._max_entries:
            del self._cache[next(iter(self._cache))]
