"""The SMTP session of intake, without I/O (sans-I/O, as h11 does for HTTP).

A :class:`Session` takes what the client sent -- one command line at a time, a DATA
body once it has been read, the result of a password check or of a TLS handshake --
and returns what to do: replies to send and actions for the socket class
(:class:`StartTls`, :class:`Authenticate`, :class:`ReceiveData`, :class:`Enqueue`,
:class:`Close`). Command ordering (the 503 rules), MAIL and RCPT parameters, the
relay decision and the body checks live here; buffers, deadlines, TLS, password
checks and the queue stay in ``server.py``. Every rule is tested with dialogues in
``tests/cases/smtp_sessions/`` that need no socket.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry.config import ListenMode, ServerConfig
from ferry.domains import address_domain
from ferry.envelope import EnvelopeIn, Priority, RecipientIn, Reply
from ferry.events import (
    Accepted,
    AuthFailed,
    AuthSucceeded,
    ConnectionRejected,
    Rejected,
    TlsStarted,
    emit,
)
from ferry.idempotency import parse_idempotency_key
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
from ferry.message import (
    MAX_HOPS,
    count_received,
    header_block,
    header_values,
    message_id,
    priority_from_headers,
    protocol_name,
    received_header,
)
from ferry.queue.base import new_queue_id

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
COMMAND_LINE_LIMIT = 512
# RFC 4954 §4: an AUTH response line may be longer (12288 octets is the usual bound).
AUTH_LINE_LIMIT = 12288


# -- actions: what the socket class must do besides sending replies --------------------


@dataclass(frozen=True, slots=True)
class StartTls:
    """Send the replies so far, drop any pipelined plain text, run the TLS handshake,
    then call :meth:`Session.tls_started` (or close on failure)."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials, then call :meth:`Session.auth_succeeded` or
    :meth:`Session.auth_failed`."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ReceiveData:
    """Read a DATA body up to <CRLF>.<CRLF>, keeping at most ``limit`` octets, then call
    :meth:`Session.data_received`. ``declared_size`` is MAIL's SIZE= (0 when absent)."""

    limit: int
    declared_size: int


