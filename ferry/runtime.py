"""How Ferry runs a coroutine at the top of a process: on uvloop when it is installed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (faster accept), else asyncio.

    ``FERRY_EVENT_LOOP=asyncio`` forces the standard loop (profilers see into it).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if os.environ.get("FERRY_EVENT_LOOP") == "asyncio":
        return asyncio.run(coro)
    return uvloop.run(coro)
