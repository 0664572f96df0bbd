"""Value types shared by every stage: the one address split and the one NOTIFY parser."""

from __future__ import annotations

import pytest

from ferry.delivery.dsn import needs_dsn
from ferry.envelope import (
    DEFAULT_NOTIFY,
    Address,
    RecipientIn,
    domain_of,
    normalize_notify,
    parse_notify,
    split_address,
)
from ferry.intake.commands import CommandError
from ferry.intake.commands import parse_notify as intake_parse_notify

# -- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("bob@Example.NET", ("bob", "Example.NET")),
        ('"a@b"@example.net', ('"a@b"', "example.net")),  # RFC 5321 §4.1.2 quoted local part
        ("@example.net", ("", "example.net")),  # an alias key for a whole domain
        ("bob@", ("bob", "")),
    ],
)
def test_split_address_at_the_last_at(text: str, parts: tuple[str, str]) -> None:
    assert split_address(text) == parts


def test_split_address_needs_an_at() -> None:
    with pytest.raises(ValueError):
        split_address("postmaster")


@pytest.mark.parametrize(
    ("text", "domain"),
    [("bob@Example.NET", "example.net"), ('"a@b"@x.test', "x.test"), ("postmaster", "")],
)
def test_domain_of(text: str, domain: str) -> None:
    assert domain_of(text) == domain
    assert RecipientIn(text).domain == domain


def test_address_parse_is_strict() -> None:
    assert Address.parse('"a@b"@Example.NET') == Address('"a@b"', "example.net")
    assert str(Address.parse("bob@Example.NET")) == "bob@example.net"
    for bad in ("postmaster", "@example.net", "bob@"):
        with pytest.raises(ValueError):
            Address.parse(bad)


# -- NOTIFY (RFC 3461 §4.1) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "keywords", "stored"),
    [
        ("NEVER", frozenset(), "NEVER"),
        ("never", frozenset(), "NEVER"),
        ("SUCCESS", {"SUCCESS"}, "SUCCESS"),
        ("delay,failure", {"DELAY", "FAILURE"}, "DELAY,FAILURE"),  # order kept
        ("SUCCESS, FAILURE,DELAY", {"SUCCESS", "FAILURE", "DELAY"}, "SUCCESS,FAILURE,DELAY"),
    ],
)
def test_notify_values(value: str, keywords: set[str], stored: str) -> None:
    assert parse_notify(value) == keywords
    assert normalize_notify(value) == stored
    assert intake_parse_notify(value) == stored
    assert parse_notify(stored) == keywords  # what delivery reads back


def test_no_notify_means_failure_and_delay() -> None:
    assert parse_notify(None) == DEFAULT_NOTIFY == {"FAILURE", "DELAY"}


BAD_NOTIFY = ["", "BOGUS", "NEVER,SUCCESS", "SUCCESS,,FAILURE", "FAILURE,FAILURE", "NEVER,NEVER"]


@pytest.mark.parametrize("value", BAD_NOTIFY)
def test_bad_notify_is_refused_by_intake_and_delivery_alike(value: str) -> None:
    # One parser: what intake refuses (501 5.5.4) delivery refuses too. "FAILURE,FAILURE"
    # used to pass dsn.parse_notify while intake refused it.
    with pytest.raises(ValueError):
        parse_notify(value)
    with pytest.raises(ValueError):
        needs_dsn(value, "failed")
    with pytest.raises(CommandError) as info:
        intake_parse_notify(value)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


def test_intake_notify_replies_are_unchanged() -> None:
    with pytest.raises(CommandError) as info:
        intake_parse_notify("")
    assert info.value.reply.text == "NOTIFY requires a value"
    with pytest.raises(CommandError) as info:
        intake_parse_notify("SUCCESS,SUCCESS")
    assert info.value.reply.text == "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY"
