"""The retry schedule: delays, jitter, expiry and the last attempt at end of life."""

from __future__ import annotations

import itertools
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.delivery.retry import (
    DEFAULT_SCHEDULE,
    RetryDecision,
    RetryPolicy,
    after_temporary_failure,
    give_up_time,
    next_delay,
)
from ferry.durations import parse_duration

NO_JITTER = 0.5  # rand=0.5 maps to a jitter factor of exactly 1
DEFAULT = RetryPolicy()
DAY = 86400.0


def test_default_schedule_is_zetians() -> None:
    minutes = [60 * 2**i for i in range(6)]  # 1, 2, 4, 8, 16, 32 minutes
    hours = [3600, 7200, 14400]  # 1 h doubling to the 4 h cap
    assert tuple(minutes + hours) == DEFAULT_SCHEDULE
    # The lifetime governs by default (issue 11.1): no retry count limit unless set.
    assert (DEFAULT.max_retries, DEFAULT.message_lifetime, DEFAULT.jitter) == (None, 4 * DAY, 0.1)


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        (1, 60),
        (2, 120),
        (3, 240),
        (4, 480),
        (5, 960),
        (6, 1920),
        (7, 3600),
        (8, 7200),
        (9, 14400),
        (10, 14400),  # the cap: the last entry repeats
        (50, 14400),
    ],
)
def test_next_delay_follows_schedule(attempts: int, expected: float) -> None:
    assert next_delay(DEFAULT, attempts, NO_JITTER) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("rand", "factor"), [(0.0, 0.9), (0.25, 0.95), (0.5, 1.0), (0.75, 1.05), (0.999999, 1.1)]
)
def test_jitter_maps_rand_linearly_onto_plus_minus_ten_percent(rand: float, factor: float) -> None:
    assert next_delay(DEFAULT, 1, rand) == pytest.approx(60 * factor, rel=1e-5)


@pytest.mark.parametrize("attempts", range(1, 12))
def test_jitter_stays_within_bounds(attempts: int) -> None:
    base = next_delay(DEFAULT, attempts, NO_JITTER)
    for i in range(100):
        assert 0.9 * base <= next_delay(DEFAULT, attempts, i / 100) < 1.1 * base


def test_zero_jitter_and_custom_schedule() -> None:
    policy = RetryPolicy(schedule=(10, 30), jitter=0)
    assert [next_delay(policy, n, 0.0) for n in (1, 2, 3, 4)] == [10, 30, 30, 30]


@pytest.mark.parametrize(("attempts", "rand"), [(0, 0.5), (-1, 0.5), (1, -0.1), (1, 1.0)])
def test_next_delay_rejects_bad_input(attempts: int, rand: float) -> None:
    with pytest.raises(ValueError):
        next_delay(DEFAULT, attempts, rand)


def test_temporary_failure_schedules_retry() -> None:
    decision = after_temporary_failure(DEFAULT, attempts=3, arrival=1000, now=2000, rand=NO_JITTER)
    assert decision == RetryDecision("retry", 2000 + 240)


def test_jitter_applies_to_retry_time() -> None:
    early = after_temporary_failure(DEFAULT, attempts=1, arrival=0, now=0, rand=0.0)
    assert early.at == pytest.approx(54)


@pytest.mark.parametrize(("attempts", "kind"), [(10, "retry"), (11, "expire"), (12, "expire")])
def test_max_retries_counts_retries(attempts: int, kind: str) -> None:
    policy = RetryPolicy(max_retries=10)
    decision = after_temporary_failure(policy, attempts=attempts, arrival=0, now=60, rand=0.5)
    assert decision.kind == kind
    assert decision.reason == (None if kind == "retry" else "max_retries")


@pytest.mark.parametrize("now", [4 * DAY, 4 * DAY + 1, 10 * DAY])
def test_expires_at_end_of_lifetime(now: float) -> None:
    decision = after_temporary_failure(DEFAULT, attempts=2, arrival=0, now=now, rand=0.5)
    assert decision == RetryDecision("expire", None, "lifetime")


def test_retry_past_expiry_is_clamped_to_expiry() -> None:
    # 100 s of life left, but the schedule says 4 h: one last try at expiry.
    now = 4 * DAY - 100
    decision = after_temporary_failure(DEFAULT, attempts=9, arrival=0, now=now, rand=0.99)
    assert decision == RetryDecision("retry", 4 * DAY)


def test_retry_inside_lifetime_is_not_clamped() -> None:
    decision = after_temporary_failure(DEFAULT, attempts=9, arrival=0, now=DAY, rand=NO_JITTER)
    assert decision.at == DAY + 14400


def _life(policy: RetryPolicy) -> tuple[list[float], RetryDecision]:
    """Attempt times of a recipient that always fails temporarily, and the final decision."""
    times = [0.0]
    while True:
        decision = after_temporary_failure(
            policy, attempts=len(times), arrival=0, now=times[-1], rand=NO_JITTER
        )
        if decision.at is None:
            return times, decision
        times.append(decision.at)


