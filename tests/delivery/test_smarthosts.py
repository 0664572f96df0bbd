"""Smart host failover and balancing: breaker, smooth weighted round-robin, host set."""

from __future__ import annotations

from collections import Counter

import pytest

from ferry.config import SmartHost
from ferry.delivery.smarthosts import (
    BreakerSnapshot,
    CircuitBreaker,
    SmartHostSet,
    SmoothWeightedRR,
)


def host(name: str, priority: int = 10, weight: int = 100) -> SmartHost:
    return SmartHost(name=name, host=f"{name}.example.net", priority=priority, weight=weight)


def names(hosts: list[SmartHost]) -> list[str]:
    return [h.name for h in hosts]


# --- CircuitBreaker ---------------------------------------------------------------


def test_breaker_starts_closed_and_allows() -> None:
    b = CircuitBreaker()
    assert (b.state, b.allow(0.0), b.last_error, b.open_until) == ("closed", True, None, None)


def test_breaker_opens_on_failure_and_refuses_until_cooldown() -> None:
    b = CircuitBreaker(base=30, cap=600)
    b.record_failure(100.0, "connection refused")
    assert (b.state, b.open_until, b.last_error) == ("open", 130.0, "connection refused")
    assert b.allow(100.0) is False
    assert b.allow(129.999) is False
    assert b.state == "open"


def test_breaker_half_open_allows_exactly_one_probe() -> None:
    b = CircuitBreaker(base=30)
    b.record_failure(0.0, "421 4.3.2 shutting down")
    assert b.allow(30.0) is True  # the probe
    assert b.state == "half_open"
    assert b.probing is True
    assert b.allow(30.0) is False  # a concurrent caller gets no probe
    assert b.allow(100.0) is False  # still outstanding


def test_breaker_probe_success_closes_and_resets_cooldown() -> None:
    b = CircuitBreaker(base=30)
    b.record_failure(0.0, "tls")
    assert b.allow(30.0)
    b.record_success(31.0)
    assert (b.state, b.open_until, b.opens, b.probing) == ("closed", None, 0, False)
    assert b.allow(31.0) is True
    b.record_failure(40.0, "tls")  # a fresh outage starts at base again
    assert b.open_until == 70.0


@pytest.mark.parametrize(
    ("base", "cap", "expected"),
    [
        (30, 600, [30, 60, 120, 240, 480, 600, 600]),
        (10, 35, [10, 20, 35, 35]),
        (5, 5, [5, 5, 5]),
    ],
)
def test_breaker_cooldown_doubles_per_failed_probe_up_to_cap(
    base: float, cap: float, expected: list[float]
) -> None:
    b = CircuitBreaker(base=base, cap=cap)
    now = 0.0
    b.record_failure(now, "refused")
    seen = []
    for _ in expected:
        assert b.open_until is not None
        seen.append(b.open_until - now)
        now = b.open_until
        assert b.allow(now) is True  # half-open probe
        b.record_failure(now, "refused again")  # the probe fails
    assert seen == expected


def test_breaker_cooldown_exponent_does_not_overflow() -> None:
    b = CircuitBreaker(base=30, cap=600)
    now = 0.0
    b.record_failure(now, "x")
    for _ in range(2000):
        assert b.open_until is not None
        now = b.open_until
        assert b.allow(now)
        b.record_failure(now, "x")
    assert b.cooldown == 600


def test_breaker_failures_while_open_do_not_extend_cooldown() -> None:
    b = CircuitBreaker(base=30)
    b.record_failure(0.0, "first")
    b.record_failure(5.0, "in-flight session failed too")
    assert (b.open_until, b.opens, b.last_error) == (30.0, 1, "in-flight session failed too")


def test_breaker_success_while_open_is_stale() -> None:
    b = CircuitBreaker(base=30)
    b.record_failure(0.0, "refused")
    b.record_success(1.0)  # a session that began before the breaker opened
    assert (b.state, b.allow(2.0)) == ("open", False)


