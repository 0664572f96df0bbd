"""Intake: the inbound SMTP server -- the socket side of the SMTP session.

A small asyncio protocol of our own rather than aiosmtpd: we need enhanced status codes
on every reply, RFC 3461 DSN and RFC 6710 MT-PRIORITY parameters, DATA read in bulk
(aiosmtpd reads bodies line by line: ~475 msgs/s at 100 KB), replies to pipelined
commands flushed in one write, and a strict end-of-data rule against SMTP smuggling.
The SMTP rules live in ``session.py`` (a sans-I/O state machine) and the parsing in
``commands.py`` and ``message.py``; this module keeps buffers, deadlines and TLS, and
carries out the session's actions (password checks, the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from ferry.config import Listener, RelayConfig, ServerConfig
from ferry.envelope import EnvelopeIn, Reply
from ferry.events import (
    Connected,
    ConnectionRejected,
    Disconnected,
    Listening,
    TlsFailed,
    emit,
)
from ferry.intake.aliases import AliasTable
from ferry.intake.policy import RelayPolicy
from ferry.intake.session import (
    Action,
    Authenticate,
    Close,
    Enqueue,
    ReceiveData,
    Session,
    StartTls,
    reply_bytes,
)
from ferry.intake.throttle import AuthThrottle
from ferry.intake.users import UserDB
from ferry.queue.base import IdempotencyRecord, IdempotencyReplay, new_queue_id
from ferry.tls import describe, self_signed_context, server_context


def load_tls(config: RelayConfig) -> ssl.SSLContext:
    """The configured certificate, or the self-signed one made on first run.

    An operator's certificate that cannot be used stops the start with
    ``<path>: <reason>`` (TlsMaterialError); Ferry's own self-signed pair is remade.
    """
    s = config.server
    if s.tls_cert and s.tls_key:
        return server_context(s.tls_cert, s.tls_key)
    return self_signed_context(config.data_dir, s.hostname)


async def run_hook(hook: Callable[[EnvelopeIn], Awaitable[None]], envelope: EnvelopeIn) -> None:
    """An embedder's before-queue hook: it may set priority or route; if it raises, the
    message is queued as it was (a hook must never lose mail)."""
    try:
        await hook(envelope)
    except Exception:
        logging.getLogger("ferry.intake").exception("before_queue hook failed; queuing as is")


class QueueWriter(Protocol):
    """What intake needs of the queue: ``enqueue`` (the queue itself, or in an intake
    process the parent that writes it: ferry/intake/process.py)."""

    async def enqueue(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> str: ...


class AuthGate(Protocol):
    """Where failed AUTH attempts are counted: one place for every session of the relay,
    whichever process runs it (else a guesser would gain by spreading connections)."""

    async def delay(self, ip: str) -> float: ...

    async def failed(self, ip: str) -> int: ...

    async def succeeded(self, ip: str) -> None: ...


class LocalAuthGate:
    """The AUTH throttle of this process, on the monotonic clock."""

    def __init__(self, throttle: AuthThrottle | None = None) -> None:
        self.throttle = throttle or AuthThrottle()

    async def delay(self, ip: str) -> float:
        return self.throttle.delay_for(ip, time.monotonic())

    async def failed(self, ip: str) -> int:
        return self.throttle.record_failure(ip, time.monotonic())

    async def succeeded(self, ip: str) -> None:
        self.throttle.record_success(ip)


# Why a connection is refused at once (max_connections, max_connections_per_ip).
LIMIT_TEXT = {
    "max_connections": "Too many connections, try later",
    "max_connections_per_ip": "Too many connections from you",
}


def over_limit(total: int, from_ip: int, cfg: ServerConfig) -> str | None:
    """The limit a new connection would pass, given the connections open now in all
    and from its address; None when it may go on."""
    if total >= cfg.max_connections:
        return "max_connections"
    if from_ip >= cfg.max_connections_per_ip:
        return "max_connections_per_ip"
    return None


class _Closed(Exception):
    """The client went away (or we closed the connection)."""


class IntakeServer:
    """Listens on every configured listener and feeds accepted mail to the queue."""

    def __init__(
        self,
        config: RelayConfig,
        queue: QueueWriter,
        *,
        ssl_context: ssl.SSLContext | None,
        users: UserDB | None = None,
        on_accept: Callable[[str], None] | None = None,
        before_queue: Callable[[EnvelopeIn], Awaitable[None]] | None = None,
        auth_gate: AuthGate | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.ssl_context = ssl_context
        self.users = users or UserDB(config.server.users_file)
        s = config.server
        self.policy = RelayPolicy.build(s.local_domains, s.relay_domains, s.relay_networks)
        self.aliases = AliasTable(config.aliases, s.local_domains)
        self.auth_gate = auth_gate or LocalAuthGate()
        self.lifetime = config.delivery.message_lifetime  # seconds, parsed at load
        self.idempotency_ttl = config.http.idempotency_ttl  # seconds, parsed at load
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
                emit(Listening(sock.getsockname()[0], sock.getsockname()[1], listener.mode))

    async def adopt(
        self,
        sock: socket.socket,
        listener: Listener,
        refused: str | None,
        on_close: Callable[[], None],
    ) -> None:
        """Run a session on a connection another process accepted (ferry/intake/process.py).

        ``refused``: the connection limit it passed there (it gets 421 and is closed);
        ``on_close`` is called once, when the connection is over (or never started).
        """
        sock.setblocking(False)
        ssl_ctx = self.ssl_context if listener.mode == "smtps" else None
        conn = SmtpConnection(self, listener, refused=refused, on_close=on_close)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: conn, sock, ssl=ssl_ctx
            )
        except asyncio.CancelledError:
            sock.close()
            conn.closed()
            raise
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # A TLS handshake that failed (smtps) or a client already gone: no session.
            peer = "unknown"
            with contextlib.suppress(OSError):
                peer = str(sock.getpeername()[0])
            sock.close()
            conn.closed()
            if ssl_ctx is not None:
                emit(TlsFailed(peer, str(exc)))

    @property
    def open_connections(self) -> int:
        """Connections with a session running now."""
        return len(self.connections)

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


class DataReader:
    """Finds the end of a DATA body in a growing buffer (RFC 5321 §4.1.1.4).

    Pure: :meth:`feed` looks at the connection's buffer and takes the body out of it
    once <CRLF>.<CRLF> has arrived. Only CRLF.CRLF ends the data: a dot line after a
    bare LF or bare CR never does (SMTP smuggling, CVE-2023-51764). A body larger than
    ``limit`` is not kept, but read to its end so the session can go on.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.discarded = 0  # octets of an oversized body already dropped
        self._scan = 0  # where to resume the search for the terminator

    def received(self, buf: bytearray) -> int:
        """Octets of the body seen so far."""
        return self.discarded + len(buf)

    def feed(self, buf: bytearray) -> tuple[bytes | None, int] | None:
        """(raw body with dot-stuffing still in place and its final CRLF, or None when
        larger than ``limit``; its total size), or None while the terminator is missing.
        The body and its terminator are removed from ``buf``; what follows stays."""
        if self.discarded == 0 and buf.startswith(b".\r\n"):
            del buf[:3]
            return b"", 0
        idx = buf.find(b"\r\n.\r\n", self._scan)
        if idx >= 0:
            size = self.discarded + idx + 2
            if self.discarded:
                del buf[: idx + 5]
                return None, size
            # One copy through a view (``bytes(buf[:n])`` would copy twice).
            with memoryview(buf) as view:
                raw = bytes(view[: idx + 2])
            del buf[: idx + 5]
            return (raw if size <= self.limit else None), size
        if len(buf) > self.limit + 8:
            # Too large: stop keeping it, but keep reading to the terminator. The last
            # four bytes stay so a terminator spanning two reads is still found.
            self.discarded += len(buf) - 4
            del buf[:-4]
        self._scan = max(0, len(buf) - 4)
        return None

    def ready(self, buf: bytearray) -> bool:
        """True when :meth:`feed` has work: the terminator may have arrived, or the
        buffer must be trimmed. The socket side asks this on every read, so the reading
        task wakes once per body rather than once per read (a 100 KB body comes in
        tens of reads); the search resumes where the last one stopped."""
        if len(buf) > self.limit + 8 or (self.discarded == 0 and buf.startswith(b".\r\n")):
            return True
        if buf.find(b"\r\n.\r\n", self._scan) >= 0:
            return True
        self._scan = max(0, len(buf) - 4)
        return False


