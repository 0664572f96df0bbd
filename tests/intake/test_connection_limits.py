"""The connection limits (``over_limit``), case by case (tests/cases/connection_limits/),
and the code a refusal crosses to an intake process with (ferry/intake/handover.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ferry.config import ServerConfig
from ferry.intake.handover import HANDOVER, REFUSALS, refusal, refusal_code
from ferry.intake.server import LIMIT_TEXT, over_limit

CASES = Path(__file__).parent.parent / "cases" / "connection_limits" / "cases.jsonl"


def _cases() -> list[Any]:
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["why"])
def test_over_limit(case: dict[str, Any]) -> None:
    cfg = ServerConfig(
        hostname="mx.test",
        max_connections=case["max_connections"],
        max_connections_per_ip=case["max_per_ip"],
    )
    assert over_limit(case["total"], case["from_ip"], cfg) == case["refused"]


@pytest.mark.parametrize("refused", [None, *REFUSALS])
def test_a_refusal_crosses_to_an_intake_process_as_itself(refused: str | None) -> None:
    header = HANDOVER.pack(2**40 + 7, 3, refusal_code(refused))
    cid, index, code = HANDOVER.unpack(header)
    assert (cid, index, refusal(code)) == (2**40 + 7, 3, refused)


def test_every_refusal_has_its_reply_text() -> None:
    assert set(REFUSALS) == set(LIMIT_TEXT)
