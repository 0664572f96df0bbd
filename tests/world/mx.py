"""Scripted SMTP servers (aiosmtpd) on their own loopback addresses.

Every server of a :class:`MxFactory` runs on one event loop in one background
thread, so sync tests and async tests (whose own loop runs the code under test)
can both use them. Servers take distinct addresses from 127.0.0.10-250 and,
by default, share one port number: Ferry connects to every MX on one
``mx_port``, as it connects to port 25 on the Internet.

Behaviour is scripted per server and may change while it runs::

    mx = mx_factory("mx1.example.test")
    mx.publish(dns_server, "example.test")            # MX + A records
    mx.on("rcpt", "550 5.1.1 no such user", rcpt="bob@example.test")
    mx.on("greeting", "421 4.3.2 busy", times=1)      # first connection only
    mx.on("dot", delay=5)                             # slower than a client timeout
    mx.on("data", drop=True)                          # hang up mid-DATA
    [message] = mx.wait_for_messages(1)
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import ipaddress
import itertools
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .ca import WorldCA
from .dns import DnsServer
from .wait import async_wait_until

T = TypeVar("T")

Stage = Literal["greeting", "helo", "ehlo", "mail", "rcpt", "data", "dot"]
STAGES: tuple[str, ...] = get_args(Stage)

#: RFC 3461 parameters, accepted (and recorded) only when a server offers DSN.
_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")


# -- loopback addresses ------------------------------------------------------

_POOL_LOCK = threading.Lock()
_POOL_IN_USE: set[str] = set()
# Cycle through the pool so a just-released address is not reused at once.
_POOL_NEXT = itertools.cycle(f"127.0.0.{n}" for n in range(10, 251))
_POOL_SIZE = 241


def _check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the test world stays on loopback, not {host}")


def _bind(host: str | None, port: int, *, listen: bool) -> socket.socket:
    """A TCP socket bound to ``host:port``, or to the first pool address free there.

    A pool address is held (in ``_POOL_IN_USE``) until :func:`_release`. A socket
    that is bound but not listening makes connections to it *refused*, and
    keeps anyone else from listening there.
    """
    if host is not None:
        _check_loopback(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if listen:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            if listen:
                sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock
    for _ in range(_POOL_SIZE):
        with _POOL_LOCK:
            candidate = next(_POOL_NEXT)
            if candidate in _POOL_IN_USE:
                continue
            _POOL_IN_USE.add(candidate)
        try:
            return _bind(candidate, port, listen=listen)
        except OSError:
            _release(candidate)  # taken by someone else on this port: skip it
    raise OSError(f"no free loopback address in the pool for port {port}")


def _release(host: str) -> None:
    with _POOL_LOCK:
        _POOL_IN_USE.discard(host)


def free_port() -> int:
    """A port number the kernel considers free (on 127.0.0.1) right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _publish(dns: DnsServer, name: str, host: str, domains: Iterable[str], pref: int) -> None:
    (dns.add_aaaa if ":" in host else dns.add_a)(name, host)
    for domain in domains:
        dns.add_mx(domain, [(pref, name)])


# -- records and script --------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMessage:
    """One message an MX accepted, as it arrived."""

    mail_from: str  # "" for the null reverse-path <>
    rcpt_tos: tuple[str, ...]
    data: bytes  # exactly as received, after dot-unstuffing, CRLF line ends
    mail_options: tuple[str, ...]  # MAIL parameters, case preserved ("RET=HDRS")
    rcpt_options: dict[str, tuple[str, ...]]  # RCPT parameters per recipient
    tls: bool
    peer: tuple[str, int]
    helo: str | None
    auth_user: str | None
    server: str  # "host:port" of the receiving server

    @property
    def parsed(self) -> email.message.EmailMessage:
        """The data parsed as an RFC 5322 message (for header assertions)."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message


@dataclass
class Rule:
    """A scripted behaviour: at ``stage``, optionally wait, then reply or hang up.

    ``reply=None`` means "then behave normally" (useful with ``delay``).
    ``rcpt`` limits an RCPT rule to some recipients; ``times`` to some uses.
    """

    stage: Stage
    reply: str | None = None
    rcpt: frozenset[str] | None = None
    delay: float = 0.0
    drop: bool = False
    times: int | None = None


class _Envelope(Envelope):
    """aiosmtpd's envelope plus the raw parameters it upper-cases or pools."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_mail_options: tuple[str, ...] = ()
        self.raw_rcpt_options: list[tuple[str, ...]] = []  # parallel to rcpt_tos


