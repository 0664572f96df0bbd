"""``ferry ...``: the operator's commands (click + rich; ``--json`` on every listing).

Queue commands open the queue database directly, so they work whether or not
``ferry serve`` is running (SQLite WAL lets both use it at once).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ferry.cli.common import (
    config_option,
    config_path,
    load_config,
    queue_header,
    queue_location,
)
from ferry.config import RelayConfig
from ferry.delivery.retry import fill_give_up, policy_for
from ferry.envelope import Priority, Status
from ferry.queue.base import MessageInfo, QueueStats
from ferry.queue.sqlite import SqliteQueue
from ferry.runtime import run_async

T = TypeVar("T")
console = Console()


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _load(ctx: click.Context) -> RelayConfig:
    return load_config(config_path(ctx))


def _with_queue(
    ctx: click.Context, fn: Callable[[SqliteQueue], Awaitable[T]], *, readonly: bool = False
) -> T:
    config = _load(ctx)

    async def run() -> T:
        # Never create a queue: a wrong path must not look like an empty queue.
        try:
            if config.queue.backend == "postgres":
                from ferry.queue.postgres import PostgresQueue, conninfo

                dsn = conninfo(config.queue.dsn.get_secret_value(), config.queue.password_file)
                queue: Any = await PostgresQueue(dsn, create=False, pool_size=2).open()
            else:
                queue = SqliteQueue(config.queue.path, create=False, readonly=readonly)
        except (OSError, LookupError, RuntimeError) as exc:  # not found, damaged, too new
            raise click.ClickException(str(exc)) from None
        try:
            return await fn(queue)
        finally:
            await queue.close()

    return asyncio.run(run())


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


@click.group()
@click.option(
    "-c",
    "--config",
    "config_path",
    envvar="FERRY_CONFIG",
    type=click.Path(dir_okay=False),
    help="Path to ferry.toml (default: $FERRY_CONFIG, else built-in defaults and"
    " the data directory $FERRY_DATA or ./ferry-data).",
)
@click.version_option(package_name="ferry")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Ferry: a self-hosted SMTP relay and outbound mail transfer agent."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path


@main.command()
@config_option
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the relay (SMTP intake and delivery) until interrupted."""
    from ferry.events import setup_logging
    from ferry.service import AlreadyRunning, Service

    config = _load(ctx)
    setup_logging(config.log.level, config.log.format)
    try:
        run_async(Service(config).run_forever())
    except AlreadyRunning as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    except KeyboardInterrupt:
        pass


# -- config ----------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Inspect configuration."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def config_check(ctx: click.Context, file: str | None, as_json: bool) -> None:
    """Validate FILE (or the active config) and print the effective settings, secrets masked."""
    config = load_config(file or config_path(ctx))  # the same load as `ferry serve`
    data = config.masked()
    if as_json:
        _print_json(data)
        return
    click.echo("# configuration is valid; effective settings (secrets masked):")
    _print_toml(data)


