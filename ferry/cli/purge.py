"""``ferry queue purge``: delete finished messages' history past the retention, now.

The same purge ``ferry serve`` runs in the background every minute
(``ferry.queue.retention``); safe to run while it runs.
"""

from __future__ import annotations

import asyncio
import json
import time

import click

from ferry.config import ConfigError, RelayConfig
from ferry.durations import parse_duration
from ferry.queue import open_queue
from ferry.queue.retention import PurgeResult, purge_history


@click.command("purge")
@click.option(
    "--older-than",
    "older_than",
    metavar="DURATION",
    help="Purge messages finished longer ago than this (default: queue.history_retention).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge(ctx: click.Context, older_than: str | None, as_json: bool) -> None:
    """Delete the history of messages finished longer ago than the retention."""
    try:
        config = RelayConfig.load(ctx.obj.get("config"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        retention = parse_duration(older_than or config.queue.history_retention)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None

    async def run() -> PurgeResult:
        queue = open_queue(config)
        try:
            return await purge_history(queue, now=time.time(), retention=retention)
        finally:
            await queue.close()

    result = asyncio.run(run())
    if as_json:
        click.echo(json.dumps({"purged": result.messages, "pages_freed": result.pages}))
    else:
        click.echo(
            f"{result.messages} finished messages purged, {result.pages} free pages returned"
        )