def _is_reply(reply: str) -> bool:
    """One reply line, or several joined by CRLF (RFC 5321 §4.2.1: "250-" until "250 ")."""
    lines = reply.split("\r\n")
    return all(
        line[:3].isdigit()
        and line[:3] == lines[0][:3]
        and line[3:4] in ((" ", "") if n == len(lines) - 1 else ("-",))
        for n, line in enumerate(lines)
    )


def _params(arg: str | None) -> tuple[str, ...]:
    """The parameters after ``FROM:<...>`` / ``TO:<...>``, case preserved."""
    if not arg:
        return ()
    head, sep, rest = arg.partition(">")
    return tuple(rest.split()) if sep else tuple(head.split()[1:])


def _without(arg: str | None, names: tuple[str, ...]) -> str | None:
    """``arg`` minus the named parameters (which aiosmtpd would refuse with 555)."""
    if not arg or ">" not in arg:
        return arg
    head, _, rest = arg.partition(">")
    kept = [p for p in rest.split() if p.partition("=")[0].upper() not in names]
    return " ".join([head + ">", *kept])


def _address(arg: str | None) -> str:
    """The address in ``TO:<addr> ...``, lower-cased, for matching rules."""
    return (arg or "").partition("<")[2].partition(">")[0].lower()


# -- the SMTP session ------------------------------------------------------------