def _print_toml(data: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    for k, v in scalars.items():
        click.echo(f"{k} = {fmt(v)}")
    for section, value in data.items():
        if isinstance(value, dict):
            click.echo(f"\n[{section}]")
            for k, v in value.items():
                key = k if k.replace("_", "").isalnum() else json.dumps(k)
                click.echo(f"{key} = {fmt(v)}")
        elif isinstance(value, list):
            for item in value:
                click.echo(f"\n[[{section}]]")
                for k, v in item.items():
                    click.echo(f"{k} = {fmt(v)}")


# -- users -----------------------------------------------------------------------


@main.group("user")
def user_group() -> None:
    """Manage SMTP AUTH users."""


def _users(ctx: click.Context) -> Any:
    from ferry.intake.users import UserDB

    return UserDB(_load(ctx).server.users_file)


@user_group.command("add")
@click.argument("name")
@click.option(
    "--priority",
    type=click.Choice([p.name.lower() for p in Priority]),
    help="Default priority of this user's mail.",
)
@click.pass_context
def user_add(ctx: click.Context, name: str, priority: str | None) -> None:
    """Add or replace user NAME; the password is read from a prompt or stdin."""
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.ClickException("empty password")
    try:
        _users(ctx).add(name, password, Priority.parse(priority) if priority else None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"user {name} saved")


@user_group.command("remove")
@click.argument("name")
@click.pass_context
def user_remove(ctx: click.Context, name: str) -> None:
    """Remove user NAME."""
    if not _users(ctx).remove(name):
        raise click.ClickException(f"no user {name}")
    click.echo(f"user {name} removed")


@user_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def user_list(ctx: click.Context, as_json: bool) -> None:
    """List users (names and default priority; never hashes)."""
    users = _users(ctx).list()
    if as_json:
        _print_json(
            [
                {"name": u.name, "priority": u.priority.name.lower() if u.priority else None}
                for u in users
            ]
        )
        return
    table = Table("user", "default priority")
    for u in users:
        table.add_row(u.name, u.priority.name.lower() if u.priority else "-")
    console.print(table)


# -- queue -----------------------------------------------------------------------


@main.group("queue")
def queue_group() -> None:
    """Inspect and manage the queue (works while `ferry serve` runs)."""


def message_json(m: MessageInfo, history: bool = False) -> dict[str, Any]:
    """A message as plain data (the shape of every --json output)."""
    return {
        "id": m.id,
        "status": m.status.value,
        "sender": m.sender,
        "size": m.size,
        "priority": m.priority.name.lower(),
        "arrival": _ts(m.arrival),
        # The real give-up time (issue 11.1): retry.fill_give_up; None once finished.
        "expires": _ts(m.gives_up) if m.gives_up is not None else None,
        "finished": _ts(m.finished) if m.finished is not None else None,
        "client_address": m.client_address,
        "client_helo": m.client_helo,
        "auth_user": m.auth_user,
        "envid": m.envid,
        "ret": m.ret,
        "smtputf8": m.smtputf8,
        "recipients": [
            {
                "address": r.address,
                "original_recipient": r.orcpt,
                "notify": r.notify,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt": _ts(r.next_attempt) if r.next_attempt else None,
                "gives_up": _ts(r.gives_up) if r.gives_up is not None else None,
                "gives_up_reason": r.gives_up_reason,
                "expiry_reason": r.expiry_reason,
                "last_reply": str(r.last_reply) if r.last_reply else None,
                "route": r.route,
                **(
                    {
                        "history": [
                            {
                                "at": _ts(a.at),
                                "outcome": a.outcome.value,
                                "next_hop": a.next_hop,
                                "tls": a.tls,
                                "reply": str(a.reply) if a.reply else None,
                            }
                            for a in r.history
                        ]
                    }
                    if history
                    else {}
                ),
            }
            for r in m.recipients
        ],
    }


@queue_group.command("list")
@click.option("--status", help="Queued, InProgress, Deferred, Delivered, Failed, Expired, ...")
@click.option("--domain", help="Only messages with a recipient at this domain.")
@click.option("--sender", help="Only messages from this envelope sender.")
@click.option("--limit", default=100, show_default=True)
@click.option("--offset", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_list(
    ctx: click.Context,
    status: str | None,
    domain: str | None,
    sender: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List messages, newest first."""
    try:
        st = Status.parse(status) if status else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--status") from None
    msgs = _with_queue(
        ctx,
        lambda q: q.list(status=st, domain=domain, sender=sender, limit=limit, offset=offset),
        readonly=True,
    )
    policy = policy_for(_load(ctx))
    for m in msgs:
        fill_give_up(policy, m)
    if as_json:
        _print_json(
            {"queue": queue_location(_load(ctx)), "messages": [message_json(m) for m in msgs]}
        )
        return
    queue_header(_load(ctx))
    table = Table("id", "status", "arrival", "size", "prio", "sender", "recipients", "gives up")
    for m in msgs:
        rcpts = ", ".join(f"{r.address} ({r.status.value})" for r in m.recipients[:3])
        if len(m.recipients) > 3:
            rcpts += f", +{len(m.recipients) - 3}"
        table.add_row(
            m.id,
            m.status.value,
            _ts(m.arrival),
            str(m.size),
            m.priority.name.lower(),
            m.sender or "<>",
            rcpts,
            _ts(m.gives_up) if m.gives_up is not None else "-",
        )
    console.print(table)
    if not msgs:
        click.echo("(no messages)")


@queue_group.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """Show one message: envelope, recipients, states and attempt history."""
    m = _with_queue(ctx, lambda q: q.get(message_id), readonly=True)
    if m is None:
        raise click.ClickException(f"no message {message_id}")
    fill_give_up(policy_for(_load(ctx)), m)
    data = message_json(m, history=True)
    if as_json:
        _print_json({**data, "queue": queue_location(_load(ctx))})
        return
    queue_header(_load(ctx))
    for key in (
        "id",
        "status",
        "sender",
        "size",
        "priority",
        "arrival",
        "expires",
        "finished",
        "client_address",
        "client_helo",
        "auth_user",
        "envid",
        "ret",
        "smtputf8",
    ):
        click.echo(f"{key:>15}: {data[key] if data[key] not in (None, '') else '-'}")
    for r in data["recipients"]:
        click.echo(
            f"\n  {r['address']}  [{r['status']}]  attempts={r['attempts']}"
            f"  next={r['next_attempt'] or '-'}  route={r['route'] or '-'}"
        )
        if r["gives_up"]:
            click.echo(f"    gives up: {r['gives_up']} ({r['gives_up_reason']})")
        if r["expiry_reason"]:
            click.echo(f"    expired: {r['expiry_reason']}")
        if r["original_recipient"]:
            click.echo(f"    original recipient: {r['original_recipient']}")
        if r["last_reply"]:
            click.echo(f"    last reply: {r['last_reply']}")
        for a in r["history"]:
            click.echo(
                f"    {a['at']}  {a['outcome']:<10} {a['next_hop'] or '-'}"
                f"  tls={a['tls'] or 'none'}  {a['reply'] or ''}"
            )


def stats_json(st: QueueStats) -> dict[str, Any]:
    out = st.as_dict()
    for key in ("oldest_message_time", "oldest_pending_recipient_time"):
        out[key] = _ts(out[key]) if out[key] else None
    return out


@queue_group.command("stats")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_stats(ctx: click.Context, as_json: bool) -> None:
    """Queue statistics (Zetian's fields) and per smart host delivery counters."""
    from ferry.stats import relay_stats

    st = _with_queue(ctx, lambda q: q.statistics(now=time.time()), readonly=True)
    data = stats_json(st)
    relay = relay_stats(_load(ctx))
    if as_json:
        _print_json(
            {**data, "smart_hosts": relay["smart_hosts"], "queue": queue_location(_load(ctx))}
        )
        return
    queue_header(_load(ctx))
    _smart_host_table(relay["smart_hosts"])
    table = Table("statistic", "value")
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    console.print(table)


def _smart_host_table(hosts: dict[str, Any]) -> None:
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


@main.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the SMTPy seed's shape).")
@click.pass_context
def stats_command(ctx: click.Context, as_json: bool) -> None:
    """Delivery statistics of the running relay (mode, direct/relay, DKIM, MX cache...)."""
    from ferry.stats import relay_stats

    config = _load(ctx)
    data = relay_stats(config)
    if as_json:
        _print_json({**data, "queue": queue_location(config)})
        return
    queue_header(config)
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
    _smart_host_table(data["smart_hosts"])
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
    if not data["workers"]:
        click.echo("(no running delivery: start `ferry serve`)")


def _one(ctx: click.Context, action: str, message_id: str) -> None:
    now = time.time()

    async def run(q: SqliteQueue) -> Any:
        if action == "retry":
            return await q.retry(message_id, now=now)
        if action == "cancel":
            return await q.cancel(message_id, now=now)
        return await q.remove(message_id)

    result = _with_queue(ctx, run)
    if not result:
        raise click.ClickException(f"{message_id}: nothing to {action}")
    click.echo(
        f"{message_id}: {action} done"
        + (f" ({result} recipients)" if not isinstance(result, bool) else "")
    )


@queue_group.command("retry")
@click.argument("message_id")
@click.pass_context
def queue_retry(ctx: click.Context, message_id: str) -> None:
    """Make a message's pending recipients due now."""
    _one(ctx, "retry", message_id)


@queue_group.command("cancel")
@click.argument("message_id")
@click.pass_context
def queue_cancel(ctx: click.Context, message_id: str) -> None:
    """Cancel a message's pending recipients (kept, marked Cancelled)."""
    _one(ctx, "cancel", message_id)


@queue_group.command("remove")
@click.argument("message_id")
@click.pass_context
def queue_remove(ctx: click.Context, message_id: str) -> None:
    """Delete a message and its history."""
    _one(ctx, "remove", message_id)


@queue_group.command("clear-expired")
@click.pass_context
def queue_clear_expired(ctx: click.Context) -> None:
    """Delete messages that ended Expired."""
    n = _with_queue(ctx, lambda q: q.clear_expired())
    click.echo(f"{n} expired messages removed")


def _attach() -> None:
    """Commands that live in their own modules."""
    from ferry.cli.dns import dns
    from ferry.cli.nodes import nodes
    from ferry.cli.purge import purge
    from ferry.cli.token import token
    from ferry.cli.webhooks import webhooks

    main.add_command(token)
    main.add_command(webhooks)
    main.add_command(dns)
    main.add_command(nodes)
    from ferry.cli.queue_check import check

    queue_group.add_command(check)
    queue_group.add_command(purge)
    from ferry.cli.queue_migrate import migrate, migrate_to

    queue_group.add_command(migrate)
    queue_group.add_command(migrate_to)
    try:
        from ferry.cli.dkim import dkim
    except ImportError:  # pragma: no cover
        return
    main.add_command(dkim)


_attach()

if __name__ == "__main__":  # pragma: no cover
    main()
