"""MX resolution: pure ordering rules, then the resolver against a real DNS server."""

from __future__ import annotations

import asyncio
import random

import pytest

from ferry.delivery.mx import (
    MxError,
    MxHost,
    MxResolver,
    is_null_mx,
    order_mx,
)
from ferry.domains import to_a_labels
from ferry.resolver import parse_nameserver
from tests.world import DnsServer, async_wait_until

DOMAIN = "example.test"


class Clock:
    """A clock tests move by hand, for cache expiry."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(dns: DnsServer, **kwargs: object) -> MxResolver:
    kwargs.setdefault("timeout", 2.0)
    return MxResolver([dns.address], **kwargs)  # type: ignore[arg-type]


def publish_two_mx(dns: DnsServer, ttl: int = 300) -> None:
    dns.add_mx(DOMAIN, [(20, "mx2.example.test"), (10, "mx1.example.test")], ttl=ttl)
    dns.add_a("mx1.example.test", "127.0.0.11")
    dns.add_a("mx2.example.test", "127.0.0.12")


async def permanent_or_not(coro: object) -> MxError:
    with pytest.raises(MxError) as info:
        await coro  # type: ignore[misc]
    return info.value


# -- pure helpers ------------------------------------------------------------------


def test_order_mx_sorts_by_preference() -> None:
    records = [(30, "c"), (10, "a"), (20, "b")]
    assert order_mx(records, random.Random(1)) == [(10, "a"), (20, "b"), (30, "c")]


def test_order_mx_shuffles_equal_preferences_reproducibly() -> None:
    records = [(10, "a"), (10, "b"), (10, "c"), (5, "first"), (99, "last")]
    orders = {tuple(order_mx(records, random.Random(seed))) for seed in range(50)}
    assert all(order[0] == (5, "first") and order[-1] == (99, "last") for order in orders)
    assert len({order[1:4] for order in orders}) == 6  # every order of a, b, c occurs
    assert order_mx(records, random.Random(7)) == order_mx(records, random.Random(7))


@pytest.mark.parametrize(
    ("records", "null"),
    [
        ([(0, ".")], True),
        ([(0, "")], True),
        ([], False),
        ([(10, "mx.example.test")], False),
        ([(0, "."), (10, "mx.example.test")], False),  # misconfigured: use the real one
    ],
)
def test_is_null_mx(records: list[tuple[int, str]], null: bool) -> None:
    assert is_null_mx(records) is null


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.2:5353", ("127.0.0.2", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5300", ("::1", 5300)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_nameserver(text: str, parsed: tuple[str, int]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize(
    "text", ["localhost", "127.0.0.1:x", "127.0.0.1:", "127.0.0.1:70000", "[::1]:", "[::1]5", ""]
)
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_to_a_labels() -> None:
    assert to_a_labels("Bücher.Example.TEST.") == "xn--bcher-kva.example.test"
    with pytest.raises(ValueError):
        to_a_labels(" . ")


def test_mx_error_codes() -> None:
    assert MxError(True, "5.1.10", "null MX").code == 556  # RFC 7505 §4.1
    assert MxError(True, "5.1.2", "x").reply.is_permanent
    assert MxError(False, "4.4.3", "x").reply.code == 451


# -- against the DNS server ------------------------------------------------------------


async def test_mx_hosts_in_preference_order_with_addresses(dns_server: DnsServer) -> None:
    publish_two_mx(dns_server)
    dns_server.add_aaaa("mx1.example.test", "::1")
    hosts = await resolver(dns_server).resolve(DOMAIN)
    assert hosts == [
        MxHost(10, "mx1.example.test", ("::1", "127.0.0.11")),
        MxHost(20, "mx2.example.test", ("127.0.0.12",)),
    ]


async def test_equal_preferences_shuffled_by_the_rng(dns_server: DnsServer) -> None:
    names = [f"mx{i}.example.test" for i in range(4)]
    dns_server.add_mx(DOMAIN, [(10, name) for name in names])
    for i, name in enumerate(names):
        dns_server.add_a(name, f"127.0.0.{20 + i}")

    async def orders(seed: int) -> list[list[str]]:
        mx = resolver(dns_server, rng=random.Random(seed))
        return [[h.name for h in await mx.resolve(DOMAIN)] for _ in range(8)]

    first = await orders(3)
    assert first == await orders(3)  # reproducible with a seeded rng
    assert len({tuple(order) for order in first}) > 1  # reshuffled per resolve, cache or not
    assert all(sorted(order) == names for order in first)


async def test_implicit_mx_is_the_domain_itself(dns_server: DnsServer) -> None:
    dns_server.add_a(DOMAIN, "127.0.0.30")
    dns_server.add_aaaa(DOMAIN, "::1")
    hosts = await resolver(dns_server).resolve(DOMAIN)
    assert hosts == [MxHost(0, DOMAIN, ("::1", "127.0.0.30"))]


async def test_no_mx_and_no_address_is_permanent(dns_server: DnsServer) -> None:
    dns_server.add_txt(DOMAIN, "v=spf1 -all")  # exists, but nothing to deliver to
    error = await permanent_or_not(resolver(dns_server).resolve(DOMAIN))
    assert error.permanent and error.enhanced == "5.4.4"


async def test_null_mx_fails_permanently_without_address_lookups(dns_server: DnsServer) -> None:
    dns_server.null_mx(DOMAIN)
    dns_server.add_a(DOMAIN, "127.0.0.31")  # must not be used as an implicit MX
    error = await permanent_or_not(resolver(dns_server).resolve(DOMAIN))
    assert (error.permanent, error.enhanced, error.code) == (True, "5.1.10", 556)
    assert dns_server.queries == [(DOMAIN, "MX")]


async def test_nxdomain_is_permanent(dns_server: DnsServer) -> None:
    error = await permanent_or_not(resolver(dns_server).resolve("nowhere.test"))
    assert (error.permanent, error.enhanced) == (True, "5.1.2")


async def test_servfail_is_temporary_and_not_cached(dns_server: DnsServer) -> None:
    dns_server.servfail(DOMAIN)
    mx = resolver(dns_server)
    for _ in range(2):
        error = await permanent_or_not(mx.resolve(DOMAIN))
        assert (error.permanent, error.enhanced) == (False, "4.4.3")
    assert dns_server.count(DOMAIN, "MX") == 2
    dns_server.remove(DOMAIN)
    publish_two_mx(dns_server)
    assert len(await mx.resolve(DOMAIN)) == 2


async def test_timeout_is_temporary(dns_server: DnsServer) -> None:
    dns_server.timeout(DOMAIN)
    error = await permanent_or_not(resolver(dns_server, timeout=0.5).resolve(DOMAIN))
    assert (error.permanent, error.enhanced) == (False, "4.4.3")
    assert "timed out" in error.text


async def test_hosts_without_addresses_are_skipped(dns_server: DnsServer) -> None:
    publish_two_mx(dns_server)
    dns_server.servfail("mx1.example.test")
    hosts = await resolver(dns_server).resolve(DOMAIN)
    assert [h.name for h in hosts] == ["mx2.example.test"]


async def test_no_usable_host_is_temporary(dns_server: DnsServer) -> None:
    dns_server.add_mx(DOMAIN, [(10, "gone.example.test")])
    error = await permanent_or_not(resolver(dns_server).resolve(DOMAIN))
    assert (error.permanent, error.enhanced) == (False, "4.4.4")

    dns_server.add_a("gone.example.test", "127.0.0.40")
    dns_server.servfail("gone.example.test", "A")
    error = await permanent_or_not(resolver(dns_server).resolve(DOMAIN))
    assert (error.permanent, error.enhanced) == (False, "4.4.3")


async def test_cache_honours_ttl(dns_server: DnsServer) -> None:
    publish_two_mx(dns_server, ttl=60)
    clock = Clock()
    mx = resolver(dns_server, clock=clock)
    first = await mx.resolve(DOMAIN)
    clock.now += 59
    assert await mx.resolve(DOMAIN) == first
    assert dns_server.count(DOMAIN, "MX") == 1
    assert dns_server.count("mx1.example.test", "A") == 1  # addresses are cached too
    clock.now += 2
    await mx.resolve(DOMAIN)
    assert dns_server.count(DOMAIN, "MX") == 2
    assert mx.stats() == {
        "mx_lookups": 2,
        "mx_cache_hits": 1,
        "mx_joined": 0,
        "mx_cache_size": 1,
        "address_lookups": 4,  # A and AAAA of two hosts; the A TTL (300 s) outlives the MX
        "address_cache_hits": 8,
    }


async def test_cache_ttl_is_capped(dns_server: DnsServer) -> None:
    publish_two_mx(dns_server, ttl=86_400)
    clock = Clock()
    mx = resolver(dns_server, clock=clock, max_ttl=100)
    await mx.resolve(DOMAIN)
    clock.now += 101
    await mx.resolve(DOMAIN)
    assert dns_server.count(DOMAIN, "MX") == 2


@pytest.mark.parametrize(("soa_minimum", "negative_ttl", "lives"), [(300, 30, 30), (10, 300, 10)])
async def test_negative_answers_cached(
    dns_server: DnsServer, soa_minimum: int, negative_ttl: float, lives: int
) -> None:
    dns_server.negative_ttl = soa_minimum
    clock = Clock()
    mx = resolver(dns_server, clock=clock, negative_ttl=negative_ttl)
    for _ in range(2):
        assert (await permanent_or_not(mx.resolve("nowhere.test"))).enhanced == "5.1.2"
    assert dns_server.count("nowhere.test") == 1
    clock.now += lives + 1
    await permanent_or_not(mx.resolve("nowhere.test"))
    assert dns_server.count("nowhere.test") == 2


async def test_null_mx_cached_as_negative(dns_server: DnsServer) -> None:
    dns_server.null_mx(DOMAIN, ttl=3600)
    clock = Clock()
    mx = resolver(dns_server, clock=clock, negative_ttl=60)
    await permanent_or_not(mx.resolve(DOMAIN))
    clock.now += 59
    await permanent_or_not(mx.resolve(DOMAIN))
    assert dns_server.count(DOMAIN, "MX") == 1
    clock.now += 2
    await permanent_or_not(mx.resolve(DOMAIN))
    assert dns_server.count(DOMAIN, "MX") == 2


async def test_concurrent_resolves_share_one_lookup(dns_server: DnsServer) -> None:
    publish_two_mx(dns_server)
    dns_server.delay(DOMAIN, 0.2)  # keep the first lookup in flight while the others arrive
    mx = resolver(dns_server)
    results = await asyncio.gather(*(mx.resolve(DOMAIN) for _ in range(20)))
    assert all(len(hosts) == 2 for hosts in results)
    assert dns_server.count(DOMAIN, "MX") == 1
    assert dns_server.count("mx1.example.test", "A") == 1
    stats = mx.stats()
    assert (stats["mx_lookups"], stats["mx_joined"]) == (1, 19)


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(
    dns_server: DnsServer,
) -> None:
    publish_two_mx(dns_server)
    dns_server.delay(DOMAIN, 0.2)
    mx = resolver(dns_server)
    impatient = asyncio.ensure_future(mx.resolve(DOMAIN))
    patient = asyncio.ensure_future(mx.resolve(DOMAIN))
    await async_wait_until(lambda: mx.stats()["mx_joined"] == 1)  # both wait on one lookup
    impatient.cancel()
    assert len(await patient) == 2
    assert impatient.cancelled()
    assert dns_server.count(DOMAIN, "MX") == 1


async def test_unicode_domain_queried_as_a_labels(dns_server: DnsServer) -> None:
    dns_server.add_mx("xn--bcher-kva.example.test", [(10, "mx1.example.test")])
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    hosts = await resolver(dns_server).resolve("Bücher.example.test")
    assert [h.name for h in hosts] == ["mx1.example.test"]
    assert ("xn--bcher-kva.example.test", "MX") in dns_server.queries


async def test_nameservers_each_with_their_own_port(dns_server: DnsServer) -> None:
    # The first nameserver fails (SERVFAIL): dnspython moves on to the second,
    # which listens on another address and port.
    with DnsServer(host="127.0.0.2") as other:
        other.servfail(DOMAIN)
        dns_server.add_a(DOMAIN, "127.0.0.51")
        assert other.port != dns_server.port or other.host != dns_server.host
        hosts = await MxResolver([other.address, dns_server.address]).resolve(DOMAIN)
    assert hosts[0].addresses == ("127.0.0.51",)
    assert other.count(DOMAIN, "MX") == 1 and dns_server.count(DOMAIN, "MX") == 1