@dataclass(frozen=True, slots=True)
class Enqueue:
    """Store the message durably, then call :meth:`Session.enqueued` or
    :meth:`Session.enqueue_failed`."""

    envelope: EnvelopeIn
    queue_id: str
    received_at: float
    #: ``(key, fingerprint)`` when an authenticated client's message carries an
    #: ``Idempotency-Key:`` header: a repeat within the TTL is not queued twice.
    idempotency: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Send the replies so far and close the connection."""


Action = Reply | StartTls | Authenticate | ReceiveData | Enqueue | Close

# What the session waits for next.
State = Literal["command", "auth_plain", "auth_user", "auth_password", "busy", "closed"]


@dataclass(slots=True)
class Transaction:
    """One MAIL ... DATA transaction."""

    sender: str | None = None
    recipients: list[RecipientIn] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    rcpt_attempts: int = 0
    smtputf8: bool = False
    body_8bit: bool = False
    priority: Priority | None = None
    envid: str | None = None
    ret: str | None = None
    size: int = 0  # declared by SIZE= (RFC 1870), 0 when not given


# Commands allowed on a submission listener before STARTTLS (RFC 3207 §4).
_BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET"})


class Session:
    """One client's SMTP dialogue as a state machine over plain values."""

    def __init__(
        self,
        cfg: ServerConfig,
        *,
        mode: ListenMode,
        peer_ip: str,
        policy: RelayPolicy,
        aliases: AliasTable,
        tls: str | None = None,
        tls_available: bool = False,
        new_id: Callable[[float], str] = new_queue_id,
        clock: Callable[[], float] = time.time,
        session_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        #: In every log line about this connection and the messages it hands over.
        self.session_id = session_id
        self.mode = mode
        self.peer_ip = peer_ip
        self.policy = policy
        self.aliases = aliases
        self.tls = tls  # a description of the TLS session, None in plain text
        self.tls_available = tls_available  # a certificate is loaded (STARTTLS possible)
        self.new_id = new_id
        self.clock = clock
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.user_priority: Priority | None = None
        self.txn = Transaction()
        self.errors = 0
        self.state: State = "command"
        self._auth_mech = ""
        self._auth_username = ""
        self._auth_login_name = b""
        self._pending: tuple[EnvelopeIn, str] | None = None
        self._out: list[Action] = []

    # -- inputs ----------------------------------------------------------------

    def greet(self) -> list[Action]:
        self._reply(220, None, f"{self.cfg.hostname} ESMTP Ferry")
        return self._take()

    @property
    def line_limit(self) -> int:
        """The longest line the next input may be (octets, line ending included)."""
        return COMMAND_LINE_LIMIT if self.state == "command" else AUTH_LINE_LIMIT

    def receive_line(self, line: bytes | None) -> list[Action]:
        """One line from the client without its line ending; None when it was longer
        than :attr:`line_limit`."""
        if self.state in ("auth_plain", "auth_user", "auth_password"):
            self._auth_response(line)
        elif self.state == "command":
            self._command(line)
        return self._take()

    def data_received(self, raw: bytes | None, size: int) -> list[Action]:
        """The DATA body as read (dot-stuffing and final CRLF in place), or None when it
        was larger than the limit; ``size`` is its full length either way."""
        txn, self.txn = self.txn, Transaction()
        self.state = "command"
        if raw is None:
            self._reject(Reply(552, "5.3.4", "Error: message too big"), size=size)
            return self._take()
        data = check_body(raw, self.cfg.max_line_length, self.cfg.bare_lf)
        if isinstance(data, Reply):
            self._reject(data, size=size)
            return self._take()
        block = header_block(data)
        if count_received(block) > MAX_HOPS:
            self._reject(Reply(554, "5.4.6", "Error: too many hops (mail loop?)"), size=size)
            return self._take()
        # Priority.LOW is 0, so test for None rather than truthiness.
        candidates = (txn.priority, priority_from_headers(block), self.user_priority)
        priority = next((p for p in candidates if p is not None), Priority.NORMAL)
        now = self.clock()
        qid = self.new_id(now)
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
        self._pending = (envelope, qid)
        self.state = "busy"
        self._out.append(Enqueue(envelope, qid, now, self._idempotency(block, txn, data)))
        return self._take()

    def enqueued(self) -> list[Action]:
        """The message of the last :class:`Enqueue` is stored durably (fsynced)."""
        assert self._pending is not None
        envelope, qid = self._pending
        self._pending = None
        self.state = "command"
        emit(
            Accepted(
                queue_id=qid,
                client=self.peer_ip,
                sender=envelope.sender,
                recipients=tuple(r.address for r in envelope.recipients),
                size=len(envelope.data),
                priority=envelope.priority,
                user=self.auth_user,
                tls=self.tls,
                message_id=message_id(envelope.data),
                session=self.session_id,
            )
        )
        self._reply(250, "2.0.0", f"Ok: queued as {qid}")
        return self._take()

    def _idempotency(self, block: bytes, txn: Transaction, data: bytes) -> tuple[str, str] | None:
        """The message's idempotency key, scoped to its authenticated user, and a
        fingerprint of the message as the client sent it (our Received: left out)."""
        if self.auth_user is None:
            return None  # an unauthenticated client's key could shadow anyone's
        values = header_values(block, "Idempotency-Key")
        if not values:
            return None
        key = parse_idempotency_key(values[0])
        if key is None:
            return None
        digest = hashlib.sha256()
        for part in (txn.sender or "", *sorted(r.address for r in txn.recipients)):
            digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(data)
        return f"smtp:{self.auth_user}:{key}", digest.hexdigest()

    def replayed(self, original: str) -> list[Action]:
        """The last :class:`Enqueue` repeats an earlier message (same key, same content):
        answer as the first time, with the first queue id; nothing is queued."""
        self._pending = None
        self.state = "command"
        self._reply(250, "2.0.0", f"Ok: queued as {original} (a repeat: not queued again)")
        return self._take()

    def idempotency_conflict(self) -> list[Action]:
        """The last :class:`Enqueue` reuses an idempotency key with other content."""
        self._pending = None
        self.state = "command"
        self._reject(
            Reply(554, "5.6.0", "Idempotency-Key already used for a different message"),
            error="idempotency_key_reused",
        )
        return self._take()

    def enqueue_failed(self, error: str) -> list[Action]:
        """Storing the message of the last :class:`Enqueue` failed (``error``: its type)."""
        self._pending = None
        self.state = "command"
        self._reject(
            Reply(451, "4.3.0", "Error: queue file write error, try again later"), error=error
        )
        return self._take()

    def auth_succeeded(self, user: str, priority: Priority | None) -> list[Action]:
        self.state = "command"
        self.auth_user = user
        self.user_priority = priority
        emit(AuthSucceeded(self.peer_ip, user, self._auth_mech, session=self.session_id))
        self._reply(235, "2.7.0", "Authentication successful")
        return self._take()

    def auth_failed(self, failures: int) -> list[Action]:
        self.state = "command"
        emit(
            AuthFailed(
                self.peer_ip,
                self._auth_username[:64],
                self._auth_mech,
                failures,
                session=self.session_id,
            )
        )
        self._error(535, "5.7.8", "Authentication credentials invalid")
        return self._take()

    def tls_started(self, description: str) -> list[Action]:
        self.tls = description
        # RFC 3207 §4.2: the session starts over; the client must EHLO again.
        self.helo, self.esmtp = None, False
        self.txn = Transaction()
        self.state = "command"
        emit(TlsStarted(self.peer_ip, description, session=self.session_id))
        return self._take()

    # -- commands ----------------------------------------------------------------

    def _command(self, line: bytes | None) -> None:
        if line is None:
            self._error(500, "5.5.2", "Error: command line too long")
            return
        verb_b, _, arg_b = line.partition(b" ")
        verb = verb_b.decode("ascii", "replace").upper()
        arg = arg_b.decode("utf-8", "surrogateescape").strip() or None
        handler = self._handlers.get(verb)
        if handler is None:
            self._error(500, "5.5.2", "Error: command not recognized")
            return
        if (
            self.mode == "submission"
            and self.tls is None
            and self.tls_available
            and verb not in _BEFORE_TLS
        ):
            # RFC 3207 §4: a server may require TLS before other commands.
            self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        handler(self, arg)

    def _need_helo(self) -> bool:
        """RFC 5321 §4.1.4: a client must say HELO/EHLO before a mail transaction.
        True (and a 503 queued) when it has not and ``server.require_helo`` is set."""
        if self.helo is None and self.cfg.require_helo:
            self._error(503, "5.5.1", "Send HELO/EHLO first")
            return True
        return False

    def _ehlo(self, arg: str | None) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self.helo, self.esmtp = arg, True
        self.txn = Transaction()
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
        if self.tls is None and self.tls_available:
            lines.append("STARTTLS")
        if self._auth_offered() and self.auth_user is None:
            lines.append("AUTH PLAIN LOGIN")
        self._out.append(Reply(250, None, "\n".join(lines)))

    def _helo_cmd(self, arg: str | None) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: HELO hostname")
            return
        self.helo, self.esmtp = arg, False
        self.txn = Transaction()
        self._reply(250, None, self.cfg.hostname)

    def _noop(self, arg: str | None) -> None:
        self._reply(250, "2.0.0", "Ok")

    def _rset(self, arg: str | None) -> None:
        self.txn = Transaction()
        self._reply(250, "2.0.0", "Ok")

    def _quit(self, arg: str | None) -> None:
        self._reply(221, "2.0.0", "Bye")
        self._close()

    def _vrfy(self, arg: str | None) -> None:
        # RFC 5321 §3.5.3: 252 = cannot verify, but will accept and try.
        self._reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def _help(self, arg: str | None) -> None:
        self._reply(
            214,
            "2.0.0",
            "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT"
            " STARTTLS AUTH VRFY HELP",
        )

    def _starttls(self, arg: str | None) -> None:
        if not self.tls_available or self.tls is not None:
            self._error(502, "5.5.1", "Error: STARTTLS not available")
            return
        if arg:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
            return
        self._reply(220, "2.0.0", "Ready to start TLS")
        self.state = "busy"
        self._out.append(StartTls())

    def _auth_offered(self) -> bool:
        # RFC 4954 §4: never offer plain-text passwords over an unencrypted channel.
        return self.tls is not None or not self.tls_available

    def _auth(self, arg: str | None) -> None:
        if self.helo is None or not self.esmtp:
            self._error(503, "5.5.1", "Error: send EHLO first")
            return
        if self.auth_user is not None:
            self._error(503, "5.5.1", "Error: already authenticated")
            return
        if self.txn.sender is not None:
            self._error(503, "5.5.1", "Error: AUTH not permitted during a mail transaction")
            return
        if not self._auth_offered():
            # RFC 4954 §6
            self._error(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return
        mech, _, initial = (arg or "").partition(" ")
        mech = mech.upper()
        initial = initial.strip()
        if mech not in ("PLAIN", "LOGIN"):
            self._error(504, "5.5.4", "Unrecognized authentication type")
            return
        self._auth_mech = mech
        self._auth_username = ""
        if mech == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._challenge("", "auth_plain")
        elif initial:
            self._auth_login_user(initial)
        else:
            self._challenge("VXNlcm5hbWU6", "auth_user")  # "Username:"

    def _challenge(self, prompt: str, state: State) -> None:
        self._reply(334, None, prompt)
        self.state = state

    def _auth_response(self, line: bytes | None) -> None:
        state, self.state = self.state, "command"
        if line is None:
            self._reject(Reply(500, "5.5.6", "Authentication exchange line is too long"))
            return
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self._reject(Reply(501, "5.0.0", "Authentication cancelled"))
            return
        if state == "auth_plain":
            self._auth_plain(text)
        elif state == "auth_user":
            self._auth_login_user(text)
        else:
            self._auth_login_password(text)

    def _auth_plain(self, blob: str) -> None:
        try:
            parts = _b64decode(blob).split(b"\0")
            if len(parts) != 3:
                raise CommandError(501, "5.5.2", "Cannot decode AUTH PLAIN response")
            _authzid, username, password = parts
        except CommandError as exc:
            self._reject(exc.reply)
            return
        self._authenticate(username, password)

    def _auth_login_user(self, blob: str) -> None:
        try:
            username = _b64decode(blob)
        except CommandError as exc:
            self._reject(exc.reply)
            return
        self._auth_login_name = username  # decoded with the password, as one response
        self._challenge("UGFzc3dvcmQ6", "auth_password")  # "Password:"

    def _auth_login_password(self, blob: str) -> None:
        try:
            password = _b64decode(blob)
        except CommandError as exc:
            self._reject(exc.reply)
            return
        self._authenticate(self._auth_login_name, password)

    def _authenticate(self, username_b: bytes, password_b: bytes) -> None:
        try:
            username = username_b.decode("utf-8")
            password = password_b.decode("utf-8")
        except UnicodeDecodeError:
            self._error(501, "5.5.2", "Cannot decode AUTH response (not UTF-8)")
            return
        self._auth_username = username
        self.state = "busy"
        self._out.append(Authenticate(self._auth_mech, username, password))

    def _mail(self, arg: str | None) -> None:
        if self._need_helo():
            return
        if self.mode == "submission" and self.auth_user is None:
            self._reject(Reply(530, "5.7.0", "Authentication required"))
            return
        if self.txn.sender is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            path = parse_path_arg(arg, "FROM", smtputf8_offered=True)
            txn = Transaction(sender=path.address)
            self._mail_params(txn, path.params)
            if path.address:
                problem = check_mailbox(path.address, utf8=txn.smtputf8)
                if problem:
                    raise CommandError(501, "5.1.7", f"Bad sender address syntax: {problem}")
        except CommandError as exc:
            self._reject(exc.reply, command="MAIL")
            return
        self.txn = txn
        self._reply(250, "2.1.0", "Ok")

    def _mail_params(self, txn: Transaction, params: dict[str, str | None]) -> None:
        for key, value in params.items():
            if key == "SIZE":
                if not value or not value.isdigit():
                    raise CommandError(501, "5.5.4", "SIZE requires a number")
                if int(value) > self.cfg.max_message_size:
                    # RFC 1870 §6
                    raise CommandError(552, "5.3.4", "Message size exceeds fixed maximum")
                txn.size = int(value)
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

    def _rcpt(self, arg: str | None) -> None:
        if self._need_helo():
            return
        txn = self.txn
        if txn.sender is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
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
            self._reject(exc.reply, command="RCPT")
            return
        address = path.address
        if len(txn.recipients) >= self.cfg.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452, and the client sends the rest later.
            self._reject(Reply(452, "4.5.3", "Error: too many recipients"), rcpt=address)
            return
        decision = decide_rcpt(
            self.policy,
            recipient_domain=address_domain(address),
            client_ip=self.peer_ip,
            authenticated=self.auth_user is not None,
        )
        if decision is RcptDecision.DENIED:
            self._reject(Reply(554, "5.7.1", f"<{address}>: Relay access denied"), rcpt=address)
            return
        if decision is RcptDecision.LOCAL:
            targets = self.aliases.expand(address)
            if not targets:
                self._reject(
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
        self._reply(250, "2.1.5", "Ok")

    def _data(self, arg: str | None) -> None:
        if self._need_helo():
            return
        txn = self.txn
        if arg:
            self._error(501, "5.5.4", "Syntax: DATA")
            return
        if txn.sender is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return
        if not txn.recipients:
            if txn.rcpt_attempts:
                # RFC 2920 §3.1: pipelined DATA after every RCPT failed.
                self._error(554, "5.5.1", "Error: no valid recipients")
            else:
                self._error(503, "5.5.1", "Error: need RCPT command")
            return
        self._reply(354, None, "End data with <CR><LF>.<CR><LF>")
        self.state = "busy"
        self._out.append(ReceiveData(self.cfg.max_message_size, txn.size))

    _handlers: dict[str, Callable[[Session, str | None], None]] = {
        "EHLO": _ehlo,
        "HELO": _helo_cmd,
        "MAIL": _mail,
        "RCPT": _rcpt,
        "DATA": _data,
        "RSET": _rset,
        "NOOP": _noop,
        "QUIT": _quit,
        "STARTTLS": _starttls,
        "AUTH": _auth,
        "VRFY": _vrfy,
        "HELP": _help,
    }

    # -- output ------------------------------------------------------------------

    def _reply(self, code: int, enhanced: str | None, text: str) -> None:
        self._out.append(Reply(code, enhanced, text))

    def _error(self, code: int, enhanced: str, text: str) -> None:
        self._reply(code, enhanced, text)
        self.errors += 1
        if self.errors >= self.cfg.max_errors:
            self._reply(421, "4.7.0", f"{self.cfg.hostname} Too many errors, closing connection")
            emit(ConnectionRejected(self.peer_ip, 421, "too many errors", session=self.session_id))
            self._close()

    def _reject(self, reply: Reply, **fields: Any) -> None:
        emit(Rejected(self.peer_ip, reply, **fields, session=self.session_id))
        self._error(reply.code, reply.enhanced or "", reply.text)

    def _close(self) -> None:
        self.state = "closed"
        self._out.append(Close())

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out


@functools.lru_cache(maxsize=256)
def reply_bytes(reply: Reply) -> bytes:
    """A reply as sent: its lines, each ending in CRLF. Client text quoted in a reply
    may carry bytes that were not UTF-8 (kept as surrogates): they go out as "?".

    Cached: most replies are the same few values (``250 2.1.0 Ok``, ``354 ...``) sent
    for every message; a reply is a frozen value, so its bytes never change."""
    return (str(reply) + "\r\n").encode("utf-8", "replace")


# -- the body checks ------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")


def check_body(raw: bytes, max_line_length: int, bare_lf: str) -> bytes | Reply:
    """Line endings, line length and dot-unstuffing of a DATA body (RFC 5321 §4.5.2).

    ``raw`` is the body as read, up to and including the CRLF before the final dot.
    Returns the message to store, or the reply refusing it. Every step is one pass of
    a bytes method over the whole buffer (no Python loop per line).
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        if bare_lf == "reject":
            # RFC 5321 §2.3.8: bare CR and LF are not line endings.
            return Reply(
                554, "5.6.0", "Error: message contains a bare CR or LF; use CRLF line endings"
            )
        raw = _LINE_END.sub(b"\r\n", raw)
    # RFC 5321 §4.5.3.1.6 (a text line's limit; ours is configurable).
    if has_long_line(raw, max_line_length):
        return Reply(554, "5.6.0", f"Error: a line is longer than {max_line_length} octets")
    return unstuff(raw)


def has_long_line(raw: bytes, limit: int) -> bool:
    """True when a line of ``raw`` is longer than ``limit`` octets, its CRLF not
    counted (``raw`` has CRLF line ends only; a last line may lack its CRLF).

    No list of lines: a line over the limit is a run of more than ``limit`` octets
    without LF, and every such run holds a whole block of ``(limit + 1) // 2`` octets
    starting at a multiple of that size. So one ``find`` (memchr) per block, stopping
    at the block's first LF, rules a block out; only a block without LF is measured.
    About 50 short searches for 100 KB at the default limit, where splitting into
    lines made 1,300 objects (a regular expression is slower still: it retries the
    run from every octet).
    """
    n = len(raw)
    step = max(1, (limit + 1) // 2)
    for pos in range(0, n - step + 1 if n > limit else 0, step):
        if raw.find(b"\n", pos, pos + step) >= 0:
            continue
        start = raw.rfind(b"\n", 0, pos) + 1
        end = raw.find(b"\n", pos + step)
        if end < 0:  # the last line, without CRLF
            if n - start > limit:
                return True
        elif end - start > limit + 1:  # the line and its CR
            return True
    return False


def unstuff(raw: bytes) -> bytes:
    """RFC 5321 §4.5.2: remove the dot a sender doubled at the start of a line."""
    # Only a doubled dot is undone: a client that forgot to stuff a line such as ".x"
    # keeps its dot (lenient, like today's MTAs).
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
