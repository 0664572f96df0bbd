"""Route targets: tests/cases/routes/*.toml, one case per file (see its README).

Every case goes through the three places that read a route — the parser the delivery
engine plans with, the configuration's ``[routes]`` and the Python API's per-message
route — which must agree (issue 9: they used to accept different sets).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.api.relay import check_route
from ferry.config import ConfigError, RelayConfig
from ferry.routes import NextHop, parse_route_target, validate_routes

CASES = sorted((Path(__file__).parent / "cases" / "routes").glob("*.toml"))
SMART = {"sendgrid", "ses", "gmail-relay"}


def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _config(tmp_path: Path, key: str, target: object) -> Path:
    hosts = "".join(
        f'[[smart_hosts]]\nname = "{name}"\nhost = "{name}.example.net"\n\n'
        for name in sorted(SMART)
    )
    path = tmp_path / "ferry.toml"
    path.write_text(f"{hosts}[routes]\n{json.dumps(key)} = {json.dumps(target)}\n")
    return path


def test_there_are_cases() -> None:
    assert len(CASES) > 30


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_route_case(path: Path, tmp_path: Path) -> None:
    case = _load(path)
    assert ("hops" in case) != ("error" in case), f"{path.name}: hops or error"
    key, target = case.get("key", "example.com"), case["target"]
    config = _config(tmp_path, key, target)
    per_message = key == "example.com" and isinstance(target, str)
    if "error" in case:
        with pytest.raises(ValueError) as err:
            validate_routes({key: target}, SMART, mx_port=25)
        assert case["error"] in str(err.value)
        with pytest.raises(ConfigError) as config_err:
            RelayConfig.load(config, env={})
        assert f"routes.{key}: " in str(config_err.value)
        assert case["error"] in str(config_err.value)
        if per_message:
            with pytest.raises(ValueError, match="route target"):
                check_route(target, sorted(SMART))
        return
    domain = "example.com" if key == "*" else key.removeprefix("*.")
    hops = parse_route_target(target, SMART, domain=domain, mx_port=25)
    assert hops == [NextHop(kind, name, port) for kind, name, port in case["hops"]]
    assert RelayConfig.load(config, env={}).routes == {key: target}
    if per_message:
        assert check_route(target, sorted(SMART)) == target.strip()
