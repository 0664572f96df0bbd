"""The text log line's cheap parts (issue 12): the timestamp is formatted once a second
and numbers skip the quoting check, with the same line as before."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import pytest

import ferry.events as events
from ferry.events.log import TextFormatter, _fmt_value

T0 = 1_764_590_399.25  # 2025-12-01T11:59:59.250Z


def _record(created: float, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("ferry.events", logging.INFO, __file__, 0, "word", None, None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    record.ferry_fields = fields
    return record


def _expected(created: float) -> str:
    second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{second}.{int((created - int(created)) * 1000):03d}Z info word"


def test_the_timestamp_follows_each_second_forwards_and_back() -> None:
    fmt = TextFormatter()
    for created in (T0, T0 + 0.5, T0 + 0.749, T0 + 1.0, T0 + 61.999, T0 - 3600, T0):
        assert fmt.format(_record(created)) == _expected(created)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (-7, "-7"),
        (0.334, "0.334"),
        (1e-05, "1e-05"),
        (1.5e20, "1.5e+20"),
        (True, "True"),
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('a"b', '"a\\"b"'),
        ("grüße", '"grüße"'),
    ],
)
def test_values_as_before(value: object, text: str) -> None:
    assert _fmt_value(value) == text
    line = TextFormatter().format(_record(T0, k=value, gone=None))
    assert line == _expected(T0) + f" k={text}"


@pytest.fixture(name="buffer")
def buffer_fixture() -> Iterator[io.StringIO]:
    root = logging.getLogger("ferry")
    saved = (root.handlers[:], root.level, root.propagate)
    buffer = io.StringIO()
    events.setup_logging("info", "text", buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], root.level, root.propagate = saved


def test_an_event_line_through_the_logging_module(buffer: io.StringIO) -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger("ferry").addHandler(keep)
    try:
        events.emit(events.DkimUnsigned("no key", queue_id="Q1", required=False))
    finally:
        logging.getLogger("ferry").removeHandler(keep)
    line = buffer.getvalue()
    assert line.endswith('Z info dkim_unsigned id=Q1 reason="no key" required=False\n')
    [record] = seen
    assert (record.name, record.levelno, record.funcName) == ("ferry.events", 20, "log_event")
    assert record.ferry_fields == {"id": "Q1", "reason": "no key", "required": False}
