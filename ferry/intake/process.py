"""An intake process: runs the SMTP sessions of the connections ``ferry serve`` hands it.

The parent's side is :class:`IntakeProcess` (start, watch, restart, hand a connection
over); the child's is :func:`main` (``python -m ferry.intake.process``). The child gets
the validated configuration on stdin (secrets never on a command line), connections over
a SEQPACKET socket pair (one message per connection: its header and its descriptor,
ferry/intake/dispatch.py), and makes its calls to the parent over a second socket pair
with the frames of ferry/queue/remote.py. It commits nothing itself: a message is queued
by the parent (a large body written to the spool here first, as ferry/queue/spool.py
orders it), and the 250 is sent only after the parent's commit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ferry.config import RelayConfig, config_payload
from ferry.envelope import EnvelopeIn
from ferry.events import IntakeWorkerDied, IntakeWorkerStarted, emit
from ferry.intake.handover import CALLS, HANDOVER, refusal
from ferry.queue.base import IdempotencyRecord
from ferry.queue.spool import Writer, new_tag, spool_dir
from ferry.runtime import ChildProcess

if TYPE_CHECKING:
    from ferry.queue.remote import QueueLink


class Dispatcher(Protocol):
    """What an :class:`IntakeProcess` tells the dispatcher that owns it (and the object
    that runs the process's calls: ferry/intake/dispatch.py)."""

    def forget(self, cids: Sequence[int]) -> None: ...

    async def writer_gone(self, tag: str) -> None: ...

    def lost(self, child: IntakeProcess) -> int: ...

    def child_ready(self) -> None: ...


MAX_WAITING = 1024  # connections queued for one process whose socket buffer is full
RESTART_DELAY = 1.0  # no hot restart loop on a process that dies at once
STOP_TIMEOUT = 10.0


class IntakeProcess(ChildProcess):
    """The parent's handle on one intake process."""

    RESTART_DELAY = RESTART_DELAY
    LOGGER = "ferry.intake"

    def __init__(self, config: RelayConfig, index: int, dispatcher: Dispatcher) -> None:
        super().__init__()
        self.config = config
        self.index = index
        self.dispatcher = dispatcher
        self.handover: socket.socket | None = None
        self.connections = 0  # handed over and not reported over
        self.spool_tag = ""  # its spool segments' tag, new for every start
        # Connections waiting for room in the hand-over socket (a busy child).
        self._waiting: collections.deque[tuple[socket.socket, bytes]] = collections.deque()

    @property
    def ready(self) -> bool:
        return self.handover is not None and not self._stopping

    async def _spawn(self) -> None:
        from ferry.queue.remote import QueueServer

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        calls_ours, calls_theirs = socket.socketpair()
        # The tag of the process's spool segments: sealed by us once it is gone.
        self.spool_tag = new_tag()
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ferry.intake.process",
                    "--handover-fd",
                    str(theirs.fileno()),
                    "--calls-fd",
                    str(calls_theirs.fileno()),
                    "--spool-tag",
                    self.spool_tag,
                ],
                stdin=subprocess.PIPE,
                pass_fds=[theirs.fileno(), calls_theirs.fileno()],
            )
        except BaseException:
            ours.close()
            calls_ours.close()
            raise
        finally:
            theirs.close()
            calls_theirs.close()
        server = QueueServer(self.dispatcher, calls_ours, methods=CALLS)
        await server.start()
        self.server = server
        assert self.proc.stdin is not None
        self.proc.stdin.write(config_payload(self.config).encode())
        self.proc.stdin.close()
        ours.setblocking(False)
        self.handover = ours
        emit(IntakeWorkerStarted(self.proc.pid, self.index))
        self.dispatcher.child_ready()

    def hand_over(self, conn: socket.socket, header: bytes) -> None:
        """Send ``conn`` to the process (then close it here); queued while its socket
        buffer is full."""
        if self._waiting:
            if len(self._waiting) >= MAX_WAITING:
                # A process this far behind (hung, or a flood): do not hold descriptors
                # for it without bound. The client sees the connection close.
                conn.close()
                self.dispatcher.forget([HANDOVER.unpack(header)[0]])
                return
            self._waiting.append((conn, header))
            return
        if not self._send(conn, header):
            self._waiting.append((conn, header))
            assert self.handover is not None
            asyncio.get_running_loop().add_writer(self.handover.fileno(), self._flush)

    def _send(self, conn: socket.socket, header: bytes) -> bool:
        """False: no room now. A connection that cannot be sent at all is closed."""
        try:
            if self.handover is None:
                raise ConnectionError("intake process gone")
            socket.send_fds(self.handover, [header], [conn.fileno()])
        except BlockingIOError:
            return False
        except OSError:
            # The process is gone: the client sees the connection close and retries.
            self.dispatcher.forget([HANDOVER.unpack(header)[0]])
        conn.close()
        return True

    def _flush(self) -> None:
        while self._waiting:
            conn, header = self._waiting[0]
            if not self._send(conn, header):
                return
            self._waiting.popleft()
        if self.handover is not None:
            asyncio.get_running_loop().remove_writer(self.handover.fileno())

    def _drop_handover(self) -> None:
        handover, self.handover = self.handover, None
        if handover is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_writer(handover.fileno())
            handover.close()
        while self._waiting:
            conn, _header = self._waiting.popleft()
            conn.close()

    async def _died(self, code: int) -> None:
        """Its connections are lost; the calls it made are finished (a message it sent
        is committed: its client got no 250 and sends it again -- a duplicate at worst)."""
        assert self.proc is not None
        self._drop_handover()
        lost = self.dispatcher.lost(self)
        emit(IntakeWorkerDied(self.proc.pid, code, lost))
        await self._close_server()
        await self.dispatcher.writer_gone(self.spool_tag)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._stopping = True
        self._drop_handover()
        await self._terminate(timeout)
        await self._close_server()
        await self._stop_watching()


