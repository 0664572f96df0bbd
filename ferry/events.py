"""One event model: every notable thing Ferry does is one ``emit(event, **fields)``.

Today events become one structured log line each (text ``key=value`` or JSON); the
metrics, webhooks and DSN triggers of later issues subscribe to the same stream.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ferry.events")

# Field names that may never carry their value into a log line.
_SECRET_WORDS = ("password", "secret", "token", "credential")

Subscriber = Callable[[str, dict[str, Any]], None]
_subscribers: list[Subscriber] = []


def subscribe(fn: Subscriber) -> Callable[[], None]:
    """Call ``fn(event, fields)`` for every event; returns an unsubscribe function."""
    _subscribers.append(fn)
    return lambda: _subscribers.remove(fn) if fn in _subscribers else None


_secret_keys: dict[str, bool] = {}


def _is_secret(key: str) -> bool:
    known = _secret_keys.get(key)
    if known is None:
        known = _secret_keys[key] = any(word in key.lower() for word in _SECRET_WORDS)
    return known


def emit(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Record one event."""
    for key in fields:
        if _is_secret(key):
            fields[key] = "********"
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"ferry_fields": fields})
    for fn in list(_subscribers):
        try:
            fn(event, fields)
        except Exception:  # a subscriber must never break the pipeline
            logger.exception("event subscriber failed")


# Printable ASCII except space, '"', '=' and backslash: written as is, else JSON-quoted.
_BARE = re.compile(r"[!#-<>-\[\]-~]+")


def _fmt_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-11-24T12:00:00.123Z info accept id=... size=...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        fields = getattr(record, "ferry_fields", None)
        line = f"{ts}.{ms:03d}Z {record.levelname.lower()} {record.getMessage()}"
        if fields:
            # Absent values (None) are left out: shorter lines, same information.
            line += " " + " ".join(
                f"{k}={_fmt_value(v)}" for k, v in fields.items() if v is not None
            )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        out.update(getattr(record, "ferry_fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Send Ferry's log lines to ``stream`` (stdout by default)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("ferry")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
