"""Duration strings: tests/cases/durations/*.toml, one case per file (see its README)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.config import ConfigError, RelayConfig
from ferry.durations import format_duration, parse_duration

CASES = sorted((Path(__file__).parent / "cases" / "durations").glob("*.toml"))


def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def test_there_are_cases() -> None:
    assert len(CASES) > 20


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_duration_case(path: Path, tmp_path: Path) -> None:
    case = _load(path)
    assert ("seconds" in case) != ("error" in case), f"{path.name}: seconds or error"
    config = tmp_path / "ferry.toml"
    config.write_text(f"[delivery]\ndelay_warning_after = {_toml(case['input'])}\n")
    if "error" in case:
        with pytest.raises(ValueError, match=case["error"]):
            parse_duration(case["input"])
        # The configuration refuses it too, naming the key.
        with pytest.raises(ConfigError) as err:
            RelayConfig.load(config, env={})
        assert "delivery.delay_warning_after: " in str(err.value)
        assert case["error"] in str(err.value)
        return
    seconds = parse_duration(case["input"])
    assert seconds == case["seconds"]
    assert RelayConfig.load(config, env={}).delivery.delay_warning_after == seconds
    assert parse_duration(format_duration(seconds)) == seconds


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