def test_breaker_threshold_counts_consecutive_failures() -> None:
    b = CircuitBreaker(threshold=3)
    b.record_failure(0.0, "a")
    b.record_failure(1.0, "b")
    assert b.state == "closed"
    b.record_success(2.0)  # resets the count
    b.record_failure(3.0, "c")
    b.record_failure(4.0, "d")
    assert b.state == "closed"
    b.record_failure(5.0, "e")
    assert (b.state, b.open_until) == ("open", 35.0)


def test_breaker_lost_probe_is_replaced_after_probe_timeout() -> None:
    b = CircuitBreaker(base=30, probe_timeout=900)
    b.record_failure(0.0, "x")
    assert b.allow(30.0)
    assert b.allow(929.0) is False
    assert b.peek(930.0) is True
    assert b.allow(930.0) is True  # the first probe never reported
    assert b.allow(930.0) is False


def test_breaker_peek_takes_no_probe() -> None:
    b = CircuitBreaker(base=30)
    b.record_failure(0.0, "x")
    assert b.peek(30.0) is True
    assert b.peek(30.0) is True
    assert b.state == "open"
    assert b.allow(30.0) is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0},
        {"base": -1},
        {"base": 60, "cap": 30},
        {"threshold": 0},
        {"probe_timeout": 0},
    ],
)
def test_breaker_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


# --- SmoothWeightedRR -------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "picks", "expected"),
    [
        ({"a": 50, "b": 30, "c": 20}, 1000, {"a": 500, "b": 300, "c": 200}),
        ({"a": 5, "b": 1, "c": 1}, 700, {"a": 500, "b": 100, "c": 100}),
        ({"a": 1, "b": 1}, 10, {"a": 5, "b": 5}),
        ({"a": 100}, 7, {"a": 7}),
        ({"a": 3, "b": 7}, 1000, {"a": 300, "b": 700}),
    ],
)
def test_wrr_shares_are_exact_over_full_cycles(
    weights: dict[str, int], picks: int, expected: dict[str, int]
) -> None:
    rr = SmoothWeightedRR(weights)
    counts = Counter(rr.pick(list(weights)) for _ in range(picks))
    assert dict(counts) == expected


def test_wrr_shares_within_one_percent_on_partial_cycle() -> None:
    rr = SmoothWeightedRR({"a": 50, "b": 30, "c": 20})
    counts = Counter(rr.pick(["a", "b", "c"]) for _ in range(1037))
    for name, share in {"a": 0.5, "b": 0.3, "c": 0.2}.items():
        assert abs(counts[name] / 1037 - share) <= 0.01


def test_wrr_is_smooth_like_nginx() -> None:
    # The sequence from nginx's commit introducing smooth weighted round-robin.
    rr = SmoothWeightedRR({"a": 5, "b": 1, "c": 1})
    assert [rr.pick("abc") for _ in range(7)] == list("aabacaa")


def test_wrr_is_deterministic() -> None:
    seqs = []
    for _ in range(2):
        rr = SmoothWeightedRR({"a": 50, "b": 30, "c": 20})
        seqs.append([rr.pick(["a", "b", "c"]) for _ in range(100)])
    assert seqs[0] == seqs[1]


def test_wrr_subset_leaves_others_untouched() -> None:
    rr = SmoothWeightedRR({"a": 1, "b": 1, "c": 2})
    before = rr.current["c"]
    picks = [rr.pick(["a", "b"]) for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]
    assert rr.current["c"] == before


@pytest.mark.parametrize(
    ("weights", "candidates"),
    [({"a": 1}, []), ({"a": 1}, ["zz"])],
)
def test_wrr_rejects_empty_or_unknown(weights: dict[str, int], candidates: list[str]) -> None:
    with pytest.raises(ValueError):
        SmoothWeightedRR(weights).pick(candidates)


def test_wrr_rejects_zero_weight() -> None:
    with pytest.raises(ValueError, match="'a'"):
        SmoothWeightedRR({"a": 0})


