"""The retry schedule: when to try a deferred recipient again, and when to give up.

Pure functions over plain values: the caller supplies the clock (``now``,
``arrival``) and the randomness (``rand``), so every decision is reproducible
in tests. Times are epoch seconds; durations are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ferry.durations import parse_duration

if TYPE_CHECKING:
    from ferry.config import RelayConfig
    from ferry.queue.base import MessageInfo

#: Zetian's schedule: 1, 2, 4, 8, 16, 32 minutes, then 1 h doubling to a 4 h cap.
#: The last entry repeats for every later attempt.
#:
#: RFC 5321 §4.5.4.1 asks for at least 30 minutes between retries and a give-up time of
#: at least 4-5 days. The give-up time follows it (``message_lifetime`` = 4 days, which
#: governs by default). The first retries come sooner on purpose, as the same section
#: allows for "more sophisticated and variable strategies": most temporary failures are
#: greylisting (which accepts a retry after a few minutes) or a brief outage, so a retry
#: after 1, 2, 4... minutes delivers them hours earlier, while the doubling means a
#: destination that stays down is tried only 6 times in its first hour and from the
#: seventh attempt on at least 30 minutes apart (every 4 h after the first 4 hours).
DEFAULT_SCHEDULE: tuple[float, ...] = (60, 120, 240, 480, 960, 1920, 3600, 7200, 14400)

ExpiryReason = Literal["max_retries", "lifetime"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and for how long a temporarily failing recipient is retried.

    ``schedule[i]`` is the delay after attempt ``i + 1``; the last entry repeats.
    ``message_lifetime`` bounds the time since arrival and governs by default.
    ``max_retries``, when set, also bounds the number of *retries* (Zetian's
    MaxRetryCount): the first attempt plus ``max_retries`` more, then the recipient
    expires; 0 means a single attempt; None (the default) means no count limit.
    Whichever limit comes first ends the recipient's life (see :func:`give_up_time`).
    ``jitter`` spreads retries by ±that fraction so that a burst deferred together
    does not come back together.
    """

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    max_retries: int | None = None
    message_lifetime: float = 4 * 86400
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not self.schedule or any(not (d > 0 and math.isfinite(d)) for d in self.schedule):
            raise ValueError(f"schedule needs positive finite delays: {self.schedule!r}")
        if self.max_retries is not None and self.max_retries < 0:
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
        max_retries: int | None = None,
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
    reason: ExpiryReason | None = None


def after_temporary_failure(
    policy: RetryPolicy, *, attempts: int, arrival: float, now: float, rand: float
) -> RetryDecision:
    """Decide the fate of a recipient whose latest attempt failed temporarily.

    Expires once ``attempts`` exceeds ``max_retries`` when that is set (all retries
    spent) or the message has lived ``message_lifetime`` since ``arrival``. Otherwise retries after
    :func:`next_delay`, but never later than the expiry time: a retry that
    would land past it is pulled back to exactly the expiry time, so the
    message gets one last attempt at the end of its life instead of sleeping
    through it and expiring untried. (Postfix likewise bounces an old message
    only when an attempt fails after ``maximal_queue_lifetime``.)
    """
    if policy.max_retries is not None and attempts > policy.max_retries:
        return RetryDecision("expire", None, "max_retries")
    expires = arrival + policy.message_lifetime
    if now >= expires:
        return RetryDecision("expire", None, "lifetime")
    return RetryDecision("retry", min(now + next_delay(policy, attempts, rand), expires))


@dataclass(frozen=True)
class GiveUp:
    """When a pending recipient will be given up on at the latest, and which limit says so."""

    at: float
    reason: ExpiryReason


def give_up_time(
    policy: RetryPolicy, *, expires: float, attempts: int, next_attempt: float | None
) -> GiveUp:
    """The real give-up time of a pending recipient: the one figure every display shows.

    ``expires`` is the message's end of life (arrival + ``message_lifetime``, fixed
    when it arrived); ``attempts`` is how many attempts were made so far and
    ``next_attempt`` when the next one is due. Without ``max_retries`` the lifetime
    governs. With it, the last allowed attempt (number ``max_retries + 1``) is due
    after the remaining scheduled delays, each counted at its longest (+jitter), so the
    figure is a bound that the relay keeps: no attempt starts after it (as scheduled: a
    backlog that delays attempts past their due time moves it by as much). A retry never
    lands past ``expires`` (see :func:`after_temporary_failure`), so the earlier of the
    two limits is the answer.
    """
    if policy.max_retries is None:
        return GiveUp(expires, "lifetime")
    at = next_attempt if next_attempt is not None else expires
    if attempts >= policy.max_retries:
        return GiveUp(min(at, expires), "max_retries")  # the next attempt is the last
    # Attempt number attempts + 1 happens at ``at``; after a failure of attempt k the
    # next waits the delay scheduled after attempt k, until attempt max_retries + 1.
    stretch = 1 + policy.jitter
    last = len(policy.schedule)
    before = at  # when attempt number max_retries happens
    for k in range(attempts + 1, min(policy.max_retries - 1, last - 1) + 1):
        before += policy.schedule[k - 1] * stretch
    # From attempt ``last`` on, the last delay repeats: count those without a loop.
    repeats = policy.max_retries - 1 - max(attempts, last - 1)
    if repeats > 0:
        before += repeats * policy.schedule[-1] * stretch
    final = before + policy.schedule[min(policy.max_retries, last) - 1] * stretch
    if final < expires:
        return GiveUp(final, "max_retries")
    # A retry due past the end of life is pulled back to it (after_temporary_failure):
    # if that pulled-back attempt is the last allowed one, the retry count still ends it.
    return GiveUp(expires, "max_retries" if before < expires else "lifetime")


def policy_for(config: RelayConfig) -> RetryPolicy:
    """The retry policy a configuration sets (delivery, displays and the API share it)."""
    d = config.delivery
    return RetryPolicy.from_config(
        list(d.retry_schedule), max_retries=d.max_retries, message_lifetime=d.message_lifetime
    )


def fill_give_up(policy: RetryPolicy, message: MessageInfo) -> MessageInfo:
    """Set the real give-up time on a message's pending recipients and on the message.

    What ``queue show``, ``queue list`` and the Python API show: :func:`give_up_time`
    per recipient, and for the message the latest of them (when its last pending
    recipient is given up on). Final recipients and finished messages get None.
    """
    latest: float | None = None
    for r in message.recipients:
        if r.status.is_final:
            r.gives_up = r.gives_up_reason = None
            continue
        g = give_up_time(
            policy, expires=message.expires, attempts=r.attempts, next_attempt=r.next_attempt
        )
        r.gives_up, r.gives_up_reason = g.at, g.reason
        latest = g.at if latest is None else max(latest, g.at)
    message.gives_up = latest
    return message
