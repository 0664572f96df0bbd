"""Reply classification (cases in tests/cases/replies), synthetic transport failures,
block detection, reply parsing."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ferry.config import DEFAULT_BLOCK_PATTERNS
from ferry.delivery.outcomes import (
    TRANSPORT_FAILURES,
    ReplyClass,
    Stage,
    classify_reply,
    enhanced_from_reply,
    is_blocked_reply,
    parse_reply_text,
    transport_failure_reply,
)
from ferry.delivery.smarthosts import is_transport_failure
from ferry.envelope import Reply, Status

ALL_STAGES: tuple[Stage, ...] = (
    "connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot"
)  # fmt: skip


CASES = Path(__file__).parent.parent / "cases" / "replies"


def _wire_reply(text: str) -> Reply:
    """A reply as it came over the wire ("550-..." lines, then "550 ...")."""
    lines = text.strip("\n").split("\n")
    return parse_reply_text(int(lines[0][:3]), [line[4:] for line in lines])


@pytest.mark.parametrize("path", sorted(CASES.glob("*.toml")), ids=lambda p: p.stem)
def test_reply_case(path: Path) -> None:
    """tests/cases/replies: one file per (stage, reply) → class; see its README."""
    case = tomllib.loads(path.read_text())
    stage: Stage = case["stage"]
    reply = _wire_reply(case["reply"]) if "reply" in case else None
    expected: str = case["expected"]
    if expected == "error":
        with pytest.raises(ValueError):
            classify_reply(reply, stage=stage)
        return
    verdict = classify_reply(reply, stage=stage)
    assert verdict is ReplyClass(expected)
    # The smart hosts' circuit breakers count exactly the transport failures.
    assert is_transport_failure(reply, stage=stage) is (verdict is ReplyClass.TRANSPORT)
    assert (
        verdict.status
        is {
            "delivered": Status.DELIVERED,
            "temporary": Status.DEFERRED,
            "transport": Status.DEFERRED,
            "permanent": Status.FAILED,
        }[expected]
    )


def test_reply_cases_cover_every_class_and_stage() -> None:
    cases = [tomllib.loads(p.read_text()) for p in CASES.glob("*.toml")]
    assert {c["expected"] for c in cases} == {*(v.value for v in ReplyClass), "error"}
    assert {c["stage"] for c in cases} == set(ALL_STAGES)


@pytest.mark.parametrize("stage", [s for s in ALL_STAGES if s != "dot"])
@pytest.mark.parametrize("code", [220, 250, 334, 354])
def test_positive_reply_before_dot_is_not_an_outcome(code: int, stage: Stage) -> None:
    with pytest.raises(ValueError):
        classify_reply(Reply(code, None, "ok"), stage=stage)


@pytest.mark.parametrize("code", [199, 600])
def test_classify_rejects_non_smtp_codes(code: int) -> None:
    with pytest.raises(ValueError):
        classify_reply(Reply(code, None, "?"), stage="dot")


TRANSPORT_CODES = {
    "refused": "4.4.1",  # RFC 3463 X.4.1 no answer from host
    "unreachable": "4.4.1",
    "connect_timeout": "4.4.1",
    "dns": "4.4.3",  # X.4.3 directory server failure
    "timeout": "4.4.2",  # X.4.2 bad connection
    "lost": "4.4.2",
    "tls": "4.7.5",  # X.7.5 cryptographic failure
    "protocol": "4.5.0",  # X.5.0 other protocol status
}


@pytest.mark.parametrize(("kind", "enhanced"), TRANSPORT_CODES.items())
def test_transport_failure_reply(kind: str, enhanced: str) -> None:
    reply = transport_failure_reply(kind, "mx.example.net[192.0.2.1]:25")
    assert (reply.code, reply.enhanced) == (451, enhanced)
    assert reply.text.endswith(": mx.example.net[192.0.2.1]:25")
    for stage in ALL_STAGES:  # a transport failure is never final, wherever it happens
        assert classify_reply(reply, stage=stage).status is Status.DEFERRED


def test_every_transport_failure_kind_is_tested() -> None:
    assert TRANSPORT_CODES.keys() == TRANSPORT_FAILURES.keys()


def test_transport_failure_detail_stays_on_one_line() -> None:
    reply = transport_failure_reply("lost", "read failed\r\n  peer reset")
    assert reply.text == "connection lost: read failed peer reset"
    assert len(reply.lines()) == 1


def test_transport_failure_without_detail_and_unknown_kind() -> None:
    assert transport_failure_reply("refused", "").text == "connection refused"
    with pytest.raises(ValueError):
        transport_failure_reply("gremlins", "x")


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (
            554,
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        ),
        (550, "5.7.1", "Message rejected due to poor IP reputation"),
        (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]"),
        (550, "5.7.1", "Your IP is on our BLOCKLIST"),
        (550, "5.7.1", "Sender domain is on a block list"),
        (554, "5.7.1", "192.0.2.1 is blacklisted"),
        (554, "5.7.0", "Rejected by DNSBL"),
        (554, "5.7.1", "RBL rejection"),
        (554, None, "Your access to this mail system has been rejected due to poor reputation"),
        (550, None, "Rejected: 192.0.2.1 listed at bl.spamcop.net"),
    ],
)
def test_blocked_replies(code: int, enhanced: str | None, text: str) -> None:
    assert is_blocked_reply(Reply(code, enhanced, text))


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (550, "5.1.1", "User unknown"),
        (550, "5.1.1", "User not listed in directory; see our blocklist policy"),  # 5.1.x
        (550, None, "Recipient not listed in public directory"),
        (554, "5.7.1", "Message content rejected as spam"),  # content, not reputation
        (451, "4.7.1", "Greylisted, try again later"),
        (421, "4.7.0", "Temporarily deferred: IP listed on spamhaus"),  # temporary
        (552, None, "blocklisted"),  # no enhanced code and not 550/554
        (550, "5.7.1", "Relaying denied"),
    ],
)
def test_not_blocked_replies(code: int, enhanced: str | None, text: str) -> None:
    assert not is_blocked_reply(Reply(code, enhanced, text))


def test_block_patterns_are_configurable() -> None:
    reply = Reply(554, "5.7.1", "Go away, Spammer")
    assert not is_blocked_reply(reply)
    assert is_blocked_reply(reply, patterns=[r"go away", *DEFAULT_BLOCK_PATTERNS])


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(550, "5.1.1", "x"), "5.1.1"),
        (Reply(451, "4.4.2", "x"), "4.4.2"),
        (Reply(550, None, "x"), "5.0.0"),
        (Reply(451, None, "x"), "4.0.0"),
        (Reply(250, None, "x"), "2.0.0"),
        (Reply(354, None, "x"), "2.0.0"),
        (Reply(550, "4.1.1", "x"), "5.0.0"),  # class contradicts the code
        (Reply(550, "junk", "x"), "5.0.0"),
    ],
)
def test_enhanced_from_reply(reply: Reply, expected: str) -> None:
    assert enhanced_from_reply(reply) == expected


def test_enhanced_from_reply_rejects_non_smtp_codes() -> None:
    with pytest.raises(ValueError):
        enhanced_from_reply(Reply(600, None, "x"))


@pytest.mark.parametrize(
    ("code", "lines", "expected"),
    [
        (550, ["5.1.1 User unknown"], Reply(550, "5.1.1", "User unknown")),
        (550, ["User unknown"], Reply(550, None, "User unknown")),
        (550, ["4.1.1 odd"], Reply(550, None, "4.1.1 odd")),  # class mismatch: just text
        (250, ["2.0.0"], Reply(250, "2.0.0", "")),
        (250, ["2.0.0Ok"], Reply(250, None, "2.0.0Ok")),
        (550, ["5.1.10 Null MX"], Reply(550, "5.1.10", "Null MX")),
        (550, ["5.1.1234 x"], Reply(550, None, "5.1.1234 x")),
        (550, [], Reply(550, None, "")),
        (
            550,
            ["5.7.1 [192.0.2.1] Our system has", "5.7.1 detected spam.", "5.7.1"],
            Reply(550, "5.7.1", "[192.0.2.1] Our system has\ndetected spam.\n"),
        ),
        (550, ["5.1.1 first", "5.2.2 second"], Reply(550, "5.1.1", "first\n5.2.2 second")),
        (
            250,
            ["mx.example.net Hello", "PIPELINING", "8BITMIME"],
            Reply(250, None, "mx.example.net Hello\nPIPELINING\n8BITMIME"),
        ),
    ],
)
def test_parse_reply_text(code: int, lines: list[str], expected: Reply) -> None:
    assert parse_reply_text(code, lines) == expected


@pytest.mark.parametrize(
    "reply",
    [
        Reply(550, "5.1.1", "User unknown"),
        Reply(250, None, "mx Hello\nSIZE 1000\nSTARTTLS"),
        Reply(421, "4.7.0", "Try again later\nSee https://example.net/help"),
    ],
)
def test_parse_reply_text_inverts_reply_lines(reply: Reply) -> None:
    texts = [line[4:] for line in reply.lines()]  # strip "550-" / "550 "
    assert parse_reply_text(reply.code, texts) == reply
