"""AUTH failure slow-down, driven with explicit clock values."""

from __future__ import annotations

import pytest

from ferry.intake.throttle import AuthThrottle, client_key

IP = "203.0.113.5"


@pytest.mark.parametrize(
    ("failures", "expected_delay"),
    [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (4, 1.0), (5, 2.0), (6, 4.0), (7, 8.0), (8, 16.0),
     (9, 30.0), (10, 30.0), (50, 30.0)],
)  # fmt: skip
def test_delay_schedule_with_defaults(failures: int, expected_delay: float) -> None:
    throttle = AuthThrottle()
    for i in range(failures):
        throttle.record_failure(IP, now=float(i))
    assert throttle.delay_for(IP, now=float(failures)) == expected_delay


@pytest.mark.parametrize(
    ("kwargs", "failures", "expected_delay"),
    [
        ({"free_failures": 0}, 1, 1.0),
        ({"free_failures": 0}, 2, 2.0),
        ({"free_failures": 5, "base_delay": 0.5}, 5, 0.0),
        ({"free_failures": 5, "base_delay": 0.5}, 6, 0.5),
        ({"free_failures": 5, "base_delay": 0.5}, 8, 2.0),
        ({"base_delay": 3.0, "max_delay": 10.0}, 5, 6.0),
        ({"base_delay": 3.0, "max_delay": 10.0}, 6, 10.0),
        ({"base_delay": 2.0, "max_delay": 2.0}, 20, 2.0),
        ({"base_delay": 0.0, "max_delay": 0.0}, 20, 0.0),
    ],
)
def test_delay_schedule_configurable(
    kwargs: dict[str, float], failures: int, expected_delay: float
) -> None:
    throttle = AuthThrottle(**kwargs)  # type: ignore[arg-type]
    for _ in range(failures):
        throttle.record_failure(IP, now=0.0)
    assert throttle.delay_for(IP, now=0.0) == expected_delay


def test_record_failure_returns_count() -> None:
    throttle = AuthThrottle()
    assert [throttle.record_failure(IP, now=t) for t in (0.0, 1.0, 2.0)] == [1, 2, 3]
    assert throttle.failures(IP, now=2.0) == 3
    assert throttle.failures("198.51.100.1", now=2.0) == 0


def test_count_saturates_where_the_delay_is_maximal() -> None:
    throttle = AuthThrottle()
    counts = [throttle.record_failure(IP, now=0.0) for _ in range(1000)]
    assert max(counts) == throttle.count_cap == 9
    assert throttle.delay_for(IP, now=0.0) == 30.0


def test_sliding_window() -> None:
    throttle = AuthThrottle(window=100.0)
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        throttle.record_failure(IP, now=t)
    assert throttle.delay_for(IP, now=99.9) == 2.0  # all five still inside
    assert throttle.delay_for(IP, now=100.0) == 1.0  # the one at t=0 expired exactly now
    assert throttle.delay_for(IP, now=110.0) == 0.0  # three left: free again
    assert throttle.failures(IP, now=139.9) == 1
    assert throttle.failures(IP, now=140.0) == 0
    assert throttle.record_failure(IP, now=141.0) == 1  # starts over


def test_success_clears_the_client() -> None:
    throttle = AuthThrottle()
    for _ in range(6):
        throttle.record_failure(IP, now=0.0)
    throttle.record_failure("198.51.100.1", now=0.0)
    throttle.record_success(IP)
    assert throttle.delay_for(IP, now=0.0) == 0.0
    assert throttle.record_failure(IP, now=1.0) == 1
    assert throttle.failures("198.51.100.1", now=1.0) == 1  # others untouched
    throttle.record_success("192.0.2.99")  # unknown client: no error


def test_clients_are_counted_separately() -> None:
    throttle = AuthThrottle()
    for _ in range(5):
        throttle.record_failure("192.0.2.1", now=0.0)
    assert throttle.delay_for("192.0.2.1", now=0.0) == 2.0
    assert throttle.delay_for("192.0.2.2", now=0.0) == 0.0


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("192.0.2.1", "::ffff:192.0.2.1", True),
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),  # same /64
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("fe80::1%eth0", "fe80::2", True),
        ("192.0.2.1", "192.0.2.2", False),
        ("2001:DB8::1", "2001:db8::1", True),
        ("weird", "weird", True),
        ("weird", "other", False),
    ],
)
def test_client_key(a: str, b: str, same: bool) -> None:
    assert (client_key(a) == client_key(b)) is same


def test_ipv6_rotation_within_a_64_is_throttled() -> None:
    throttle = AuthThrottle()
    for i in range(5):
        throttle.record_failure(f"2001:db8:0:1::{i + 1:x}", now=0.0)
    assert throttle.delay_for("2001:db8:0:1::abcd", now=0.0) == 2.0


def test_memory_bounded_by_max_tracked() -> None:
    throttle = AuthThrottle(max_tracked=3)
    for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        throttle.record_failure(ip, now=float(i))
    throttle.record_failure("10.0.0.1", now=3.0)  # now the most recent, not the oldest
    throttle.record_failure("10.0.0.4", now=4.0)
    assert len(throttle) == 3
    assert throttle.failures("10.0.0.2", now=4.0) == 0  # least recently failing: evicted
    assert throttle.failures("10.0.0.1", now=4.0) == 2
    assert throttle.failures("10.0.0.3", now=4.0) == 1
    assert throttle.failures("10.0.0.4", now=4.0) == 1


def test_expired_clients_dropped() -> None:
    throttle = AuthThrottle(window=60.0)
    for i in range(100):
        throttle.record_failure(f"10.0.1.{i}", now=float(i) * 0.1)
    assert len(throttle) == 100
    throttle.record_failure("10.0.2.1", now=70.0)  # >= window after every earlier one
    assert len(throttle) == 1
    throttle.record_failure("10.0.2.2", now=71.0)
    assert len(throttle) == 2


def test_queries_for_unknown_or_expired_clients_leave_no_entry() -> None:
    throttle = AuthThrottle(window=10.0)
    assert throttle.delay_for(IP, now=0.0) == 0.0
    assert len(throttle) == 0
    throttle.record_failure(IP, now=0.0)
    assert throttle.delay_for(IP, now=10.0) == 0.0
    assert len(throttle) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"window": -1.0},
        {"free_failures": -1},
        {"base_delay": -1.0},
        {"max_tracked": 0},
        {"base_delay": 5.0, "max_delay": 1.0},
    ],
)
def test_bad_settings_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AuthThrottle(**kwargs)  # type: ignore[arg-type]
