"""``ferry webhooks ...``: endpoints, their backlog and failures; retry and replay."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import secrets
import time
from typing import Any

import click

from ferry.config import ConfigError, RelayConfig
from ferry.durations import parse_duration


def _config(ctx: click.Context) -> RelayConfig:
    try:
        return RelayConfig.load(ctx.obj.get("config") if ctx.obj else None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _queue_run(config: RelayConfig, fn: Any) -> Any:
    from ferry.queue import open_queue

    async def run() -> Any:
        # The configured backend: on PostgreSQL the event log and cursors are shared.
        queue = open_queue(config)
        try:
            return await fn(queue)
        finally:
            await queue.close()

    return asyncio.run(run())


def _ts(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


def _since(text: str) -> float:
    """An ISO time (``2026-12-01T10:00``) or a duration back from now (``2h``)."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a duration nor an ISO time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


@click.group("webhooks")
def webhooks() -> None:
    """Webhook endpoints: backlog, failures, retry and replay."""


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def webhooks_list(ctx: click.Context, as_json: bool) -> None:
    """Each endpoint with its cursor, backlog and failed events."""
    config = _config(ctx)

    async def gather(queue: Any) -> dict[str, Any]:
        failures = await queue.webhook_failures()
        out = {}
        for hook in config.webhooks:
            cursor = await queue.webhook_cursor(hook.name)
            backlog = await queue.events(after=cursor, types=hook.events, limit=100_000)
            out[hook.name] = {
                "url": hook.url,
                "events": list(hook.events),
                "cursor": cursor,
                "backlog": len(backlog),
                "failed": [
                    {"event": e, "at": _ts(at), "error": err}
                    for name, e, at, err in failures
                    if name == hook.name
                ],
            }
        return out

    data = _queue_run(config, gather)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("(no [[webhooks]] configured)")
    for name, d in data.items():
        click.echo(f"{name}  {d['url']}")
        click.echo(f"  events: {', '.join(d['events'])}")
        click.echo(f"  cursor: {d['cursor']}  backlog: {d['backlog']}  failed: {len(d['failed'])}")
        for f in d["failed"][:20]:
            click.echo(f"    event {f['event']} at {f['at']}: {f['error']}")


@webhooks.command("retry")
@click.option("--endpoint", help="Only this endpoint (its name).")
@click.pass_context
def webhooks_retry(ctx: click.Context, endpoint: str | None) -> None:
    """Send failed events again (the running relay picks them up)."""
    n = _queue_run(_config(ctx), lambda q: q.webhook_retry(endpoint))
    click.echo(f"{n} failed event deliveries will be retried")


@webhooks.command("replay")
@click.option("--since", required=True, help="A duration back from now (2h) or an ISO time.")
@click.option("--endpoint", help="Only this endpoint (default: every endpoint).")
@click.pass_context
def webhooks_replay(ctx: click.Context, since: str, endpoint: str | None) -> None:
    """Send every stored event since a time again, in order (receivers dedup on webhook-id)."""
    config = _config(ctx)
    names = [h.name for h in config.webhooks if endpoint in (None, h.name)]
    if not names:
        raise click.ClickException(f"no webhook endpoint {endpoint!r}")
    start = _since(since)

    async def rewind(queue: Any) -> list[int]:
        return [await queue.webhook_rewind(name, start) for name in names]

    for name, after in zip(names, _queue_run(config, rewind), strict=True):
        click.echo(f"{name}: replaying from event {after + 1}")


@webhooks.command("secret")
def webhooks_secret() -> None:
    """Print a new signing secret (whsec_...) for a secret_file."""
    click.echo("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
