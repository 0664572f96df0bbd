"""The retry schedule: when to try a deferred recipient again, and when to give up.

Pure functions over plain values: the caller supplies the clock (``now``,
``arrival``) and the randomness (``rand``), so every decision is reproducible
in tests. Times are epoch seconds; durations are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ferry.durations import parse_duration

#: Zetian's schedule: 1, 2, 4, 8, 16, 32 minutes, then 1 h doubling to a 4 h cap.
#: The last entry repeats for every later attempt.
DEFAULT_SCHEDULE: tuple[float, ...] = (60, 120, 240, 480, 960, 1920, 3600, 7200, 14400)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and for how long a temporarily failing recipient is retried.

    ``schedule[i]`` is the delay after attempt ``i + 1``; the last entry repeats.
    ``max_retries`` bounds the number of *retries* (Zetian's MaxRetryCount): the
    first attempt plus ``max_retries`` more, then the recipient expires; 0 means
    a single attempt. ``message_lifetime`` bounds the
    time since arrival. ``jitter`` spreads retries by ±that fraction so that a
    burst deferred together does not come back together.
    """

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    max_retries: int = 10
    message_lifetime: float = 4 * 86400
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not self.schedule or any(not (d > 0 and math.isfinite(d)) for d in self.schedule):
            raise ValueError(f"schedule needs positive finite delays: {self.schedule!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must not be negative: {self.max_retries!r}")
        if not (self.message_lifetime > 0 and math.isfinite(self.message_lifetime)):
            raise ValueError(f"message_lifetime must be positive: {self.message_lifetime!r}")
        # jitter < 1 keeps every delay strictly positive.
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1): {self.jitter!r}")

    @classmethod
    def from_config(
        cls,
        schedule: list[str | int | float] | tuple[str | int | float, ...] | None = None,
        max_retries: int = 10,
        message_lifetime: str | int | float = 4 * 86400,
        jitter: float = 0.1,
    ) -> RetryPolicy:
        """Build a policy from config values, where durations may be strings like ``"4h"``."""
        return cls(
            schedule=DEFAULT_SCHEDULE
            if schedule is None
            else tuple(parse_duration(d) for d in schedule),
            max_retries=max_retries,
            message_lifetime=parse_duration(message_lifetime),
            jitter=jitter,
        )


def next_delay(policy: RetryPolicy, attempts: int, rand: float) -> float:
    """The delay before the next attempt, given ``attempts`` made so far (>= 1).

    ``rand`` in [0, 1) (as from ``random.random()``) maps linearly onto
    [-jitter, +jitter] of the scheduled delay.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1: {attempts!r}")
    if not 0 <= rand < 1:
        raise ValueError(f"rand must be in [0, 1): {rand!r}")
    base = policy.schedule[min(attempts, len(policy.schedule)) - 1]
    return base * (1 + policy.jitter * (2 * rand - 1))


@dataclass(frozen=True)
class RetryDecision:
    """What to do after a temporary failure: retry at ``at``, or expire (``at`` is None).

    ``reason`` says why an expiry happened ("max_retries" or "lifetime"), for
    logs and the DSN text; it is None for a retry.
    """

    kind: Literal["retry", "expire"]
    at: float | None
    reason: Literal["max_retries", "lifetime"] | None = None


def after_temporary_failure(
    policy: RetryPolicy, *, attempts: int, arrival: float, now: float, rand: float
) -> RetryDecision:
    """Decide the fate of a recipient whose latest attempt failed temporarily.

    Expires once ``attempts`` exceeds ``max_retries`` (all retries spent) or the message has lived
    ``message_lifetime`` since ``arrival``. Otherwise retries after
    :func:`next_delay`, but never later than the expiry time: a retry that
    would land past it is pulled back to exactly the expiry time, so the
    message gets one last attempt at the end of its life instead of sleeping
    through it and expiring untried. (Postfix likewise bounces an old message
    only when an attempt fails after ``maximal_queue_lifetime``.)
    """
    if attempts > policy.max_retries:
        return RetryDecision("expire", None, "max_retries")
    expires = arrival + policy.message_lifetime
    if now >= expires:
        return RetryDecision("expire", None, "lifetime")
    return RetryDecision("retry", min(now + next_delay(policy, attempts, rand), expires))
