"""What every event is: a small frozen dataclass, its log line, and its JSON form.

An event carries typed values (the whole :class:`~ferry.envelope.Reply`, a
:class:`~ferry.envelope.Status`, a queue id ...). Subscribers -- the log, ``ferry.Relay``
hooks, and later metrics and webhooks -- read those values; only the log formatter
shortens anything, and only for display (:meth:`Event.log_fields`).

:func:`to_dict` / :func:`from_dict` turn an event into JSON-safe values and back, so an
event can cross a process boundary as itself, never as a log line to be parsed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from ferry.envelope import Priority, Reply, Status

#: Every concrete event class by its class name (the ``type`` of :func:`to_dict`).
EVENT_TYPES: dict[str, type[Event]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """The base of every event. ``name`` is the event's word in the log line."""

    name: ClassVar[str] = ""
    level: ClassVar[int] = logging.INFO
    #: The logger of its line (a few events keep the logger their line always had).
    logger: ClassVar[str] = "ferry.events"

    def __init_subclass__(cls) -> None:
        # (no super(): dataclass(slots=True) replaces the class the cell would name)
        if cls.__dict__.get("name"):  # abstract groups (no name of their own) stay out
            # dataclass(slots=True) makes a second class: the last one registered wins.
            EVENT_TYPES[cls.__name__] = cls

    def log_level(self) -> int:
        """The log level of this event's line."""
        return self.level

    def log_message(self) -> str:
        """The line's message: the event's word (a sentence for a few older lines)."""
        return self.name

    def log_fields(self) -> dict[str, Any]:
        """The fields of the log line, in order (``None`` values are left out of text).

        By default every field under its own name; events whose log line predates them
        override this to keep the line operators and tests already read.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def cut(text: object, limit: int) -> str:
    """``text`` shortened to ``limit`` characters -- for a log line only."""
    return str(text)[:limit]


# -- JSON form ------------------------------------------------------------------------


def _dump(value: Any) -> Any:
    if isinstance(value, Reply):
        return {"code": value.code, "enhanced": value.enhanced, "text": value.text}
    if isinstance(value, Priority):
        return value.name.lower()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _dump(v) for k, v in value.items()}
    return value


def to_dict(event: Event) -> dict[str, Any]:
    """The event as JSON-safe values: ``{"type": class name, field: value, ...}``."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in dataclasses.fields(event):
        out[f.name] = _dump(getattr(event, f.name))
    return out


def _load(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _load(options[0], value) if len(options) == 1 else value
    if hint is Reply:
        return Reply(int(value["code"]), value.get("enhanced"), str(value["text"]))
    if hint is Status:
        return Status(value)
    if hint is Priority:
        return Priority.parse(value)
    if origin is tuple:
        args = typing.get_args(hint)
        return tuple(_load(args[0], v) for v in value) if args else tuple(value)
    if hint is float:
        return float(value)
    return value


def from_dict(data: Mapping[str, Any]) -> Event:
    """The event :func:`to_dict` made (KeyError for an unknown type)."""
    cls = EVENT_TYPES[str(data["type"])]
    hints = typing.get_type_hints(cls)
    values = {
        f.name: _load(hints[f.name], data[f.name])
        for f in dataclasses.fields(cls)
        if f.name in data
    }
    return cls(**values)
