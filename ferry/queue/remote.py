"""One writer per SQLite database: a delivery worker sends its queue writes to its parent.

SQLite lets one connection write at a time. When intake (the ``ferry serve`` process)
and a delivery worker process both wrote queue.db, each waited for the other's write
lock in a polling loop: 17-21 % of the intake process's samples (issue 12). So the
parent is the only writer of queue.db while serving. A worker reads through its own
read-only connections (WAL lets readers run beside the writer: bodies, due times,
suspensions) and sends every write -- claims, outcomes with the DSNs they call for,
lease renewals and releases -- over a socket pair to the parent. There the same
``SqliteQueue`` methods run on intake's writer thread (``SqliteQueue.relaxed``): each
group of waiting writes commits the worker's part first, without an fsync of its own
(as when the worker committed it: a process crash loses none of it), then intake's
fsynced part. The reply comes after that commit, and sessions wait for it before
their connection's next transaction (issue 10.1).

Frames: a 4-byte big-endian length, then a pickle (both ends are the same Ferry,
started by the same ``ferry serve``; nothing else can reach the socket pair). A request
is ``(id, method, args, kwargs)``; its reply ``(id, ok, value)`` carries the result, or
the exception raised in the parent, re-raised in the worker with its type
(``QueueStorageLost`` stays ``QueueStorageLost``). Ids let many sessions' requests be in
flight at once; replies come back as the writes commit.

If the parent dies (even SIGKILL) the worker sees end-of-file: every call in flight and
every later one raises :class:`QueueGone` and ``lost`` is set, so the worker stops. If
the worker dies, the parent finishes what it had received (its replies go nowhere) and
hands the worker's leases back as before.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Collection, Sequence
from typing import Any, cast

from ferry.envelope import EnvelopeIn, Status
from ferry.queue.base import (
    AttemptResult,
    ClaimedRecipient,
    IdempotencyRecord,
    MessageInfo,
    Queue,
    QueueStats,
)
from ferry.queue.selection import Suspension

# The queue methods a worker may ask its parent to run: every write of the Queue
# contract (delivery uses claim, record, extend_leases and release_leases).
FORWARDED = frozenset(
    {
        "claim",
        "record",
        "extend_leases",
        "release_leases",
        "enqueue",
        "retry",
        "cancel",
        "remove",
        "clear_expired",
        "purge",
    }
)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a frame this long is a bug (or not our peer): stop reading


class QueueGone(ConnectionError):
    """The process that writes the queue is gone: nothing more can be written from here."""


class RemoteError(RuntimeError):
    """An exception in the writing process that could not be carried over as itself."""


def encode_frame(obj: Any) -> bytes:
    """One frame: length, then the pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class FrameDecoder:
    """Bytes in, whole frames' objects out; a frame may arrive in any number of pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(buf, pos)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes: not a queue peer")
            end = pos + _LENGTH.size + n
            if len(buf) < end:
                break
            out.append(pickle.loads(memoryview(buf)[pos + _LENGTH.size : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (0 between frames)."""
        return len(self._buf)


def portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it survives a pickle round trip with its type, else a
    RemoteError naming it (an exception with a custom constructor may not)."""
    try:
        back = pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        back = None
    if type(back) is type(exc):
        return exc
    return RemoteError(f"{type(exc).__name__}: {exc}")


# -- the parent: runs the forwarded calls on its queue ------------------------------


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: QueueServer) -> None:
        self.server = server
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            requests = self.decoder.feed(data)
        except Exception:
            # Not our peer's bytes: nothing after this can be trusted.
            assert self.transport is not None
            self.transport.close()
            return
        for request in requests:
            self.server._start(request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._closed.set()


class QueueServer:
    """The parent's end: runs each request on ``target`` and sends the reply back.

    ``target`` is the queue (a delivery worker's writes) or any object whose ``methods``
    are coroutines (an intake process's calls: ferry/intake/process.py).
    Requests run concurrently (a claim does not wait behind an outcome): each is a
    task, and the queue's writer thread groups whatever is waiting into one commit.
    A request with id 0 is a notification: it runs, and nothing is sent back.
    """

    def __init__(self, target: object, sock: socket.socket, methods: Collection[str] = FORWARDED):
        self.target = target
        self.sock = sock
        self.methods = frozenset(methods)
        self._protocol: _ServerProtocol | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self.requests = 0  # how many calls this worker made (tests, statistics)

    async def start(self) -> None:
        self.sock.setblocking(False)
        _transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _ServerProtocol(self), self.sock
        )
        self._protocol = protocol

    def _start(self, request: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._call(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, request: Any) -> None:
        self.requests += 1
        rid, name, args, kwargs = request
        try:
            if name not in self.methods:
                raise RemoteError(f"{name!r} is not a forwarded queue method")
            value = await getattr(self.target, name)(*args, **kwargs)
            frame = encode_frame((rid, True, value))
        except Exception as exc:
            if not rid:
                logging.getLogger("ferry").exception("notification %s from a child process", name)
                return
            frame = encode_frame((rid, False, portable(exc)))
        if not rid:
            return  # a notification: nobody waits for an answer
        transport = self._protocol.transport if self._protocol is not None else None
        if transport is not None and not transport.is_closing():
            transport.write(frame)
        # else: the worker is gone; the write itself is done (or failed) all the same

    async def closed(self) -> None:
        """Wait until the worker's end is closed (it exited or was killed)."""
        await self._closed.wait()

    async def close(self) -> None:
        """Stop reading and let every request already received finish.

        A dead worker's requests are finished, not abandoned half way: the caller
        hands the worker's leases back only after its last claim has committed.
        """
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        else:
            self.sock.close()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# -- the worker: a Queue that reads locally and forwards its writes -------------------


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, link: QueueLink) -> None:
        self.link = link
        self.decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.decoder.feed(data)
        except Exception as exc:
            self.link._lose(exc)
            return
        for rid, ok, value in replies:
            fut = self.link._pending.pop(rid, None)
            if fut is None or fut.done():
                continue  # its caller was cancelled; the write happened all the same
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._lose(exc)


class QueueLink:
    """The worker's end of the socket pair: ``await link.call(method, ...)``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._ids = itertools.count(1)  # 0 is a notification's
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()

    async def open(self) -> QueueLink:
        self.sock.setblocking(False)
        transport, _p = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _ClientProtocol(self), self.sock
        )
        self._transport = transport
        return self

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.lost.is_set() or self._transport is None or self._transport.is_closing():
            raise QueueGone("the process that writes the queue is gone")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._transport.write(encode_frame((rid, method, args, kwargs)))
        try:
            # A cancelled caller (shutdown) does not cancel the write in the parent; its
            # reply is dropped when it comes.
            return await fut
        finally:
            self._pending.pop(rid, None)

    def notify(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Ask the parent to run ``method`` without waiting for (or getting) an answer;
        dropped if the parent is gone."""
        if self.lost.is_set() or self._transport is None or self._transport.is_closing():
            return
        self._transport.write(encode_frame((0, method, args, kwargs)))

    def _lose(self, exc: BaseException | None) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        if self._transport is not None:
            self._transport.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(QueueGone("the process that writes the queue is gone"))

    def close(self) -> None:
        self._lose(None)

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class ForwardingQueue(Queue):
    """The queue as a delivery worker sees it: reads from ``reader`` (a read-only
    queue of its own), writes run by the parent through ``link``.

    The scheduler and sessions use it through the ``Queue`` contract and need not know.
    """

    def __init__(self, reader: Queue, link: QueueLink) -> None:
        self.reader = reader
        self.link = link

    # -- writes: to the parent --------------------------------------------------------

    async def enqueue(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> str:
        result: str = await self.link.call(
            "enqueue", envelope, queue_id=queue_id, expires=expires, idempotency=idempotency
        )
        return result

    async def claim(
        self,
        owner: str,
        *,
        now: float,
        limit: int,
        lease: float,
        exclude_domains: Collection[str] = (),
    ) -> list[ClaimedRecipient]:
        result: list[ClaimedRecipient] = await self.link.call(
            "claim",
            owner,
            now=now,
            limit=limit,
            lease=lease,
            exclude_domains=list(exclude_domains),
        )
        return result

    async def record(
        self,
        owner: str,
        results: list[AttemptResult],
        *,
        now: float,
        new_messages: Sequence[tuple[EnvelopeIn, float, Sequence[int]]] = (),
    ) -> list[str | None]:
        ids: list[str | None] = await self.link.call(
            "record", owner, results, now=now, new_messages=list(new_messages)
        )
        return ids

    async def extend_leases(self, owner: str, recipient_ids: Sequence[int], *, until: float) -> int:
        n: int = await self.link.call("extend_leases", owner, list(recipient_ids), until=until)
        return n

    async def release_leases(self, owner: str | None = None) -> int:
        n: int = await self.link.call("release_leases", owner)
        return n

    async def retry(self, message_id: str, *, now: float) -> int:
        n: int = await self.link.call("retry", message_id, now=now)
        return n

    async def cancel(self, message_id: str, *, now: float) -> int:
        n: int = await self.link.call("cancel", message_id, now=now)
        return n

    async def remove(self, message_id: str) -> bool:
        gone: bool = await self.link.call("remove", message_id)
        return gone

    async def clear_expired(self) -> int:
        n: int = await self.link.call("clear_expired")
        return n

    async def purge(self, *, before: float, limit: int) -> int:
        n: int = await self.link.call("purge", before=before, limit=limit)
        return n

    # -- reads: on this process's own read-only connections -----------------------------

    async def idempotency(self, key: str, *, now: float) -> IdempotencyRecord | None:
        return await self.reader.idempotency(key, now=now)

    async def read_message(self, message_id: str) -> bytes | None:
        return await self.reader.read_message(message_id)

    async def read_messages(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        return await self.reader.read_messages(message_ids)

    async def get(self, message_id: str) -> MessageInfo | None:
        return await self.reader.get(message_id)

    async def list(
        self,
        *,
        status: Status | None = None,
        domain: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[MessageInfo]:
        return await self.reader.list(
            status=status, domain=domain, sender=sender, limit=limit, offset=offset
        )

    async def next_due(self, *, exclude_domains: Collection[str] = ()) -> float | None:
        return await self.reader.next_due(exclude_domains=exclude_domains)

    async def statistics(self, *, now: float) -> QueueStats:
        return await self.reader.statistics(now=now)

    async def suspensions(self, *, now: float) -> Sequence[Suspension]:
        return await self.reader.suspensions(now=now)

    async def close(self) -> None:
        self.link.close()
        with contextlib.suppress(Exception):
            await self.reader.close()


__all__ = [
    "FORWARDED",
    "ForwardingQueue",
    "FrameDecoder",
    "QueueGone",
    "QueueLink",
    "QueueServer",
    "RemoteError",
    "encode_frame",
    "portable",
]
