"""The outbound SMTP client against real servers on loopback (tests/world MX servers,
plus a few raw asyncio servers for behaviour aiosmtpd cannot script)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult

from ferry.delivery.client import (
    ClientOptions,
    RcptSpec,
    SmtpClient,
    SmtpError,
    dot_stuff,
    xtext,
)
from tests.world import MxFactory, MxServer, WorldCA

# A body line that is a lone "." would end the data if the client forgot to stuff it.
MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
)
SENDER = "a@example.org"


def options(**kwargs: Any) -> ClientOptions:
    kwargs.setdefault("connect_timeout", 5.0)
    for name in ("greeting", "command", "data_init", "data_block", "final"):
        kwargs.setdefault(f"{name}_timeout", 5.0)
    return ClientOptions(helo_name="relay.ferry.test", **kwargs)


async def connect(mx: MxServer | Any, **kwargs: Any) -> SmtpClient:
    return await SmtpClient.connect(mx.host, mx.port, options(**kwargs))


async def connect_error(mx: MxServer | Any, **kwargs: Any) -> SmtpError:
    with pytest.raises(SmtpError) as info:
        await connect(mx, **kwargs)
    return info.value


def rcpts(*addresses: str) -> list[RcptSpec]:
    return [RcptSpec(a) for a in addresses]


# -- pure helpers ------------------------------------------------------------------


def test_dot_stuff() -> None:
    # RFC 5321 §4.5.2, including the first line; a CRLF is added when missing.
    assert dot_stuff(b".a\r\nb\r\n.\r\n..c") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert dot_stuff(b"plain\r\n") == b"plain\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    # Bare LF / CR are not line ends: normalised, so "\n.\n" cannot end the data early.
    assert dot_stuff(b"a\n.\nb\rc") == b"a\r\n..\r\nb\r\nc\r\n.\r\n"


def test_xtext() -> None:
    # RFC 3461 §4: "+" and "=" and anything outside "!".."~" become "+XX".
    assert xtext("id+1=2 x") == "id+2B1+3D2+20x"
    assert xtext("plain<id>@host") == "plain<id>@host"
    assert xtext("é") == "+C3+A9"


def test_options_repr_hides_secrets() -> None:
    text = repr(options(username="u", password="hunter2", oauth_token="tok-XYZ"))
    assert "hunter2" not in text and "tok-XYZ" not in text and "'u'" in text


# -- delivery ----------------------------------------------------------------------


async def test_plain_delivery_dot_stuffed(mx_factory: MxFactory) -> None:
    mx = mx_factory("mx1.example.test")
    client = await connect(mx)
    try:
        assert client.tls is None and client.peer_certificate_verified is None
        assert "PIPELINING" in client.extensions and client.usable
        result = await client.send(SENDER, rcpts("b@example.test", "c@example.test"), MESSAGE)
    finally:
        await client.quit()
    assert result.sent and [r.code for r in result.replies] == [250, 250]
    assert result.data_reply is not None and result.data_reply.enhanced == "2.0.0"
    assert result.stages == ["dot", "dot"] and client.transactions == 1
    [message] = mx.messages
    assert message.data == MESSAGE  # unstuffed by the server: exactly what we sent
    assert message.rcpt_tos == ("b@example.test", "c@example.test")
    assert message.mail_from == SENDER and message.helo == "relay.ferry.test"
    assert not message.tls and mx.commands[-1] == "QUIT"
    assert not client.usable


async def test_two_transactions_on_one_connection(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    client = await connect(mx)
    try:
        for i in range(2):
            result = await client.send(SENDER, rcpts(f"r{i}@example.test"), MESSAGE)
            assert result.sent
    finally:
        await client.quit()
    assert client.transactions == 2 and mx.connections == 1
    assert [m.rcpt_tos for m in mx.messages] == [("r0@example.test",), ("r1@example.test",)]
    # A completed transaction leaves the session ready for MAIL: no RSET needed.
    assert "RSET" not in mx.commands


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mixed_recipient_replies(mx_factory: MxFactory, pipelining: bool) -> None:
    mx = mx_factory(pipelining=pipelining)
    mx.on("rcpt", "550 5.1.1 no such user", rcpt="bad@example.test")
    client = await connect(mx)
    try:
        assert ("PIPELINING" in client.extensions) is pipelining
        result = await client.send(
            SENDER, rcpts("good@example.test", "bad@example.test", "fine@example.test"), MESSAGE
        )
    finally:
        await client.quit()
    assert [(r.code, r.enhanced) for r in result.replies] == [
        (250, "2.0.0"),
        (550, "5.1.1"),
        (250, "2.0.0"),
    ]
    assert result.replies[1].text == "no such user"
    assert result.stages == ["dot", "rcpt", "dot"] and result.sent
    [message] = mx.messages
    assert message.rcpt_tos == ("good@example.test", "fine@example.test")
    assert message.data == MESSAGE


@pytest.mark.parametrize("pipelining", [True, False])
async def test_all_recipients_rejected_sends_no_data(
    mx_factory: MxFactory, pipelining: bool
) -> None:
    mx = mx_factory(pipelining=pipelining)
    mx.on("rcpt", "550 5.1.1 no such user", rcpt=["x@example.test", "y@example.test"])
    client = await connect(mx)
    try:
        result = await client.send(SENDER, rcpts("x@example.test", "y@example.test"), MESSAGE)
        assert [r.code for r in result.replies] == [550, 550]
        assert result.data_reply is None and not result.sent
        assert mx.messages == [] and client.usable
        # Pipelined, DATA went out and was refused (RFC 2920 §3.1); lock-step, never sent.
        assert ("DATA" in mx.commands) is pipelining
        # The open transaction (MAIL accepted) is reset before the next one.
        again = await client.send(SENDER, rcpts("z@example.test"), MESSAGE)
    finally:
        await client.quit()
    assert again.sent and len(mx.messages) == 1
    commands = mx.commands
    assert commands.index("RSET") < commands.index("RCPT TO:<z@example.test>")


async def test_transient_failure_at_mail(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("mail", "451 4.3.0 try later", times=1)
    client = await connect(mx)
    try:
        result = await client.send(SENDER, rcpts("b@example.test", "c@example.test"), MESSAGE)
        assert [(r.code, r.enhanced) for r in result.replies] == [(451, "4.3.0")] * 2
        assert result.stages == ["mail", "mail"] and not result.sent and mx.messages == []
        # The connection stays usable: RSET, then the next transaction goes through.
        assert client.usable
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert "RSET" in mx.commands and len(mx.messages) == 1


async def test_rejection_after_the_dot(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("dot", "554 5.6.0 content rejected", times=1)
    mx.on("rcpt", "550 5.1.1 unknown", rcpt="bad@example.test")
    client = await connect(mx)
    try:
        result = await client.send(SENDER, rcpts("b@example.test", "bad@example.test"), MESSAGE)
        assert [r.code for r in result.replies] == [554, 550]
        assert result.stages == ["dot", "rcpt"] and not result.sent
        assert result.data_reply is not None and result.data_reply.code == 554
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert "RSET" not in mx.commands and len(mx.messages) == 1


# -- TLS ---------------------------------------------------------------------------


async def test_opportunistic_starttls(mx_factory: MxFactory) -> None:
    mx = mx_factory("mx1.example.test", starttls=True)
    client = await connect(mx, server_name="mx1.example.test")
    try:
        assert client.tls is not None and client.tls.startswith("TLSv1.")
        assert client.peer_certificate_verified is False  # recorded, not required
        assert client.peer_certificate and "STARTTLS" not in client.extensions
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert mx.messages[0].tls
    # RFC 3207 §4.2: EHLO again after the handshake.
    assert [c.split()[0] for c in mx.commands[:3]] == ["EHLO", "STARTTLS", "EHLO"]


async def test_plaintext_when_starttls_not_offered(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    client = await connect(mx)
    try:
        assert client.tls is None
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert not mx.messages[0].tls and "STARTTLS" not in mx.commands


async def test_required_tls_without_starttls_sends_nothing(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    error = await connect_error(mx, tls="required")
    assert (error.kind, error.stage) == ("tls", "starttls")
    assert not error.tls_handshake_failed and error.reply.enhanced == "4.7.5"
    assert not any(c.startswith("MAIL") for c in mx.commands) and mx.messages == []
    assert mx.commands[-1] == "QUIT"


async def test_verified_certificate(mx_factory: MxFactory, world_ca: WorldCA) -> None:
    mx = mx_factory("smtp.smarthost.test", starttls=True)
    verified = {"verify_certificate": True, "ca_file": str(world_ca.ca_path)}
    client = await connect(mx, tls="required", server_name="smtp.smarthost.test", **verified)
    try:
        assert client.tls and client.peer_certificate_verified is True
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()

    error = await connect_error(mx, tls="required", server_name="other.example.test", **verified)
    assert (error.kind, error.stage) == ("tls", "starttls") and error.tls_handshake_failed
    assert "certificate" in error.reply.text.lower()
    assert len(mx.messages) == 1


async def test_handshake_failure_then_retry_in_plaintext(mx_factory: MxFactory) -> None:
    mx = mx_factory("mx1.example.test", starttls=True)
    # The certificate's CA is not in the system store: verification fails.
    error = await connect_error(mx, verify_certificate=True, server_name="mx1.example.test")
    assert error.tls_handshake_failed
    client = await connect(mx, tls="none")  # what a caller may do next
    try:
        assert client.tls is None and "STARTTLS" in client.extensions
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert not mx.messages[0].tls


# -- session failures ----------------------------------------------------------------


async def test_refused(mx_factory: MxFactory) -> None:
    error = await connect_error(mx_factory.refusing())
    assert (error.kind, error.stage) == ("refused", "connect")
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.1")


async def test_421_greeting(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("greeting", "421 4.3.2 too busy")
    error = await connect_error(mx)
    assert (error.kind, error.stage) == ("reply", "greeting")
    assert (error.reply.code, error.reply.enhanced, error.reply.text) == (421, "4.3.2", "too busy")


async def test_554_greeting_gets_a_quit(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("greeting", "554 5.7.1 no service for you")
    error = await connect_error(mx)
    assert (error.kind, error.stage, error.reply.code) == ("reply", "greeting", 554)
    assert mx.commands == ["QUIT"]  # RFC 5321 §3.1


async def test_drop_mid_data(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("data", drop=True)
    client = await connect(mx)
    with pytest.raises(SmtpError) as info:
        await client.send(SENDER, rcpts("b@example.test"), MESSAGE)
    assert info.value.kind == "lost" and info.value.stage in ("data", "dot")
    assert info.value.partial == [None] and info.value.reply.enhanced == "4.4.2"
    assert not client.usable and mx.messages == []


async def test_slow_reply_times_out(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("mail", delay=5)  # the server plays slow; the client gives up first
    client = await connect(mx, command_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(SmtpError) as info:
        await client.send(SENDER, rcpts("b@example.test"), MESSAGE)
    assert (info.value.kind, info.value.stage) == ("timeout", "mail")
    assert time.monotonic() - started < 3 and not client.usable


async def test_421_mid_transaction(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("rcpt", "550 5.1.1 unknown", rcpt="bad@example.test")
    mx.on("rcpt", "421 4.3.2 shutting down", rcpt="late@example.test")
    client = await connect(mx)
    with pytest.raises(SmtpError) as info:
        await client.send(SENDER, rcpts("bad@example.test", "late@example.test"), MESSAGE)
    error = info.value
    assert (error.kind, error.stage, error.reply.code) == ("reply", "rcpt", 421)
    # The rejection already known is final; the other recipient is undecided.
    assert [r and r.code for r in error.partial] == [550, None]
    assert not client.usable and mx.messages == []


# -- extensions ----------------------------------------------------------------------


async def test_size_limit(mx_factory: MxFactory) -> None:
    mx = mx_factory(size=1000)
    client = await connect(mx)
    try:
        assert client.max_size == 1000
        big = MESSAGE + b"x" * 1000 + b"\r\n"
        result = await client.send(SENDER, rcpts("b@example.test", "c@example.test"), big)
        assert [(r.code, r.enhanced) for r in result.replies] == [(552, "5.3.4")] * 2
        assert not result.sent and result.stages == ["mail", "mail"]
        assert not any(c.startswith("MAIL") for c in mx.commands)
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert f"SIZE={len(MESSAGE)}" in mx.messages[0].mail_options


async def test_smtputf8(mx_factory: MxFactory) -> None:
    without = mx_factory(smtputf8=False)
    client = await connect(without)
    try:
        result = await client.send("pelé@example.org", rcpts("b@example.test"), MESSAGE)
    finally:
        await client.quit()
    assert [(r.code, r.enhanced) for r in result.replies] == [(553, "5.6.7")]
    assert not any(c.startswith("MAIL") for c in without.commands)

    with_utf8 = mx_factory()
    client = await connect(with_utf8)
    try:
        assert (await client.send("pelé@example.org", rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    [message] = with_utf8.messages
    assert message.mail_from == "pelé@example.org" and "SMTPUTF8" in message.mail_options


async def test_8bit_body(mx_factory: MxFactory) -> None:
    seven_bit = mx_factory(eightbitmime=False)
    client = await connect(seven_bit)
    try:
        result = await client.send(SENDER, rcpts("b@example.test"), MESSAGE, body_8bit=True)
    finally:
        await client.quit()
    assert [(r.code, r.enhanced) for r in result.replies] == [(554, "5.6.3")]

    eight_bit = mx_factory()
    client = await connect(eight_bit)
    try:
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE, body_8bit=True)).sent
    finally:
        await client.quit()
    assert "BODY=8BITMIME" in eight_bit.messages[0].mail_options


@pytest.mark.parametrize("dsn", [True, False])
async def test_dsn_parameters_only_when_advertised(mx_factory: MxFactory, dsn: bool) -> None:
    mx = mx_factory(dsn=dsn)
    spec = RcptSpec("b+x@example.test", notify="success,failure", orcpt="rfc822;b+x@example.test")
    client = await connect(mx)
    try:
        result = await client.send(SENDER, [spec], MESSAGE, envid="env+id=1", ret="hdrs")
    finally:
        await client.quit()
    assert result.sent  # a server without DSN would refuse the parameters with 555
    [message] = mx.messages
    if dsn:
        assert {"RET=HDRS", "ENVID=env+2Bid+3D1"} <= set(message.mail_options)
        assert message.rcpt_options == {
            "b+x@example.test": ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b+2Bx@example.test")
        }
    else:
        assert not any(o.startswith(("RET", "ENVID")) for o in message.mail_options)
        assert message.rcpt_options == {"b+x@example.test": ()}


# -- AUTH ----------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth(mx_factory: MxFactory, mechanism: str) -> None:
    mx = mx_factory(starttls=True, auth={"u": "p"})
    client = await connect(mx, username="u", password="p", auth_mechanisms=(mechanism,))
    try:
        assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
    finally:
        await client.quit()
    assert mx.messages[0].auth_user == "u"
    assert any(c.startswith(f"AUTH {mechanism}") for c in mx.commands)


async def test_auth_prefers_plain(mx_factory: MxFactory) -> None:
    mx = mx_factory(starttls=True, auth={"u": "p"})
    client = await connect(mx, username="u", password="p")
    await client.quit()
    assert [c.split()[:2] for c in mx.commands if c.startswith("AUTH")] == [["AUTH", "PLAIN"]]


async def test_auth_failure_keeps_the_password_secret(mx_factory: MxFactory) -> None:
    secret = "Wr0ng-Pa55word!"
    mx = mx_factory(starttls=True, auth={"u": "p"})
    for mechanism in ("PLAIN", "LOGIN"):
        error = await connect_error(mx, username="u", password=secret, auth_mechanisms=(mechanism,))
        assert (error.kind, error.stage, error.reply.code) == ("auth", "auth", 535)
        encoded = base64.b64encode(secret.encode()).decode()
        for text in (str(error), repr(error), repr(error.reply)):
            assert secret not in text and encoded not in text
    assert mx.messages == []


async def test_auth_not_offered(mx_factory: MxFactory) -> None:
    mx = mx_factory(starttls=True)
    error = await connect_error(mx, username="u", password="p")
    assert (error.kind, error.stage) == ("auth", "auth") and error.reply.is_transient


# -- raw servers: implicit TLS and XOAUTH2, pipelining on the wire, STARTTLS injection


@asynccontextmanager
async def raw_server(
    session: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    **kwargs: Any,
) -> AsyncIterator[asyncio.Server]:
    """A server on 127.0.0.1 in this test's loop running ``session`` per connection."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0, **kwargs)
    async with server:
        yield server


