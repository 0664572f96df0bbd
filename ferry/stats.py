"""Relay statistics in the SMTPy seed's shape, from what the schedulers publish.

SQLite (one node): each running scheduler (in `ferry serve` or a delivery worker
process) writes its counters to ``<queue.path>/stats/<owner>.json`` every few seconds;
this module sums them, so `ferry stats` works from another process and with several
workers. The figures are those of the current run.

PostgreSQL (several nodes): each scheduler also adds its counts to per-node counters in
the database and keeps its current states there (``Scheduler.share_stats``); `ferry
stats` on any node reads them all: every node's work counted once, totals since the
queue was created (stopped nodes' counters are kept under one entry), states (sessions
open, backlog, breakers) of the schedulers running now.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ferry.config import RelayConfig
from ferry.delivery.scheduler import COUNTERS, stats_dir

if TYPE_CHECKING:
    from ferry.queue.postgres import NodeStats

#: How the nodes that have stopped are named in the per-node figures.
STOPPED_NODES = "(stopped nodes)"

# What is added up across schedulers: their counters (one list, the scheduler's) and the
# states that add up too (sessions open, work in hand, cached MX answers).
_COUNTERS = (*COUNTERS, "mx_cache_size", "active_sessions", "backlog")


def read_published(config: RelayConfig) -> list[dict[str, Any]]:
    """Every scheduler's latest published statistics."""
    out = []
    d = stats_dir(config)
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue  # being replaced right now: the next read gets it
    return out


def combine(mode: str, published: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum per-scheduler statistics into the SMTPy seed's shape (plus Ferry's extras)."""
    total: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
    smart_hosts: dict[str, dict[str, Any]] = {}
    destinations: dict[str, dict[str, Any]] = {}
    routing: dict[str, Any] = {}
    unsigned: dict[str, int] = {}
    workers = 0
    for p in published:
        workers += 1
        for key in _COUNTERS:
            total[key] += int(p.get(key) or 0)
        for name, h in (p.get("smart_hosts") or {}).items():
            into = smart_hosts.setdefault(name, {"sent": 0, "failed": 0, "deferred": 0})
            for k in ("sent", "failed", "deferred"):
                into[k] += int(h.get(k) or 0)
            for k in ("state", "last_error", "priority", "weight"):
                if h.get(k) is not None:
                    into[k] = h[k]
        for name, dst in (p.get("destinations") or {}).items():
            into = destinations.setdefault(name, {})
            for k, v in dst.items():
                into[k] = into.get(k, 0) + v if isinstance(v, (int, float)) else v
        routing.update(p.get("smart_routing") or {})
        for reason, n in (p.get("dkim_unsigned_reasons") or {}).items():
            unsigned[reason] = unsigned.get(reason, 0) + int(n)
    return {
        "mode": mode,
        "direct_sent": total["direct_sent"],
        "direct_failed": total["direct_failed"],
        "relay_sent": total["relay_sent"],
        "relay_failed": total["relay_failed"],
        "dkim_signed": total["dkim_signed"],
        "dkim_unsigned": total["dkim_unsigned"],
        "dkim_unsigned_reasons": unsigned,
        "direct_service": {
            "sent": total["direct_sent"],
            "failed": total["direct_failed"],
            "deferred": total["deferred"],
            "bounced": total["bounced"],
            "mx_lookups": total["mx_lookups"],
            "mx_cache_hits": total["mx_cache_hits"],
            "mx_cache_size": total["mx_cache_size"],
        },
        "delivery": {
            k: total[k]
            for k in (
                "sent",
                "failed",
                "deferred",
                "expired",
                "bounced",
                "dsn_dropped",
                "double_bounces",
                "fallbacks",
                "connections",
                "connections_reused",
                "tls_fallbacks",
                "active_sessions",
                "backlog",
            )
        },
        "smart_hosts": smart_hosts,
        "destinations": destinations,
        "smart_routing": routing,
        "workers": workers,
    }


def unflatten(counters: Mapping[str, int]) -> dict[str, Any]:
    """Counters keyed by their path (``counter_key``) as one nested published dict."""
    out: dict[str, Any] = {}
    for key, n in counters.items():
        path = json.loads(key)
        into = out
        for part in path[:-1]:
            into = into.setdefault(part, {})
        into[path[-1]] = n
    return out


def combine_nodes(mode: str, nodes: Sequence[NodeStats]) -> dict[str, Any]:
    """The statistics of every node sharing a PostgreSQL queue: the totals in
    ``combine``'s shape, plus ``nodes``: each node's main figures."""
    published: list[dict[str, Any]] = []
    per_node: dict[str, dict[str, Any]] = {}
    for ns in nodes:
        own = [unflatten(ns.counters), *ns.states.values()]
        published += own
        mine = combine(mode, own)["delivery"]
        per_node[ns.node or STOPPED_NODES] = {
            **{k: mine[k] for k in ("sent", "failed", "deferred", "expired", "connections")},
            "active_sessions": mine["active_sessions"],
            "backlog": mine["backlog"],
            "workers": len(ns.states),
            "heartbeat": ns.heartbeat,
        }
    out = combine(mode, published)
    out["workers"] = sum(len(ns.states) for ns in nodes)
    out["nodes"] = per_node
    return out


async def shared_relay_stats(config: RelayConfig, *, now: float | None = None) -> dict[str, Any]:
    """Every node's statistics from the PostgreSQL queue (``queue.backend = "postgres"``)."""
    from ferry.queue import open_postgres_for_tool

    queue = open_postgres_for_tool(config)
    try:
        now = time.time() if now is None else now
        return combine_nodes(config.delivery.mode, await queue.delivery_stats(now=now))
    finally:
        await queue.close()


def relay_stats(config: RelayConfig) -> dict[str, Any]:
    """The whole relay's statistics: since `ferry serve` started (SQLite), or every
    node's since the shared queue was created (PostgreSQL)."""
    if config.queue.backend == "postgres":
        return asyncio.run(shared_relay_stats(config))
    return combine(config.delivery.mode, read_published(config))
