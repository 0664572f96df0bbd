"""The pure parts of the shared limits (``ferry/queue/limits.py``): the rate windows'
bucket arithmetic (tests/cases/rate_windows/cases.toml) and the advisory-lock keys."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.queue.limits import FREE_SLOT, LocalLimits, first_bucket, lock_key, rate_wait

CASES_FILE = Path(__file__).parents[1] / "cases" / "rate_windows" / "cases.toml"
CASES: list[dict[str, Any]] = tomllib.loads(CASES_FILE.read_text())["case"]


def test_there_are_cases() -> None:
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_rate_wait_case(case: dict[str, Any]) -> None:
    buckets = {int(k): int(v) for k, v in case["buckets"].items()}
    if "error" in case:
        with pytest.raises(ValueError, match=case["error"]):
            rate_wait(buckets, case["now"], case["limit"], case["period"])
        return
    got = rate_wait(buckets, case["now"], case["limit"], case["period"])
    assert got == pytest.approx(case["wait"], abs=1e-9)


@pytest.mark.parametrize("period", [1.0, 60.0, 3600.0])
def test_no_period_long_interval_ever_holds_more_than_the_limit(period: float) -> None:
    """Events taken whenever rate_wait says 0, at many instants: any interval of one
    period holds at most ``limit`` of them (the windows never let a burst through)."""
    limit = 3
    buckets: dict[int, int] = {}
    taken: list[float] = []
    step = period / 37  # not a divisor of the bucket width: instants fall everywhere
    for i in range(2000):
        now = i * step
        if rate_wait(buckets, now, limit, period) == 0:
            b = first_bucket(now, period) + 10
            buckets[b] = buckets.get(b, 0) + 1
            taken.append(now)
    assert len(taken) > 20
    for i, t in enumerate(taken):
        assert sum(1 for u in taken[i:] if u < t + period) <= limit


def test_lock_keys_are_the_same_on_every_node_and_version() -> None:
    # Nodes of different versions must agree on a destination's slots: never change.
    assert lock_key("dest:example.com") == -85597889
    assert -(2**31) <= lock_key("x" * 1000) < 2**31


async def test_local_limits_add_nothing_to_one_process_s_own_counts() -> None:
    limits = LocalLimits()
    assert not limits.shared
    assert await limits.take_slot("dest:x", 1) is FREE_SLOT
    assert await limits.take_slot("dest:x", 1) is FREE_SLOT
    assert await limits.take_rate("msg:x", [(1, 60.0)], 0.0) == 0.0
    FREE_SLOT.release()
    assert FREE_SLOT.held
