"""The Python API: the whole relay in-process, with hooks for embedders.

::

    from ferry import Relay, RelayConfig

    async with Relay(RelayConfig.from_file("ferry.toml")) as relay:
        queue_id = await relay.submit(message)      # durably queued, like an SMTP 250
        results = await relay.send(message)         # ... and wait for the outcomes
        stats = relay.get_stats()                   # the SMTPy seed's shape

:class:`Relay` runs Ferry's ``Service`` -- listeners, the queue and delivery -- on the
caller's event loop. SMTP sessions and delivery always run in this process
(``server.workers`` and ``delivery.workers`` are forced to 0), so the hooks,
:meth:`Relay.send` and :meth:`Relay.get_stats` see every message and outcome as it
happens.

Hooks (Zetian's ``MessageReceived`` + ``QueueForRelayAsync``, and delivery callbacks):

- a *routing* hook sees each message before it is queued -- from SMTP or from
  :meth:`Relay.submit` -- and may set its priority, its route or its smart host;
- *accepted*, *delivered*, *deferred*, *failed* and *expired* hooks are called after
  the fact, per message (accepted) or per recipient (the others).

The hooks are fed by Ferry's typed events (:mod:`ferry.events`): a delivery hook's
:class:`DeliveryResult` carries the server's whole reply, as the event does.

Hooks may be coroutine functions or plain functions. One that raises is logged and
changes nothing: the message is queued (or stays queued) as it was. The DSNs Ferry
sends are messages too: their deliveries reach the per-recipient hooks (they are
never "accepted").
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.message
import email.policy
import email.utils
import inspect
import logging
import os
import re
import signal
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any, Literal, NewType, TypeAlias, TypeVar

from ferry.config import RelayConfig
from ferry.delivery.retry import RetryPolicy, fill_give_up, policy_for
from ferry.envelope import Address, EnvelopeIn, Priority, RecipientIn, Reply, Status
from ferry.events import (
    Accepted,
    Event,
    ExpiredCleared,
    HookFailed,
    OperatorAction,
    RecipientOutcome,
    emit,
    subscribe,
)
from ferry.queue.base import MessageInfo, QueueStats, RecipientInfo
from ferry.routes import check_route_target
from ferry.service import Service
from ferry.stats import combine

__all__ = [
    "DEFAULT_SEND_TIMEOUT",
    "AcceptedHook",
    "AcceptedMessage",
    "DeliveryHook",
    "DeliveryResult",
    "IncomingMessage",
    "MessageLike",
    "QueueId",
    "Relay",
    "RelayQueue",
    "RoutingHook",
    "prepare_message",
]

logger = logging.getLogger("ferry.api")

#: A queue id as returned by :meth:`Relay.submit` (a plain ``str`` at run time).
QueueId = NewType("QueueId", str)

#: What :meth:`Relay.submit` takes: a message object, or the raw RFC 5322 bytes.
MessageLike: TypeAlias = email.message.Message | bytes | str

#: How long :meth:`Relay.send` waits for final outcomes unless told otherwise (seconds).
DEFAULT_SEND_TIMEOUT = 60.0

#: How often a waiter re-reads the queue, to notice changes no event announces
#: (``ferry queue cancel`` from another process, for instance).
_POLL_SECONDS = 1.0

#: How long :meth:`Relay.stop` lets running hooks finish before cancelling them.
_HOOK_GRACE_SECONDS = 5.0

#: Message bytes for an ASCII-only envelope: CRLF line ends, source headers kept as
#: they were (re-folding them would break a DKIM signature already made).
_POLICY = email.policy.SMTP.clone(refold_source="none")
_POLICY_UTF8 = email.policy.SMTPUTF8.clone(refold_source="none")

_OUTCOME_HOOKS = {
    Status.DELIVERED: "delivered",
    Status.DEFERRED: "deferred",
    Status.FAILED: "failed",
    Status.EXPIRED: "expired",
}


# -- value types ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One recipient's outcome: truthy when the message was delivered to it.

    ``status`` is the recipient's state (Delivered, Failed, Expired, Cancelled when
    final; Queued, Deferred or InProgress when :meth:`Relay.send` timed out first).
    ``route`` says how it left: ``"direct"``, ``"smarthost:<name>"`` or
    ``"host:<host>:<port>"``; ``relay`` is the server that gave ``reply``
    (``"mx1.example.com[192.0.2.1]:25"``); ``tls`` the protocol and cipher, if any.
    """

    recipient: str
    status: Status
    queue_id: str | None = None
    route: str | None = None
    reply: Reply | None = None
    relay: str | None = None
    tls: str | None = None
    attempts: int = 0

    def __bool__(self) -> bool:
        return self.status is Status.DELIVERED

    @property
    def delivered(self) -> bool:
        """True when the recipient's server accepted the message."""
        return self.status is Status.DELIVERED

    @property
    def final(self) -> bool:
        """True when nothing more will happen to this recipient."""
        return self.status.is_final

    @property
    def smart_host(self) -> str | None:
        """The smart host's name when the message went through one."""
        if self.route and self.route.startswith("smarthost:"):
            return self.route.removeprefix("smarthost:")
        return None

    @classmethod
    def from_recipient(cls, info: RecipientInfo) -> DeliveryResult:
        """The result as the queue records it."""
        last = info.history[-1] if info.history else None
        return cls(
            recipient=info.address,
            status=info.status,
            queue_id=info.message_id,
            route=info.route,
            reply=info.last_reply,
            relay=last.next_hop if last is not None else None,
            tls=last.tls if last is not None else None,
            attempts=info.attempts,
        )

    @classmethod
    def from_event(cls, event: RecipientOutcome) -> DeliveryResult:
        """The result as an outcome event reports it (see :mod:`ferry.events`)."""
        return cls(
            recipient=event.recipient,
            status=event.status,
            queue_id=event.queue_id,
            route=event.route,
            reply=event.reply,
            relay=event.next_hop,
            tls=event.tls,
            attempts=event.attempt,
        )


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    """A message just queued (the *accepted* hook's argument).

    ``client`` is the SMTP client's address, or ``"api"`` for :meth:`Relay.submit`.
    """

    queue_id: str
    sender: str
    recipients: int
    size: int
    priority: Priority
    client: str | None = None
    user: str | None = None