def test_max_retries_life_is_one_attempt_and_ten_retries() -> None:
    times, decision = _life(RetryPolicy(max_retries=10))
    assert times == [0, 60, 180, 420, 900, 1860, 3780, 7380, 14580, 28980, 43380]
    assert decision.reason == "max_retries"


def test_default_life_lasts_the_lifetime() -> None:
    # Before issue 11.1 the default max_retries = 10 ended it after 12 hours while every
    # display promised 4 days.
    times, decision = _life(DEFAULT)
    assert times[-1] == 4 * DAY and decision.reason == "lifetime"
    assert len(times) == 32  # 9 scheduled steps to 4 h, then every 4 h, then one at the end
    # RFC 5321 §4.5.4.1: from the seventh retry on, at least 30 minutes apart.
    assert all(b - a >= 1800 for a, b in itertools.pairwise(times[6:]))


def test_lifetime_bound_life_ends_with_an_attempt_at_expiry() -> None:
    times, decision = _life(RetryPolicy(max_retries=1000, message_lifetime=DAY))
    assert times[-1] == DAY  # the last attempt lands exactly at expiry...
    assert 0 < times[-1] - times[-2] < 14400  # ...sooner than the 4 h step would have
    assert decision.reason == "lifetime"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("1m", 60),
        ("4h", 14400),
        ("4d", 4 * 86400),
        ("1w", 7 * 86400),
        ("1h30m", 5400),
        ("1d 2h 3m 4s", 86400 + 7200 + 180 + 4),
        ("1.5h", 5400),
        (" 2M ", 120),
        ("90", 90),
        ("0", 0),
        (90, 90),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "junk",
    ["", "  ", "abc", "1x", "h", "30m1h", "1m1m", "-5", "1h-30m", "1,5h", -5, float("nan"),
     float("inf"), True],
)  # fmt: skip
def test_parse_duration_rejects_junk(junk: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(junk)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schedule": ()},
        {"schedule": (60, 0)},
        {"schedule": (60, -1)},
        {"schedule": (float("inf"),)},
        {"max_retries": -1},
        {"message_lifetime": 0},
        {"jitter": -0.1},
        {"jitter": 1.0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_from_config_parses_durations() -> None:
    policy = RetryPolicy.from_config(["1m", 300, "1h"], max_retries=5, message_lifetime="2d")
    assert policy == RetryPolicy(schedule=(60, 300, 3600), max_retries=5, message_lifetime=2 * DAY)
    assert RetryPolicy.from_config() == DEFAULT


# -- the real give-up time (issue 11.1) ---------------------------------------------

CASES = tomllib.loads(
    (Path(__file__).parent.parent / "cases" / "give_up" / "cases.toml").read_text()
)["case"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_give_up_time_cases(case: dict[str, Any]) -> None:
    policy = RetryPolicy(
        schedule=tuple(case.get("schedule", DEFAULT_SCHEDULE)),
        max_retries=case.get("max_retries"),
        jitter=case.get("jitter", 0.0),
    )
    got = give_up_time(
        policy,
        expires=case["expires"],
        attempts=case["attempts"],
        next_attempt=case["next_attempt"],
    )
    assert (got.at, got.reason) == pytest.approx(tuple(case["want"]))


POLICIES = [
    RetryPolicy(),
    RetryPolicy(max_retries=0),
    RetryPolicy(max_retries=3),
    RetryPolicy(max_retries=10),
    RetryPolicy(max_retries=40),
    RetryPolicy(max_retries=10, message_lifetime=3 * 3600),
    RetryPolicy(schedule=(5, 50), max_retries=7, message_lifetime=300),
    RetryPolicy(schedule=(1800,), max_retries=500, jitter=0.3),
]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("seed", range(5))
def test_give_up_time_is_a_bound_the_retry_rules_keep(policy: RetryPolicy, seed: int) -> None:
    """Live a recipient's whole life with random jitter: at every step, the give-up time
    shown is never earlier than the last attempt really made, never grows, and names the
    limit that really ended it."""
    rng = random.Random(seed)
    expires = policy.message_lifetime
    at, attempts, shown = 0.0, 0, []
    while True:
        shown.append(give_up_time(policy, expires=expires, attempts=attempts, next_attempt=at))
        attempts += 1
        decision = after_temporary_failure(
            policy, attempts=attempts, arrival=0, now=at, rand=rng.random()
        )
        if decision.at is None:
            break
        at = decision.at
    assert all(g.at >= at for g in shown)
    assert all(a.at >= b.at for a, b in itertools.pairwise(shown))
    assert shown[-1].at == at  # the last attempt: known exactly
    assert {g.reason for g in shown[-1:]} == {decision.reason}


@pytest.mark.parametrize("policy", [p for p in POLICIES if p.max_retries is not None], ids=repr)
def test_give_up_time_is_exact_without_jitter(policy: RetryPolicy) -> None:
    exact = RetryPolicy(policy.schedule, policy.max_retries, policy.message_lifetime, jitter=0)
    times, decision = _life(exact)
    got = give_up_time(exact, expires=exact.message_lifetime, attempts=0, next_attempt=0)
    assert (got.at, got.reason) == (times[-1], decision.reason)
