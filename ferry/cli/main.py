"""``ferry ...``: the operator's commands (click; ``--json`` on every listing).

Each command group lives in its own module (``ferry/cli/queue.py``, ``dns.py``...) and is
imported only when it runs: ``ferry --help`` stays instant. Queue commands open the
queue database directly, so they work whether or not ``ferry serve`` is running (SQLite
WAL lets both use it at once).
"""

from __future__ import annotations

import datetime
import importlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ferry import __version__
from ferry.cli.common import config_option, config_path, load_config

if TYPE_CHECKING:
    from ferry.config import RelayConfig
    from ferry.queue.sqlite import SqliteQueue

T = TypeVar("T")


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _load(ctx: click.Context) -> RelayConfig:
    """The configuration, through the one load path (``ferry.cli.common``)."""
    return load_config(config_path(ctx))


def _with_queue(
    ctx: click.Context, fn: Callable[[SqliteQueue], Awaitable[T]], *, readonly: bool = False
) -> T:
    import asyncio

    from ferry.queue.sqlite import SqliteQueue

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


#: Commands imported when used: name -> ("module:attribute", one-line help for --help).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "queue": ("ferry.cli.queue:queue_group", "Inspect and manage the queue (mailq, postsuper)."),
    "stats": ("ferry.cli.stats:stats_command", "Delivery statistics of the running relay."),
    "init": ("ferry.cli.init:init_command", "Write a starter ferry.toml and print next steps."),
    "dns": ("ferry.cli.dns:dns", "Check a sending domain's DNS (SPF, DKIM, DMARC, MX)."),
    "dkim": ("ferry.cli.dkim:dkim", "Create, list, rotate and remove DKIM signing keys."),
    "token": ("ferry.cli.token:token", "Create, list and revoke HTTP API tokens."),
    "config": ("ferry.cli.config:config_group", "Check a configuration and show its settings."),
    "user": ("ferry.cli.user:user_group", "Manage SMTP AUTH users."),
    "webhooks": ("ferry.cli.webhooks:webhooks", "Webhook endpoints: backlog, failures, replay."),
    "nodes": ("ferry.cli.nodes:nodes", "The nodes sharing a PostgreSQL queue."),
}


class LazyGroup(click.Group):
    """A group whose commands in ``LAZY_COMMANDS`` are imported only when needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            path, _help = LAZY_COMMANDS[cmd_name]
            module, attr = path.split(":")
            try:
                command = getattr(importlib.import_module(module), attr)
            except ImportError:  # an optional part (e.g. DKIM) is not installed
                return None
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(formatter.width)))
            else:
                rows.append((name, LAZY_COMMANDS[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option(
    "-c",
    "--config",
    "config_path",
    envvar="FERRY_CONFIG",
    type=click.Path(dir_okay=False),
    help="Path to ferry.toml (default: $FERRY_CONFIG, else built-in defaults and"
    " the data directory $FERRY_DATA or ./ferry-data).",
)
@click.version_option(message="ferry %(version)s", version=__version__)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Ferry: a self-hosted SMTP relay and outbound mail transfer agent.

    Start with `ferry init`, then `ferry serve`. Shell completion:
    eval "$(_FERRY_COMPLETE=bash_source ferry)" (zsh_source, fish_source).
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path


@main.command()
@config_option
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the relay (SMTP intake and delivery) until interrupted."""
    from ferry.events import setup_logging
    from ferry.runtime import run_async
    from ferry.service import AlreadyRunning, Service

    config = _load(ctx)
    setup_logging(config.log.level, config.log.format)
    try:
        run_async(Service(config, config_file=config_path(ctx)).run_forever())
    except AlreadyRunning as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":  # pragma: no cover
    main()
