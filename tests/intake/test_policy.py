"""Relay access decision: the whole table, without sockets."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from ferry.intake.policy import (
    RcptDecision,
    RelayPolicy,
    client_in_networks,
    decide_rcpt,
    domain_matches,
)

LOCAL, RELAY, DENIED = RcptDecision.LOCAL, RcptDecision.RELAY, RcptDecision.DENIED

POLICY = RelayPolicy.build(
    local_domains=["Example.COM.", "*.corp.example"],
    relay_domains=["backup.org", ".relay.net"],
    relay_networks=["192.0.2.0/24", "127.0.0.0/8", "2001:db8:1::/48"],
)

# Recipient domains, and what they get regardless of client (None: depends on client).
DOMAINS = {
    "example.com": LOCAL,
    "EXAMPLE.com.": LOCAL,
    "mail.corp.example": LOCAL,
    "backup.org": RELAY,
    "mx.relay.net": RELAY,
    "gmail.com": None,
    "sub.example.com": None,  # exact local entry does not cover subdomains
    "corp.example": None,  # a wildcard does not cover its apex
    "relay.net": None,
}
# Clients, and whether they are inside relay_networks.
CLIENTS = {
    "192.0.2.10": True,
    "127.0.0.1": True,
    "198.51.100.7": False,
    "2001:db8:1::25": True,
    "2001:db8:2::25": False,
    "::ffff:192.0.2.10": True,
    "::ffff:203.0.113.1": False,
    None: False,
}


@pytest.mark.parametrize(
    ("domain", "client", "authenticated"),
    list(itertools.product(DOMAINS, CLIENTS, [False, True])),
)
def test_decision_table(domain: str, client: str | None, authenticated: bool) -> None:
    expected = DOMAINS[domain] or (RELAY if authenticated or CLIENTS[client] else DENIED)
    got = decide_rcpt(
        POLICY, recipient_domain=domain, client_ip=client, authenticated=authenticated
    )
    assert got is expected


def test_open_relay_is_refused() -> None:
    # The one cell that matters most, spelled out.
    decision = decide_rcpt(
        POLICY, recipient_domain="victim.example", client_ip="203.0.113.9", authenticated=False
    )
    assert decision is DENIED


@pytest.mark.parametrize(
    ("domain", "patterns", "expected"),
    [
        ("example.com", ["example.com"], True),
        ("EXAMPLE.COM", ["example.com"], True),
        ("example.com.", ["Example.Com"], True),
        ("example.com", ["example.com."], True),
        ("www.example.com", ["example.com"], False),
        ("example.org", ["example.com"], False),
        ("a.example.com", ["*.example.com"], True),
        ("a.b.example.com", ["*.example.com"], True),
        ("A.Example.Com.", ["*.EXAMPLE.com"], True),
        ("example.com", ["*.example.com"], False),
        ("badexample.com", ["*.example.com"], False),
        ("a.example.com", [".example.com"], True),
        ("example.com", [".example.com"], False),
        ("badexample.com", [".example.com"], False),
        ("a.example.com", ["other.org", "*.example.com"], True),
        ("example.com", [], False),
        ("", ["example.com", ".example.com"], False),
        (".", ["example.com"], False),
    ],
)
def test_domain_matches(domain: str, patterns: list[str], expected: bool) -> None:
    assert domain_matches(domain, patterns) is expected


@pytest.mark.parametrize(
    ("networks", "client", "expected"),
    [
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.5"], "10.0.0.5", True),  # a bare address is a /32
        (["10.0.0.5"], "10.0.0.6", False),
        (["127.0.0.0/8"], "::ffff:127.0.0.1", True),
        (["127.0.0.0/8"], "::FFFF:7f00:1", True),
        (["127.0.0.0/8"], "::1", False),
        (["::1/128"], "::1", True),
        (["::1/128"], "127.0.0.1", False),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["fe80::/10"], "fe80::1%2", True),
        (["2001:db8::/32"], "fe80::1%eth0", False),
        (["::ffff:0:0/96"], "::ffff:10.1.2.3", True),  # mapped range listed as IPv6
        (["10.0.0.0/8"], " 10.0.0.1 ", True),
        (["10.0.0.0/8", "2001:db8::/32"], "2001:db8::1", True),
        (["0.0.0.0/0"], "::1", False),  # an IPv4 wildcard does not swallow IPv6
        (["10.0.0.0/8"], None, False),
        (["10.0.0.0/8"], "", False),
        (["10.0.0.0/8"], "not-an-ip", False),
        (["10.0.0.0/8"], "10.0.0.256", False),
        (["10.0.0.0/8"], "10.0.0.0/8", False),  # a network is not a client
        ([], "10.0.0.1", False),
    ],
)
def test_client_in_networks(networks: list[str], client: str | None, expected: bool) -> None:
    policy = RelayPolicy.build([], [], networks)
    assert client_in_networks(policy, client) is expected


def test_build_normalises() -> None:
    policy = RelayPolicy.build(
        [" Example.COM. ", "*.Corp.Example."], ["Backup.ORG."], [" 10.0.0.0/8", "2001:DB8::/32"]
    )
    assert policy.local_domains == frozenset({"example.com", "*.corp.example"})
    assert policy.relay_domains == frozenset({"backup.org"})
    assert policy.relay_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_build_accepts_any_iterables() -> None:
    policy = RelayPolicy.build(iter(["a.example"]), (), (n for n in ["10.0.0.0/8"]))
    assert policy.local_domains == frozenset({"a.example"})
    assert len(policy.relay_networks) == 1


@pytest.mark.parametrize(
    "bad",
    ["10.0.0.0/33", "10.0.0.1/8", "300.1.2.3", "example.com", "", "2001:db8::/129", "10.0.0.0/8x"],
)
def test_bad_network_rejected_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match="relay_networks entry") as info:
        RelayPolicy.build([], [], ["192.0.2.0/24", bad])
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["", "  ", ".", "*", "*."])
@pytest.mark.parametrize("field", ["local_domains", "relay_domains"])
def test_empty_domain_entry_rejected(field: str, bad: str) -> None:
    kwargs: dict[str, list[str]] = {"local_domains": [], "relay_domains": [], "relay_networks": []}
    kwargs[field] = ["ok.example", bad]
    with pytest.raises(ValueError, match=field):
        RelayPolicy.build(**kwargs)


def test_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        POLICY.local_domains = frozenset()  # type: ignore[misc]
