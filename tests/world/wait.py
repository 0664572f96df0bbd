"""Wait for a condition with a deadline, never for a fixed time.

Tests synchronise on *state* ("the MX has 2 messages"), not on time. The short
poll interval below only bounds how often the predicate is re-checked; the
deadline is what turns a hang into a clear failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition not met",
) -> None:
    """Block until ``predicate()`` is truthy; AssertionError after ``timeout`` s.

    ``message`` may be a callable, so the failure text can describe the state
    at the moment of failure (e.g. which messages did arrive).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(_text(message, timeout))
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition not met",
) -> None:
    """Async twin of :func:`wait_until`; the predicate may be sync or async.

    It yields to the event loop between checks, so code under test running on
    the same loop keeps making progress.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(_text(message, timeout))
        await asyncio.sleep(interval)


def _text(message: str | Callable[[], str], timeout: float) -> str:
    text = message() if callable(message) else message
    return f"{text} (after {timeout:g} s)"
