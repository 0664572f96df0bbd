"""Command argument parsing (ferry/intake/commands.py) as a table of cases.

The cases are data: ``tests/cases/smtp_commands/cases.jsonl``. NOTIFY parsing has its
own owner and tests (tests/test_dsn.py), so it is left out here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.intake import commands
from ferry.intake.commands import CommandError, PathArg

CASES = Path(__file__).resolve().parents[1] / "cases" / "smtp_commands" / "cases.jsonl"
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "parse_path_arg": lambda arg, kw: commands.parse_path_arg(arg, kw, smtputf8_offered=True),
    "parse_params": commands.parse_params,
    "check_mailbox": commands.check_mailbox,
    "is_valid_domain": commands.is_valid_domain,
    "decode_xtext": commands.decode_xtext,
    "encode_xtext": commands.encode_xtext,
    "parse_orcpt": commands.parse_orcpt,
    "parse_mt_priority": commands.parse_mt_priority,
}


def load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


def case_id(case: dict[str, Any]) -> str:
    return f"{case['fn']}:{json.dumps(case['args'], ensure_ascii=False)[:50]}"


@pytest.mark.parametrize("case", load(), ids=case_id)
def test_command_case(case: dict[str, Any]) -> None:
    fn = FUNCTIONS[case["fn"]]
    if "error" in case:
        with pytest.raises(CommandError) as err:
            fn(*case["args"], **case.get("kwargs", {}))
        assert str(err.value.reply) == case["error"]
        return
    got = fn(*case["args"], **case.get("kwargs", {}))
    if isinstance(got, PathArg):
        got = {"address": got.address, "params": got.params}
    assert got == case["out"]


def test_every_function_has_cases() -> None:
    assert {c["fn"] for c in load()} == set(FUNCTIONS)


def test_xtext_round_trip() -> None:
    for text in ("plain", "a+b=c", "spaces and ü", "+2B"):
        assert commands.decode_xtext(commands.encode_xtext(text)) == text


def test_path_limit() -> None:
    # RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the brackets.
    ok = "a@" + "b" * 252
    assert commands.parse_path_arg(f"TO:<{ok}>", "TO", smtputf8_offered=True).address == ok
    with pytest.raises(CommandError) as err:
        commands.parse_path_arg(f"TO:<{ok}b>", "TO", smtputf8_offered=True)
    assert str(err.value.reply) == "501 5.5.4 Path longer than 256 octets"
