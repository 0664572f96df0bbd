"""Prometheus metrics: a subscriber to Ferry's typed events, in every process.

``ferry serve`` and its delivery worker processes each count the events they emit.
prometheus_client's multiprocess mode sums them: every process writes its values to
files under ``<queue.path>/metrics`` (memory-mapped, cheap), and ``GET /metrics`` in the
serve process reads them all. The queue's own figures (messages by status and priority,
the oldest pending message, commit batches) are read at scrape time instead.

Labels stay bounded: an outcome's labels are its status, the kind of route, the smart
host's name (configured, so bounded) and the reply's class (``2xx``/``4xx``/``5xx`` with
the enhanced code's class and subject, ``5.1``); never a recipient domain.

Metrics are on only when the HTTP API is (``[http] listen``): a relay nobody scrapes pays
nothing per message.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ferry.events import (
    Accepted,
    ConnectFailed,
    ConnectionClosed,
    ConnectionOpened,
    DkimSigned,
    DkimUnsigned,
    DsnDropped,
    DsnQueued,
    Event,
    RecipientOutcome,
    Rejected,
    SmartHostState,
    TransactionDone,
    subscribe,
)

#: The environment variable prometheus_client reads at import (multiprocess mode).
DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds; delivery latency runs from arrival (accept) to the outcome.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
BREAKER_STATE = {"closed": 0.0, "half-open": 1.0, "half_open": 1.0, "open": 2.0}

_installed: Any = None


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / "metrics"


def install(directory: Path, *, fresh: bool) -> None:
    """Count this process's events into ``directory``. ``fresh`` (the serve process, at
    start) clears what an earlier run left. Must run before anything imports
    prometheus_client in this process; a second call is a no-op."""
    global _installed
    if _installed is not None:
        return
    if fresh:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[DIR_ENV] = str(directory)
    _installed = _Metrics()
    subscribe(_installed.on_event)


def reply_class(code: int, enhanced: str | None) -> str:
    """``5xx/5.1`` -- bounded: the code's class and the enhanced code's class.subject."""
    label = f"{code // 100}xx"
    if enhanced:
        label += "/" + ".".join(enhanced.split(".")[:2])
    return label


def route_labels(route: str) -> tuple[str, str]:
    """(kind, hop): ``smarthost:sendgrid`` -> (smarthost, sendgrid); ``direct`` -> (direct, mx)."""
    kind, _, rest = route.partition(":")
    if kind in ("smarthost", "relay"):
        return "smarthost", rest or "-"
    if kind == "mx" or kind == "host":
        return "fixed_mx", "-"  # a fixed host name is operator-set but unbounded in form
    return kind or "direct", "mx"


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.received = Counter("ferry_messages_received", "Messages accepted and queued", ["via"])
        self.received_rcpts = Counter(
            "ferry_recipients_received", "Recipients of accepted messages", ["via"]
        )
        self.rejected = Counter(
            "ferry_rejected", "Commands and messages refused at intake", ["command", "code"]
        )
        self.outcomes = Counter(
            "ferry_recipient_outcomes",
            "Delivery outcomes of recipients, per attempt",
            ["outcome", "route_kind", "hop", "reply_class"],
        )
        self.latency = Histogram(
            "ferry_delivery_latency_seconds",
            "Arrival to delivered, per recipient",
            buckets=LATENCY_BUCKETS,
        )
        self.connect_failed = Counter(
            "ferry_connection_failures", "Outbound connections that failed", ["kind"]
        )
        self.breaker = Gauge(
            "ferry_smart_host_state",
            "Smart host circuit breaker: 0 closed, 1 half-open, 2 open",
            ["host"],
            multiprocess_mode="mostrecent",
        )
        self.opened = Counter(
            "ferry_connections_opened", "Outbound SMTP sessions opened", ["group"]
        )
        self.open = Gauge(
            "ferry_connections_open",
            "Outbound SMTP sessions open now",
            ["group"],
            multiprocess_mode="livesum",
        )
        self.attempt = Histogram(
            "ferry_attempt_duration_seconds",
            "One mail transaction, MAIL FROM to the reply to the final dot",
            ["group"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.dkim = Counter("ferry_dkim", "Messages sent signed or unsigned", ["result"])
        self.dsn = Counter("ferry_dsns", "DSNs queued, by action", ["action"])
        self.dsn_dropped = Counter("ferry_dsns_dropped", "DSNs that could not be delivered")

    def on_event(self, event: Event) -> None:
        if isinstance(event, RecipientOutcome):
            kind, hop = route_labels(event.route)
            outcome = event.status.value.lower()
            self.outcomes.labels(
                outcome, kind, hop, reply_class(event.reply.code, event.reply.enhanced)
            ).inc()
            if outcome == "delivered":
                self.latency.observe(max(0.0, event.delay))
        elif isinstance(event, Accepted):
            via = event.client if event.client in ("api", "http") else "smtp"
            self.received.labels(via).inc()
            self.received_rcpts.labels(via).inc(len(event.recipients))
        elif isinstance(event, Rejected):
            self.rejected.labels((event.command or "-").upper()[:12], str(event.reply.code)).inc()
        elif isinstance(event, TransactionDone):
            self.attempt.labels(event.group).observe(event.seconds)
        elif isinstance(event, ConnectionOpened):
            self.opened.labels(event.group).inc()
            self.open.labels(event.group).inc()
        elif isinstance(event, ConnectionClosed):
            self.open.labels(event.group).dec()
        elif isinstance(event, ConnectFailed):
            self.connect_failed.labels(event.kind or "connect").inc()
        elif isinstance(event, SmartHostState):
            self.breaker.labels(event.host).set(BREAKER_STATE.get(event.state, 0.0))
        elif isinstance(event, DkimSigned):
            self.dkim.labels("signed").inc()
        elif isinstance(event, DkimUnsigned):
            self.dkim.labels("unsigned").inc()
        elif isinstance(event, DsnQueued):
            self.dsn.labels(event.action).inc()
        elif isinstance(event, DsnDropped):
            self.dsn_dropped.inc()