class IncomingMessage:
    """A message about to be queued, as the routing hook sees it.

    Read: ``sender``, ``recipients``, ``data`` (the bytes to be stored), ``headers``
    (parsed lazily), ``from_address``, ``client_address`` (None for the API),
    ``auth_user``. Set: ``priority``, ``route`` (a smart host's name, ``"direct"`` or
    ``"mx:host[:port]"``), or ``smart_host`` (a configured smart host's name).
    """

    def __init__(self, envelope: EnvelopeIn, smart_hosts: Sequence[str] = ()) -> None:
        self._envelope = envelope
        self._smart_hosts = tuple(smart_hosts)
        self._priority = envelope.priority
        self._route: str | None = envelope.extra.get("route")
        self._headers: email.message.EmailMessage | None = None

    # -- what arrived

    @property
    def sender(self) -> str:
        """The envelope sender (``""`` for the null sender ``<>``)."""
        return self._envelope.sender

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope recipients."""
        return tuple(r.address for r in self._envelope.recipients)

    @property
    def data(self) -> bytes:
        """The message bytes, as they will be stored."""
        return self._envelope.data

    @property
    def size(self) -> int:
        """The message size in bytes."""
        return len(self._envelope.data)

    @property
    def headers(self) -> email.message.EmailMessage:
        """The message's header fields, parsed on first use (the body is not parsed)."""
        if self._headers is None:
            parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(self.data)
            assert isinstance(parsed, email.message.EmailMessage)
            self._headers = parsed
        return self._headers

    @property
    def from_address(self) -> str | None:
        """The address in the From: header (Zetian's ``e.Message.From?.Address``)."""
        addresses = _addresses(self.headers.get_all("From") or [])
        return addresses[0] if addresses else None

    @property
    def subject(self) -> str | None:
        """The Subject: header, if any."""
        value = self.headers.get("Subject")
        return None if value is None else str(value)

    @property
    def client_address(self) -> str | None:
        """The SMTP client's IP address; None for a message from :meth:`Relay.submit`."""
        return self._envelope.client_address

    @property
    def auth_user(self) -> str | None:
        """The user the SMTP client authenticated as, if any."""
        return self._envelope.auth_user

    # -- what the hook may change

    @property
    def priority(self) -> Priority:
        """The delivery priority (higher is served first)."""
        return self._priority

    @priority.setter
    def priority(self, value: Priority | str | int) -> None:
        self._priority = Priority.parse(value)

    @property
    def route(self) -> str | None:
        """This message's route: a smart host name, ``"direct"``, ``"mx:host[:port]"``,
        or None for the configured routing."""
        return self._route

    @route.setter
    def route(self, value: str | None) -> None:
        self._route = None if value is None else check_route(value, self._smart_hosts)

    @property
    def smart_host(self) -> str | None:
        """The smart host this message is routed through, if one was chosen."""
        return self._route if self._route in self._smart_hosts else None

    @smart_host.setter
    def smart_host(self, name: str | None) -> None:
        if name is not None and name not in self._smart_hosts:
            raise ValueError(f"no smart host named {name!r} (have: {list(self._smart_hosts)})")
        self._route = name

    def _apply(self) -> None:
        self._envelope.priority = self._priority
        if self._route is None:
            self._envelope.extra.pop("route", None)
        else:
            self._envelope.extra["route"] = self._route

    def __repr__(self) -> str:
        return (
            f"<IncomingMessage from={self.sender!r} to={list(self.recipients)!r}"
            f" priority={self.priority.name} route={self.route!r}>"
        )


