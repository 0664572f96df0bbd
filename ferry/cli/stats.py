"""``ferry stats``: what the running relay has done since it started, and whether it delivers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ferry.cli.main import _load, _print_json, _ts, _with_queue
from ferry.config import RelayConfig
from ferry.queue.selection import ALL_DESTINATIONS, Suspension


def serve_pid(config: RelayConfig) -> int | None:
    """The pid of the `ferry serve` using this data directory, if it runs."""
    try:
        text = (Path(config.queue.path) / "serve.lock").read_text().strip()
        pid = int(text)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def delivery_state(suspended: list[Suspension]) -> str:
    """One line: running, held (every destination) or some destinations suspended."""
    hold = [s for s in suspended if s.domain == ALL_DESTINATIONS]
    if hold:
        s = hold[0]
        until = f" until {_ts(s.until)}" if s.until else ""
        why = f": {s.reason}" if s.reason else ""
        return f"HELD (every destination suspended{until}{why}; `ferry queue resume '*'`)"
    if suspended:
        return "running; suspended: " + ", ".join(s.domain for s in suspended)
    return "running"


def smart_host_table(console: Console, hosts: dict[str, Any]) -> None:
    if not hosts:
        return
    table = Table("smart host", "state", "sent", "failed", "deferred", "last error")
    for name, h in hosts.items():
        table.add_row(
            name,
            str(h.get("state", "-")),
            str(h["sent"]),
            str(h["failed"]),
            str(h["deferred"]),
            str(h.get("last_error") or "-"),
        )
    console.print(table)


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def stats_command(ctx: click.Context, as_json: bool) -> None:
    """Delivery statistics of the running relay (mode, direct/relay, DKIM, MX cache...)."""
    import time

    from ferry.stats import relay_stats

    config = _load(ctx)
    try:
        data = relay_stats(config)
    except (OSError, LookupError, RuntimeError) as exc:  # PostgreSQL: unreachable, no queue
        raise click.ClickException(str(exc)) from None
    suspended = _with_queue(ctx, lambda q: q.suspensions(now=time.time()), readonly=True)
    pid = serve_pid(config)
    data["serve_pid"] = pid
    data["held"] = any(s.domain == ALL_DESTINATIONS for s in suspended)
    data["suspended"] = [s.domain for s in suspended]
    if as_json:
        from ferry.cli.common import queue_location

        _print_json({"queue": queue_location(config), **data})
        return
    console = Console()
    here = " on this node" if "nodes" in data else ""
    click.echo(f"ferry serve{here}: {f'running (pid {pid})' if pid else 'not running'}")
    click.echo(f"delivery: {delivery_state(suspended)}")
    table = Table("statistic", "value")
    for key in (
        "mode",
        "direct_sent",
        "direct_failed",
        "relay_sent",
        "relay_failed",
        "dkim_signed",
        "dkim_unsigned",
    ):
        table.add_row(key, str(data[key]))
    for key, value in {**data["direct_service"], **data["delivery"]}.items():
        table.add_row(key, str(value))
    console.print(table)
    smart_host_table(console, data["smart_hosts"])
    if data["destinations"]:
        dest = Table("destination", "delivered", "failed", "deferred", "pending", "paused for")
        for name, d in sorted(data["destinations"].items()):
            dest.add_row(
                name,
                str(d.get("delivered", 0)),
                str(d.get("failed", 0)),
                str(d.get("deferred", 0)),
                str(d.get("pending", 0)),
                str(d.get("paused_for", 0)),
            )
        console.print(dest)
    if "nodes" in data:
        node_table(console, data["nodes"])
    if not pid and "nodes" not in data:
        click.echo("(no running delivery: start `ferry serve`)")


def node_table(console: Console, nodes: dict[str, Any]) -> None:
    """PostgreSQL: each node's share of the totals above."""
    import time

    from ferry.queue.postgres import HEARTBEAT_SECONDS

    table = Table(
        "node", "state", "sent", "failed", "deferred", "connections", "sessions", "backlog"
    )
    now = time.time()
    for name, n in nodes.items():
        beat = n.get("heartbeat")
        if beat is None:
            state = "stopped"
        elif now - beat > 3 * HEARTBEAT_SECONDS:
            state = "silent"
        else:
            state = "running"
        table.add_row(
            name,
            state,
            *(str(n[k]) for k in ("sent", "failed", "deferred", "connections")),
            str(n["active_sessions"]),
            str(n["backlog"]),
        )
    console.print(table)