class _OAuthHandler:
    """aiosmtpd handler with an XOAUTH2 mechanism, recording messages."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = base64.b64decode(args[1])
        if blob == b"user=u@example.org\x01auth=Bearer tok-123\x01\x01":
            return AuthResult(success=True, auth_data=blob)
        await server.challenge_auth(b'{"status":"401"}')  # Google-style error, then 535
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content))
        return "250 2.0.0 queued"


async def test_implicit_tls_and_xoauth2(world_ca: WorldCA) -> None:
    handler = _OAuthHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="smtp.smarthost.test", auth_require_tls=False),
        "127.0.0.1",
        0,
        ssl=world_ca.server_context("smtp.smarthost.test"),
    )
    port = server.sockets[0].getsockname()[1]
    base = options(
        tls="implicit",
        verify_certificate=True,
        ca_file=str(world_ca.ca_path),
        server_name="smtp.smarthost.test",
        username="u@example.org",
    )
    async with server:
        client = await SmtpClient.connect("127.0.0.1", port, replace(base, oauth_token="tok-123"))
        try:
            assert client.tls and client.peer_certificate_verified
            assert (await client.send(SENDER, rcpts("b@example.test"), MESSAGE)).sent
        finally:
            await client.quit()
        with pytest.raises(SmtpError) as info:
            await SmtpClient.connect("127.0.0.1", port, replace(base, oauth_token="tok-bad"))
        assert (info.value.kind, info.value.reply.code) == ("auth", 535), str(info.value)
        assert "tok-bad" not in str(info.value)
    assert handler.messages == [(SENDER, ["b@example.test"], MESSAGE)]


async def test_pipelining_sends_one_group() -> None:
    """MAIL, RCPTs and DATA arrive before the server answers anything (RFC 2920)."""
    groups: list[list[bytes]] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        await reader.readuntil(b"\r\n")  # EHLO
        writer.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        group = [await reader.readuntil(b"\r\n")]
        while group[-1] != b"DATA\r\n":
            group.append(await reader.readuntil(b"\r\n"))
        groups.append(group)
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n354 go ahead\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.readuntil(b"\r\n")  # QUIT
        writer.write(b"221 2.0.0 bye\r\n")

    async with raw_server(session) as server:
        port = server.sockets[0].getsockname()[1]
        client = await SmtpClient.connect("127.0.0.1", port, options(command_timeout=2))
        try:
            result = await client.send(SENDER, rcpts("b@x.test", "c@x.test"), b"hi\r\n")
        finally:
            await client.quit()
    group = [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@x.test>", b"RCPT TO:<c@x.test>", b"DATA"]
    assert groups == [[line + b"\r\n" for line in group]]
    assert [r.code for r in result.replies] == [250, 550] and result.sent


async def test_starttls_injection_is_refused(world_ca: WorldCA) -> None:
    """Plaintext sent after the 220 to STARTTLS must not pass for encrypted replies."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        await reader.readuntil(b"\r\n")  # EHLO
        writer.write(b"250-raw.test\r\n250 STARTTLS\r\n")
        await reader.readuntil(b"\r\n")  # STARTTLS
        writer.write(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await reader.read()  # until the client hangs up

    async with raw_server(session) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(SmtpError) as info:
            await SmtpClient.connect("127.0.0.1", port, options())
    assert (info.value.kind, info.value.stage) == ("protocol", "starttls")


async def test_half_a_multiline_reply_still_times_out() -> None:
    """Lines already received are read without a timer; the deadline still holds for
    the rest of the reply."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        await reader.readuntil(b"\r\n")  # EHLO
        writer.write(b"250-raw.test\r\n250-PIPELINING\r\n")  # ... and never the last line
        await reader.read()  # until the client hangs up

    async with raw_server(session) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(SmtpError) as info:
            await SmtpClient.connect("127.0.0.1", port, options(command_timeout=0.3))
    assert (info.value.kind, info.value.stage) == ("timeout", "ehlo")