# -- the child --------------------------------------------------------------------


class ParentCalls:
    """The intake process's queue and AUTH throttle: both live in the parent.

    With ``spool`` (a SQLite queue), a body at or above ``spool_threshold`` bytes is
    made durable here, in the spool (ferry/queue/spool.py), before its rows are sent to
    be committed: the parent neither receives nor writes it.
    """

    def __init__(
        self, link: QueueLink, spool: Writer | None = None, spool_threshold: int = 0
    ) -> None:
        self.link = link
        self.spool = spool
        self.spool_threshold = spool_threshold
        self._closed: list[int] = []

    async def enqueue(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> str:
        size = len(envelope.data)
        if self.spool is not None and queue_id is not None and size >= self.spool_threshold:
            # The order of ferry/queue/spool.py: the body durable, then the row.
            async with self.spool.append(envelope.data) as (segment, offset):
                bare = dataclasses.replace(envelope, data=b"")
                spooled: str = await self.link.call(
                    "enqueue",
                    bare,
                    queue_id=queue_id,
                    expires=expires,
                    idempotency=idempotency,
                    spooled=(segment, offset, size),
                )
                return spooled
        qid: str = await self.link.call(
            "enqueue", envelope, queue_id=queue_id, expires=expires, idempotency=idempotency
        )
        return qid

    async def delay(self, ip: str) -> float:
        seconds: float = await self.link.call("auth_delay", ip)
        return seconds

    async def failed(self, ip: str) -> int:
        n: int = await self.link.call("auth_failed", ip)
        return n

    async def succeeded(self, ip: str) -> None:
        await self.link.call("auth_succeeded", ip)

    def closed(self, cid: int) -> None:
        """Report a connection over; gathered into one notification per loop turn."""
        if not self._closed:
            asyncio.get_running_loop().call_soon(self._send_closed)
        self._closed.append(cid)

    def _send_closed(self) -> None:
        cids, self._closed = self._closed, []
        self.link.notify("closed", cids)


async def _child(config: RelayConfig, handover_fd: int, calls_fd: int, spool_tag: str) -> None:
    from ferry.intake.server import IntakeServer, load_tls
    from ferry.queue.remote import QueueLink

    link = await QueueLink(socket.socket(fileno=calls_fd)).open()
    q = config.queue
    writer = None
    if q.backend == "sqlite":
        writer = Writer(
            spool_dir(q.path),
            spool_tag,
            on_sealed=lambda segment: link.notify("segment_sealed", segment),
        )
    parent = ParentCalls(link, writer, q.spool_threshold)
    # The parent made the certificate (or the self-signed pair) before starting us.
    ssl_context = load_tls(config) if config.server.listen else None
    server = IntakeServer(config, parent, ssl_context=ssl_context, auth_gate=parent)
    listeners = config.server.listen
    handover = socket.socket(fileno=handover_fd)
    handover.setblocking(False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def receive() -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(handover, 64, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:
                stop.set()  # the parent is gone (or stopping us)
                loop.remove_reader(handover_fd)
                return
            for extra in fds[1:]:
                os.close(extra)
            if len(msg) != HANDOVER.size or not fds:
                continue  # not the parent's message: nothing to run
            cid, index, code = HANDOVER.unpack(msg)
            sock = socket.socket(fileno=fds[0])
            on_close = functools.partial(parent.closed, cid)
            task = loop.create_task(server.adopt(sock, listeners[index], refusal(code), on_close))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_reader(handover_fd, receive)
    watch = loop.create_task(link.lost.wait())
    watch.add_done_callback(lambda _t: stop.set())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        watch.cancel()
        with contextlib.suppress(Exception):
            loop.remove_reader(handover_fd)
        handover.close()
        for task in list(tasks):
            task.cancel()
        await server.stop()  # every session ends; nothing is queued after this
        link.close()
        if writer is not None:
            await writer.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry-intake", description=__doc__)
    ap.add_argument("--handover-fd", type=int, required=True)
    ap.add_argument("--calls-fd", type=int, required=True)
    ap.add_argument("--spool-tag", required=True)
    args = ap.parse_args(argv)
    from ferry.runtime import child_start, run_async

    config = child_start()
    run_async(_child(config, args.handover_fd, args.calls_fd, args.spool_tag))


if __name__ == "__main__":
    main()
