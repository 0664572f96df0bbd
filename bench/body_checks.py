"""Micro-benchmark: intake's body checks on a 1 KB and a 100 KB message (issue 12).

    .venv/bin/python bench/body_checks.py

Compares the per-line Python loop the intake used before with the whole-buffer
``check_body`` of ferry/intake/session.py (and the DATA reader's terminator search).
"""

from __future__ import annotations

import re
import timeit

from ferry.intake.server import DataReader
from ferry.intake.session import check_body

MAX_LINE = 4096


def per_line(raw: bytes) -> bytes | None:
    """The previous check: count line ends, then a Python generator over every line."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        raw = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    if len(raw) > MAX_LINE and any(len(line) > MAX_LINE for line in raw.split(b"\r\n")):
        return None
    if raw.startswith(b".."):
        raw = raw[1:]
    return raw.replace(b"\r\n..", b"\r\n.")


def message(size: int) -> bytes:
    head = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n"
    line = b"x" * 74 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def main() -> None:
    for size in (1_000, 100_000):
        raw = message(size)
        assert per_line(raw) == check_body(raw, MAX_LINE, "reject")
        n = 20_000 if size < 10_000 else 2_000
        old = timeit.timeit(lambda raw=raw: per_line(raw), number=n) / n * 1e6
        new = timeit.timeit(lambda raw=raw: check_body(raw, MAX_LINE, "reject"), number=n) / n
        wire = raw + b".\r\n"
        read = timeit.timeit(lambda wire=wire: DataReader(10**8).feed(bytearray(wire)), number=n)
        print(
            f"{len(raw):>7} octets: per-line {old:8.1f} µs   whole-buffer {new * 1e6:8.1f} µs"
            f"   ({old / (new * 1e6):4.1f}x)   DATA reader {read / n * 1e6:6.1f} µs"
        )


if __name__ == "__main__":
    main()
