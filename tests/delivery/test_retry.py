"""The retry schedule: delays, jitter, expiry and the last attempt at end of life."""

from __future__ import annotations

import pytest

from ferry.delivery.retry import (
    DEFAULT_SCHEDULE,
    RetryDecision,
    RetryPolicy,
    after_temporary_failure,
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
    assert (DEFAULT.max_retries, DEFAULT.message_lifetime, DEFAULT.jitter) == (10, 4 * DAY, 0.1)


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
    decision = after_temporary_failure(DEFAULT, attempts=attempts, arrival=0, now=60, rand=0.5)
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


def test_default_life_is_one_attempt_and_ten_retries() -> None:
    times, decision = _life(DEFAULT)
    assert times == [0, 60, 180, 420, 900, 1860, 3780, 7380, 14580, 28980, 43380]
    assert decision.reason == "max_retries"


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
