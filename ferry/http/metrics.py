"""``GET /metrics``: the processes' event counters plus the queue read at scrape time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ferry
from ferry.metrics import DIR_ENV

if TYPE_CHECKING:
    from ferry.http.server import Api


class _Snapshot:
    """What the serve process knows right now, gathered before rendering."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, dict[str, str], float]] = []
        self.counters: list[tuple[str, str, dict[str, str], float]] = []

    def gauge(self, name: str, help_: str, value: float, **labels: str) -> None:
        self.gauges.append((name, help_, labels, value))

    def counter(self, name: str, help_: str, value: float, **labels: str) -> None:
        self.counters.append((name, help_, labels, value))

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for kind, rows in ((GaugeMetricFamily, self.gauges), (CounterMetricFamily, self.counters)):
            for name, help_, labels, value in rows:
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = kind(name, help_, labels=sorted(labels))
                fam.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


async def snapshot(api: Api) -> _Snapshot:
    snap = _Snapshot()
    snap.gauge("ferry_info", "Ferry's version", 1, version=ferry.__version__)
    queue = api.service.queue
    now = time.time()
    if queue is not None:
        st = await queue.statistics(now=now)
        by_status = {
            "queued": st.queued_messages,
            "in_progress": st.in_progress_messages,
            "deferred": st.deferred_messages,
            "partially_delivered": st.partially_delivered_messages,
        }
        for status, n in by_status.items():
            snap.gauge("ferry_queue_messages", "Pending messages by status", n, status=status)
        for prio, n in st.messages_by_priority.items():
            snap.gauge(
                "ferry_queue_messages_by_priority",
                "Pending messages by priority",
                n,
                priority=str(prio).lower(),
            )
        oldest = st.oldest_pending_recipient_time
        snap.gauge(
            "ferry_queue_oldest_pending_age_seconds",
            "Age of the oldest message still waiting for delivery (0 when none)",
            max(0.0, now - oldest) if oldest else 0.0,
        )
        commits, jobs, seconds = queue.commit_counters()
        snap.counter("ferry_queue_commits", "Fsynced commits of the serve process", commits)
        snap.counter("ferry_queue_committed_jobs", "Writes those commits carried", jobs)
        snap.counter("ferry_queue_commit_seconds", "Seconds spent committing", seconds)
        sender = api.service.webhooks
        if sender is not None:
            for ep in sender.endpoints:
                cursor = await queue.webhook_cursor(ep.hook.name)
                backlog = await queue.events(after=cursor, types=ep.hook.events, limit=100_000)
                snap.gauge(
                    "ferry_webhook_backlog",
                    "Events not yet acknowledged by the endpoint",
                    len(backlog),
                    endpoint=ep.hook.name,
                )
                snap.counter(
                    "ferry_webhook_events_sent",
                    "Events the endpoint acknowledged",
                    ep.sent,
                    endpoint=ep.hook.name,
                )
            failed: dict[str, int] = {}
            for name, *_ in await queue.webhook_failures():
                failed[name] = failed.get(name, 0) + 1
            for ep in sender.endpoints:
                snap.gauge(
                    "ferry_webhook_failed_events",
                    "Events recorded as failed (ferry webhooks list)",
                    failed.get(ep.hook.name, 0),
                    endpoint=ep.hook.name,
                )
    vfs = os.statvfs(api.config.data_dir)
    snap.gauge(
        "ferry_data_free_bytes", "Free space where the queue lives", vfs.f_bavail * vfs.f_frsize
    )
    snap.gauge(
        "ferry_data_size_bytes", "Size of the queue's file system", vfs.f_blocks * vfs.f_frsize
    )
    snap.counter("ferry_http_auth_failures", "Refused HTTP authentications", api.auth_failures)
    return snap


async def render(api: Api) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    if os.environ.get(DIR_ENV):
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(await snapshot(api))
    return generate_latest(registry), CONTENT_TYPE_LATEST
