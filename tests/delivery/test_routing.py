"""Routing: route targets, route matching, route plans and hybrid fallback."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from ferry.config import DeliveryMode
from ferry.delivery.routes import NextHop
from ferry.delivery.routing import (
    ALL_SMART_HOSTS,
    FALLBACK_ALL,
    NO_FALLBACK,
    RoutePlan,
    RouteTarget,
    hop_smart_host_names,
    match_route,
    parse_route_target,
    plan_route,
    should_fall_back,
    smarthost_hop,
    validate_routes,
)
from ferry.envelope import Reply

SMART = {"sendgrid", "ses", "gmail-relay"}

MX = NextHop("mx", "example.com", 25)
RELAY = NextHop("smarthost", "*", 0)


# --- parse_route_target ------------------------------------------------------------
# The table of route strings is data: tests/cases/routes/ (tests/test_route_cases.py).


def test_parse_route_target_names_known_hosts_in_error() -> None:
    with pytest.raises(ValueError, match="gmail-relay, sendgrid, ses"):
        parse_route_target("nope", SMART, domain="example.com", mx_port=25)
    with pytest.raises(ValueError, match="none configured"):
        parse_route_target("nope", set(), domain="example.com", mx_port=25)


@pytest.mark.parametrize(("bad"), ["a,b", "*", ""])
def test_smarthost_hop_refuses_names_that_break_the_convention(bad: str) -> None:
    with pytest.raises(ValueError):
        smarthost_hop([bad])


def test_smarthost_hop_and_names_round_trip() -> None:
    assert smarthost_hop() == NextHop("smarthost", ALL_SMART_HOSTS, 0)
    assert hop_smart_host_names(smarthost_hop(), ["a", "b"]) == ["a", "b"]
    assert hop_smart_host_names(smarthost_hop(["b", "c"]), ["a", "b", "c"]) == ["b", "c"]
    with pytest.raises(ValueError):
        hop_smart_host_names(MX, ["a"])
    with pytest.raises(ValueError):
        smarthost_hop([])


# --- match_route -------------------------------------------------------------------

ROUTES: dict[str, RouteTarget] = {
    "example.com": "direct",
    "*.example.com": "sendgrid",
    "*.eu.example.com": "ses",
    "Partner.ORG.": "mx:mail.partner.org",
    "*.gov.uk": ["ses", "sendgrid"],
}


@pytest.mark.parametrize(
    ("domain", "key"),
    [
        ("example.com", "example.com"),  # exact, not the wildcard
        ("EXAMPLE.COM.", "example.com"),
        ("sub.example.com", "*.example.com"),
        ("a.b.example.com", "*.example.com"),
        ("eu.example.com", "*.example.com"),  # *.eu.example.com needs a label before eu
        ("x.eu.example.com", "*.eu.example.com"),  # longest wildcard wins
        ("y.x.eu.example.com", "*.eu.example.com"),
        ("partner.org", "Partner.ORG."),
        ("mail.partner.org", None),
        ("notexample.com", None),  # suffix match is label-wise
        ("gov.uk", None),
        ("hmrc.gov.uk", "*.gov.uk"),
        ("example.org", None),
        ("", None),
    ],
)
def test_match_route(domain: str, key: str | None) -> None:
    got = match_route(domain, ROUTES)
    if key is None:
        assert got is None
    else:
        assert got == (key, ROUTES[key])


def test_match_route_exact_beats_wildcard_whatever_the_order() -> None:
    routes: dict[str, RouteTarget] = {"*.b.c": "ses", "a.b.c": "direct", "*.c": "sendgrid"}
    assert match_route("a.b.c", routes) == ("a.b.c", "direct")
    assert match_route("z.b.c", routes) == ("*.b.c", "ses")
    assert match_route("b.c", routes) == ("*.c", "sendgrid")


def test_match_route_catch_all_is_lowest() -> None:
    routes: dict[str, RouteTarget] = {"*": "ses", "*.example.com": "sendgrid"}
    assert match_route("a.example.com", routes) == ("*.example.com", "sendgrid")
    assert match_route("example.net", routes) == ("*", "ses")


# --- validate_routes ---------------------------------------------------------------


def test_validate_routes_accepts_good_table() -> None:
    validate_routes(ROUTES | {"*": "direct"}, SMART, mx_port=25)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"": "direct"}, "is not a domain"),
        ({"Example.com": "direct", "example.com.": "ses"}, "same key"),
    ],
)
def test_validate_routes_errors(routes: Mapping[str, RouteTarget], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_routes(routes, SMART, mx_port=25)


# --- plan_route --------------------------------------------------------------------

DEFAULT = ("sendgrid", "ses")
T, Tmp, B = "transport", "temporary", "blocked"


@pytest.mark.parametrize(
    ("domain", "mode", "routes", "smart", "choice", "mx_failed", "hops", "fallback", "reason"),
    [
        # Modes without routes.
        ("example.com", "direct", {}, DEFAULT, None, False, [MX], set(), "direct: MX delivery"),
        ("example.com", "relay", {}, DEFAULT, None, False, [RELAY], set(), "relay: default"),
        ("example.com", "hybrid", {}, DEFAULT, None, False, [MX, RELAY], {T, Tmp, B}, "hybrid"),
        ("example.com", "smart", {}, DEFAULT, "direct", False, [MX, RELAY], {T, Tmp, B}, "smart"),
        ("example.com", "smart", {}, DEFAULT, None, False, [MX, RELAY], {T, Tmp, B}, "direct then"),
        ("example.com", "smart", {}, DEFAULT, "relay", False, [RELAY], set(), "via relay"),
        # Zetian's MX routing fallback: MX lookup SERVFAIL/timeout.
        ("example.com", "direct", {}, DEFAULT, None, True, [RELAY], set(), "MX lookup failed"),
        ("example.com", "hybrid", {}, DEFAULT, None, True, [RELAY], set(), "MX lookup failed"),
        ("example.com", "smart", {}, DEFAULT, "direct", True, [RELAY], set(), "MX lookup"),
        ("example.com", "relay", {}, DEFAULT, None, True, [RELAY], set(), "relay: default"),
        ("example.com", "direct", {}, (), None, True, [MX], set(), "no smart host"),
        # No smart hosts configured: direct whatever the mode.
        ("example.com", "relay", {}, (), None, False, [MX], set(), "no smart hosts configured"),
        ("example.com", "hybrid", {}, (), None, False, [MX], set(), "no smart hosts configured"),
        ("example.com", "smart", {}, (), "relay", False, [MX], set(), "no smart hosts"),
        # Domain normalised into the hop.
        ("Example.COM.", "direct", {}, DEFAULT, None, False, [MX], set(), "direct"),
        # Routes override the mode.
        (
            "a.example.com", "direct", {"*.example.com": "gmail-relay"},
            ("gmail-relay", *DEFAULT), None, False,
            [NextHop("smarthost", "gmail-relay", 0)], set(),
            "route *.example.com -> gmail-relay",
        ),
        (
            "example.com", "relay", {"example.com": "direct"}, DEFAULT, None, False,
            [MX], set(), "route example.com -> direct",
        ),
        (
            # A route pinning direct stays direct even when the MX lookup fails.
            "example.com", "hybrid", {"example.com": "direct"}, DEFAULT, None, True,
            [MX], set(), "route allows only direct",
        ),
        (
            "example.com", "smart", {"example.com": "mx:10.1.2.3:2525"}, DEFAULT, "relay",
            False, [NextHop("host", "10.1.2.3", 2525)], set(), "route example.com -> mx:",
        ),
        (
            "example.com", "direct", {"example.com": ["direct", "ses"]}, DEFAULT, None, False,
            [MX, NextHop("smarthost", "ses", 0)], {T, Tmp, B}, "route example.com -> direct, ses",
        ),
        (
            "example.com", "direct", {"example.com": ["direct", "ses"]}, DEFAULT, None, True,
            [NextHop("smarthost", "ses", 0)], set(), "skipping direct",
        ),
        (
            "example.com", "hybrid", {"example.com": ["ses", "sendgrid"]}, DEFAULT, None, False,
            [NextHop("smarthost", "ses,sendgrid", 0)], set(), "ses, sendgrid",
        ),
    ],
)  # fmt: skip
def test_plan_route(
    domain: str,
    mode: DeliveryMode,
    routes: dict[str, RouteTarget],
    smart: tuple[str, ...],
    choice: str | None,
    mx_failed: bool,
    hops: list[NextHop],
    fallback: set[str],
    reason: str,
) -> None:
    plan = plan_route(
        domain,
        mode=mode,
        routes=routes,
        smart_hosts=smart,
        mx_port=25,
        smart_choice=choice,  # type: ignore[arg-type]
        mx_failed=mx_failed,
    )
    assert list(plan.hops) == hops
    assert plan.fallback_on == frozenset(fallback)
    assert reason in plan.reason


def test_plan_route_smart_reason_is_carried() -> None:
    plan = plan_route(
        "example.com",
        mode="smart",
        routes={},
        smart_hosts=DEFAULT,
        mx_port=25,
        smart_choice="relay",
        smart_reason="6/10 deferred; relay for 1800s",
    )
    assert plan.reason == "smart: example.com via relay (6/10 deferred; relay for 1800s)"


def test_plan_route_uses_mx_port() -> None:
    plan = plan_route("example.com", mode="direct", routes={}, smart_hosts=(), mx_port=2525)
    assert plan.hops == (NextHop("mx", "example.com", 2525),)
    plan = plan_route(
        "example.com", mode="direct", routes={"*": "mx:relay.lan"}, smart_hosts=(), mx_port=2525
    )
    assert plan.hops == (NextHop("host", "relay.lan", 2525),)


def test_plan_route_refuses_route_to_unknown_smart_host() -> None:
    with pytest.raises(ValueError, match="'mailgun'"):
        plan_route(
            "example.com",
            mode="direct",
            routes={"example.com": "mailgun"},
            smart_hosts=DEFAULT,
            mx_port=25,
        )


def test_plan_route_refuses_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'carrier-pigeon'"):
        plan_route(
            "example.com",
            mode="carrier-pigeon",  # type: ignore[arg-type]
            routes={},
            smart_hosts=DEFAULT,
            mx_port=25,
        )


@pytest.mark.parametrize(
    ("hops", "fallback"),
    [((), frozenset()), ((MX,), frozenset({"sometimes"}))],
)
def test_route_plan_validates(hops: tuple[NextHop, ...], fallback: frozenset[str]) -> None:
    with pytest.raises(ValueError):
        RoutePlan(hops, fallback, "x")


# --- should_fall_back --------------------------------------------------------------

HYBRID = RoutePlan((MX, RELAY), FALLBACK_ALL, "hybrid")
SINGLE = RoutePlan((RELAY,), NO_FALLBACK, "relay")
TRANSPORT_ONLY = RoutePlan((MX, RELAY), frozenset({"transport"}), "t")
NO_BLOCKED = RoutePlan((MX, RELAY), frozenset({"transport", "temporary"}), "tt")


@pytest.mark.parametrize(
    ("plan", "transport", "reply", "expected"),
    [
        # Hybrid: temporary and connection failures go on to the relay.
        (HYBRID, False, Reply(451, "4.7.1", "greylisted, try again later"), True),
        (HYBRID, False, Reply(450, None, "mailbox busy"), True),
        (HYBRID, True, None, True),  # connection refused
        (HYBRID, True, Reply(451, "4.4.1", "connection refused"), True),
        (HYBRID, False, Reply(421, "4.3.2", "service shutting down"), True),
        # A 5xx from the recipient's own MX is final...
        (HYBRID, False, Reply(550, "5.1.1", "user unknown"), False),
        (HYBRID, False, Reply(552, "5.2.2", "mailbox full"), False),
        (HYBRID, False, Reply(550, "5.1.1", "user unknown, listed in our blocklist"), False),
        # ...unless it blames our standing: blocked, try the relay.
        (HYBRID, False, Reply(554, "5.7.1", "Service unavailable; listed at Spamhaus"), True),
        (HYBRID, False, Reply(550, "5.7.1", "poor sender reputation"), True),
        (HYBRID, False, Reply(554, None, "blocked using zen.spamhaus.org"), True),
        (HYBRID, False, Reply(550, "5.7.1", "relaying denied"), False),
        # Success is never a reason to move on.
        (HYBRID, False, Reply(250, "2.0.0", "ok"), False),
        # Plans with fewer reasons.
        (SINGLE, True, None, False),
        (SINGLE, False, Reply(451, None, "later"), False),
        (SINGLE, False, Reply(554, "5.7.1", "listed at Spamhaus"), False),
        (TRANSPORT_ONLY, True, None, True),
        (TRANSPORT_ONLY, False, Reply(421, None, "closing"), True),
        (TRANSPORT_ONLY, False, Reply(451, None, "later"), False),
        (NO_BLOCKED, False, Reply(451, None, "later"), True),
        (NO_BLOCKED, False, Reply(554, "5.7.1", "listed at Spamhaus"), False),
    ],
)
def test_should_fall_back(
    plan: RoutePlan, transport: bool, reply: Reply | None, expected: bool
) -> None:
    assert should_fall_back(plan, transport_failure=transport, reply=reply) is expected


def test_should_fall_back_custom_block_patterns() -> None:
    reply = Reply(554, "5.7.1", "go away, you smell")
    assert should_fall_back(HYBRID, transport_failure=False, reply=reply) is False
    assert (
        should_fall_back(HYBRID, transport_failure=False, reply=reply, block_patterns=["smell"])
        is True
    )


def test_should_fall_back_needs_a_reply_or_transport_failure() -> None:
    with pytest.raises(ValueError):
        should_fall_back(HYBRID, transport_failure=False, reply=None)