RoutingHook: TypeAlias = Callable[[IncomingMessage], Awaitable[None] | None]
AcceptedHook: TypeAlias = Callable[[AcceptedMessage], Awaitable[None] | None]
DeliveryHook: TypeAlias = Callable[[DeliveryResult], Awaitable[None] | None]

_R = TypeVar("_R", bound=RoutingHook)
_A = TypeVar("_A", bound=AcceptedHook)
_D = TypeVar("_D", bound=DeliveryHook)


def check_route(route: str, smart_hosts: Sequence[str]) -> str:
    """``route`` if it names a way out (``direct``, ``mx:host[:port]``, a smart host).

    The same parser as ``[routes]`` and the delivery engine (:mod:`ferry.routes`).
    """
    check_route_target(route, smart_hosts)
    return route.strip()


# -- messages ---------------------------------------------------------------------------


def _addresses(values: Iterable[Any]) -> list[str]:
    """The addr-specs in address header values (groups and empty entries skipped)."""
    return [addr for _name, addr in email.utils.getaddresses([str(v) for v in values]) if addr]


def _check_address(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    try:
        Address.parse(address)
    except ValueError:
        raise ValueError(f"not an email address: {address!r}") from None
    if any(c in address for c in " \r\n<>"):
        raise ValueError(f"not an email address: {address!r}")
    return address


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _strip_header(data: bytes, name: bytes) -> bytes:
    """``data`` without the header field ``name`` (with its continuation lines)."""
    match = _HEADER_END.search(data)
    head, rest = (data[: match.start()], data[match.start() :]) if match else (data, b"")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + rest


def prepare_message(
    message: MessageLike,
    recipients: Iterable[str] | str | None = None,
    mail_from: str | None = None,
    *,
    hostname: str = "localhost",
) -> tuple[bytes, str, list[str]]:
    """Turn what the caller has into ``(bytes, envelope sender, recipients)``.

    - ``message``: an :class:`email.message.EmailMessage` (or ``Message``) is written
      with CRLF line ends (the SMTPUTF8 policy when an address is not ASCII); bytes
      and str are taken as RFC 5322 text (bare LF becomes CRLF).
    - ``recipients`` default to the To:, Cc: and Bcc: addresses; ``mail_from`` to
      the From: address. Bcc: is never stored or sent.
    - A missing Date: or Message-ID: is added, as an MTA does for local submission.
    """
    if isinstance(message, str):
        message = message.encode("utf-8")
    headers: email.message.Message
    if isinstance(message, bytes | bytearray | memoryview):
        data = _LINE_END.sub(b"\r\n", bytes(message))
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(data)
        obj: email.message.Message | None = None
    elif isinstance(message, email.message.Message):
        headers, obj = message, message
        data = b""
    else:
        raise TypeError(f"a message is an EmailMessage or bytes, not {type(message).__name__}")

    if recipients is None:
        found: list[str] = []
        for name in ("To", "Cc", "Bcc"):
            found += _addresses(headers.get_all(name) or [])
        rcpts = found
    elif isinstance(recipients, str):
        rcpts = [recipients]
    else:
        rcpts = list(recipients)
    unique: dict[str, str] = {}
    for rcpt in rcpts:
        address = _check_address(rcpt)
        unique.setdefault(address.lower(), address)
    if not unique:
        raise ValueError("no recipients: pass recipients= or set To:, Cc: or Bcc:")
    if mail_from is None:
        senders = _addresses(headers.get_all("From") or [])
        if not senders:
            raise ValueError("no sender: pass mail_from= or set From:")
        mail_from = senders[0]
    sender = "" if mail_from in ("", "<>") else _check_address(mail_from)
    addresses = list(unique.values())
    utf8 = not sender.isascii() or not all(a.isascii() for a in addresses)

    missing_date = headers.get("Date") is None
    missing_id = headers.get("Message-ID") is None
    if obj is not None:
        if missing_date or missing_id or obj.get("Bcc") is not None:
            obj = copy.deepcopy(obj)
            del obj["Bcc"]
            if missing_date:
                obj["Date"] = email.utils.formatdate(localtime=True)
            if missing_id:
                obj["Message-ID"] = email.utils.make_msgid(domain=hostname)
        data = obj.as_bytes(policy=_POLICY_UTF8 if utf8 else _POLICY)
    else:
        if headers.get("Bcc") is not None:
            data = _strip_header(data, b"bcc")
        added = b""
        if missing_date:
            added += f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode()
        if missing_id:
            added += f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n".encode()
        data = added + data
    return data, sender, addresses


# -- the queue, Zetian's operations ------------------------------------------------------


class RelayQueue:
    """The relay's queue: Zetian's operations and fields (``relay.queue``)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def _queue(self) -> Any:
        service = self._relay._service
        if service is None or service.queue is None:
            raise RuntimeError("the relay is not running")
        return service.queue

    async def get(self, queue_id: str) -> MessageInfo | None:
        """One message with its recipients and their attempt history (None: no such id)."""
        info: MessageInfo | None = await self._queue().get(queue_id)
        return None if info is None else fill_give_up(self._policy(), info)

    def _policy(self) -> RetryPolicy:
        # ``gives_up``: the real give-up time, the one `ferry queue show` prints.
        return policy_for(self._relay.config)

    async def get_all(self, *, limit: int | None = None) -> list[MessageInfo]:
        """Every message in the queue (newest first), with its recipients."""
        return await self._list(None, limit)

    async def get_by_status(
        self, status: Status | str, *, limit: int | None = None
    ) -> list[MessageInfo]:
        """The messages whose (derived) status is ``status``, newest first."""
        return await self._list(
            status if isinstance(status, Status) else Status.parse(status), limit
        )

    async def _list(self, status: Status | None, limit: int | None) -> list[MessageInfo]:
        out: list[MessageInfo] = []
        page = 500
        while limit is None or len(out) < limit:
            want = page if limit is None else min(page, limit - len(out))
            batch: list[MessageInfo] = await self._queue().list(
                status=status, limit=want, offset=len(out)
            )
            out += batch
            if len(batch) < want:
                break
        policy = self._policy()
        return [fill_give_up(policy, m) for m in out]

    async def read_message(self, queue_id: str) -> bytes | None:
        """The stored message bytes (None once every recipient is final: the body goes then)."""
        data: bytes | None = await self._queue().read_message(queue_id)
        return data

    async def retry(self, queue_id: str) -> int:
        """Make the message's pending recipients due now; returns how many."""
        n: int = await self._queue().retry(queue_id, now=time.time())
        emit(OperatorAction("retry", queue_id, n, via="api"))
        service = self._relay._service
        if n and service is not None and service.scheduler is not None:
            service.scheduler.notify()
        return n

    async def cancel(self, queue_id: str) -> int:
        """Cancel the message's not yet final recipients; returns how many."""
        n: int = await self._queue().cancel(queue_id, now=time.time())
        emit(OperatorAction("cancel", queue_id, n, via="api"))
        self._relay._poke(queue_id)
        return n

    async def remove(self, queue_id: str) -> bool:
        """Delete the message and its history; False when there was no such message."""
        removed: bool = await self._queue().remove(queue_id)
        emit(OperatorAction("remove", queue_id, int(removed), via="api"))
        self._relay._poke(queue_id)
        return removed

    async def clear_expired(self) -> int:
        """Delete the messages that ended Expired; returns how many."""
        n: int = await self._queue().clear_expired()
        return n

    async def statistics(self) -> QueueStats:
        """Counts and ages in Zetian's shape (``stats.queued_messages``...)."""
        stats: QueueStats = await self._queue().statistics(now=time.time())
        return stats


# -- the relay -------------------------------------------------------------------------


class _Waiter:
    """One :meth:`Relay.wait` call: which recipients have reached the awaited state."""

    def __init__(self, until: Literal["final", "attempted"]) -> None:
        self.until = until
        self.done: dict[str, DeliveryResult] = {}
        self.pending: set[str] | None = None
        self.wake = asyncio.Event()

    def record(self, result: DeliveryResult) -> None:
        if self.until == "attempted" or result.status.is_final:
            self.done[result.recipient] = result
            if self.pending is not None and self.pending <= self.done.keys():
                self.wake.set()


# Relays running per event loop: hooks need an ownership check only when one loop
# runs several relays (events are process-wide).
_running: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Relay]] = (
    weakref.WeakKeyDictionary()
)