# --- SmartHostSet: ordering, failover, recovery ------------------------------------


def test_order_balances_by_weight_within_a_tier() -> None:
    hs = SmartHostSet([host("a", weight=50), host("b", weight=30), host("c", weight=20)])
    firsts = Counter(hs.order(0.0)[0].name for _ in range(1000))
    assert dict(firsts) == {"a": 500, "b": 300, "c": 200}


def test_order_lists_pick_then_rest_of_tier_by_weight_then_next_tier() -> None:
    hs = SmartHostSet(
        [
            host("backup", priority=20),
            host("b", weight=30),
            host("c", weight=20),
            host("a", weight=50),
            host("last", priority=30),
        ]
    )
    # Smooth WRR over b/c/a (30/20/50) picks a first; the rest by weight desc.
    assert names(hs.order(0.0)) == ["a", "b", "c", "backup", "last"]
    # Second pick: currents b=60, c=40, a=0 -> b; the rest of the tier still by weight.
    second = names(hs.order(0.0))
    assert second[0] == "b"
    assert second[1:] == ["a", "c", "backup", "last"]


def test_failover_to_same_tier_then_next_tier() -> None:
    hs = SmartHostSet([host("a"), host("b"), host("backup", priority=20)])
    hs.report("a", 0.0, ok=False, transport_failure=True, error="connection refused")
    assert names(hs.order(1.0)) == ["b", "backup"]
    hs.report("b", 1.0, ok=False, transport_failure=True, error="TLS handshake failed")
    assert names(hs.order(2.0)) == ["backup"]


def test_empty_when_every_host_is_open() -> None:
    hs = SmartHostSet([host("a"), host("b", priority=20)])
    for name in ("a", "b"):
        hs.report(name, 0.0, ok=False, transport_failure=True, error="421 4.3.2 busy")
    assert hs.order(10.0) == []


def test_empty_set_orders_nothing() -> None:
    assert SmartHostSet([]).order(0.0) == []


def test_recovery_after_cooldown_with_one_probe() -> None:
    hs = SmartHostSet(
        [host("primary"), host("backup", priority=20)], base_cooldown=30, max_cooldown=600
    )
    hs.report("primary", 0.0, ok=False, transport_failure=True, error="refused")
    assert names(hs.order(29.0)) == ["backup"]
    # Cool-down over: the probe leads, the backup follows in the same attempt.
    assert names(hs.order(30.0)) == ["primary", "backup"]
    # A second concurrent attempt gets no probe.
    assert names(hs.order(30.5)) == ["backup"]
    assert hs.stats()["primary"]["state"] == "half_open"
    hs.report("primary", 31.0, ok=True)
    assert names(hs.order(32.0)) == ["primary", "backup"]
    assert hs.stats()["primary"]["state"] == "closed"


def test_failed_probe_doubles_the_cooldown() -> None:
    hs = SmartHostSet([host("a"), host("b", priority=20)], base_cooldown=30)
    hs.report("a", 0.0, ok=False, transport_failure=True, error="refused")
    assert names(hs.order(30.0))[0] == "a"  # probe
    hs.report("a", 30.0, ok=False, transport_failure=True, error="refused again")
    assert hs.stats()["a"]["open_until"] == 90.0
    assert names(hs.order(89.0)) == ["b"]
    assert names(hs.order(90.0)) == ["a", "b"]


def test_probe_goes_first_in_its_tier_and_does_not_move_the_balancer() -> None:
    hs = SmartHostSet([host("a", weight=10), host("b", weight=90), host("c", weight=50)])
    hs.report("a", 0.0, ok=False, transport_failure=True, error="refused")
    current_before = dict(hs.balancer.current)
    assert names(hs.order(30.0)) == ["a", "b", "c"]
    assert hs.balancer.current == current_before


