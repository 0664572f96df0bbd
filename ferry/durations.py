"""Durations in configuration and commands: ``"90s"``, ``"5m"``, ``"1h30m"``, ``"4d"``, seconds."""

from __future__ import annotations

import decimal
import math
import re

_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_NUMBER = r"\d+(?:\.\d+)?"
# Units at most once each and largest first ("1h30m", not "30m1h" or "1m1m"),
# so a typo in a config file is an error rather than a surprising sum.
_DURATION = re.compile(
    "".join(rf"(?:(?P<{u}>{_NUMBER})\s*{u}\s*)?" for u in _UNIT_SECONDS), re.IGNORECASE
)


def parse_duration(text: str | int | float) -> float:
    """Parse a duration such as ``"90s"``, ``"1m"``, ``"4h"``, ``"4d"`` or ``"1h30m"``.

    Plain numbers (and numeric strings) are seconds. Units are w, d, h, m, s.
    Raises ValueError for anything else, including negative, infinite or NaN
    values: a duration in a config file that we cannot read must stop startup,
    not become zero.
    """
    if isinstance(text, bool):  # bool is an int; True seconds is surely a mistake
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        stripped = text.strip()
        if re.fullmatch(_NUMBER, stripped):
            seconds = float(stripped)
        else:
            match = _DURATION.fullmatch(stripped)
            if not stripped or match is None:
                raise ValueError(f"not a duration: {text!r}")
            seconds = sum(
                float(value) * _UNIT_SECONDS[unit]
                for unit, value in match.groupdict().items()
                if value is not None
            )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest text :func:`parse_duration` reads back as ``seconds``: 345600 -> "4d".

    Whole units, largest first ("1h30m"); a fraction stays on the seconds ("1m0.5s").
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    whole = int(seconds)
    fraction = seconds - whole
    parts: list[str] = []
    for unit, size in _UNIT_SECONDS.items():
        if unit == "s":
            break
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    rest = whole + fraction
    if rest or not parts:
        text = format(decimal.Decimal(repr(rest)), "f")  # never "1e-07": no exponent
        parts.append(f"{int(rest)}s" if rest == int(rest) else f"{text}s")
    return "".join(parts)
