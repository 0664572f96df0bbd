"""The log's cheap parts (issue 12): the timestamp is formatted once a second, numbers
skip the quoting check (the same line as before), and info lines are flushed in batches."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ferry.events as events
from ferry.events.log import LineHandler, TextFormatter, _fmt_value
from tests.world.wait import wait_until

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


class _CountingStream(io.StringIO):
    """A stream that counts its flushes (each one a write system call on a file)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_info_lines_are_flushed_in_batches_warnings_at_once() -> None:
    # Before issue 12 every line was flushed on its own (a write per line on the event
    # loop's thread): 100 lines, 100 flushes. This failed then.
    stream = _CountingStream()
    handler = LineHandler(stream, delay=0.01)
    handler.setFormatter(TextFormatter())
    for i in range(100):
        handler.handle(_record(T0 + i / 1000, n=i))
    assert stream.getvalue().count("\n") == 100  # every line written at once, in order
    assert stream.flushes < 100
    wait_until(lambda: stream.flushes >= 1, 5, message="the batch was never flushed")
    before = stream.flushes
    warning = _record(T0)
    warning.levelno, warning.levelname = logging.WARNING, "WARNING"
    handler.handle(warning)
    assert stream.flushes == before + 1  # a warning does not wait
    assert stream.getvalue().endswith(" warning word\n")


def test_setup_logging_flushes_everything_at_exit(tmp_path: Path) -> None:
    # A process that logs info lines and exits at once still leaves every line.
    out = tmp_path / "log.txt"
    code = (
        "import sys\n"
        "import ferry.events as events\n"
        f"events.setup_logging('info', 'text', open({str(out)!r}, 'w'))\n"
        "for i in range(50):\n"
        "    events.emit(events.DkimUnsigned('no key', queue_id=f'Q{i}', required=False))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    lines = out.read_text().splitlines()
    assert len(lines) == 50 and lines[-1].endswith('id=Q49 reason="no key" required=False')
