"""The outbound SMTP client: one connection, many transactions.

Our own small client on ``asyncio.open_connection``, because delivery needs
what general-purpose clients hide: RFC 2920 pipelining of MAIL, every RCPT and
DATA in one write; one final reply per recipient; RFC 3461 DSN parameters; and
connection reuse across transactions.

Usage::

    client = await SmtpClient.connect(ip, 25, ClientOptions(helo_name="relay.example"))
    try:
        result = await client.send("a@example.org", [RcptSpec("b@example.net")], data)
    finally:
        await client.quit()

Failures come in two shapes. A reply about *recipients* (a 550 to RCPT, a 451
to MAIL, a 554 after the dot) is data: :meth:`SmtpClient.send` returns it in
:class:`TransactionResult`, one final reply per recipient. A failure of the
*session* (refused, timed out, lost, TLS, a 421, nonsense from the server)
raises :class:`SmtpError` and leaves the connection closed: the caller defers
every recipient not yet decided (``SmtpError.partial`` says which are).

Credentials never appear in exceptions, reprs or logs: ClientOptions hides
them from its repr and nothing here formats them into text.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry.config import RelayConfig
from ferry.delivery.outcomes import Stage, parse_reply_text, transport_failure_reply
from ferry.envelope import Reply
from ferry.events import ConnectionClosed, ConnectionOpened, TransactionDone, emit
from ferry.tls import describe

__all__ = [
    "ClientOptions",
    "ErrorKind",
    "RcptSpec",
    "SmtpClient",
    "SmtpError",
    "mx_options",
    "session_options",
    "TlsMode",
    "TransactionResult",
    "dot_stuff",
    "xtext",
]

TlsMode = Literal["opportunistic", "required", "none", "implicit"]
ErrorKind = Literal["refused", "timeout", "tls", "lost", "protocol", "reply", "auth"]

#: Longest reply line we accept (RFC 5321 §4.5.3.1.5 says 512; servers exceed it).
_LINE_LIMIT = 64 * 1024
#: Most lines in one multi-line reply (an EHLO has a dozen).
_MAX_REPLY_LINES = 1000
#: QUIT is a courtesy: never wait long for its 221.
_QUIT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ClientOptions:
    """How to connect and behave; one value per next hop (MX host or smart host)."""

    helo_name: str  # our hostname for EHLO/HELO
    # "opportunistic": STARTTLS whenever offered (MX delivery); "required": never
    # send in clear; "none": never TLS; "implicit": TLS from the first byte (port 465).
    tls: TlsMode = "opportunistic"
    # True for smart hosts: check chain + name (server_name) whenever TLS is
    # used; only tls="required"/"implicit" also forbid plaintext.
    verify_certificate: bool = False
    ca_file: str | None = None  # extra trust anchor, added to the system store
    server_name: str | None = None  # SNI and certificate name; default: the IP
    source_address: str | None = None  # bind here before connecting
    #: Metrics label: the smart host's name, or "mx" for direct delivery (bounded).
    group: str = "mx"
    connect_timeout: float = 30.0
    # RFC 5321 §4.5.3.2: greeting 5 min, MAIL/RCPT 5 min, DATA initiation 2 min,
    # each data block 3 min, reply to the final dot 10 min.
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_block_timeout: float = 180.0
    final_timeout: float = 600.0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # XOAUTH2 bearer token (Google, Microsoft); needs ``username``.
    oauth_token: str | None = field(default=None, repr=False)
    # AUTH mechanisms to use for username/password, in order of preference.
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")

    @property
    def wants_auth(self) -> bool:
        return self.password is not None or self.oauth_token is not None


def session_options(config: RelayConfig, **overrides: Any) -> ClientOptions:
    """The client options ``config`` asks for: our name, source address, timeouts.

    The one place the engine and the seed functions take them from; ``overrides`` set
    the rest (TLS mode, server name, credentials). RFC 5321 §4.5.3.2 asks for 5 min
    per command, 2 min for DATA initiation, 3 min per data block and 10 min for the
    reply to the final dot; ``delivery.command_timeout`` shortens them only when the
    operator asked for shorter timeouts.
    """
    d = config.delivery
    base: dict[str, Any] = {
        "helo_name": config.server.hostname,
        "source_address": d.source_address or None,
        "connect_timeout": d.connect_timeout,
        "greeting_timeout": d.command_timeout,
        "command_timeout": d.command_timeout,
        "data_init_timeout": min(d.command_timeout, 120.0),
        "data_block_timeout": min(d.command_timeout, 180.0),
        "final_timeout": 600.0 if d.command_timeout >= 300 else d.command_timeout,
    }
    base.update(overrides)
    return ClientOptions(**base)


def mx_options(
    config: RelayConfig, server_name: str, *, plain: bool = False, ca_file: str | None = None
) -> ClientOptions:
    """Options for an MX host: STARTTLS whenever offered, certificates not checked
    (RFC 7435 opportunistic security: no MX certificate can be expected to verify), or
    in clear after a failed handshake (``plain``)."""
    return session_options(
        config,
        tls="none" if plain else "opportunistic",
        verify_certificate=False,
        ca_file=ca_file,
        server_name=server_name,
    )


@dataclass(frozen=True)
class RcptSpec:
    """One recipient of a transaction with its RFC 3461 parameters."""

    address: str
    notify: str | None = None  # "SUCCESS,FAILURE", "NEVER"...; None = server default
    orcpt: str | None = None  # decoded "rfc822;addr"; sent xtext-encoded (RFC 3461 §4.2)


@dataclass
class TransactionResult:
    """What one transaction decided, recipient by recipient."""

    replies: list[Reply]  # one final reply per recipient, in the order given
    data_reply: Reply | None  # the reply to the final dot, if the data was sent
    sent: bool  # the message data was transmitted and accepted
    # Per recipient, the stage whose reply decided it ("rcpt", "mail", "data",
    # "dot"), for outcomes.classify_reply (a 552 means different things at
    # RCPT and after it, RFC 5321 §4.5.3.1.10).
    stages: list[Stage] = field(default_factory=list)


class SmtpError(Exception):
    """The session failed as a whole, not one recipient; the connection is closed.

    ``reply`` is the server's reply (kinds "reply", "auth"), or a synthetic
    451 from :func:`outcomes.transport_failure_reply` (a 454 4.7.0 of ours when
    the server offers no AUTH mechanism we can use). ``partial`` holds, per
    recipient of the transaction under way, the final reply already known
    (a rejection), or None for recipients still undecided (defer them).
    """

    def __init__(
        self,
        reply: Reply,
        stage: Stage,
        kind: ErrorKind,
        *,
        tls_handshake: bool = False,
    ) -> None:
        enhanced = f"{reply.enhanced} " if reply.enhanced else ""
        super().__init__(f"{stage} ({kind}): {reply.code} {enhanced}{' '.join(reply.text.split())}")
        self.reply = reply
        self.stage = stage
        self.kind = kind
        self._tls_handshake = tls_handshake
        self.partial: list[Reply | None] = []
        # The stage that decided each ``partial`` reply ("mail" or "rcpt").
        self.partial_stages: list[Stage] = []

    @property
    def tls_handshake_failed(self) -> bool:
        """True when the TLS handshake itself failed: the caller may retry that
        host without TLS (what Postfix does at security level "may")."""
        return self._tls_handshake


def xtext(text: str) -> str:
    """RFC 3461 §4 xtext: "!".."~" except "+" and "=" as is, other octets "+XX"."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}" for b in text.encode()
    )