def test_probe_in_a_later_tier_is_not_taken_while_a_better_tier_works() -> None:
    hs = SmartHostSet([host("a"), host("later", priority=20)], base_cooldown=30)
    hs.report("later", 0.0, ok=False, transport_failure=True, error="refused")
    assert names(hs.order(60.0)) == ["a"]
    assert hs.breakers["later"].state == "open"  # probe not consumed
    hs.report("a", 61.0, ok=False, transport_failure=True, error="refused")
    assert names(hs.order(62.0)) == ["later"]  # now it leads: probed
    assert hs.breakers["later"].state == "half_open"


def test_recipient_level_failures_never_open_the_breaker() -> None:
    hs = SmartHostSet([host("a"), host("b")])
    for i in range(50):
        hs.report("a", float(i), ok=False, error="550 5.1.1 user unknown")
        hs.report("a", float(i), ok=False, error="452 4.2.2 mailbox full")
    stats = hs.stats()["a"]
    assert stats["state"] == "closed"
    assert stats["last_error"] == "452 4.2.2 mailbox full"
    assert "a" in names(hs.order(100.0))


def test_recipient_level_reply_closes_a_half_open_probe() -> None:
    hs = SmartHostSet([host("a")], base_cooldown=30)
    hs.report("a", 0.0, ok=False, transport_failure=True, error="refused")
    assert names(hs.order(30.0)) == ["a"]
    hs.report("a", 31.0, ok=False, error="550 5.1.1 user unknown")  # the host answered
    assert hs.breakers["a"].state == "closed"


def test_order_restricted_to_named_hosts() -> None:
    hs = SmartHostSet([host("a"), host("b", priority=5), host("c", priority=20)])
    assert names(hs.order(0.0, names=["c", "a"])) == ["a", "c"]
    assert names(hs.order(0.0, names={"b"})) == ["b"]
    with pytest.raises(KeyError, match="nope"):
        hs.order(0.0, names=["nope"])


def test_traffic_returns_to_the_preferred_tier_after_recovery() -> None:
    hs = SmartHostSet([host("a", weight=1), host("b", weight=1), host("z", priority=99)])
    hs.report("a", 0.0, ok=False, transport_failure=True, error="refused")
    during = Counter(hs.order(float(t) / 10)[0].name for t in range(100))  # t < 30 s
    assert during == {"b": 100}
    assert names(hs.order(30.0))[0] == "a"
    hs.report("a", 30.0, ok=True)
    after = Counter(hs.order(31.0)[0].name for _ in range(100))
    assert after == {"a": 50, "b": 50}


# --- SmartHostSet: statistics and reporting ----------------------------------------


def test_stats_and_counts() -> None:
    hs = SmartHostSet([host("a", priority=1, weight=70), host("b")])
    for status in ("sent", "sent", "failed", "deferred", "sent"):
        hs.count("a", status)  # type: ignore[arg-type]
    hs.report("b", 0.0, ok=False, transport_failure=True, error="535 5.7.8 auth failed")
    stats = hs.stats()
    assert stats["a"] == {
        "sent": 3,
        "failed": 1,
        "deferred": 1,
        "transport_failures": 0,
        "state": "closed",
        "last_error": None,
        "open_until": None,
        "priority": 1,
        "weight": 70,
    }
    assert stats["b"]["state"] == "open"
    assert stats["b"]["last_error"] == "535 5.7.8 auth failed"
    assert stats["b"]["transport_failures"] == 1
    assert stats["b"]["sent"] == 0


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda hs: hs.count("zz", "sent"), KeyError),
        (lambda hs: hs.count("a", "bounced"), ValueError),
        (lambda hs: hs.report("zz", 0.0, ok=True), KeyError),
        (lambda hs: hs.report("a", 0.0, ok=True, transport_failure=True), ValueError),
        (lambda hs: hs.get("zz"), KeyError),
    ],
)
def test_bad_reports_are_refused(call, exc: type[Exception]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc):
        call(SmartHostSet([host("a")]))


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'a'"):
        SmartHostSet([host("a"), host("a", priority=2)])


