"""Properties of the delivery client against whatever a server sends, and of a message's
trip from the client's dot-stuffing into intake's queue -- over real loopback sockets.

- arbitrary bytes as a server's greeting never make the client raise anything but
  ``SmtpError``, and its reply is a well-formed SMTP reply;
- any well-formed (multi-line) reply is parsed back to the same ``Reply``;
- a message sent by the client to a running intake is stored byte for byte (after
  the ``Received:`` header), bare CR and LF aside, which become CRLF.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.delivery.client import ClientOptions, RcptSpec, SmtpClient, SmtpError
from ferry.envelope import Reply
from tests.fuzz.test_intake_properties import assert_well_formed, messages
from tests.harness import ThreadedService
from tests.intake.test_server import make_config, queued

OPTIONS = ClientOptions(
    helo_name="client.test",
    tls="none",
    connect_timeout=5,
    greeting_timeout=5,
    command_timeout=5,
)


async def _session_with(payload: bytes) -> SmtpClient | SmtpError:
    """Connect to a server that sends ``payload`` and hangs up; what did connect do?"""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            client = await SmtpClient.connect("127.0.0.1", port, OPTIONS)
        except SmtpError as exc:
            return exc
        client.close()
        return client
    finally:
        server.close()
        await server.wait_closed()


reply_lines = st.lists(
    st.one_of(
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"") + b"\r\n"),
        st.builds(
            lambda code, sep, text: code + sep + text + b"\r\n",
            st.sampled_from([b"220", b"250", b"421", b"554", b"999", b"22", b"2x0"]),
            st.sampled_from([b" ", b"-", b"", b"\t"]),
            st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
        ),
    ),
    max_size=8,
)


@given(reply_lines, st.binary(max_size=20))
def test_client_survives_any_greeting(lines: list[bytes], tail: bytes) -> None:
    outcome = asyncio.run(_session_with(b"".join(lines) + tail))
    if isinstance(outcome, SmtpError):
        assert isinstance(outcome.reply, Reply)
        assert 400 <= outcome.reply.code < 600
        assert_well_formed(outcome.reply)


replies = st.builds(
    lambda code, enhanced, texts: Reply(
        code, f"{str(code)[0]}.{enhanced[0]}.{enhanced[1]}" if enhanced else None, "\n".join(texts)
    ),
    st.integers(400, 599),
    st.one_of(st.none(), st.tuples(st.integers(0, 999), st.integers(0, 999))),
    st.lists(st.text(st.sampled_from("abc XYZ.:;!<>"), max_size=20), min_size=1, max_size=5),
)


@given(replies)
def test_well_formed_replies_parse_back(reply: Reply) -> None:
    wire = "".join(line + "\r\n" for line in reply.lines()).encode()
    outcome = asyncio.run(_session_with(wire))
    assert isinstance(outcome, SmtpError)
    assert outcome.reply == reply


def test_endless_multiline_reply_is_a_protocol_error() -> None:
    outcome = asyncio.run(_session_with(b"220-x\r\n" * 1200))
    assert isinstance(outcome, SmtpError)
    assert "endless multi-line reply" in outcome.reply.text


@pytest.fixture(scope="module")
def intake(tmp_path_factory: pytest.TempPathFactory, tls_files: Any) -> Iterator[ThreadedService]:
    cfg = make_config(Path(tmp_path_factory.mktemp("fuzz")), tls_files)
    with ThreadedService(cfg) as svc:
        yield svc


async def _send(port: int, data: bytes) -> str:
    client = await SmtpClient.connect("127.0.0.1", port, OPTIONS)
    try:
        result = await client.send("s@example.org", [RcptSpec("r@example.net")], data)
    finally:
        await client.quit()
    assert result.sent and result.data_reply is not None, result
    match = re.search(r"queued as (\S+)", result.data_reply.text)
    assert match, result.data_reply
    return match.group(1)


_LINE_END = re.compile(rb"\r\n|\r|\n")
# The end of the Received: header intake prepends (RFC 5322 date, UTC).
_RECEIVED_END = re.compile(rb"; [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\r\n")


def strip_received(data: bytes) -> bytes:
    assert data.startswith(b"Received: ")
    match = _RECEIVED_END.search(data)
    assert match, data[:300]
    return data[match.end() :]


@given(messages)
def test_message_reaches_the_queue_byte_for_byte(intake: ThreadedService, message: bytes) -> None:
    qid = asyncio.run(_send(intake.port(), message))
    stored = strip_received(intake.call(intake.queue.read_message(qid)))
    expected = _LINE_END.sub(b"\r\n", message)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert stored == expected
    assert any(m.id == qid for m in queued(intake))
