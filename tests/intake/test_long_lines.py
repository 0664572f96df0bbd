"""The line-length rule of intake's body checks, case by case (tests/cases/long_lines/),
and against the obvious line-by-line rule on generated bodies."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.intake.session import has_long_line

CASES = Path(__file__).parent.parent / "cases" / "long_lines" / "cases.txt"


def expand(text: str) -> bytes:
    """``{N*x}`` repeats x (which may hold more braces) N times; the rest is a bytes
    literal's text (``\\r\\n``)."""
    out, rest = _expand(text, 0)
    assert rest == len(text), f"unbalanced braces in {text!r}"
    return out


def _expand(text: str, i: int) -> tuple[bytes, int]:
    out = b""
    plain = ""
    while i < len(text) and text[i] != "}":
        if text[i] == "{":
            out += codecs.escape_decode(plain.encode())[0]
            plain = ""
            star = text.index("*", i)
            count = int(text[i + 1 : star])
            inner, i = _expand(text, star + 1)
            assert text[i] == "}"
            out += inner * count
            i += 1
        else:
            plain += text[i]
            i += 1
    return out + codecs.escape_decode(plain.encode())[0], i


def load() -> list[tuple[int, str, bool]]:
    cases = []
    for line in CASES.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        limit, body, expected = (part.strip() for part in line.split("|"))
        assert expected in ("long", "ok"), line
        cases.append((int(limit), body, expected == "long"))
    return cases


def reference(raw: bytes, limit: int) -> bool:
    """The rule written the slow, obvious way."""
    lines = raw.split(b"\r\n")
    return any(len(line) > limit for line in lines)


@pytest.mark.parametrize(("limit", "body", "long"), load(), ids=lambda v: str(v)[:40])
def test_long_line_case(limit: int, body: str, long: bool) -> None:
    raw = expand(body)
    assert reference(raw, limit) == long, "the case itself is wrong"
    assert has_long_line(raw, limit) == long


def test_cases_exist() -> None:
    assert len(load()) >= 20


line_lengths = st.lists(st.integers(0, 40), max_size=30)


@given(line_lengths, st.booleans(), st.integers(1, 25))
def test_matches_the_line_by_line_rule(lengths: list[int], final_crlf: bool, limit: int) -> None:
    raw = b"\r\n".join(b"x" * n for n in lengths) + (b"\r\n" if final_crlf and lengths else b"")
    assert has_long_line(raw, limit) == reference(raw, limit)
