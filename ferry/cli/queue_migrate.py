"""``ferry queue migrate`` and ``ferry queue migrate-to``: the queue's schema, and moving
pending mail from the SQLite queue to PostgreSQL."""

from __future__ import annotations

import asyncio
import fcntl
import json
from pathlib import Path

import click

from ferry.config import ConfigError, RelayConfig


def _config(ctx: click.Context) -> RelayConfig:
    try:
        return RelayConfig.load(ctx.obj.get("config"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("migrate")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def migrate(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the queue's schema to this Ferry's version (idempotent).

    `ferry serve` does the same at start; a schema newer than this Ferry is refused.
    """
    config = _config(ctx)

    async def run() -> tuple[str, int, int]:
        if config.queue.backend == "postgres":
            import psycopg

            from ferry.queue.postgres import conninfo, describe_dsn
            from ferry.queue.postgres_schema import LATEST, migrate, schema_version

            dsn = config.queue.dsn.get_secret_value()
            description = describe_dsn(dsn)
            try:
                conn = await psycopg.AsyncConnection.connect(
                    conninfo(dsn, config.queue.password_file), autocommit=True, connect_timeout=30
                )
            except psycopg.OperationalError as exc:
                # libpq's message names host, port and user, never the password.
                raise click.ClickException(f"cannot connect to {description}: {exc}") from None
            try:
                found = await schema_version(conn)
                await migrate(conn)
            finally:
                await conn.close()
            return description, found, LATEST
        from ferry.queue.sqlite import SqliteQueue, connect
        from ferry.queue.sqlite_schema import LATEST as SQLITE_LATEST

        db = SqliteQueue.database_path(config.queue.path)
        found = 0
        if db.is_file():
            c = connect(db, readonly=True)
            try:
                row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                found = int(row[0]) if row else 1
            finally:
                c.close()
        await SqliteQueue(config.queue.path).close()  # opening migrates
        return str(db), found, SQLITE_LATEST

    try:
        where, found, latest = asyncio.run(run())
    except (OSError, RuntimeError) as exc:  # unreachable, damaged, a newer schema
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"queue": where, "found": found, "version": latest}))
    elif found == latest:
        click.echo(f"{where}: schema version {latest}, up to date")
    else:
        click.echo(f"{where}: schema version {found} -> {latest}")


@click.command("migrate-to")
@click.argument("dsn")
@click.option("--password-file", default="", help="A file whose first line is the password.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def migrate_to(ctx: click.Context, dsn: str, password_file: str, as_json: bool) -> None:
    """Copy every pending message of the SQLite queue to the PostgreSQL queue at DSN.

    Stop `ferry serve` first. Messages go whole (recipients, states, history); one
    already there is skipped, so an interrupted move is run again. The SQLite queue is
    left as it was: switch the configuration to queue.backend = "postgres", start
    ferry, and keep the old queue.db until the new queue has been checked.
    """
    config = _config(ctx)
    if config.queue.backend != "sqlite":
        raise click.ClickException('migrate-to moves a queue.backend = "sqlite" queue')
    from ferry.queue.postgres import PostgresQueue
    from ferry.queue.sqlite import QueueNotFound, SqliteQueue
    from ferry.queue.transfer import MoveResult, move_pending

    db = SqliteQueue.database_path(config.queue.path)
    if not db.is_file():
        raise click.ClickException(str(QueueNotFound(db)))
    # The serve lock: nothing may change the SQLite queue while it is copied.
    lock = open(Path(config.queue.path) / "serve.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise click.ClickException(
            f"ferry serve is running on {config.queue.path}: stop it first"
        ) from None

    async def run() -> MoveResult:
        target = PostgresQueue(dsn, password_file=password_file, pool_size=2)
        try:
            return await move_pending(db, target)
        finally:
            await target.close()

    try:
        result = asyncio.run(run())
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        lock.close()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "copied": result.copied,
                    "skipped": result.skipped,
                    "recipients": result.recipients,
                }
            )
        )
    else:
        click.echo(
            f"{result.copied} messages ({result.recipients} recipients) copied,"
            f" {result.skipped} already there"
        )