_LINE_END = re.compile(rb"\r\n|\r|\n")


def dot_stuff(data: bytes) -> bytes:
    """The message as DATA content: CRLF lines, dots doubled, then "." CRLF.

    RFC 5321 §4.5.2: a line starting with "." gets another ".". A bare CR or
    LF is no line end (RFC 5321 §2.3.8) and is how SMTP smuggling slips an end
    of data past one server to another, so they become CRLF. Intake already
    does so; this is the cheap last line of defence (three counts when clean).
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_END.sub(b"\r\n", data)
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    head = b"." if stuffed.startswith(b".") else b""
    tail = b".\r\n" if not stuffed or stuffed.endswith(b"\r\n") else b"\r\n.\r\n"
    return b"".join((head, stuffed, tail))


@functools.lru_cache(maxsize=16)
def _tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client context, cached: loading the system store costs milliseconds."""
    if not verify:
        # Opportunistic TLS (RFC 7435): encrypt against passive listeners; a
        # certificate we cannot verify is still better than plaintext.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received but not yet read (StreamReader has no public accessor)."""
    return len(getattr(reader, "_buffer", b""))


def _has_line(reader: asyncio.StreamReader) -> bool:
    """A whole line is received and not yet read: reading it will not wait."""
    return b"\n" in getattr(reader, "_buffer", b"")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _unsafe(address: str) -> bool:
    """An address that would break the command line (CR, LF, NUL, controls)."""
    return _CONTROL.search(address) is not None


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) -> their parameters; the first line is the name."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        key = keyword.upper()
        if key.startswith("AUTH="):  # pre-RFC 4954 "AUTH=LOGIN PLAIN" (old Exchange)
            extensions.setdefault("AUTH", f"{keyword[5:]} {params}".strip())
        elif key:
            extensions[key] = params.strip()
    return extensions


