"""How Ferry runs a coroutine at the top of a process: on uvloop when it is installed;
and how a child process of ``ferry serve`` starts (its configuration, log and metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ferry.config import RelayConfig

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (faster accept), else asyncio.

    ``FERRY_EVENT_LOOP=asyncio`` forces the standard loop (profilers see into it).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if os.environ.get("FERRY_EVENT_LOOP") == "asyncio":
        return asyncio.run(coro)
    return uvloop.run(coro)


def child_start() -> RelayConfig:
    """In a child process of ``ferry serve`` (a delivery worker, an intake process): the
    configuration its parent wrote on stdin (secrets never on a command line), the log
    set up as the parent's, and metrics counted where the parent serves them."""
    from ferry.config import RelayConfig
    from ferry.events import setup_logging

    config = RelayConfig.model_validate_json(sys.stdin.read())
    setup_logging(config.log.level, config.log.format)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if config.http.listen and directory:  # the parent serves /metrics: count here too
        from ferry.metrics import install

        install(Path(directory), fresh=False)
    return config


class _Closable(Protocol):
    async def close(self) -> None: ...


class ChildProcess:
    """The parent's handle on a child process it restarts when it dies (a delivery
    worker, an intake process): subclasses start it (``_spawn``) and say what its death
    means (``_died``, before the restart)."""

    RESTART_DELAY = 1.0  # no hot restart loop on a child that dies at once
    LOGGER = "ferry"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        # Runs the child's calls in this process (ferry/queue/remote.py's QueueServer).
        self.server: _Closable | None = None
        self.restarts = 0
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    async def _spawn(self) -> None:
        raise NotImplementedError

    async def _died(self, code: int) -> None:
        """The child exited unasked with ``code``; it is restarted after this."""

    async def start(self) -> None:
        await self._spawn()
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _close_server(self) -> None:
        """The child is gone: finish the calls it made, then stop serving it."""
        server, self.server = self.server, None
        if server is not None:
            await server.close()

    async def _watch(self) -> None:
        while not self._stopping:
            try:
                assert self.proc is not None
                code = await asyncio.to_thread(self.proc.wait)
                if self._stopping:
                    return
                if code in (0, -signal.SIGTERM, -signal.SIGINT):
                    # Asked to stop, and not by us: most often the whole service is
                    # being stopped (systemd signals every process of the unit at
                    # once), and our own stop is a moment behind. Give it that moment
                    # before calling the death unexpected. A child that stops cleanly
                    # has handed back its work itself.
                    await asyncio.sleep(self.RESTART_DELAY)
                    if self._stopping:
                        return
                await self._died(code)
                await asyncio.sleep(self.RESTART_DELAY)
                if not self._stopping:
                    self.restarts += 1
                    await self._spawn()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The monitor must outlive any one failure: a child that is not
                # restarted leaves its work undone for good.
                logging.getLogger(self.LOGGER).exception("child process monitor")
                await asyncio.sleep(self.RESTART_DELAY)
                if not self._stopping and (self.proc is None or self.proc.poll() is not None):
                    with contextlib.suppress(Exception):
                        await self._close_server()
                        await self._spawn()

    async def _terminate(self, timeout: float) -> bool:
        """Stop watching, SIGTERM the child and wait ``timeout`` seconds for it, then
        SIGKILL. True when it had to be killed."""
        self._stopping = True
        killed = False
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
                killed = True
        return killed

    async def _stop_watching(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