def data_deadline(start: float, received: int, declared: int, timeout: float, rate: int) -> float:
    """When the DATA phase must be over: ``max(timeout, size / rate)`` after it began,
    where size is the larger of the octets received so far and MAIL's SIZE= (RFC 1870).

    A deadline, not an idle timer: a client dribbling one byte at a time cannot hold
    the connection open for ever, while a large message on a slow link (any rate above
    ``rate`` octets per second) always has the time it needs.
    """
    return start + max(timeout, max(received, declared) / rate)


def new_session_id() -> str:
    """10 hex digits naming a connection in log lines: 40 random bits, as before, but
    from the ``random`` module (seeded from the OS once, reseeded in a forked child)
    rather than a ``getrandom`` system call per connection. A log label, not a secret."""
    return f"{random.getrandbits(40):010x}"


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class SmtpConnection(asyncio.Protocol):
    """One client connection: a byte buffer, deadlines and TLS around a :class:`Session`."""

    def __init__(
        self,
        server: IntakeServer,
        listener: Listener,
        *,
        refused: str | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.cfg = server.config.server
        self.listener = listener
        # Adopted from the process that accepted it (ferry/intake/process.py): it
        # decided the connection limits; tell it when the connection is over.
        self.adopted = on_close is not None
        self.refused = refused
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.eof = False
        self.waiter: asyncio.Future[bool] | None = None
        # While a DATA body is read: wake the reading task only when it has work.
        self.data_reader: DataReader | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer_ip: str = "unknown"
        self.tls: str | None = None
        self.session: Session | None = None
        self.session_id = "-"  # set in connection_made

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "unknown"
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            self.tls = describe(ssl_obj)
        # In every log line about this connection (and the messages it hands over).
        self.session_id = new_session_id()
        self.session = Session(
            self.cfg,
            mode=self.listener.mode,
            peer_ip=self.peer_ip,
            policy=self.server.policy,
            aliases=self.server.aliases,
            tls=self.tls,
            tls_available=self.server.ssl_context is not None,
            new_id=new_queue_id,
            session_id=self.session_id,
        )
        self.task = asyncio.get_running_loop().create_task(self._run(self.session))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        reader = self.data_reader
        if reader is None or reader.ready(self.buf):
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
            self.waiter.set_result(True)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.task is not None:
            self.task.cancel()

    # -- I/O primitives ----------------------------------------------------------

    def reply(self, code: int, enhanced: str | None, text: str) -> None:
        self.send(Reply(code, enhanced, text))

    def send(self, reply: Reply) -> None:
        self.out.append(reply_bytes(reply))

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    async def _wait(self, deadline: float, later: Callable[[], float] | None = None) -> None:
        """Wait for more input until ``deadline`` (loop time); then ``421 4.4.2`` and
        close. Replies queued so far go out first (RFC 2920 batching). ``later``: the
        deadline as it is now, asked when the first one passes (a DATA deadline grows
        with the octets received while the task slept).

        One future and one timer per wait (``asyncio.wait_for`` costs twice that, and
        a session waits several times per message)."""
        self.flush()
        if self.eof:
            raise _Closed
        loop = asyncio.get_running_loop()
        while deadline > loop.time():
            waiter = self.waiter = loop.create_future()
            timer = loop.call_at(deadline, _time_up, waiter)
            try:
                woken = await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if woken:
                return
            if later is not None:
                deadline = later()
        # RFC 5321 §4.5.3.2: the server may close a session that stays silent too long.
        self.reply(421, "4.4.2", f"{self.cfg.hostname} Error: timeout exceeded")
        emit(ConnectionRejected(self.peer_ip, 421, "deadline passed", session=self.session_id))
        self.close()
        raise _Closed

    async def readline(self, limit: int) -> bytes | None:
        """One line without its line ending; None when the line was over ``limit``.

        ``server.command_timeout`` is a deadline for the whole line, counted from the
        moment we start waiting for it: a client sending one byte at a time does not
        restart it."""
        deadline = 0.0
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
            if not deadline:
                deadline = asyncio.get_running_loop().time() + self.cfg.command_timeout
            await self._wait(deadline)

    async def read_data(self, limit: int, declared: int) -> tuple[bytes | None, int]:
        """Read a DATA body (see :class:`DataReader`) within the deadline of
        :func:`data_deadline`."""
        reader = DataReader(limit)
        start = asyncio.get_running_loop().time()

        def deadline() -> float:
            received = reader.received(self.buf)
            return data_deadline(
                start, received, declared, self.cfg.data_timeout, self.cfg.data_min_rate
            )

        self.data_reader = reader
        try:
            while True:
                done = reader.feed(self.buf)
                if done is not None:
                    return done
                await self._wait(deadline(), deadline)
        finally:
            self.data_reader = None

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # -- the dialogue ------------------------------------------------------------

    def closed(self) -> None:
        """The connection is over: tell the process that accepted it (once)."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    async def _run(self, session: Session) -> None:
        srv = self.server
        count = srv.per_ip.get(self.peer_ip, 0)
        counted = False
        try:
            refused = (
                self.refused if self.adopted else over_limit(len(srv.connections), count, self.cfg)
            )
            if refused is not None:
                self.reply(421, "4.7.0", f"{self.cfg.hostname} {LIMIT_TEXT[refused]}")
                emit(ConnectionRejected(self.peer_ip, 421, refused, session=self.session_id))
                self.close()
                return
            srv.connections.add(self)
            if not self.adopted:
                srv.per_ip[self.peer_ip] = count + 1
                counted = True
            emit(Connected(self.peer_ip, self.listener.mode, self.tls, session=self.session_id))
            await self._act(session, session.greet())
            while self.transport is not None:
                line = await self.readline(session.line_limit)
                await self._act(session, session.receive_line(line))
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
            if counted:  # per-IP counts of an adopted connection are its acceptor's
                left = srv.per_ip.get(self.peer_ip, 1) - 1
                if left <= 0:
                    srv.per_ip.pop(self.peer_ip, None)
                else:
                    srv.per_ip[self.peer_ip] = left
            if self.transport is not None:
                self.flush()
                self.transport.close()
            emit(Disconnected(self.peer_ip, session=self.session_id))
            self.closed()

    async def _act(self, session: Session, actions: list[Action]) -> None:
        """Carry out the session's actions in order; each may yield more."""
        todo = list(reversed(actions))
        while todo:
            action = todo.pop()
            if isinstance(action, Reply):
                self.send(action)
                continue
            if isinstance(action, Close):
                self.close()
                raise _Closed
            if isinstance(action, ReceiveData):
                raw, size = await self.read_data(action.limit, action.declared_size)
                more = session.data_received(raw, size)
            elif isinstance(action, Enqueue):
                more = await self._enqueue(session, action)
            elif isinstance(action, Authenticate):
                more = await self._authenticate(session, action)
            else:
                assert isinstance(action, StartTls)
                more = await self._starttls(session)
            todo.extend(reversed(more))

    async def _starttls(self, session: Session) -> list[Action]:
        self.flush()
        transport, context = self.transport, self.server.ssl_context
        assert transport is not None and context is not None  # the session checked
        # RFC 3207 §4.2 (and CVE-2011-0411): anything pipelined after STARTTLS in
        # plain text is discarded, never executed inside the TLS session. Reading
        # stops now, so nothing can slip in before the TLS layer takes over.
        transport.pause_reading()
        self.buf.clear()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await asyncio.wait_for(
                loop.start_tls(transport, self, context, server_side=True),
                self.cfg.command_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            emit(TlsFailed(self.peer_ip, str(exc), session=self.session_id))
            transport.abort()
            self.transport = None
            raise _Closed from None
        if new_transport is None:
            raise _Closed
        self.transport = new_transport
        self.tls = describe(new_transport.get_extra_info("ssl_object")) or "TLS"
        return session.tls_started(self.tls)

    async def _authenticate(self, session: Session, action: Authenticate) -> list[Action]:
        gate = self.server.auth_gate
        delay = await gate.delay(self.peer_ip)
        if delay > 0:
            await asyncio.sleep(delay)  # slow down password guessing, not a sync point
        record = await self.server.users.averify(action.username, action.password)
        if record is None:
            return session.auth_failed(await gate.failed(self.peer_ip))
        await gate.succeeded(self.peer_ip)
        return session.auth_succeeded(record.name, record.priority)

    async def _enqueue(self, session: Session, action: Enqueue) -> list[Action]:
        srv = self.server
        if srv.before_queue is not None:
            await run_hook(srv.before_queue, action.envelope)
        record = None
        if action.idempotency is not None:
            key, fingerprint = action.idempotency
            record = IdempotencyRecord(
                key,
                fingerprint,
                action.queue_id,
                action.queue_id,  # the answer to replay is the first queue id
                action.received_at + srv.idempotency_ttl,
            )
        try:
            await srv.queue.enqueue(
                action.envelope,
                queue_id=action.queue_id,
                expires=action.received_at + srv.lifetime,
                idempotency=record,
            )
        except IdempotencyReplay as replay:
            # The key's first message is queued already (written with it, in one
            # transaction): answer as then, queue nothing.
            if record is not None and replay.record.fingerprint == record.fingerprint:
                return session.replayed(replay.record.queue_id)
            return session.idempotency_conflict()
        except Exception as exc:
            logging.getLogger("ferry.intake").exception("enqueue failed")
            return session.enqueue_failed(type(exc).__name__)
        srv.accepted += 1
        more = session.enqueued()
        if srv.on_accept is not None:
            srv.on_accept(action.queue_id)
        return more