def test_set_accessors() -> None:
    hs = SmartHostSet([host("x"), host("y")])
    assert (hs.names, len(hs), "x" in hs, "q" in hs, hs.get("y").host) == (
        ["x", "y"],
        2,
        True,
        False,
        "y.example.net",
    )


# --- Breakers shared by nodes: snapshots, the latest change wins --------------------


def test_breaker_snapshot_round_trips_through_json() -> None:
    b = CircuitBreaker(base=30, cap=600)
    assert b.snapshot().changed_at == float("-inf")  # never changed: nothing to share
    b.record_failure(100.0, "421 busy")
    snap = b.snapshot()
    assert (snap.state, snap.changed_at, snap.open_until, snap.opens) == ("open", 100.0, 130.0, 1)
    assert BreakerSnapshot.from_json(snap.changed_at, snap.as_json()) == snap
    with pytest.raises(ValueError):
        BreakerSnapshot.from_json(1.0, {"state": "ajar"})


def test_a_breaker_adopts_only_a_later_change() -> None:
    here, there = CircuitBreaker(), CircuitBreaker()
    there.record_failure(100.0, "refused")  # another node saw the host fail
    assert here.adopt(there.snapshot())
    assert (here.state, here.open_until, here.last_error) == ("open", 130.0, "refused")
    assert not here.allow(120.0)  # out of rotation here too, without trying it
    assert not here.adopt(there.snapshot())  # nothing newer
    # Cool-down over: here takes the probe (a change at 131) and closes on success...
    assert here.allow(131.0) and here.state == "half_open"
    here.record_success(132.0)
    # ...while an older view (the open breaker of 100) cannot reopen it.
    assert not here.adopt(there.snapshot())
    assert there.adopt(here.snapshot()) and there.state == "closed"
    # The failure count is each node's own: adopting a state resets it.
    counting = CircuitBreaker(threshold=3)
    counting.record_failure(1.0, "x")
    assert counting.failures == 1
    assert counting.adopt(BreakerSnapshot("closed", 2.0)) and counting.failures == 0


def test_a_failed_probe_after_adoption_doubles_as_if_seen_here() -> None:
    here, there = CircuitBreaker(base=30, cap=600), CircuitBreaker(base=30, cap=600)
    there.record_failure(100.0, "down")
    here.adopt(there.snapshot())
    assert here.allow(130.0)
    here.record_failure(131.0, "still down")
    assert (here.state, here.cooldown, here.open_until) == ("open", 60.0, 191.0)


def test_restore_undoes_a_probe_not_claimed() -> None:
    b = CircuitBreaker()
    b.record_failure(100.0, "down")
    before = b.snapshot()
    assert b.allow(130.0) and b.probing
    b.restore(before)
    assert b.snapshot() == before and not b.probing
    assert b.peek(130.0)  # the probe can be taken again (e.g. once claimed)


def test_host_set_shares_its_changes_once_and_adopts_newer_ones() -> None:
    a, b = SmartHostSet([host("x"), host("y")]), SmartHostSet([host("x"), host("y")])
    assert a.changes() == {}
    a.report("x", 100.0, ok=False, transport_failure=True, error="refused")
    a.report("y", 100.0, ok=True)  # closed and still closed: no change
    changes = a.changes()
    assert list(changes) == ["x"] and changes["x"].state == "open"
    assert a.changes() == {}  # taken
    a.unshared(changes)  # could not be stored: offered again
    assert list(a.changes()) == ["x"]
    b.adopt("x", changes["x"])
    b.adopt("nowhere", changes["x"])  # a host this node does not have: ignored
    assert names(b.order(110.0)) == ["y"]
    assert b.changes() == {}  # adopted, not this node's news
    # The probe taken by order() is a change to share (and to claim first).
    assert names(b.order(131.0)) == ["x", "y"]
    assert b.changes()["x"].state == "half_open"
