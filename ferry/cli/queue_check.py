"""``ferry queue check``: SQLite's integrity check of the queue database, with a summary,
and that every message whose body is a spool file still has it.

On PostgreSQL there are no pages of ours to check (the server keeps them whole): the
check connects, verifies the schema version (``open``) and counts the mail."""

from __future__ import annotations

import asyncio
import json

import click

from ferry.config import ConfigError, RelayConfig
from ferry.queue.spool import spool_dir
from ferry.queue.sqlite import QueueDamaged, QueueNotFound, SqliteQueue, recovery_steps


async def _check(path: str, quick: bool) -> tuple[list[str], list[str], dict[str, int]]:
    queue = SqliteQueue(path, create=False, readonly=True)
    try:
        problems = await queue.check(quick=quick)
        counts: dict[str, int] = {}
        missing: list[str] = []
        if not problems:
            st = await queue.statistics(now=0)
            counts = {"messages": st.total_messages, "bytes": st.total_size}
            # A sound database can still name a body file that is gone (spool.py).
            missing = await queue.check_bodies()
        return problems, missing, counts
    finally:
        await queue.close()


def _check_postgres(config: RelayConfig, as_json: bool) -> None:
    from ferry.queue import open_postgres_for_tool
    from ferry.queue.postgres import describe_dsn

    where = describe_dsn(config.queue.dsn.get_secret_value())

    async def run() -> dict[str, int]:
        queue = open_postgres_for_tool(config)
        try:
            await queue.check()
            st = await queue.statistics(now=0)
            return {"messages": st.total_messages, "bytes": st.total_size}
        finally:
            await queue.close()

    try:
        counts = asyncio.run(run())
    except (OSError, LookupError, RuntimeError) as exc:  # unreachable, no queue, too new
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"path": where, "ok": True, "problems": [], **counts}))
    else:
        click.echo(f"{where}: ok ({counts['messages']} messages, {counts['bytes']} bytes of mail)")


@click.command("check")
@click.option("--quick", is_flag=True, help="quick_check instead of integrity_check (faster).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check(ctx: click.Context, quick: bool, as_json: bool) -> None:
    """Check the queue database for corruption and the spool for missing message bodies
    (exit 0: sound, 1: damaged or missing).

    Read-only: safe while `ferry serve` runs.
    """
    try:
        config = RelayConfig.load(ctx.obj.get("config"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if config.queue.backend == "postgres":
        _check_postgres(config, as_json)
        return
    db = SqliteQueue.database_path(config.queue.path)
    try:
        problems, missing, counts = asyncio.run(_check(config.queue.path, quick))
    except QueueNotFound as exc:
        raise click.ClickException(str(exc)) from None
    except QueueDamaged as exc:
        problems, missing, counts = exc.problems, [], {}
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(db),
                    "ok": not problems and not missing,
                    "problems": problems + missing,
                    **counts,
                }
            )
        )
    elif missing:
        click.echo(f"{db}: {len(missing)} message(s) without their body file:")
        for line in missing[:20]:
            click.echo(f"  {line}")
        if len(missing) > 20:
            click.echo(f"  ... and {len(missing) - 20} more")
        click.echo(
            f"Restore the files into {spool_dir(config.queue.path)} from the backup"
            " taken with the database, or remove those messages (ferry queue remove ID)."
        )
    elif problems:
        click.echo(f"{db}: damaged, {len(problems)} problem(s):")
        for line in problems[:20]:
            click.echo(f"  {line}")
        if len(problems) > 20:
            click.echo(f"  ... and {len(problems) - 20} more")
        click.echo(recovery_steps(db))
    else:
        click.echo(f"{db}: ok ({counts['messages']} messages, {counts['bytes']} bytes of mail)")
    ctx.exit(1 if problems or missing else 0)
