"""Pure parts of the HTTP API: request bodies to envelopes, idempotency keys, rate limits."""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path

import pytest

from ferry.envelope import Priority
from ferry.http.limits import Bucket
from ferry.http.requests import RequestError, parse_submission
from ferry.idempotency import fingerprint, parse_idempotency_key

CASES = Path(__file__).resolve().parents[1] / "cases" / "idempotency_keys" / "cases.txt"


def _key_cases() -> list[tuple[str, str]]:
    rows = []
    for line in CASES.read_text().splitlines():
        if line and not line.startswith("#"):
            value, expected = line.split("\t")
            rows.append((value, expected))
    return rows


@pytest.mark.parametrize(("value", "expected"), _key_cases())
def test_idempotency_key(value: str, expected: str) -> None:
    got = parse_idempotency_key(value)
    assert got == (None if expected == "INVALID" else expected)


def test_raw_form() -> None:
    data = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    sub = parse_submission(
        {
            "mail_from": "a@example.org",
            "rcpt_to": ["b@example.net", "B@example.net", "c@example.com"],
            "data": base64.b64encode(data).decode(),
            "priority": "high",
            "notify": ["FAILURE", "DELAY"],
            "envid": "env-1",
            "metadata": {"campaign": "42"},
        },
        hostname="relay.test",
        now=0,
    )
    env = sub.envelope
    assert env.sender == "a@example.org"
    assert [r.address for r in env.recipients] == ["b@example.net", "c@example.com"]
    assert env.data == data
    assert env.priority is Priority.HIGH
    assert env.envid == "env-1"
    assert all(r.notify == "FAILURE,DELAY" for r in env.recipients)
    assert sub.metadata == {"campaign": "42"}


def test_structured_form_builds_mime() -> None:
    sub = parse_submission(
        {
            "from": "Alice <alice@example.org>",
            "to": ["bob@example.net"],
            "cc": ["carol@example.net"],
            "bcc": ["dave@example.net"],
            "subject": "Grüße",
            "text": "plain body",
            "html": "<p>html body</p>",
            "headers": {"X-Campaign": "spring"},
            "attachments": [
                {
                    "filename": "a.bin",
                    "content_type": "application/octet-stream",
                    "content": base64.b64encode(b"\x00\x01binary").decode(),
                }
            ],
        },
        hostname="relay.test",
        now=1_700_000_000,
    )
    env = sub.envelope
    assert env.sender == "alice@example.org"
    assert sorted(r.address for r in env.recipients) == [
        "bob@example.net",
        "carol@example.net",
        "dave@example.net",
    ]
    msg = email.message_from_bytes(env.data, policy=email.policy.default)
    assert msg["Subject"] == "Grüße"
    assert msg["Bcc"] is None  # Bcc recipients are in the envelope only
    assert msg["X-Campaign"] == "spring"
    assert msg["Message-ID"].endswith("@relay.test>")
    assert b"\r\n" in env.data and b"\n" not in env.data.replace(b"\r\n", b"")
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "plain body"
    html = msg.get_body(("html",))
    assert html is not None and "html body" in html.get_content()
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "a.bin"
    assert att.get_content() == b"\x00\x01binary"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mail_from": "a@x.test", "rcpt_to": ["nope"], "data": "eA=="}, "rcpt_to[0]"),
        ({"mail_from": "a@x.test", "rcpt_to": [], "data": "eA=="}, "rcpt_to"),
        ({"mail_from": "a@x.test", "rcpt_to": ["b@x.test"], "data": "%%%"}, "data"),
        ({"mail_from": "bad", "rcpt_to": ["b@x.test"], "data": "eA=="}, "mail_from"),
        ({"from": "a@x.test", "to": ["b@x.test"]}, "text"),
        ({"from": "a@x.test", "to": ["b@x.test"], "text": "t", "priority": "max"}, "priority"),
        (
            {"from": "a@x.test", "to": ["b@x.test"], "text": "t", "headers": {"To": "x"}},
            "headers.To",
        ),
        (
            {"from": "a@x.test", "to": ["b@x.test"], "text": "t", "headers": {"X": "a\r\nBcc: y"}},
            "headers.X",
        ),
        ({"from": "a@x.test", "to": ["b@x.test"], "text": "t", "metadata": {"a": 1}}, "metadata"),
        (
            {"from": "a@x.test", "to": ["b@x.test"], "text": "t", "notify": ["NEVER", "DELAY"]},
            "notify",
        ),
        ({"subject": "neither form"}, "body"),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_submission(body, hostname="relay.test", now=0)
    assert err.value.field == field


def test_fingerprint_ignores_key_order() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_bucket() -> None:
    b = Bucket(rate=2, burst=2)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.5) == 0
