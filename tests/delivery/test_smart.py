"""Smart mode: destination groups and the direct/relay decision over time."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ferry.delivery.smart_mode import (
    DirectOutcome,
    GroupSnapshot,
    SmartRouter,
    destination_group,
)

# --- destination_group -------------------------------------------------------------


@pytest.mark.parametrize(
    ("mx_hosts", "group"),
    [
        (["aspmx.l.google.com", "alt1.aspmx.l.google.com"], "google.com"),
        (["alt1.aspmx.l.google.com"], "google.com"),
        (["gmail-smtp-in.l.google.com."], "google.com"),
        (["example-com.mail.protection.outlook.com"], "outlook.com"),
        (["mx1.example.com", "mx2.other.net"], "example.com"),  # most preferred decides
        (["MX1.Example.COM."], "example.com"),
        (["example.com"], "example.com"),  # implicit MX: the domain itself
        (["mx.example.co.uk"], "example.co.uk"),
        (["mx1.mail.example.com.au"], "example.com.au"),
        (["mx.yandex.ru"], "yandex.ru"),
        (["localhost"], "localhost"),
        (["192.0.2.10"], "192.0.2.10"),
        (["[2001:db8::1]"], "2001:db8::1"),
        (["co.uk"], "co.uk"),
    ],
)
def test_destination_group(mx_hosts: Sequence[str], group: str) -> None:
    assert destination_group(mx_hosts) == group


@pytest.mark.parametrize("mx_hosts", [[], [""], ["."]])
def test_destination_group_needs_a_host(mx_hosts: Sequence[str]) -> None:
    with pytest.raises(ValueError):
        destination_group(mx_hosts)


# --- SmartRouter -------------------------------------------------------------------

G = "google.com"


def feed(router: SmartRouter, outcomes: Sequence[DirectOutcome], *, start: float = 0.0) -> float:
    """Record outcomes one second apart; return the time of the last one."""
    now = start
    for i, outcome in enumerate(outcomes):
        now = start + i
        router.record_direct(G, now, outcome)
    return now


def test_new_group_is_direct() -> None:
    router = SmartRouter()
    assert router.choose(G, 0.0) == ("direct", "no recent direct outcomes")


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        # Fewer than min_samples (5): never switch, however bad.
        (["deferred"] * 4, "direct"),
        # Five samples, all deferred or blocked.
        (["deferred"] * 5, "relay"),
        (["blocked"] * 5, "relay"),
        (["deferred", "blocked", "deferred", "blocked", "delivered"], "relay"),  # 4/5
        # Exactly at the threshold (0.5) switches.
        (["delivered", "deferred"] * 3, "relay"),
        # Just under the threshold stays direct.
        (["delivered", "delivered", "deferred", "delivered", "deferred"], "direct"),  # 2/5
        # Plain failures (user unknown) are not a reason to switch.
        (["failed"] * 20, "direct"),
        (["failed", "failed", "failed", "deferred", "deferred"], "direct"),  # 2/5
        (["delivered"] * 20, "direct"),
    ],
)
def test_switch_to_relay_at_threshold(outcomes: list[DirectOutcome], expected: str) -> None:
    router = SmartRouter(window=20, min_samples=5, threshold=0.5)
    last = feed(router, outcomes)
    choice, _ = router.choose(G, last + 1)
    assert choice == expected


def test_window_slides_old_outcomes_out() -> None:
    router = SmartRouter(window=10, min_samples=5, threshold=0.5)
    last = feed(router, ["delivered"] * 10)
    last = feed(router, ["deferred"] * 4, start=last + 1)  # 4/10 bad: still direct
    assert router.choose(G, last + 1)[0] == "direct"
    router.record_direct(G, last + 2, "deferred")  # 5/10
    assert router.choose(G, last + 3)[0] == "relay"
    assert router.stats()[G]["window"] == {
        "delivered": 5,
        "deferred": 5,
        "blocked": 0,
        "failed": 0,
    }


def test_relay_reason_names_the_numbers_and_duration() -> None:
    router = SmartRouter(cooldown=1800)
    feed(router, ["deferred", "deferred", "blocked", "delivered", "deferred", "delivered"])
    choice, reason = router.choose(G, 10.0)
    assert choice == "relay"
    # The switch happened at the 5th outcome (4/5 bad).
    assert reason == "3/5 deferred + 1/5 blocked; relay for 1800s"


def test_cooldown_then_one_probe_then_back_to_direct() -> None:
    router = SmartRouter(cooldown=1800)
    last = feed(router, ["deferred"] * 5)  # switch at t=4
    assert router.stats()[G]["relay_until"] == last + 1800
    assert router.choose(G, last + 1799)[0] == "relay"
    # Cool-down over: exactly one probe goes direct.
    assert router.choose(G, last + 1800) == ("direct", "probing direct after cool-down")
    assert router.choose(G, last + 1801) == ("relay", "relay while a direct probe is outstanding")
    router.record_direct(G, last + 1802, "delivered")
    choice, reason = router.choose(G, last + 1803)
    assert (choice, reason) == ("direct", "direct probe delivered: back to direct")
    stats = router.stats()[G]
    assert stats["samples"] == 1  # the window was cleared; the probe starts afresh
    assert stats["relay_until"] is None
    assert stats["cooldown"] == 1800
    # One more bad outcome does not flip it back: the old deferrals are gone.
    router.record_direct(G, last + 1804, "deferred")
    assert router.choose(G, last + 1805)[0] == "direct"


def test_failed_probe_doubles_cooldown_up_to_the_cap() -> None:
    router = SmartRouter(cooldown=1000, probe_cooldown_growth=2.0, max_cooldown=5000)
    now = feed(router, ["blocked"] * 5)
    periods = []
    for _ in range(5):
        until = router.stats()[G]["relay_until"]
        assert isinstance(until, float)
        periods.append(until - now)
        now = until
        assert router.choose(G, now)[0] == "direct"  # the probe
        router.record_direct(G, now, "deferred")  # ...is deferred again
    assert periods == [1000, 2000, 4000, 5000, 5000]
    assert router.choose(G, now + 1)[1] == "direct probe deferred; relay for 5000s"


def test_good_probe_resets_the_cooldown() -> None:
    router = SmartRouter(cooldown=100, probe_cooldown_growth=3.0, max_cooldown=10_000)
    now = feed(router, ["deferred"] * 5)
    now += 100
    assert router.choose(G, now)[0] == "direct"
    router.record_direct(G, now, "blocked")  # relay for 300 s
    now += 300
    assert router.choose(G, now)[0] == "direct"
    router.record_direct(G, now, "delivered")
    # A new bad spell: with the probe's "delivered", 4 deferrals make 4/5.
    now = feed(router, ["deferred"] * 4, start=now + 1)
    assert router.stats()[G]["relay_until"] == now + 100  # back to the base cool-down


def test_failed_probe_counts_as_good() -> None:
    router = SmartRouter(cooldown=60)
    now = feed(router, ["deferred"] * 5) + 60
    assert router.choose(G, now)[0] == "direct"
    router.record_direct(G, now, "failed")  # 550 user unknown: the server judged the rcpt
    assert router.choose(G, now + 1)[0] == "direct"


def test_lost_probe_is_replaced_after_probe_timeout() -> None:
    router = SmartRouter(cooldown=60, probe_timeout=900)
    now = feed(router, ["deferred"] * 5) + 60
    assert router.choose(G, now)[0] == "direct"
    assert router.choose(G, now + 899)[0] == "relay"
    assert router.choose(G, now + 900)[0] == "direct"  # a new probe
    assert router.choose(G, now + 901)[0] == "relay"


def test_outcomes_during_relay_do_not_change_the_decision() -> None:
    router = SmartRouter(cooldown=600)
    now = feed(router, ["deferred"] * 5)
    for i in range(10):  # in-flight direct sessions finishing after the switch
        router.record_direct(G, now + i, "delivered")
    assert router.choose(G, now + 20)[0] == "relay"
    assert router.stats()[G]["relay_until"] == now + 600


def test_groups_are_independent() -> None:
    router = SmartRouter()
    feed(router, ["deferred"] * 5)
    assert router.choose(G, 10.0)[0] == "relay"
    assert router.choose("outlook.com", 10.0)[0] == "direct"


def test_stats_show_decision_reason_and_counts() -> None:
    router = SmartRouter(cooldown=1800)
    feed(router, ["delivered", "deferred", "deferred", "failed", "deferred"])
    router.choose("outlook.com", 0.0)
    stats = router.stats()
    assert stats[G] == {
        "choice": "relay",
        "state": "relay",
        "reason": "3/5 deferred; relay for 1800s",
        "window": {"delivered": 1, "deferred": 3, "blocked": 0, "failed": 1},
        "samples": 5,
        "relay_until": 1804.0,
        "cooldown": 1800,
        "switches": 1,
        "changed_at": 4.0,
        "totals": {"delivered": 1, "deferred": 3, "blocked": 0, "failed": 1},
    }
    assert stats["outlook.com"]["choice"] == "direct"
    assert stats["outlook.com"]["samples"] == 0


def test_switches_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    router = SmartRouter()
    with caplog.at_level("INFO", logger="ferry.delivery.smart_mode"):
        feed(router, ["deferred"] * 5)
    assert any("google.com -> relay" in r.getMessage() for r in caplog.records)


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="bounced"):
        SmartRouter().record_direct(G, 0.0, "bounced")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"min_samples": 0},
        {"window": 5, "min_samples": 6},
        {"threshold": 0},
        {"threshold": 1.5},
        {"cooldown": 0},
        {"probe_cooldown_growth": 0.5},
        {"cooldown": 100, "max_cooldown": 50},
        {"probe_timeout": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SmartRouter(**kwargs)  # type: ignore[arg-type]


# --- Shared by nodes: windows merged, decisions adopted -----------------------------


def test_windows_of_several_nodes_decide_together() -> None:
    """Neither node alone has min_samples outcomes; together they do."""
    a, b = SmartRouter(window=10, min_samples=5), SmartRouter(window=10, min_samples=5)
    for t in (1.0, 2.0, 3.0):
        a.record_direct(G, t, "deferred")
    for t in (1.5, 2.5):
        b.record_direct(G, t, "deferred")
    assert a.choose(G, 4.0)[0] == b.choose(G, 4.0)[0] == "direct"
    a_own, b_own = a.own_outcomes(), b.own_outcomes()
    assert a_own == {G: [(1.0, "deferred"), (2.0, "deferred"), (3.0, "deferred")]}
    assert a.own_outcomes() == {}  # taken: nothing new since
    a.merge(G, b_own[G], 5.0)
    assert a.choose(G, 6.0)[0] == "relay"
    assert a.stats()[G]["samples"] == 5
    change = a.changes()[G]
    assert (change.state, change.changed_at, change.relay_until) == ("relay", 5.0, 1805.0)
    # The other node takes the decision as it is (its own window need not agree).
    assert b.adopt(G, change, 7.0)
    assert b.choose(G, 8.0) == ("relay", change.reason)
    assert b.changes() == {}
    assert not b.adopt(G, change, 9.0)  # nothing newer


def test_merge_keeps_the_latest_window_of_all_nodes() -> None:
    a = SmartRouter(window=4, min_samples=4)
    a.record_direct(G, 10.0, "delivered")
    theirs = [(1.0, "deferred"), (2.0, "deferred"), (11.0, "delivered"), (12.0, "failed")]
    a.merge(G, theirs, 13.0)
    assert a.stats()[G]["window"] == {"delivered": 2, "deferred": 1, "blocked": 0, "failed": 1}
    assert a.choose(G, 14.0)[0] == "direct"
    # ``others`` is everything the other nodes have now; an outcome this version does
    # not know is left out.
    a.merge(G, [*theirs, (20.0, "bogus")], 21.0)
    assert a.stats()[G]["samples"] == 4
    a.merge(G, [], 22.0)  # the others have nothing (any more): our own only
    assert a.stats()[G]["samples"] == 1


def test_a_good_probe_anywhere_resets_every_node_s_window() -> None:
    a, b = SmartRouter(cooldown=100), SmartRouter(cooldown=100)
    bad = [(float(t), "deferred") for t in range(5)]
    for t, o in bad:
        a.record_direct(G, t, o)  # type: ignore[arg-type]
    b.adopt(G, a.changes()[G], 5.0)
    assert b.choose(G, 50.0)[0] == "relay"
    # b probes after the cool-down, the probe delivers: back to direct, as of t=105.
    before = b.snapshot(G)
    assert b.choose(G, 104.0)[0] == "direct" and b.snapshot(G) != before
    b.record_direct(G, 105.0, "delivered")
    back = b.changes()[G]
    assert (back.state, back.since) == ("direct", 105.0)
    assert a.adopt(G, back, 106.0)
    assert a.choose(G, 107.0)[0] == "direct"
    # a's old bad outcomes no longer count, even merged in again.
    a.merge(G, bad, 108.0)
    assert a.choose(G, 109.0)[0] == "direct" and a.stats()[G]["samples"] == 0


def test_restore_gives_back_a_probe_not_claimed() -> None:
    r = SmartRouter(cooldown=100)
    for t in range(5):
        r.record_direct(G, float(t), "deferred")
    before = r.snapshot(G)
    assert r.choose(G, 200.0) == ("direct", "probing direct after cool-down")
    r.restore(G, before)
    assert r.snapshot(G) == before
    # Another node's probe, adopted: this one sends through the relay meanwhile.
    theirs = GroupSnapshot("probing", 201.0, 100.0, None, 201.0, "probing direct", -1e309)
    assert r.adopt(G, theirs, 202.0)
    assert r.choose(G, 203.0)[0] == "relay"


def test_group_snapshot_round_trips_through_json() -> None:
    r = SmartRouter()
    snap = r.snapshot(G)
    assert snap.changed_at == float("-inf") and snap.since == float("-inf")
    assert snap.as_json()["since"] is None  # JSON has no infinity
    assert GroupSnapshot.from_json(snap.changed_at, snap.as_json()) == snap
    with pytest.raises(ValueError):
        GroupSnapshot.from_json(1.0, {"state": "sideways"})
