"""``ferry nodes``: the ``ferry serve`` nodes sharing a PostgreSQL queue."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from ferry.config import ConfigError, RelayConfig

if TYPE_CHECKING:
    from ferry.queue.postgres import NodeInfo


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.command("nodes")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def nodes(ctx: click.Context, as_json: bool) -> None:
    """List the nodes sharing the queue: id, host, version, last heartbeat, work in hand."""
    try:
        config = RelayConfig.load(ctx.obj.get("config"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if config.queue.backend != "postgres":
        raise click.ClickException(
            "a SQLite queue has one node, the `ferry serve` that owns it:"
            ' `ferry nodes` is for queue.backend = "postgres"'
        )
    from ferry.queue import open_postgres_for_tool

    async def run() -> list[NodeInfo]:
        queue = open_postgres_for_tool(config)
        try:
            return list(await queue.nodes())
        except (OSError, LookupError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await queue.close()

    found = asyncio.run(run())
    now = time.time()
    if as_json:
        click.echo(json.dumps([n.as_json(now) for n in found], indent=2))
        return
    table = Table("id", "host", "version", "last heartbeat", "in hand", "state")
    for n in found:
        table.add_row(
            n.id,
            n.host,
            n.version,
            f"{_when(n.heartbeat)} ({now - n.heartbeat:.0f}s ago)",
            str(n.in_hand),
            "silent" if n.silent(now) else "alive",
        )
    Console().print(table)