class SmtpClient:
    """One SMTP connection carrying any number of transactions, one at a time.

    Make one with :meth:`connect`; then :meth:`send` while :attr:`usable`;
    end with :meth:`quit` (polite) or :meth:`close` (abrupt).
    """

    def __init__(
        self,
        ip: str,
        port: int,
        options: ClientOptions,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.ip = ip
        self.port = port
        self.options = options
        self._reader = reader
        self._writer = writer
        self._label = f"{options.server_name or ''}[{ip}]:{port}"
        self.extensions: dict[str, str] = {}
        self.esmtp = False  # False after a fallback to HELO
        self.tls: str | None = None
        self.peer_certificate: bytes | None = None  # DER, verified or not
        self.peer_certificate_verified: bool | None = None
        self.max_size: int | None = None
        self.transactions = 0
        self._counted = False  # ConnectionOpened emitted, ConnectionClosed not yet
        self._closed = False
        self._busy = False
        # True while a transaction may be open on the server: the next one
        # starts with RSET (RFC 5321 §4.1.1.5).
        self._needs_reset = False

    def __repr__(self) -> str:
        state = "usable" if self.usable else "closed" if self._closed else "busy"
        return f"<SmtpClient {self._label} tls={self.tls!r} {state} n={self.transactions}>"

    # -- session ---------------------------------------------------------------

    @classmethod
    async def connect(cls, ip: str, port: int, options: ClientOptions) -> SmtpClient:
        """Connect, read the greeting, EHLO, STARTTLS, EHLO again, AUTH.

        Raises SmtpError (stage "connect", "greeting", "ehlo", "starttls" or
        "auth"); the connection is then closed, after a QUIT where the server
        is still talking to us.
        """
        label = f"{options.server_name or ''}[{ip}]:{port}"
        implicit = options.tls == "implicit"
        context = _tls_context(options.verify_certificate, options.ca_file) if implicit else None
        try:
            async with asyncio.timeout(options.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    ip,
                    port,
                    limit=_LINE_LIMIT,
                    ssl=context,
                    server_hostname=(options.server_name or ip) if implicit else None,
                    local_addr=(options.source_address, 0) if options.source_address else None,
                )
        except TimeoutError:
            detail = f"{label}: no connection within {options.connect_timeout:g} s"
            raise SmtpError(
                transport_failure_reply("connect_timeout", detail), "connect", "timeout"
            ) from None
        except ssl.SSLError as exc:  # implicit TLS: the handshake failed
            reply = transport_failure_reply("tls", f"{label}: {exc}")
            raise SmtpError(reply, "connect", "tls", tls_handshake=True) from None
        except ConnectionRefusedError as exc:
            reply = transport_failure_reply("refused", f"{label}: {exc}")
            raise SmtpError(reply, "connect", "refused") from None
        except OSError as exc:  # unreachable, no route, bad source address...
            reply = transport_failure_reply("unreachable", f"{label}: {exc}")
            raise SmtpError(reply, "connect", "refused") from None
        client = cls(ip, port, options, reader, writer)
        if implicit:
            client._tls_established(context)  # type: ignore[arg-type]
        try:
            await client._open_session()
        except SmtpError:
            await client.quit()  # a no-op once the connection is gone
            raise
        except BaseException:
            client.close()
            raise
        client._counted = True  # from here its close is reported too
        emit(ConnectionOpened(label, options.group))
        return client

    async def _open_session(self) -> None:
        o = self.options
        greeting = await self._read_reply("greeting", o.greeting_timeout)
        if greeting.code != 220:
            # RFC 5321 §3.1: a 554 greeting means "no service here"; we QUIT.
            raise self._reply_error(greeting, "greeting")
        await self._hello()
        if o.tls not in ("none", "implicit"):
            if "STARTTLS" in self.extensions:
                await self._starttls()
            if o.tls == "required" and self.tls is None:
                # Never fall back to plaintext when TLS is required.
                detail = f"{self._label}: TLS required but STARTTLS not offered"
                raise SmtpError(transport_failure_reply("tls", detail), "starttls", "tls")
        if o.wants_auth:
            await self._auth()

    async def _hello(self) -> None:
        """EHLO, or HELO when EHLO is refused (RFC 5321 §3.2, §4.1.4)."""
        helo = self.options.helo_name
        reply = await self._command(f"EHLO {helo}", "ehlo")
        if reply.code == 250:
            self.esmtp, self.extensions = True, _parse_ehlo(reply)
        elif reply.is_permanent:
            reply = await self._command(f"HELO {helo}", "ehlo")
            if reply.code != 250:
                raise self._reply_error(reply, "ehlo")
            self.esmtp, self.extensions = False, {}
        else:
            raise self._reply_error(reply, "ehlo")
        size = self.extensions.get("SIZE", "")
        # RFC 1870 §4: "SIZE" alone or "SIZE 0" declares no fixed limit.
        self.max_size = int(size) if size.isdigit() and int(size) > 0 else None

    async def _starttls(self) -> None:
        """RFC 3207: STARTTLS, the handshake, then EHLO again."""
        o = self.options
        reply = await self._command("STARTTLS", "starttls")
        if reply.code != 220:
            if o.tls == "required":
                detail = f"{self._label}: STARTTLS refused: {reply.code} {reply.text}"
                raise SmtpError(transport_failure_reply("tls", detail), "starttls", "tls")
            return  # RFC 3207 §4: the client decides; opportunistic goes on in clear
        if _buffered(self._reader):
            # Bytes after the 220 arrived in clear yet would be read as if
            # protected (the STARTTLS injection attack, CVE-2011-0411).
            raise self._protocol_error("starttls", "data pipelined after the 220 to STARTTLS")
        context = _tls_context(o.verify_certificate, o.ca_file)
        try:
            async with asyncio.timeout(o.command_timeout):
                await self._writer.start_tls(context, server_hostname=o.server_name or self.ip)
        except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
            self.close()
            reply = transport_failure_reply("tls", f"{self._label}: {exc or 'handshake timed out'}")
            raise SmtpError(reply, "starttls", "tls", tls_handshake=True) from None
        self._tls_established(context)
        # RFC 3207 §4.2: forget everything learnt before TLS and ask again.
        self.extensions, self.max_size = {}, None
        await self._hello()

    def _tls_established(self, context: ssl.SSLContext) -> None:
        ssl_object = self._writer.get_extra_info("ssl_object")
        self.tls = describe(ssl_object)
        self.peer_certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        # Without verification the handshake accepts any certificate, so
        # "verified" is only ever true when verification was required.
        self.peer_certificate_verified = context.verify_mode == ssl.CERT_REQUIRED

    async def _auth(self) -> None:
        """RFC 4954 AUTH: XOAUTH2 with a token, else the first of auth_mechanisms offered."""
        o = self.options
        offered = self.extensions.get("AUTH", "").upper().split()
        user = (o.username or "").encode()
        if o.oauth_token is not None:
            mechanism = "XOAUTH2"
            token = b"user=" + user + b"\x01auth=Bearer " + o.oauth_token.encode() + b"\x01\x01"
            steps = [base64.b64encode(token)]
        else:
            mechanism = next((m for m in o.auth_mechanisms if m.upper() in offered), "")
            password = (o.password or "").encode()
            if mechanism.upper() == "PLAIN":  # RFC 4616: authzid NUL authcid NUL passwd
                steps = [base64.b64encode(b"\0" + user + b"\0" + password)]
            else:
                steps = [base64.b64encode(user), base64.b64encode(password)]
        if not mechanism or mechanism.upper() not in offered:
            wanted = "XOAUTH2" if o.oauth_token is not None else "/".join(o.auth_mechanisms)
            text = f"{self._label} offers no {wanted} authentication (AUTH {' '.join(offered)})"
            raise SmtpError(Reply(454, "4.7.0", text), "auth", "auth")
        mechanism = mechanism.upper()
        if mechanism == "LOGIN":
            reply = await self._command(b"AUTH LOGIN", "auth")
        else:  # an initial response saves a round trip (RFC 4954 §4)
            reply = await self._command(b"AUTH " + mechanism.encode() + b" " + steps[0], "auth")
            if mechanism == "XOAUTH2":
                # A 334 here carries a base64 JSON error; an empty response
                # gets the final (failure) reply.
                steps = [b""]
            # PLAIN keeps its one step: a server that ignored the initial
            # response asks for it with an empty 334.
        while reply.code == 334:
            if not steps:
                reply = await self._command(b"*", "auth")  # RFC 4954 §4: cancel
                break
            reply = await self._command(steps.pop(0), "auth")
        if reply.code != 235:
            if reply.is_success:
                raise self._protocol_error("auth", f"{reply.code} in reply to AUTH")
            raise SmtpError(reply, "auth", "auth")

    @property
    def usable(self) -> bool:
        """Open, idle, and with nothing unread (a server's idle 421 would be)."""
        return not (
            self._closed
            or self._busy
            or self._writer.is_closing()
            or self._reader.at_eof()
            or _buffered(self._reader)
        )

    async def quit(self) -> None:
        """Send QUIT, wait briefly for its reply, then close. Never raises."""
        if not self._closed and not self._writer.is_closing():
            try:
                self._writer.write(b"QUIT\r\n")
                await self._read_reply("mail", min(self.options.command_timeout, _QUIT_TIMEOUT))
            except (SmtpError, OSError):
                pass
        self.close()

    def close(self) -> None:
        """Abort the connection at once (no QUIT, no TLS close_notify)."""
        self._closed = True
        transport = self._writer.transport
        if not transport.is_closing():
            transport.abort()
        if self._counted:
            self._counted = False
            emit(ConnectionClosed(self._label, self.options.group))

    # -- transactions ------------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: Sequence[RcptSpec],
        data: bytes,
        *,
        envid: str | None = None,
        ret: str | None = None,
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> TransactionResult:
        """Run one mail transaction: MAIL, RCPT per recipient, DATA.

        Returns one final reply per recipient. Raises SmtpError when the session
        fails (timeout, lost connection, 421, protocol error); the connection
        is then closed. ``smtputf8`` is implied by a non-ASCII address.
        """
        rcpts = list(recipients)
        if not rcpts:
            raise ValueError("a transaction needs at least one recipient")
        if self._busy:
            raise RuntimeError("one transaction at a time on a connection")
        if not self.usable:
            reply = transport_failure_reply("lost", f"{self._label}: connection not usable")
            raise SmtpError(reply, "mail", "lost")
        utf8 = smtputf8 or not sender.isascii() or not all(r.address.isascii() for r in rcpts)
        refusal = self._refusal(len(data), utf8, body_8bit)
        if refusal is None and _unsafe(sender):
            refusal = Reply(553, "5.1.7", "bad sender address syntax (control character)")
        if refusal is not None:  # nothing is sent
            return TransactionResult([refusal] * len(rcpts), None, False, ["mail"] * len(rcpts))

        finals: list[Reply | None] = [None] * len(rcpts)
        stages: list[Stage] = ["rcpt"] * len(rcpts)
        active: list[int] = []
        for i, spec in enumerate(rcpts):
            if _unsafe(spec.address):
                finals[i] = Reply(553, "5.1.3", "bad recipient address syntax (control character)")
            else:
                active.append(i)
        if active:
            self._busy = True
            started = time.monotonic()
            try:
                sent, data_reply = await self._transaction(
                    self._mail_command(sender, len(data), utf8, body_8bit, envid, ret),
                    [(i, self._rcpt_command(rcpts[i])) for i in active],
                    dot_stuff(data),
                    finals,
                    stages,
                )
            except SmtpError as exc:
                exc.partial = list(finals)
                exc.partial_stages = list(stages)
                self.close()
                raise
            except BaseException:  # cancelled mid-dialogue: the state is unknown
                self.close()
                raise
            finally:
                self._busy = False
            self.transactions += 1
            emit(
                TransactionDone(
                    self._label, self.options.group, time.monotonic() - started, len(active)
                )
            )
        else:
            sent, data_reply = False, None
        assert all(r is not None for r in finals)
        return TransactionResult(finals, data_reply, sent, stages)  # type: ignore[arg-type]

    def _refusal(self, size: int, utf8: bool, body_8bit: bool) -> Reply | None:
        """A permanent reply for every recipient when this server cannot take the message."""
        if self.max_size is not None and size > self.max_size:
            # RFC 1870 §6.1: don't send what the server declared too big.
            text = f"message size {size} exceeds the fixed limit {self.max_size} of {self._label}"
            return Reply(552, "5.3.4", text)
        if utf8 and "SMTPUTF8" not in self.extensions:
            # RFC 6531 §3.4: a message that needs SMTPUTF8 must not be sent to a
            # server that lacks it; X.6.7 "non-ASCII addresses not permitted".
            return Reply(553, "5.6.7", f"{self._label} does not support SMTPUTF8")
        if body_8bit and "8BITMIME" not in self.extensions:
            # RFC 6152 §3: 8-bit data only to a server that offers 8BITMIME. We
            # don't downgrade to 7 bit (it would break DKIM signatures): X.6.3
            # "conversion required but not supported" (RFC 3463).
            return Reply(554, "5.6.3", f"conversion required: {self._label} lacks 8BITMIME")
        return None

    def _mail_command(
        self,
        sender: str,
        size: int,
        utf8: bool,
        body_8bit: bool,
        envid: str | None,
        ret: str | None,
    ) -> str:
        ext = self.extensions
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={size}")  # RFC 1870 §5
        if body_8bit and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")  # RFC 6152 §2
        if utf8:
            params.append("SMTPUTF8")  # RFC 6531 §3.4
        if "DSN" in ext:  # RFC 3461 §4: DSN parameters only to a server that offers DSN
            if ret:
                params.append(f"RET={ret.upper()}")  # RFC 3461 §4.3
            if envid:
                params.append(f"ENVID={xtext(envid)}")  # RFC 3461 §4.4
        return " ".join([f"MAIL FROM:<{sender}>", *params])

    def _rcpt_command(self, spec: RcptSpec) -> str:
        params = []
        if "DSN" in self.extensions:
            if spec.notify:
                params.append(f"NOTIFY={spec.notify.upper().replace(' ', '')}")  # RFC 3461 §4.1
            if spec.orcpt:
                # RFC 3461 §4.2: ORCPT=addr-type ";" xtext(address)
                addr_type, sep, address = spec.orcpt.partition(";")
                if not sep:
                    addr_type, address = "rfc822", spec.orcpt
                params.append(f"ORCPT={addr_type.strip()};{xtext(address.strip())}")
        return " ".join([f"RCPT TO:<{spec.address}>", *params])

    async def _transaction(
        self,
        mail: str,
        rcpts: list[tuple[int, str]],
        stuffed: bytes,
        finals: list[Reply | None],
        stages: list[Stage],
    ) -> tuple[bool, Reply | None]:
        """The dialogue; fills ``finals``/``stages``; returns (sent, reply to the dot)."""
        o = self.options
        pipelined = "PIPELINING" in self.extensions
        reset, self._needs_reset = self._needs_reset, True  # until the dot's reply
        if pipelined:
            # RFC 2920 §3.1: RSET, MAIL and RCPT may be grouped, with DATA last
            # in the group; then every reply is read, in order.
            self._write([*(["RSET"] if reset else []), mail, *(c for _, c in rcpts), "DATA"])
        elif reset:
            self._write(["RSET"])
        if reset:
            await self._expect_rset()
        if not pipelined:
            self._write([mail])
        mail_reply = await self._read_reply("mail", o.command_timeout)
        mail_ok = mail_reply.code // 100 == 2
        if mail_reply.code // 100 == 3:
            raise self._protocol_error("mail", f"{mail_reply.code} in reply to MAIL")
        if not mail_ok:  # the MAIL reply decides every recipient
            for i, _ in rcpts:
                finals[i], stages[i] = mail_reply, "mail"
        accepted: list[int] = []
        if mail_ok or pipelined:
            for i, command in rcpts:
                if not pipelined:
                    self._write([command])
                reply = await self._read_reply("rcpt", o.command_timeout)
                if not mail_ok:
                    continue  # a pipelined RCPT after a failed MAIL: 503, ignored
                if reply.code // 100 == 2:
                    accepted.append(i)
                elif reply.code // 100 == 3:
                    raise self._protocol_error("rcpt", f"{reply.code} in reply to RCPT")
                else:
                    finals[i] = reply  # final now, even if the session fails later
        data_reply: Reply | None = None
        if pipelined:
            data_reply = await self._read_reply("data", o.data_init_timeout)
        elif accepted:
            data_reply = await self._command("DATA", "data", o.data_init_timeout)
        if not accepted:
            # RFC 2920 §3.1: the pipelined DATA should have been refused (503/554,
            # ignored); if a server accepted it anyway, a lone dot ends it. The
            # next transaction starts with RSET.
            if data_reply is not None and data_reply.code == 354:
                await self._lone_dot()
            return False, None
        assert data_reply is not None
        if data_reply.code != 354:
            if data_reply.code // 100 in (2, 3):
                raise self._protocol_error("data", f"{data_reply.code} in reply to DATA")
            for i in accepted:
                finals[i], stages[i] = data_reply, "data"
            return False, None

        self._writer.write(stuffed)  # one write: already dot-stuffed and terminated
        await self._drain("data", o.data_block_timeout)
        dot_reply = await self._read_reply("dot", o.final_timeout)
        # RFC 5321 §4.1.1.4: the reply to the dot ends the transaction, whatever
        # it says: the session is ready for the next MAIL without RSET (§3.3).
        self._needs_reset = dot_reply.code // 100 == 3
        for i in accepted:
            finals[i], stages[i] = dot_reply, "dot"
        return dot_reply.code // 100 == 2, dot_reply

    async def _expect_rset(self) -> None:
        reply = await self._read_reply("mail", self.options.command_timeout)
        if reply.code // 100 != 2:
            raise self._reply_error(reply, "mail")

    async def _lone_dot(self) -> None:
        """End a DATA a server accepted with no valid recipient (RFC 2920 §3.1)."""
        self._writer.write(b".\r\n")
        await self._read_reply("dot", self.options.final_timeout)

    # -- wire ----------------------------------------------------------------------

    def _write(self, commands: list[str]) -> None:
        self._writer.write("".join(c + "\r\n" for c in commands).encode())

    async def _command(
        self, command: str | bytes, stage: Stage, timeout: float | None = None
    ) -> Reply:
        line = command.encode() if isinstance(command, str) else command
        self._writer.write(line + b"\r\n")
        if timeout is None:
            timeout = self.options.command_timeout
        return await self._read_reply(stage, timeout)

    async def _drain(self, stage: Stage, timeout: float) -> None:
        """Wait until the kernel took our data; time out only after ``timeout``
        seconds *without progress* (RFC 5321 §4.5.3.2.5 times each block, so a
        big message on a slow link is not cut off)."""
        transport = self._writer.transport
        if not transport.get_write_buffer_size() and not transport.is_closing():
            # The kernel took it all already (a small message, a fast peer): nothing to
            # wait for, and no task to make. A lost connection shows at the next read.
            return
        drain = asyncio.ensure_future(self._writer.drain())
        try:
            while True:
                before = transport.get_write_buffer_size()
                done, _ = await asyncio.wait({drain}, timeout=timeout)
                if done:
                    drain.result()
                    return
                if transport.get_write_buffer_size() >= before:
                    self.close()
                    detail = f"{self._label}: data not taken within {timeout:g} s"
                    raise SmtpError(transport_failure_reply("timeout", detail), stage, "timeout")
        except OSError as exc:  # ConnectionResetError and friends
            self.close()
            raise SmtpError(
                transport_failure_reply("lost", f"{self._label}: {exc}"), stage, "lost"
            ) from None
        finally:
            drain.cancel()

    async def _read_reply(self, stage: Stage, timeout: float) -> Reply:
        """Read one (multi-line) reply; a 421 closes the connection and raises."""
        code = ""
        texts: list[str] = []
        reader = self._reader
        deadline: float | None = None
        try:
            while True:
                if _has_line(reader):
                    # Pipelined replies often arrive together: a line already here needs
                    # no timer (one per reply was a measurable share of a transaction).
                    raw = await reader.readuntil(b"\n")
                else:
                    if deadline is None:
                        deadline = asyncio.get_running_loop().time() + timeout
                    async with asyncio.timeout_at(deadline):
                        raw = await reader.readuntil(b"\n")
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                head, sep = line[:3], line[3:4]
                if not (head.isascii() and head.isdigit()) or sep not in ("", " ", "-"):
                    raise self._protocol_error(stage, f"malformed reply line {line[:80]!r}")
                if code and head != code:
                    raise self._protocol_error(stage, "reply code changed mid-reply")
                code = head
                texts.append(line[4:])
                if sep != "-":
                    break
                if len(texts) >= _MAX_REPLY_LINES:
                    raise self._protocol_error(stage, "endless multi-line reply")
        except TimeoutError:
            self.close()
            detail = f"{self._label}: no reply at {stage} within {timeout:g} s"
            raise SmtpError(transport_failure_reply("timeout", detail), stage, "timeout") from None
        except asyncio.LimitOverrunError:
            raise self._protocol_error(stage, "reply line too long") from None
        except (asyncio.IncompleteReadError, OSError) as exc:
            self.close()
            what = "connection closed" if isinstance(exc, asyncio.IncompleteReadError) else exc
            reply = transport_failure_reply("lost", f"{self._label}: {what} at {stage}")
            raise SmtpError(reply, stage, "lost") from None
        reply = parse_reply_text(int(code), texts)
        if not 200 <= reply.code < 600:
            raise self._protocol_error(stage, f"reply code {reply.code}")
        if reply.code == 421:
            # RFC 5321 §3.8: 421 means the server is closing the channel.
            self.close()
            raise SmtpError(reply, stage, "reply")
        return reply

    def _protocol_error(self, stage: Stage, detail: str) -> SmtpError:
        self.close()
        reply = transport_failure_reply("protocol", f"{self._label}: {detail}")
        return SmtpError(reply, stage, "protocol")

    def _reply_error(self, reply: Reply, stage: Stage) -> SmtpError:
        """The error for a reply that ends the session: a failure, or nonsense."""
        if reply.code < 400:
            return self._protocol_error(stage, f"unexpected {reply.code} at {stage}")
        return SmtpError(reply, stage, "reply")
