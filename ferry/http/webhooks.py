"""Webhooks: the event log, POSTed to each ``[[webhooks]]`` endpoint in order, signed.

Delivery is at least once, from the durable event log (``ferry.queue.outbox``): an
endpoint's cursor moves only after its 2xx, so a crash between the answer and the
cursor's commit sends those events again with the same ``webhook-id``, which receivers
use to drop the repeat. One request is in flight per endpoint, so events arrive in the
order they happened; ``batch`` > 1 sends up to that many as a JSON array per request.

A failing endpoint is retried with exponential backoff (1 s doubling to 10 minutes)
while the oldest event in hand is younger than ``retry_for``; after that the batch is
recorded in ``webhook_failures`` (``ferry webhooks list``, ``ferry webhooks retry``) and
the endpoint moves on.

Signatures follow Standard Webhooks: ``webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``, one ``v1,...`` per secret while two are listed (rotation).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from ferry.config import RelayConfig, Webhook
from ferry.events import WebhookFailed, WebhookRetrying, emit
from ferry.queue.outbox import StoredEvent

logger = logging.getLogger("ferry.webhooks")

MAX_BACKOFF = 600.0
IDLE_POLL = 0.5
# At stop, how long a batch in flight may take to finish (its POST answered and the
# endpoint's cursor written) before it is cancelled and sent again at the next start.
STOP_GRACE = 5.0


class SecretError(ValueError):
    """A webhook secret file that cannot be used (the message names the file)."""


def load_secrets(path: str | Path) -> list[bytes]:
    """The signing keys in ``path``: one ``whsec_<base64>`` (or base64) per line, at most 2."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise SecretError(f"{path}: {exc.strerror or exc}") from None
    if not lines or len(lines) > 2:
        raise SecretError(f"{path}: expected one secret, or two while rotating")
    keys = []
    for line in lines:
        try:
            keys.append(base64.b64decode(line.removeprefix("whsec_"), validate=True))
        except (binascii.Error, ValueError):
            raise SecretError(f"{path}: a secret must be whsec_<base64>") from None
    return keys


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (Standard Webhooks, scheme v1)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
        for k in keys
    )


def webhook_id(events: Sequence[StoredEvent]) -> str:
    """One id per event (batch = 1); a batch is named by its first and last event."""
    if len(events) == 1:
        return f"evt_{events[0].id}"
    return f"evt_{events[0].id}-{events[-1].id}"


def backoff(failures: int) -> float:
    return min(MAX_BACKOFF, float(2 ** min(failures, 20)) / 2)


class Endpoint:
    """One endpoint's sender task."""

    def __init__(self, hook: Webhook, queue: Any, session: aiohttp.ClientSession) -> None:
        self.hook = hook
        self.queue = queue
        self.session = session
        self.keys = load_secrets(hook.secret_file)
        self.retry_for = hook.retry_for
        self.timeout = hook.timeout
        self.wake = asyncio.Event()
        self.failures = 0
        self.sent = 0

    async def post(self, events: Sequence[StoredEvent]) -> str | None:
        """POST one batch; None on a 2xx, else what went wrong."""
        payload: Any = [e.as_json() for e in events] if self.hook.batch > 1 else events[0].as_json()
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        msg_id = webhook_id(events)
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(self.keys, msg_id, ts, body),
            "user-agent": "Ferry-Webhooks",
        }
        try:
            async with self.session.post(
                self.hook.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    async def run(self, stopping: asyncio.Event) -> None:
        name = self.hook.name
        cursor = await self.queue.webhook_cursor(name)
        while not stopping.is_set():
            retry_ids = await self.queue.webhook_retries(name, self.hook.batch)
            if retry_ids:
                events = await self.queue.events_by_id(retry_ids)
                error = await self.post(events) if events else None
                if error is None:
                    await self.queue.webhook_done(name, retried=retry_ids)
                else:
                    await self.queue.webhook_failed(
                        name, retry_ids, now=time.time(), error=error, after=None
                    )
                continue
            events = await self.queue.events(
                after=cursor, types=self.hook.events, limit=self.hook.batch
            )
            if not events:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._either(stopping), IDLE_POLL)
                continue
            error = await self.post(events)
            if error is None:
                await self.queue.webhook_done(name, after=events[-1].id)
                cursor = events[-1].id
                self.failures = 0
                self.sent += len(events)
                continue
            self.failures += 1
            if time.time() - events[0].at >= self.retry_for:
                await self.queue.webhook_failed(
                    name, [e.id for e in events], now=time.time(), error=error, after=events[-1].id
                )
                cursor = events[-1].id
                emit(WebhookFailed(name, len(events), error))
                continue
            emit(WebhookRetrying(name, error, backoff(self.failures)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), backoff(self.failures))

    async def _either(self, stopping: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


class WebhookSender:
    """All endpoints of a relay, run as tasks in ``ferry serve``'s loop."""

    def __init__(self, config: RelayConfig, queue_of: Callable[[], Any]) -> None:
        self.config = config
        self.queue_of = queue_of
        self.endpoints: list[Endpoint] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        queue = self.queue_of()
        self.endpoints = [Endpoint(h, queue, self._session) for h in self.config.webhooks]
        for ep in self.endpoints:
            self._tasks.append(asyncio.create_task(self._guard(ep), name=f"webhook {ep.hook.name}"))

    async def _guard(self, ep: Endpoint) -> None:
        while not self._stopping.is_set():
            try:
                await ep.run(self._stopping)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the sender for good
                logger.exception("webhook sender for %s failed; restarting", ep.hook.name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1)

    def notify(self) -> None:
        for ep in self.endpoints:
            ep.wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_GRACE)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
