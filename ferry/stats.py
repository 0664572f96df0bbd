"""Relay statistics in the SMTPy seed's shape, from what the schedulers publish.

Each running scheduler (in `ferry serve` or a delivery worker process) writes its
counters to ``<queue.path>/stats/<owner>.json`` every few seconds; this module sums
them, so `ferry stats` works from another process and with several workers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ferry.config import RelayConfig
from ferry.delivery.scheduler import stats_dir

_COUNTERS = (
    "sent",
    "failed",
    "deferred",
    "expired",
    "bounced",
    "dsn_dropped",
    "double_bounces",
    "connections",
    "connections_reused",
    "tls_fallbacks",
    "direct_sent",
    "direct_failed",
    "relay_sent",
    "relay_failed",
    "fallbacks",
    "mx_lookups",
    "mx_cache_hits",
    "mx_cache_size",
    "dkim_signed",
    "dkim_unsigned",
    "active_sessions",
    "backlog",
)


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


def relay_stats(config: RelayConfig) -> dict[str, Any]:
    """The whole relay's statistics since `ferry serve` started."""
    return combine(config.delivery.mode, read_published(config))
