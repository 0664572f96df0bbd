"""``ferry user ...``: SMTP AUTH users (scrypt hashes in ``server.users_file``)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ferry.cli.main import _load, _print_json
from ferry.envelope import Priority


@click.group("user")
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
    from rich.console import Console
    from rich.table import Table

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
    Console().print(table)
