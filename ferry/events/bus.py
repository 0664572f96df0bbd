"""Publish and subscribe: ``emit(event)`` calls every subscriber with the event object."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.events.base import Event

logger = logging.getLogger("ferry.events")

Subscriber = Callable[[Event], None]
_subscribers: list[Subscriber] = []


def subscribe(fn: Subscriber) -> Callable[[], None]:
    """Call ``fn(event)`` for every event from now on; returns an unsubscribe function."""
    _subscribers.append(fn)
    return lambda: _subscribers.remove(fn) if fn in _subscribers else None


@dataclass(frozen=True, slots=True)
class Untyped(Event):
    """An event still emitted the old way, ``emit("word", **fields)``: logged, nothing more.

    Kept so a call site written before typed events still logs; every call in Ferry
    itself passes an :class:`Event` (``tests/test_events.py`` checks it).
    """

    word: str
    fields: dict[str, Any] = field(default_factory=dict)
    at_level: int = logging.INFO

    def log_level(self) -> int:
        return self.at_level

    def log_message(self) -> str:
        return self.word

    def log_fields(self) -> dict[str, Any]:
        return dict(self.fields)


def emit(event: Event | str, level: int = logging.INFO, **fields: Any) -> None:
    """Hand ``event`` to every subscriber (the log is one of them)."""
    if isinstance(event, str):
        event = Untyped(event, fields, level)
    for fn in list(_subscribers):
        try:
            fn(event)
        except Exception:  # a subscriber must never break the pipeline
            logger.exception("event subscriber failed")
