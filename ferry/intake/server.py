"""Intake: the inbound SMTP server.

A small asyncio protocol of our own rather than aiosmtpd: we need enhanced status codes
on every reply, RFC 3461 DSN and RFC 6710 MT-PRIORITY parameters, DATA read in bulk
(aiosmtpd reads bodies line by line: ~475 msgs/s at 100 KB), replies to pipelined
commands flushed in one write, and a strict end-of-data rule against SMTP smuggling.
Parsing lives in ``commands.py`` and ``message.py`` as pure functions; this module
only moves bytes and calls policy, auth and the queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from ferry.config import Listener, RelayConfig
from ferry.durations import parse_duration
from ferry.envelope import EnvelopeIn, Priority, RecipientIn, Reply
from ferry.events import emit
from ferry.intake.aliases import AliasTable
from ferry.intake.commands import (
    CommandError,
    check_mailbox,
    decode_xtext,
    parse_mt_priority,
    parse_notify,
    parse_orcpt,
    parse_path_arg,
)
from ferry.intake.policy import RcptDecision, RelayPolicy, decide_rcpt
from ferry.intake.throttle import AuthThrottle
from ferry.intake.users import UserDB
from ferry.message import (
    MAX_HOPS,
    count_received,
    header_block,
    message_id,
    priority_from_headers,
    protocol_name,
    received_header,
)
from ferry.queue.base import Queue, new_queue_id
from ferry.tls import describe

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
COMMAND_LINE_LIMIT = 512
# RFC 4954 §4: an AUTH response line may be longer (12288 octets is the usual bound).
AUTH_LINE_LIMIT = 12288


async def run_hook(hook: Callable[[EnvelopeIn], Awaitable[None]], envelope: EnvelopeIn) -> None:
    """An embedder's before-queue hook: it may set priority or route; if it raises, the
    message is queued as it was (a hook must never lose mail)."""
    try:
        await hook(envelope)
    except Exception:
        logging.getLogger("ferry.intake").exception("before_queue hook failed; queuing as is")


class _Closed(Exception):
    """The client went away (or we closed the connection)."""


@dataclass(slots=True)
class _Transaction:
    sender: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[RecipientIn] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    rcpt_attempts: int = 0
    smtputf8: bool = False
    body_8bit: bool = False
    priority: Priority | None = None
    envid: str | None = None
    ret: str | None = None


class IntakeServer:
    """Listens on every configured listener and feeds accepted mail to the queue."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        *,
        ssl_context: ssl.SSLContext | None,
        users: UserDB | None = None,
        on_accept: Callable[[str], None] | None = None,
        before_queue: Callable[[EnvelopeIn], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.ssl_context = ssl_context
        self.users = users or UserDB(config.server.users_file)
        s = config.server
        self.policy = RelayPolicy.build(s.local_domains, s.relay_domains, s.relay_networks)
        self.aliases = AliasTable(config.aliases, s.local_domains)
        self.throttle = AuthThrottle()
        self.lifetime = parse_duration(config.delivery.message_lifetime)
        self.on_accept = on_accept
        self.before_queue = before_queue
        self.servers: list[asyncio.Server] = []
        self.connections: set[SmtpConnection] = set()
        self.per_ip: dict[str, int] = {}
        self.accepted = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.config.server.listen:
            ssl_ctx = self.ssl_context if listener.mode == "smtps" else None
            if listener.mode == "smtps" and ssl_ctx is None:
                raise RuntimeError("smtps listener needs a TLS certificate")
            server = await loop.create_server(
                lambda listener=listener: SmtpConnection(self, listener),
                host=listener.address,
                port=listener.port,
                ssl=ssl_ctx,
                reuse_address=True,
                backlog=1024,
            )
            self.servers.append(server)
            for sock in server.sockets:
                emit(
                    "listen",
                    address=sock.getsockname()[0],
                    port=sock.getsockname()[1],
                    mode=listener.mode,
                )

    def bound(self) -> list[tuple[str, int, str]]:
        """(address, port, mode) actually bound -- useful when port 0 was configured."""
        out: list[tuple[str, int, str]] = []
        for server, listener in zip(self.servers, self.config.server.listen, strict=True):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((str(host), int(port), str(listener.mode)))
        return out

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()


class SmtpConnection(asyncio.Protocol):
    """One client connection: a byte buffer plus a coroutine running the dialogue."""

    def __init__(self, server: IntakeServer, listener: Listener) -> None:
        self.server = server
        self.cfg = server.config.server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer_ip: str = "unknown"
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None
        self.auth_user: str | None = None
        self.user_priority: Priority | None = None
        self.txn = _Transaction()
        self.errors = 0
        # In every log line about this connection (and the messages it hands over).
        self.session_id = secrets.token_hex(5)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "unknown"
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            self.tls = describe(ssl_obj)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.transport = None
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.task is not None:
            self.task.cancel()

    # -- I/O primitives ----------------------------------------------------------

    def reply(self, code: int, enhanced: str | None, text: str) -> None:
        self.out.append((str(Reply(code, enhanced, text)) + "\r\n").encode())

    def send(self, reply: Reply) -> None:
        self.out.append((str(reply) + "\r\n").encode())

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    async def _wait(self, timeout: float) -> None:
        """Wait for more input. Replies queued so far go out first (RFC 2920 batching)."""
        self.flush()
        if self.eof:
            raise _Closed
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, timeout)
        except TimeoutError:
            self.reply(421, "4.4.2", f"{self.cfg.hostname} Error: timeout exceeded")
            self.close()
            raise _Closed from None
        finally:
            self.waiter = None

    async def readline(self, limit: int = COMMAND_LINE_LIMIT) -> bytes | None:
        """One line without its line ending; None when the line was over ``limit``."""
        too_long = False
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[: nl + 1])
                del self.buf[: nl + 1]
                if too_long or len(line) > limit:
                    return None
                return line.rstrip(b"\r\n")
            if len(self.buf) > limit:
                # Keep reading until the end of this line, then report it as too long.
                too_long = True
                self.buf.clear()
            await self._wait(self.cfg.command_timeout)

    async def read_data(self, limit: int) -> tuple[bytes | None, int]:
        """Read a DATA body up to <CRLF>.<CRLF> (RFC 5321 §4.1.1.4).

        Returns (raw body with dot-stuffing still in place and its final CRLF, or
        None when larger than ``limit``; total size). Only CRLF.CRLF ends the data:
        a dot line after a bare LF or bare CR never does (SMTP smuggling,
        CVE-2023-51764).
        """
        discarded = 0
        scan = 0
        while True:
            if discarded == 0 and self.buf.startswith(b".\r\n"):
                del self.buf[:3]
                return b"", 0
            idx = self.buf.find(b"\r\n.\r\n", scan)
            if idx >= 0:
                size = discarded + idx + 2
                if discarded:
                    del self.buf[: idx + 5]
                    return None, size
                raw = bytes(self.buf[: idx + 2])
                del self.buf[: idx + 5]
                return (raw if size <= limit else None), size
            if len(self.buf) > limit + 8:
                # Too large: stop keeping it, but keep reading to the terminator. The last
                # four bytes stay so a terminator spanning two reads is still found.
                discarded += len(self.buf) - 4
                del self.buf[:-4]
            scan = max(0, len(self.buf) - 4)
            await self._wait(self.cfg.data_timeout)

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # -- the dialogue ------------------------------------------------------------

    async def _run(self) -> None:
        srv = self.server
        count = srv.per_ip.get(self.peer_ip, 0)
        try:
            if len(srv.connections) >= self.cfg.max_connections:
                self.reply(421, "4.7.0", f"{self.cfg.hostname} Too many connections, try later")
                emit(
                    "reject",
                    session=self.session_id,
                    client=self.peer_ip,
                    code=421,
                    reason="max_connections",
                )
                self.close()
                return
            if count >= self.cfg.max_connections_per_ip:
                self.reply(421, "4.7.0", f"{self.cfg.hostname} Too many connections from you")
                emit(
                    "reject",
                    session=self.session_id,
                    client=self.peer_ip,
                    code=421,
                    reason="max_connections_per_ip",
                )
                self.close()
                return
            srv.connections.add(self)
            srv.per_ip[self.peer_ip] = count + 1
            emit(
                "connect",
                session=self.session_id,
                client=self.peer_ip,
                mode=self.listener.mode,
                tls=self.tls,
            )
            self.reply(220, None, f"{self.cfg.hostname} ESMTP Ferry")
            await self._dialogue()
        except (_Closed, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            logging.getLogger("ferry.intake").exception("session error")
            self.reply(421, "4.3.0", "Internal error, closing connection")
            self.close()
        finally:
            if self in srv.connections:
                srv.connections.discard(self)
                left = srv.per_ip.get(self.peer_ip, 1) - 1
                if left <= 0:
                    srv.per_ip.pop(self.peer_ip, None)
                else:
                    srv.per_ip[self.peer_ip] = left
            if self.transport is not None:
                self.flush()
                self.transport.close()
            emit("disconnect", level=logging.DEBUG, session=self.session_id, client=self.peer_ip)

    async def _dialogue(self) -> None:
        handlers: dict[str, Callable[[str | None], Any]] = {
            "EHLO": self.smtp_EHLO,
            "HELO": self.smtp_HELO,
            "MAIL": self.smtp_MAIL,
            "RCPT": self.smtp_RCPT,
            "DATA": self.smtp_DATA,
            "RSET": self.smtp_RSET,
            "NOOP": self.smtp_NOOP,
            "QUIT": self.smtp_QUIT,
            "STARTTLS": self.smtp_STARTTLS,
            "AUTH": self.smtp_AUTH,
            "VRFY": self.smtp_VRFY,
            "HELP": self.smtp_HELP,
        }
        while self.transport is not None:
            line = await self.readline()
            if line is None:
                self.error(500, "5.5.2", "Error: command line too long")
                continue
            verb_b, _, arg_b = line.partition(b" ")
            verb = verb_b.decode("ascii", "replace").upper()
            arg = arg_b.decode("utf-8", "surrogateescape").strip() or None
            handler = handlers.get(verb)
            if handler is None:
                self.error(500, "5.5.2", "Error: command not recognized")
                continue
            if (
                self.listener.mode == "submission"
                and self.tls is None
                and verb not in ("EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET")
                and self.server.ssl_context is not None
            ):
                # RFC 3207 §4: a server may require TLS before other commands.
                self.error(530, "5.7.0", "Must issue a STARTTLS command first")
                continue
            result = handler(arg)
            if asyncio.iscoroutine(result):
                await result

    def error(self, code: int, enhanced: str, text: str) -> None:
        self.reply(code, enhanced, text)
        self.errors += 1
        if self.errors >= self.cfg.max_errors:
            self.reply(421, "4.7.0", f"{self.cfg.hostname} Too many errors, closing connection")
            emit(
                "reject",
                session=self.session_id,
                client=self.peer_ip,
                code=421,
                reason="too many errors",
            )
            self.close()
            raise _Closed

    def reject(self, reply: Reply, **fields: Any) -> None:
        emit(
            "reject",
            session=self.session_id,
            client=self.peer_ip,
            code=reply.code,
            status=reply.enhanced,
            reason=reply.text,
            **fields,
        )
        self.error(reply.code, reply.enhanced or "", reply.text)

    # -- commands ----------------------------------------------------------------

    def _auth_offered(self) -> bool:
        # RFC 4954 §4: never offer plain-text passwords over an unencrypted channel.
        return self.tls is not None or self.server.ssl_context is None

    def smtp_EHLO(self, arg: str | None) -> None:
        if not arg:
            self.error(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self.helo, self.esmtp = arg, True
        self.txn = _Transaction()
        lines = [
            f"{self.cfg.hostname}",
            "PIPELINING",
            f"SIZE {self.cfg.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "MT-PRIORITY MIXER",
        ]
        if self.tls is None and self.server.ssl_context is not None:
            lines.append("STARTTLS")
        if self._auth_offered() and self.auth_user is None:
            lines.append("AUTH PLAIN LOGIN")
        self.send(Reply(250, None, "\n".join(lines)))

    def smtp_HELO(self, arg: str | None) -> None:
        if not arg:
            self.error(501, "5.5.4", "Syntax: HELO hostname")
            return
        self.helo, self.esmtp = arg, False
        self.txn = _Transaction()
        self.reply(250, None, self.cfg.hostname)

    def smtp_NOOP(self, arg: str | None) -> None:
        self.reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, arg: str | None) -> None:
        self.txn = _Transaction()
        self.reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, arg: str | None) -> None:
        self.reply(221, "2.0.0", "Bye")
        self.close()
        raise _Closed

    def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 §3.5.3: 252 = cannot verify, but will accept and try.
        self.reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, arg: str | None) -> None:
        self.reply(
            214,
            "2.0.0",
            "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT"
            " STARTTLS AUTH VRFY HELP",
        )

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.server.ssl_context is None or self.tls is not None:
            self.error(502, "5.5.1", "Error: STARTTLS not available")
            return
        if arg:
            self.error(501, "5.5.4", "Syntax: STARTTLS")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        self.flush()
        transport = self.transport
        assert transport is not None
        # RFC 3207 §4.2 (and CVE-2011-0411): anything pipelined after STARTTLS in
        # plain text is discarded, never executed inside the TLS session. Reading
        # stops now, so nothing can slip in before the TLS layer takes over.
        transport.pause_reading()
        self.buf.clear()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await asyncio.wait_for(
                loop.start_tls(transport, self, self.server.ssl_context, server_side=True),
                self.cfg.command_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            emit(
                "tls_failed",
                level=logging.WARNING,
                session=self.session_id,
                client=self.peer_ip,
                error=str(exc)[:200],
            )
            transport.abort()
            self.transport = None
            raise _Closed from None
        if new_transport is None:
            raise _Closed
        self.transport = new_transport
        self.tls = describe(new_transport.get_extra_info("ssl_object"))
        # RFC 3207 §4.2: the session starts over; the client must EHLO again.
        self.helo, self.esmtp = None, False
        self.txn = _Transaction()
        emit("tls", session=self.session_id, client=self.peer_ip, tls=self.tls)

    async def smtp_AUTH(self, arg: str | None) -> None:
        if self.helo is None or not self.esmtp:
            self.error(503, "5.5.1", "Error: send EHLO first")
            return
        if self.auth_user is not None:
            self.error(503, "5.5.1", "Error: already authenticated")
            return
        if self.txn.sender is not None:
            self.error(503, "5.5.1", "Error: AUTH not permitted during a mail transaction")
            return
        if not self._auth_offered():
            # RFC 4954 §6
            self.error(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return
        mech, _, initial = (arg or "").partition(" ")
        mech = mech.upper()
        initial = initial.strip()
        try:
            if mech == "PLAIN":
                blob = initial if initial else await self._challenge("")
                raw = _b64decode(blob)
                parts = raw.split(b"\0")
                if len(parts) != 3:
                    raise CommandError(501, "5.5.2", "Cannot decode AUTH PLAIN response")
                _authzid, username_b, password_b = parts
            elif mech == "LOGIN":
                user_blob = initial if initial else await self._challenge("VXNlcm5hbWU6")
                username_b = _b64decode(user_blob)
                password_b = _b64decode(await self._challenge("UGFzc3dvcmQ6"))
            else:
                self.error(504, "5.5.4", "Unrecognized authentication type")
                return
            username = username_b.decode("utf-8")
            password = password_b.decode("utf-8")
        except CommandError as exc:
            self.reject(exc.reply)
            return
        except UnicodeDecodeError:
            self.error(501, "5.5.2", "Cannot decode AUTH response (not UTF-8)")
            return
        delay = self.server.throttle.delay_for(self.peer_ip, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)  # slow down password guessing, not a sync point
        record = await self.server.users.averify(username, password)
        if record is None:
            failures = self.server.throttle.record_failure(self.peer_ip, time.monotonic())
            emit(
                "auth",
                level=logging.WARNING,
                session=self.session_id,
                client=self.peer_ip,
                user=username[:64],
                mechanism=mech,
                result="fail",
                failures=failures,
            )
            self.error(535, "5.7.8", "Authentication credentials invalid")
            return
        self.server.throttle.record_success(self.peer_ip)
        self.auth_user = record.name
        self.user_priority = record.priority
        emit(
            "auth",
            session=self.session_id,
            client=self.peer_ip,
            user=record.name,
            mechanism=mech,
            result="ok",
        )
        self.reply(235, "2.7.0", "Authentication successful")

    async def _challenge(self, prompt: str) -> str:
        self.reply(334, None, prompt)
        line = await self.readline(AUTH_LINE_LIMIT)
        if line is None:
            raise CommandError(500, "5.5.6", "Authentication exchange line is too long")
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            raise CommandError(501, "5.0.0", "Authentication cancelled")
        return text

    def smtp_MAIL(self, arg: str | None) -> None:
        # Like Postfix (smtpd_helo_required = no), MAIL without HELO is tolerated:
        # printers and old scripts do it, and refusing buys nothing.
        if self.listener.mode == "submission" and self.auth_user is None:
            self.reject(Reply(530, "5.7.0", "Authentication required"))
            return
        if self.txn.sender is not None:
            self.error(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            path = parse_path_arg(arg, "FROM", smtputf8_offered=True)
            txn = _Transaction(sender=path.address, params=path.params)
            self._mail_params(txn, path.params)
            if path.address:
                problem = check_mailbox(path.address, utf8=txn.smtputf8)
                if problem:
                    raise CommandError(501, "5.1.7", f"Bad sender address syntax: {problem}")
        except CommandError as exc:
            self.reject(exc.reply, command="MAIL")
            return
        self.txn = txn
        self.reply(250, "2.1.0", "Ok")

    def _mail_params(self, txn: _Transaction, params: dict[str, str | None]) -> None:
        for key, value in params.items():
            if key == "SIZE":
                if not value or not value.isdigit():
                    raise CommandError(501, "5.5.4", "SIZE requires a number")
                if int(value) > self.cfg.max_message_size:
                    # RFC 1870 §6
                    raise CommandError(552, "5.3.4", "Message size exceeds fixed maximum")
            elif key == "BODY":
                v = (value or "").upper()
                if v not in ("7BIT", "8BITMIME"):
                    raise CommandError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                txn.body_8bit = v == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    raise CommandError(501, "5.5.4", "SMTPUTF8 takes no value")
                txn.smtputf8 = True
            elif key == "RET":
                v = (value or "").upper()
                if v not in ("FULL", "HDRS"):
                    raise CommandError(501, "5.5.4", "RET must be FULL or HDRS")
                txn.ret = v
            elif key == "ENVID":
                envid = decode_xtext(value or "")
                if not envid or len(value or "") > 100:  # RFC 3461 §4.4
                    raise CommandError(501, "5.5.4", "Bad ENVID")
                txn.envid = envid
            elif key == "MT-PRIORITY":
                txn.priority = Priority.from_mt_priority(parse_mt_priority(value))
            elif key == "AUTH":
                pass  # RFC 4954 §5: accepted; we do not trust a client's AUTH= claim
            else:
                # RFC 5321 §4.1.1.11
                raise CommandError(
                    555, "5.5.4", f"MAIL FROM parameter {key} not recognized or not implemented"
                )
        if any(not c.isascii() for c in txn.sender or "") and not txn.smtputf8:
            raise CommandError(553, "5.6.7", "Non-ASCII sender requires SMTPUTF8")

    def smtp_RCPT(self, arg: str | None) -> None:
        txn = self.txn
        if txn.sender is None:
            self.error(503, "5.5.1", "Error: need MAIL command")
            return
        txn.rcpt_attempts += 1
        try:
            path = parse_path_arg(arg, "TO", smtputf8_offered=True)
            problem = check_mailbox(path.address, utf8=txn.smtputf8)
            if problem:
                if not path.address.isascii() and not txn.smtputf8:
                    # RFC 6531 §3.5
                    raise CommandError(553, "5.6.7", "Non-ASCII recipient requires SMTPUTF8")
                raise CommandError(501, "5.1.3", f"Bad recipient address syntax: {problem}")
            notify = orcpt = None
            for key, value in path.params.items():
                if key == "NOTIFY":
                    notify = parse_notify(value)
                elif key == "ORCPT":
                    orcpt = parse_orcpt(value)
                else:
                    raise CommandError(
                        555, "5.5.4", f"RCPT TO parameter {key} not recognized or not implemented"
                    )
        except CommandError as exc:
            self.reject(exc.reply, command="RCPT")
            return
        address = path.address
        if len(txn.recipients) >= self.cfg.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452, and the client sends the rest later.
            self.reject(Reply(452, "4.5.3", "Error: too many recipients"), rcpt=address)
            return
        domain = address.rpartition("@")[2].lower().rstrip(".")
        decision = decide_rcpt(
            self.server.policy,
            recipient_domain=domain,
            client_ip=self.peer_ip,
            authenticated=self.auth_user is not None,
        )
        if decision is RcptDecision.DENIED:
            self.reject(Reply(554, "5.7.1", f"<{address}>: Relay access denied"), rcpt=address)
            return
        if decision is RcptDecision.LOCAL:
            targets = self.server.aliases.expand(address)
            if not targets:
                self.reject(
                    Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown"),
                    rcpt=address,
                )
                return
            # RFC 3461 §4.2: keep the address the client gave as the original recipient.
            orcpt = orcpt or f"rfc822;{address}"
        else:
            targets = [address]
        for target in targets:
            key = target.lower()
            if key in txn.seen:
                continue
            txn.seen.add(key)
            txn.recipients.append(RecipientIn(target, orcpt=orcpt, notify=notify))
        self.reply(250, "2.1.5", "Ok")

    async def smtp_DATA(self, arg: str | None) -> None:
        txn = self.txn
        if arg:
            self.error(501, "5.5.4", "Syntax: DATA")
            return
        if txn.sender is None:
            self.error(503, "5.5.1", "Error: need MAIL command")
            return
        if not txn.recipients:
            if txn.rcpt_attempts:
                # RFC 2920 §3.1: pipelined DATA after every RCPT failed.
                self.error(554, "5.5.1", "Error: no valid recipients")
            else:
                self.error(503, "5.5.1", "Error: need RCPT command")
            return
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")
        raw, size = await self.read_data(self.cfg.max_message_size)
        self.txn = _Transaction()
        if raw is None:
            self.reject(Reply(552, "5.3.4", "Error: message too big"), size=size)
            return
        data = self._check_body(raw)
        if isinstance(data, Reply):
            self.reject(data, size=size)
            return
        block = header_block(data)
        if count_received(block) > MAX_HOPS:
            self.reject(Reply(554, "5.4.6", "Error: too many hops (mail loop?)"), size=size)
            return
        # Priority.LOW is 0, so test for None rather than truthiness.
        candidates = (txn.priority, priority_from_headers(block), self.user_priority)
        priority = next((p for p in candidates if p is not None), Priority.NORMAL)
        qid = new_queue_id()
        now = time.time()
        protocol = protocol_name(
            esmtp=self.esmtp,
            tls=self.tls is not None,
            auth=self.auth_user is not None,
            utf8=txn.smtputf8,
        )
        received = received_header(
            helo=self.helo,
            client_ip=self.peer_ip,
            hostname=self.cfg.hostname,
            protocol=protocol,
            queue_id=qid,
            recipient=txn.recipients[0].address if len(txn.recipients) == 1 else None,
            tls=self.tls,
            now=now,
        )
        envelope = EnvelopeIn(
            sender=txn.sender or "",
            recipients=txn.recipients,
            data=received + data,
            priority=priority,
            client_address=self.peer_ip,
            client_helo=self.helo,
            auth_user=self.auth_user,
            envid=txn.envid,
            ret=txn.ret,
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit or not data.isascii(),
        )
        if self.server.before_queue is not None:
            await run_hook(self.server.before_queue, envelope)
        try:
            await self.server.queue.enqueue(
                envelope, queue_id=qid, expires=now + self.server.lifetime
            )
        except Exception as exc:
            logging.getLogger("ferry.intake").exception("enqueue failed")
            self.reject(
                Reply(451, "4.3.0", "Error: queue file write error, try again later"),
                error=type(exc).__name__,
            )
            return
        self.server.accepted += 1
        emit(
            "accept",
            id=qid,
            session=self.session_id,
            message_id=message_id(data),
            client=self.peer_ip,
            sender=txn.sender or "<>",
            rcpts=len(txn.recipients),
            size=len(envelope.data),
            priority=priority.name.lower(),
            user=self.auth_user,
            tls=self.tls,
        )
        self.reply(250, "2.0.0", f"Ok: queued as {qid}")
        if self.server.on_accept is not None:
            self.server.on_accept(qid)

    def _check_body(self, raw: bytes) -> bytes | Reply:
        """Line-ending policy, line length and dot-unstuffing (RFC 5321 §4.5.2)."""
        crlf = raw.count(b"\r\n")
        if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
            if self.cfg.bare_lf == "reject":
                # RFC 5321 §2.3.8: bare CR and LF are not line endings.
                return Reply(
                    554, "5.6.0", "Error: message contains a bare CR or LF; use CRLF line endings"
                )
            raw = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
        if len(raw) > self.cfg.max_line_length and any(
            len(line) > self.cfg.max_line_length for line in raw.split(b"\r\n")
        ):
            return Reply(
                554, "5.6.0", f"Error: a line is longer than {self.cfg.max_line_length} octets"
            )
        if raw.startswith(b".."):
            raw = raw[1:]
        return raw.replace(b"\r\n..", b"\r\n.")


def _b64decode(text: str) -> bytes:
    if text == "=":
        return b""  # RFC 4954 §4: "=" is a zero-length response
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        # RFC 4954 §4: 501 when the response cannot be BASE64 decoded.
        raise CommandError(501, "5.5.2", "Cannot decode base64 response") from None