class Relay:
    """The whole relay in-process: listeners, durable queue and delivery.

    ``config`` is a :class:`RelayConfig` (the model behind ``ferry.toml``), a path to
    a TOML file, or None to load ``$FERRY_CONFIG`` and the environment. With
    ``listen=False`` no SMTP listener is opened (pure library use). SMTP sessions and
    delivery run in this process whatever ``server.workers`` and ``delivery.workers``
    say. ``cleanup_interval`` (seconds) deletes expired messages periodically
    (Zetian's ``CleanupInterval``); None keeps them until
    :meth:`RelayQueue.clear_expired`.

    Use ``async with Relay(config) as relay:``, or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        config: RelayConfig | str | os.PathLike[str] | None = None,
        *,
        listen: bool = True,
        routing: RoutingHook | None = None,
        on_accepted: AcceptedHook | None = None,
        on_delivered: DeliveryHook | None = None,
        on_deferred: DeliveryHook | None = None,
        on_failed: DeliveryHook | None = None,
        on_expired: DeliveryHook | None = None,
        cleanup_interval: float | None = None,
    ) -> None:
        if config is None:
            config = RelayConfig.load()
        elif not isinstance(config, RelayConfig):
            config = RelayConfig.from_file(config)
        effective = config.model_copy(deep=True)
        effective.delivery.workers = 0
        effective.server.workers = 0
        if not listen:
            effective.server.listen = []
        self.config: RelayConfig = effective
        if cleanup_interval is not None and cleanup_interval <= 0:
            raise ValueError("cleanup_interval must be positive")
        self.cleanup_interval = cleanup_interval
        self.queue = RelayQueue(self)
        self._routing: list[RoutingHook] = [routing] if routing else []
        self._accepted_hooks: list[AcceptedHook] = [on_accepted] if on_accepted else []
        self._delivery_hooks: dict[str, list[DeliveryHook]] = {
            name: [fn] if fn else []
            for name, fn in (
                ("delivered", on_delivered),
                ("deferred", on_deferred),
                ("failed", on_failed),
                ("expired", on_expired),
            )
        }
        self._service: Service | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._waiters: dict[str, list[_Waiter]] = {}
        self._drainers: set[asyncio.Event] = set()
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._guard: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested: asyncio.Event | None = None
        self._final_stats: dict[str, Any] | None = None

    # -- hook registration (each returns the function, so it works as a decorator) --

    def routing(self, fn: _R) -> _R:
        """Register a routing hook: it may set ``priority``, ``route`` or ``smart_host``."""
        self._routing.append(fn)
        return fn

    def on_accepted(self, fn: _A) -> _A:
        """Register a hook called with an :class:`AcceptedMessage` per queued message."""
        self._accepted_hooks.append(fn)
        return fn

    def on_delivered(self, fn: _D) -> _D:
        """Register a hook called with a :class:`DeliveryResult` per delivered recipient."""
        self._delivery_hooks["delivered"].append(fn)
        return fn

    def on_deferred(self, fn: _D) -> _D:
        """Register a hook called per recipient deferred (it will be retried)."""
        self._delivery_hooks["deferred"].append(fn)
        return fn

    def on_failed(self, fn: _D) -> _D:
        """Register a hook called per recipient failed permanently."""
        self._delivery_hooks["failed"].append(fn)
        return fn

    def on_expired(self, fn: _D) -> _D:
        """Register a hook called per recipient given up on (lifetime or retries spent)."""
        self._delivery_hooks["expired"].append(fn)
        return fn

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._service is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the relay runs on (None when stopped)."""
        return self._loop if self.running else None

    async def start(self) -> None:
        """Open the queue, start delivery and the listeners (raises if already running)."""
        if self._service is not None:
            raise RuntimeError("the relay is already running")
        loop = asyncio.get_running_loop()
        service = Service(self.config, before_queue=self._before_queue, lock=True)
        self._loop = loop
        self._stop_requested = asyncio.Event()
        # Listening for events from the start: delivery begins (with what an earlier
        # run left in the queue) before the listeners are open.
        self._service = service
        self._unsubscribe = subscribe(self._on_event)
        _running.setdefault(loop, set()).add(self)
        try:
            await service.start()
        except BaseException:
            self._service = None
            self._unsubscribe()
            self._unsubscribe = None
            self._forget_loop()
            raise
        self._final_stats = None
        if self.cleanup_interval is not None:
            self._background.append(loop.create_task(self._cleanup(self.cleanup_interval)))

    async def stop(self) -> None:
        """Stop the listeners and delivery, wait for running hooks, close the queue."""
        if self._stopping is not None:  # another caller is stopping it: wait for that
            await self._stopping.wait()
            return
        service = self._service
        if service is None:
            return
        self._stopping = asyncio.Event()
        try:
            await self._stop(service)
        finally:
            self._stopping.set()
            self._stopping = None

    async def _stop(self, service: Service) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()
        guard, self._guard = self._guard, None
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()  # not awaited: it ends by awaiting this stop
        background, self._background = self._background, []
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        scheduler = service.scheduler
        try:
            await service.stop()  # records every outcome so far: hooks are scheduled
        finally:
            if scheduler is not None:
                self._final_stats = scheduler.stats()
            self._service = None
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            self._forget_loop()
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.wake.set()
            for drainer in self._drainers:
                drainer.set()
        if self._hook_tasks:
            _done, late = await asyncio.wait(set(self._hook_tasks), timeout=_HOOK_GRACE_SECONDS)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)

    def _forget_loop(self) -> None:
        relays = _running.get(self._loop) if self._loop is not None else None
        if relays is not None:
            relays.discard(self)
            if not relays and self._loop is not None:
                del _running[self._loop]

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM (or until :meth:`stop` is called elsewhere)."""
        if self._service is None or self._stop_requested is None:
            raise RuntimeError("the relay is not running")
        stop = self._stop_requested
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: stop() still works
        try:
            await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    @property
    def listening(self) -> list[tuple[str, int, str]]:
        """``(address, port, mode)`` of every open listener."""
        service = self._service
        if service is None or service.intake is None:
            return []
        return service.intake.bound()

    def port(self, mode: str = "mta") -> int:
        """The port the first listener of ``mode`` is bound to (useful with port 0)."""
        for _host, port, bound_mode in self.listening:
            if bound_mode == mode:
                return port
        raise LookupError(f"no {mode} listener")

    def _attach_to_loop(self) -> None:
        """Stop this relay when its event loop shuts down (``asyncio.run`` ending)."""
        assert self._loop is not None

        async def guard() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await self.stop()

        self._guard = self._loop.create_task(guard(), name="ferry-relay-guard")

    # -- submitting and waiting -------------------------------------------------------

    def _require(self) -> Service:
        if self._service is None:
            raise RuntimeError("the relay is not running (use `async with Relay(...)`)")
        return self._service

    async def submit(
        self,
        message: MessageLike,
        recipients: Iterable[str] | str | None = None,
        mail_from: str | None = None,
        priority: Priority | str | int = Priority.NORMAL,
        *,
        route: str | None = None,
    ) -> QueueId:
        """Queue ``message`` durably (the same guarantee as SMTP's 250); its queue id.

        ``recipients`` default to the To:, Cc: and Bcc: addresses, ``mail_from`` to the
        From: address. ``route`` sends this message a particular way (a smart host's
        name, ``"direct"`` or ``"mx:host[:port]"``); routing hooks run afterwards and
        may still change it.
        """
        service = self._require()
        data, sender, rcpts = prepare_message(
            message, recipients, mail_from, hostname=self.config.server.hostname
        )
        envelope = EnvelopeIn(
            sender=sender,
            recipients=[RecipientIn(address) for address in rcpts],
            data=data,
            priority=Priority.parse(priority),
            smtputf8=not sender.isascii() or not all(a.isascii() for a in rcpts),
            body_8bit=not data.isascii(),
        )
        if route is not None:
            envelope.extra["route"] = check_route(route, self._smart_host_names())
        return QueueId(await service.submit(envelope))

    async def send(
        self,
        message: MessageLike,
        recipients: Iterable[str] | str | None = None,
        mail_from: str | None = None,
        priority: Priority | str | int = Priority.NORMAL,
        *,
        route: str | None = None,
        timeout: float | None = DEFAULT_SEND_TIMEOUT,
        until: Literal["final", "attempted"] = "final",
    ) -> dict[str, DeliveryResult]:
        """:meth:`submit`, then :meth:`wait` for every recipient's outcome."""
        queue_id = await self.submit(message, recipients, mail_from, priority, route=route)
        return await self.wait(queue_id, timeout=timeout, until=until)

    async def wait(
        self,
        queue_id: str,
        *,
        timeout: float | None = DEFAULT_SEND_TIMEOUT,
        until: Literal["final", "attempted"] = "final",
    ) -> dict[str, DeliveryResult]:
        """Wait until each recipient of ``queue_id`` is final (or, with
        ``until="attempted"``, has had one more attempt), or ``timeout`` seconds pass.

        Returns one :class:`DeliveryResult` per recipient; a recipient still pending
        at the timeout has its current, non-final status (and stays queued). For a
        message removed meanwhile, or a relay stopped meanwhile, the last known states.
        Raises KeyError for an unknown queue id.
        """
        self._require()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        waiter = _Waiter(until)
        # Registered before the first read, so no event can slip between the two.
        self._waiters.setdefault(queue_id, []).append(waiter)
        try:
            info = await self.queue.get(queue_id)
            if info is None:
                raise KeyError(queue_id)
            while self.running:
                # "attempted": the waiter counts any outcome; "final": final ones only.
                waiter.pending = {r.address for r in info.recipients if not r.status.is_final}
                if waiter.pending <= waiter.done.keys():
                    break
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                waiter.wake.clear()
                wait_for = _POLL_SECONDS if remaining is None else min(remaining, _POLL_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wake.wait(), wait_for)
                if waiter.pending <= waiter.done.keys() or not self.running:
                    break
                latest = await self.queue.get(queue_id)
                if latest is None:  # removed meanwhile
                    break
                info = latest
        finally:
            waiters = self._waiters.get(queue_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(queue_id, None)
        return await self._results(queue_id, info, waiter)

    async def _results(
        self, queue_id: str, known: MessageInfo, waiter: _Waiter
    ) -> dict[str, DeliveryResult]:
        service = self._service
        if service is not None and service.queue is not None:
            if service.scheduler is not None:
                # Outcomes are announced before they are written: write them first,
                # so what we return is what the queue says.
                await service.scheduler.flush()
            fresh = await service.queue.get(queue_id)
            if fresh is not None:
                return {r.address: DeliveryResult.from_recipient(r) for r in fresh.recipients}
        # Stopped, or the message was removed: what was last seen, updated by events.
        return {
            r.address: waiter.done.get(r.address) or DeliveryResult.from_recipient(r)
            for r in known.recipients
        }

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until no recipient in the queue is pending any more; False on timeout.

        Deferred recipients are pending until their retries end, so a relay that keeps
        running may never drain; this is for scripts that want to exit after their mail
        (and its DSNs) has left.
        """
        self._require()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        wake = asyncio.Event()
        self._drainers.add(wake)
        try:
            while (service := self._service) is not None:
                wake.clear()
                if service.scheduler is not None:
                    # Outcomes (and the DSNs they call for) are written after they are
                    # announced: let them reach the queue before counting.
                    await service.scheduler.flush()
                stats = await self.queue.statistics()
                if stats.oldest_pending_recipient_time is None:
                    return True
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return False
                wait_for = _POLL_SECONDS if remaining is None else min(remaining, _POLL_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait_for)
            return False
        finally:
            self._drainers.discard(wake)

    def _poke(self, queue_id: str) -> None:
        """Something changed ``queue_id`` without an event: let its waiters look."""
        for waiter in self._waiters.get(queue_id, []):
            waiter.wake.set()

    # -- statistics ---------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        """Delivery statistics in the SMTPy seed's shape (since this relay started).

        ``mode``, ``direct_sent``, ``direct_failed``, ``relay_sent``, ``relay_failed``,
        ``dkim_signed``, ``dkim_unsigned`` and ``direct_service`` (``sent``,
        ``failed``, ``deferred``, ``bounced``, ``mx_lookups``, ``mx_cache_hits``,
        ``mx_cache_size``), plus Ferry's ``delivery``, ``smart_hosts`` and
        ``destinations`` tables. After :meth:`stop`, the last run's totals.
        """
        service = self._service
        if service is not None and service.scheduler is not None:
            published = [service.scheduler.stats()]
        elif self._final_stats is not None:
            published = [self._final_stats]
        else:
            published = []
        return combine(self.config.delivery.mode, published)

    # -- hooks --------------------------------------------------------------------------

    def _smart_host_names(self) -> list[str]:
        return [h.name for h in self.config.smart_hosts]

    async def _before_queue(self, envelope: EnvelopeIn) -> None:
        if not self._routing:
            return
        message = IncomingMessage(envelope, self._smart_host_names())
        for hook in list(self._routing):
            before = (message._priority, message._route)
            try:
                outcome = hook(message)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                message._priority, message._route = before
                logger.exception("routing hook %s failed; its changes are ignored", _name(hook))
                emit(HookFailed("routing", _name(hook), f"{type(exc).__name__}: {exc}"))
        message._apply()

    def _on_event(self, event: Event) -> None:
        """Every Ferry event in the process passes here; keep only this relay's."""
        if not isinstance(event, (RecipientOutcome, Accepted)):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # emitted outside any loop: not from this relay
        if loop is not self._loop or self._service is None:
            return
        if isinstance(event, Accepted):
            if self._accepted_hooks:
                accepted = AcceptedMessage(
                    queue_id=event.queue_id,
                    sender=event.sender,
                    recipients=len(event.recipients),
                    size=event.size,
                    priority=event.priority,
                    client=event.client,
                    user=event.user,
                )
                self._schedule("accepted", list(self._accepted_hooks), accepted)
            return
        for drainer in self._drainers:
            drainer.set()
        waiters = self._waiters.get(event.queue_id)
        hooks = self._delivery_hooks.get(_OUTCOME_HOOKS[event.status])
        if not waiters and not hooks:
            return  # the common case under load: nobody is listening for this one
        result = DeliveryResult.from_event(event)
        for waiter in waiters or []:
            waiter.record(result)
        if hooks:
            self._schedule(_OUTCOME_HOOKS[result.status], list(hooks), result)

    def _schedule(self, kind: str, hooks: Sequence[Callable[[Any], Any]], payload: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._run_hooks(kind, hooks, payload))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    async def _run_hooks(
        self, kind: str, hooks: Sequence[Callable[[Any], Any]], payload: Any
    ) -> None:
        if self._loop is not None and len(_running.get(self._loop, ())) > 1:
            # Several relays share this loop (events are process-wide): is it ours?
            try:
                if await self.queue.get(payload.queue_id) is None:
                    return
            except RuntimeError:
                return
        for hook in hooks:
            try:
                outcome = hook(payload)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                logger.exception("%s hook %s failed", kind, _name(hook))
                error = f"{type(exc).__name__}: {exc}"
                emit(HookFailed(kind, _name(hook), error, queue_id=payload.queue_id))

    async def _cleanup(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)  # a period, not a synchronisation
            try:
                cleared = await self.queue.clear_expired()
            except Exception:
                logger.exception("clearing expired messages failed")
                continue
            if cleared:
                emit(ExpiredCleared(cleared))

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Relay mode={self.config.delivery.mode} queue={self.config.queue.path!r} {state}>"


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
