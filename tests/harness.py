"""Run a real Ferry service for a test: in a thread of this process, or as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from ferry.config import RelayConfig
from ferry.service import Service

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ThreadedService:
    """A ``Service`` running on its own event loop in a background thread."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.service = Service(config)

    def __enter__(self) -> ThreadedService:
        self.thread.start()
        try:
            self.call(self.service.start())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.service.stop())
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the service's loop and wait for its result."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def port(self, mode: str = "mta") -> int:
        assert self.service.intake is not None
        for _host, port, m in self.service.intake.bound():
            if m == mode:
                return port
        raise LookupError(mode)

    @property
    def queue(self) -> Any:
        return self.service.queue


class AckingClients:
    """SMTP clients sending to ``port`` until stopped or the server dies under them (a
    crash test), each on a connection of its own: ``message(i)`` makes the i-th message;
    ``sent`` holds every message tried by number, ``acked`` those that got 250 by the
    queue ID the reply named."""

    def __init__(self, port: int, message: Callable[[int], bytes], clients: int = 6) -> None:
        self.port = port
        self.message = message
        self.sent: dict[int, bytes] = {}
        self.acked: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counter = iter(range(10**9))
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo("client.test")  # server.require_helo (RFC 5321 §4.1.4)
                while not self._stop.is_set():
                    with self._lock:
                        i = next(self._counter)
                    msg = self.message(i)
                    self.sent[i] = msg
                    c.mail("s@example.org")
                    c.rcpt("r@example.net")
                    code, text = c.data(msg)
                    if code == 250:
                        with self._lock:
                            self.acked[text.decode().rsplit(" ", 1)[1]] = msg
        except (OSError, smtplib.SMTPException):
            pass  # the server died under us: expected

    def start(self) -> AckingClients:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def child_pids(parent: int, *modules: bytes) -> list[int]:
    """The processes of `ferry serve` ``parent`` running one of ``modules`` (such as
    ``b"ferry.delivery.process"``), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and any(m in cmdline for m in modules):
            out.append(int(entry))
    return out


def delivery_worker_pid(parent: int) -> int | None:
    """The delivery worker process of `ferry serve` ``parent`` (None while there is none)."""
    pids = child_pids(parent, b"ferry.delivery.process")
    return pids[0] if pids else None


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopts it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(pred: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``pred`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class ServeProcess:
    """``ferry serve`` as a real subprocess (for crash and CLI tests)."""

    def __init__(self, config_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.with_suffix(".log")

    def start(self) -> ServeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 -- the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "--config", str(self.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.config_path.parent,
        )
        log.close()

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"ferry serve exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(listening, 20, "ferry serve to listen")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_cli(
    config_path: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``ferry`` CLI as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ferry.cli", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        cwd=config_path.parent,
    )


def cli_json(config_path: Path, *args: str) -> Any:
    res = run_cli(config_path, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
