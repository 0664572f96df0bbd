"""The log: one subscriber that writes each event as one line (text or JSON).

``2026-11-24T12:00:00.123Z info accept id=... size=...`` -- the event's log word, then
its :meth:`~ferry.events.base.Event.log_fields`. This is the only place where values
are shortened (for display); subscribers get the events themselves.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from ferry.events.base import Event

# Field names that may never carry their value into a log line.
_SECRET_WORDS = ("password", "secret", "token", "credential")
_secret_keys: dict[str, bool] = {}


def _is_secret(key: str) -> bool:
    known = _secret_keys.get(key)
    if known is None:
        known = _secret_keys[key] = any(word in key.lower() for word in _SECRET_WORDS)
    return known


def log_event(event: Event) -> None:
    """The log subscriber: one line per event, at the event's level."""
    level = event.log_level()
    logger = logging.getLogger(event.logger)  # cached by the logging module
    if not logger.isEnabledFor(level):
        return
    fields = event.log_fields()
    for key in fields:
        if _is_secret(key):
            fields[key] = "********"
    logger.log(level, event.log_message(), extra={"ferry_fields": fields})


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
