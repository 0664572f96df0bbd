"""Traffic shaping as pure functions of time."""

from __future__ import annotations

import math

import pytest

from ferry.delivery.shaping import DestinationShaper, RateWindow, is_throttle_reply


def test_rate_window_slides() -> None:
    w = RateWindow(2, 60)
    assert w.allowed(0)
    w.record(0)
    w.record(10)
    assert not w.allowed(30)
    assert w.next_allowed(30) == 60
    assert w.allowed(60.001)
    assert w.next_allowed(61) == 61


def test_connection_limits() -> None:
    s = DestinationShaper(max_connections=2, connections_per_minute=3)
    for t in (0, 1):
        assert s.can_open(t)
        s.session_started()
        s.opened(t)
    assert s.open_wait(2) == math.inf  # both slots busy: only a close frees one
    s.session_ended()
    assert s.can_open(2)
    s.opened(2)
    s.session_started()
    s.session_ended()
    assert s.open_wait(3) == pytest.approx(57)  # three in the last minute


def test_message_rates() -> None:
    s = DestinationShaper(5, 10, messages_per_minute=2, messages_per_hour=3)
    assert s.send_wait(0) == 0
    s.sent(0)
    s.sent(1)
    assert s.send_wait(2) == pytest.approx(58)
    s.sent(61)
    assert s.send_wait(62) == pytest.approx(3600 - 62)  # the hourly budget is spent


def test_throttle_backs_off_and_ramps_up() -> None:
    s = DestinationShaper(8, 1000, backoff_base=30, backoff_cap=100, ramp_after=2)
    assert s.throttled(0) == 30
    assert s.allowed_connections == 4
    assert s.open_wait(10) == pytest.approx(20)
    assert s.send_wait(10) == pytest.approx(20)
    assert s.throttled(31) == 60
    assert s.throttled(100) == 100  # capped
    assert s.allowed_connections == 1
    for t in range(6):
        s.sent(200 + t)
    assert s.allowed_connections == 4  # one more per two clean transactions
    assert s.backoffs == 0


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (421, "4.7.0 Try again later", True),
        (452, "4.5.3 Too many recipients", True),
        (452, "4.3.1 Insufficient system storage", False),
        (451, "4.7.1 too many connections", False),
        (550, "too many", False),
    ],
)
def test_throttle_replies(code: int, text: str, expected: bool) -> None:
    assert is_throttle_reply(code, text) is expected


def test_a_refusal_by_limits_shared_with_other_nodes_holds_new_work() -> None:
    s = DestinationShaper(2, 10, messages_per_minute=5, key="example.com")
    assert s.key == "example.com"
    assert s.message_rates() == [(5, 60.0)]
    assert s.open_wait(0) == 0 and s.send_wait(0) == 0
    s.wait_shared(0.25)  # no free slot on any node: look again in 0.25 s
    assert s.open_wait(0) == pytest.approx(0.25) and s.send_wait(0) == pytest.approx(0.25)
    s.wait_shared(0.1)  # an earlier time never shortens the wait
    assert s.open_wait(0.2) == pytest.approx(0.05)
    assert s.can_open(0.25) and s.send_wait(0.25) == 0
    assert s.state(0.0)["paused_for"] == 0  # not a throttle pause: stats unchanged
    assert DestinationShaper(1, 1).message_rates() == []