class _Session(SMTP):
    """One SMTP connection, following the server's script before aiosmtpd's logic."""

    def __init__(self, mx: MxServer, **kwargs: Any) -> None:
        super().__init__(_Hooks(mx), **kwargs)
        self.mx = mx
        # Log every recognised command as dispatched; aiosmtpd has no hook for it.
        self._smtp_methods = {
            name: self._logged(name, method) for name, method in self._smtp_methods.items()
        }

    def _logged(self, name: str, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def logged(arg: str | None) -> None:
            self.mx._log(f"{name} {arg}" if arg else name)
            await method(arg)

        return logged

    def _create_envelope(self) -> _Envelope:
        return _Envelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.mx._sessions.add(self)
        with self.mx._cond:
            self.mx._peak = max(self.mx._peak, len(self.mx._sessions))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.mx._sessions.discard(self)
        super().connection_lost(error)

    # -- script machinery

    async def _rule(self, stage: Stage, address: str | None = None) -> str | None:
        """Apply the matching rule, if any: its delay, its hang-up, or its reply."""
        rule = self.mx._take_rule(stage, address)
        if rule is None:
            return None
        if rule.delay:
            await asyncio.sleep(rule.delay)  # playing a slow server, not synchronising
        if rule.drop:
            if stage == "data":
                # Hang up *inside* DATA: after 354 and the first line of content.
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                try:
                    await self._reader.readuntil(b"\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    pass
            await self._hang_up(abort=True)
        return rule.reply

    async def _respond(self, reply: str) -> None:
        await self.push(reply)
        if reply.startswith("421"):  # RFC 5321 §3.8: 421, then close
            await self._hang_up(abort=False)

    async def _hang_up(self, *, abort: bool) -> None:
        """Close the TCP connection (below TLS, so no close_notify wait) and end here."""
        raw = self._original_transport or self.transport
        if raw is not None:
            raw.abort() if abort else raw.close()  # type: ignore[attr-defined]
        # connection_lost() cancels this session's task, ending this wait.
        await asyncio.get_running_loop().create_future()

    # -- commands

    async def _handle_client(self) -> None:
        reply = await self._rule("greeting")
        if reply is None:
            await super()._handle_client()
            return
        await self.push(reply)
        if not reply.startswith("421"):
            # RFC 5321 §3.1: after a 554 greeting the server waits for QUIT,
            # refusing everything else.
            while line := await self._reader.readline():
                command = line.strip().decode(errors="replace")
                self.mx._log(command)
                if command.upper() == "QUIT":
                    await self.push("221 2.0.0 Bye")
                    break
                await self.push("503 5.5.1 Bad sequence of commands")
        await self._hang_up(abort=False)

    async def smtp_HELO(self, hostname: str) -> None:
        reply = await self._rule("helo")
        await (self._respond(reply) if reply else super().smtp_HELO(hostname))

    async def smtp_EHLO(self, hostname: str) -> None:
        reply = await self._rule("ehlo")
        await (self._respond(reply) if reply else super().smtp_EHLO(hostname))

    async def smtp_MAIL(self, arg: str | None) -> None:
        reply = await self._rule("mail")
        if reply:
            await self._respond(reply)
            return
        envelope = self.envelope
        assert isinstance(envelope, _Envelope)
        had_sender = envelope.mail_from is not None
        await super().smtp_MAIL(_without(arg, _DSN_MAIL) if self.mx.dsn else arg)
        if not had_sender and envelope.mail_from is not None:
            envelope.raw_mail_options = _params(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        reply = await self._rule("rcpt", _address(arg))
        if reply:
            await self._respond(reply)
            return
        envelope = self.envelope
        assert isinstance(envelope, _Envelope)
        before = len(envelope.rcpt_tos)
        await super().smtp_RCPT(_without(arg, _DSN_RCPT) if self.mx.dsn else arg)
        if len(envelope.rcpt_tos) > before:
            envelope.raw_rcpt_options.append(_params(arg))

    async def smtp_DATA(self, arg: str) -> None:
        reply = await self._rule("data")
        await (self._respond(reply) if reply else super().smtp_DATA(arg))


class _Hooks:
    """aiosmtpd handler hooks: EHLO keywords, and the reply after the final dot."""

    def __init__(self, mx: MxServer) -> None:
        self.mx = mx

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do this itself
        mx = self.mx
        keywords = [line[4:] for line in responses[1:] if line[4:] != "HELP"]
        if not mx.eightbitmime:
            keywords.remove("8BITMIME")
        if mx.auth is None:
            # aiosmtpd offers AUTH (always failing) after STARTTLS unless told not to.
            keywords = [k for k in keywords if not k.startswith("AUTH")]
        keywords += ["PIPELINING"] * mx.pipelining + ["DSN"] * mx.dsn + list(mx.ehlo_extra)
        lines = [server.hostname, *keywords]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(server, _Session) and isinstance(envelope, _Envelope)
        reply = await server._rule("dot")
        if reply is None or reply.startswith("2"):
            self.mx._record(server, session, envelope)
        if reply is None:
            return "250 2.0.0 Ok: queued"
        if reply.startswith("421"):
            await server._respond(reply)
        return reply


# -- servers -----------------------------------------------------------------------


class MxServer:
    """A scripted SMTP server on ``host:port``; see the module docstring.

    Extension settings (``starttls``, ``auth``, ``smtputf8``, ``dsn``, ``size``,
    ``pipelining``, ``eightbitmime``, ``ehlo_extra``, ``require_tls``) are plain
    attributes read when a connection opens: change them at any time.
    """

    def __init__(
        self,
        factory: MxFactory,
        sock: socket.socket,
        name: str,
        *,
        starttls: bool = False,
        require_tls: bool = False,
        auth: Mapping[str, str] | None = None,
        auth_require_tls: bool = True,
        smtputf8: bool = True,
        dsn: bool = False,
        size: int | None = None,
        pipelining: bool = True,
        eightbitmime: bool = True,
        ehlo_extra: Iterable[str] = (),
    ) -> None:
        self._factory = factory
        self.host, self.port = sock.getsockname()[:2]
        self.name = name
        self.starttls = starttls
        self.require_tls = require_tls
        self.auth = dict(auth) if auth is not None else None
        self.auth_require_tls = auth_require_tls
        self.smtputf8 = smtputf8
        self.dsn = dsn
        self.size = size
        self.pipelining = pipelining
        self.eightbitmime = eightbitmime
        self.ehlo_extra = tuple(ehlo_extra)
        self._cond = threading.Condition()
        self._rules: list[Rule] = []
        self._messages: list[ReceivedMessage] = []
        self._commands: list[str] = []
        self._connections = 0
        self._sessions: set[_Session] = set()  # touched only on the world loop
        self._peak = 0  # the most connections ever open at once
        self._stopped = False
        self._tls = factory.ca.server_context(name, self.host) if factory.ca else None
        self._server: asyncio.AbstractServer = factory._call(
            factory._loop.create_server(self._new_session, sock=sock)
        )

    def __repr__(self) -> str:
        return f"<MxServer {self.name} {self.address}>"

    @property
    def address(self) -> str:
        """``"host:port"``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def publish(self, dns: DnsServer, *domains: str, preference: int = 10) -> MxServer:
        """Add this server's address record, and an MX to it for each domain."""
        _publish(dns, self.name, self.host, domains, preference)
        return self

    # -- script

    def on(
        self,
        stage: Stage,
        reply: str | None = None,
        *,
        rcpt: str | Iterable[str] | None = None,
        delay: float = 0.0,
        drop: bool = False,
        times: int | None = None,
    ) -> Rule:
        """Script ``stage``; the newest matching rule wins. Returns the rule.

        Stages: ``greeting`` (a non-2xx reply ends the session: 421 closes,
        others wait for QUIT), ``helo``, ``ehlo``, ``mail``, ``rcpt``, ``data``
        (the reply to DATA itself; ``drop`` hangs up after 354 and one line of
        content), ``dot`` (the reply after the final dot; messages are recorded
        only if it is 2xx). A 421 reply at any stage closes the connection.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        if reply is not None and not _is_reply(reply):
            raise ValueError(f"not an SMTP reply: {reply!r}")
        if rcpt is not None and stage != "rcpt":
            raise ValueError("rcpt= only applies to the rcpt stage")
        addresses = None
        if rcpt is not None:
            addresses = frozenset(a.lower() for a in ([rcpt] if isinstance(rcpt, str) else rcpt))
        rule = Rule(stage, reply, addresses, delay, drop, times)
        with self._cond:
            self._rules.insert(0, rule)
        return rule

    def reset(self) -> None:
        """Forget every scripted rule (records are kept)."""
        with self._cond:
            self._rules.clear()

    def _take_rule(self, stage: str, address: str | None) -> Rule | None:
        with self._cond:
            for rule in self._rules:
                if rule.stage != stage or (rule.rcpt is not None and address not in rule.rcpt):
                    continue
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                return rule
        return None

    # -- records

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted so far (a copy)."""
        with self._cond:
            return list(self._messages)

    @property
    def commands(self) -> list[str]:
        """Every command received, across connections, e.g. ``"MAIL FROM:<a@b>"``."""
        with self._cond:
            return list(self._commands)

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted."""
        with self._cond:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Connections open now (call it inside :meth:`MxFactory.at_once`)."""
        return len(self._sessions)

    @property
    def peak_connections(self) -> int:
        """The most connections (SMTP sessions) that were ever open at the same time."""
        with self._cond:
            return self._peak

    @property
    def busy_connections(self) -> int:
        """Connections inside a mail transaction now: MAIL seen, the reply to the final
        dot not yet sent (call it inside :meth:`MxFactory.at_once`)."""
        return sum(1 for s in self._sessions if s.envelope and s.envelope.mail_from is not None)

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise AssertionError(
                    f"{self}: {len(self._messages)} of {count} messages after {timeout:g} s; "
                    f"commands: {self._commands[-20:]}"
                )
            return list(self._messages)

    async def async_wait_for_messages(
        self, count: int = 1, timeout: float = 10.0
    ) -> list[ReceivedMessage]:
        """Like :meth:`wait_for_messages`, without blocking the caller's event loop."""
        await async_wait_until(
            lambda: len(self.messages) >= count,
            timeout,
            message=lambda: f"{self}: {len(self.messages)} of {count} messages",
        )
        return self.messages

    def _log(self, command: str) -> None:
        with self._cond:
            self._commands.append(command)

    def _record(self, server: _Session, session: Session, envelope: _Envelope) -> None:
        auth = session.auth_data if session.authenticated else None
        message = ReceivedMessage(
            mail_from="" if envelope.mail_from == "<>" else (envelope.mail_from or ""),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            mail_options=envelope.raw_mail_options,
            rcpt_options=dict(zip(envelope.rcpt_tos, envelope.raw_rcpt_options, strict=True)),
            tls=server._tls_protocol is not None,
            peer=tuple(session.peer[:2]) if session.peer else ("", 0),  # type: ignore[arg-type]
            helo=session.host_name,
            auth_user=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            server=self.address,
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # -- sessions and lifecycle

    def _new_session(self) -> _Session:
        with self._cond:
            self._connections += 1
        return _Session(
            self,
            hostname=self.name,
            ident="Ferry test world",
            tls_context=self._tls if self.starttls else None,
            require_starttls=self.require_tls,
            data_size_limit=self.size,
            enable_SMTPUTF8=self.smtputf8,
            auth_required=self.auth is not None,
            auth_require_tls=self.auth_require_tls,
            authenticator=self._authenticate,
            loop=self._factory._loop,
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            self.auth is not None
            and isinstance(data, LoginPassword)
            and self.auth.get(data.login.decode()) == data.password.decode()
        )
        return AuthResult(success=ok, handled=False, auth_data=data)

    async def _close(self) -> None:
        self._server.close()
        # Python 3.11's Server.close() leaves open connections alone: abort them
        # (under TLS too, hence the raw transport) and let their tasks finish.
        tasks = []
        for session in list(self._sessions):
            raw = session._original_transport or session.transport
            if raw is not None:
                raw.abort()  # type: ignore[attr-defined]
            if session._handler_coroutine is not None:
                tasks.append(session._handler_coroutine)
        await self._server.wait_closed()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if not self._stopped:
            self._stopped = True
            self._factory._call(self._close())
            _release(self.host)


@dataclass
class RefusingAddress:
    """A loopback ``host:port`` where nothing listens: connecting is refused."""

    host: str
    port: int
    name: str
    _sock: socket.socket = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def publish(self, dns: DnsServer, *domains: str, preference: int = 10) -> RefusingAddress:
        """Add this address's A record, and an MX to it for each domain."""
        _publish(dns, self.name, self.host, domains, preference)
        return self

    def close(self) -> None:
        if self._sock.fileno() != -1:
            self._sock.close()
            _release(self.host)


class MxFactory:
    """Makes :class:`MxServer` s on one background event loop; :meth:`close` stops all.

    ``port`` is the port every server uses unless told otherwise (an unused
    one by default): give it to Ferry as ``mx_port``.
    """

    def __init__(self, ca: WorldCA | None = None, port: int | None = None) -> None:
        self.ca = ca
        self.port = port or free_port()
        self.servers: list[MxServer] = []
        self._refusing: list[RefusingAddress] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mx-world")
        self._thread.start()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the world loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def at_once(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the world loop: while it runs, no server reads or answers.

        A crash test reads "connections open now" and kills a process in one instant.
        """

        async def run() -> T:
            return fn()

        return self._call(run(), timeout)

    def __call__(
        self,
        name: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        **options: Any,
    ) -> MxServer:
        """Start a server named ``name`` (its EHLO name and certificate name).

        ``host``: a loopback address (default: the next free pool address);
        ``port``: default :attr:`port`, ``0`` for an ephemeral one. Other
        options are :class:`MxServer` settings (``starttls=True``, ``dsn=True``,
        ``auth={"user": "secret"}``, ``size=1000``...).
        """
        if options.get("starttls") and self.ca is None:
            raise ValueError("starttls needs a WorldCA")
        sock = _bind(host, self.port if port is None else port, listen=True)
        name = name or f"mx{len(self.servers) + 1}.world.test"
        try:
            server = MxServer(self, sock, name, **options)
        except BaseException:
            sock.close()
            _release(sock.getsockname()[0])
            raise
        self.servers.append(server)
        return server

    def refusing(
        self, name: str | None = None, *, host: str | None = None, port: int | None = None
    ) -> RefusingAddress:
        """Reserve a loopback ``host:port`` where connections are refused."""
        sock = _bind(host, self.port if port is None else port, listen=False)
        host, port = sock.getsockname()[:2]
        name = name or f"refusing{len(self._refusing) + 1}.world.test"
        refusing = RefusingAddress(host, port, name, sock)
        self._refusing.append(refusing)
        return refusing

    def close(self) -> None:
        """Stop every server, free every address, stop the loop and its thread."""
        try:
            for server in self.servers:
                server.stop()
            for refusing in self._refusing:
                refusing.close()
            self._call(_cancel_leftovers())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> MxFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_leftovers() -> None:
    """Cancel any task still on the world loop (none is expected) and await it."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
