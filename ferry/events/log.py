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
    secret = _secret_keys
    for key in fields:
        if secret.get(key) or (key not in secret and _is_secret(key)):
            fields[key] = "********"
    # Logger.log would look up its caller on the stack (always this function: nothing
    # to learn) for a quarter of the line's cost; the record is made as it would.
    record = logger.makeRecord(
        logger.name,
        level,
        __file__,
        0,
        event.log_message(),
        (),
        None,
        "log_event",
        {"ferry_fields": fields},
    )
    logger.handle(record)


_LEVEL_WORDS = {name: name.lower() for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}

# Printable ASCII except space, '"', '=' and backslash: written as is, else JSON-quoted.
_BARE = re.compile(r"[!#-<>-\[\]-~]+")


def _fmt_value(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is float or kind is bool:  # digits, '.', '-', '+', letters
        return str(value)
    text = value if kind is str else str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-11-24T12:00:00.123Z info accept id=... size=...``"""

    def __init__(self) -> None:
        super().__init__()
        # (second, its text): strftime once a second rather than once a line. One
        # attribute, so a reader never pairs one second with another's text.
        self._stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._stamp = stamp
        ms = int(record.msecs)
        fields = getattr(record, "ferry_fields", None)
        level = _LEVEL_WORDS.get(record.levelname) or record.levelname.lower()
        line = f"{stamp[1]}.{ms:03d}Z {level} {record.getMessage()}"
        if fields:
            # Absent values (None) are left out: shorter lines, same information. Plain
            # strings (most values) are checked here, without a call per field.
            bare = _BARE.fullmatch
            line += " " + " ".join(
                [
                    f"{k}={v if type(v) is str and bare(v) else _fmt_value(v)}"
                    for k, v in fields.items()
                    if v is not None
                ]
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
    # Neither formatter prints a record's thread, process or multiprocessing names:
    # not looking them up saves a third of making each record (this sets the logging
    # module's switches for the whole process, which is Ferry's here).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("ferry")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
