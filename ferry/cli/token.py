"""``ferry token ...``: API tokens for the HTTP API (stored hashed; shown once)."""

from __future__ import annotations

import datetime
import json

import click

from ferry.config import ConfigError, RelayConfig
from ferry.http.tokens import SCOPES, TokenError, TokenStore


def _store(ctx: click.Context) -> TokenStore:
    from ferry.http.server import tokens_path

    try:
        config = RelayConfig.load(ctx.obj.get("config") if ctx.obj else None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return TokenStore(tokens_path(config))


@click.group("token")
def token() -> None:
    """Manage HTTP API tokens (Authorization: Bearer ...)."""


@token.command("create")
@click.argument("name")
@click.option("--scope", type=click.Choice(SCOPES), default="inject", show_default=True)
@click.pass_context
def token_create(ctx: click.Context, name: str, scope: str) -> None:
    """Create token NAME and print its secret (once: only a hash is kept)."""
    try:
        secret = _store(ctx).create(name, scope)  # type: ignore[arg-type]
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """List tokens (names, scopes and creation times; never secrets)."""
    rows = [
        {
            "name": t.name,
            "scope": t.scope,
            "created": datetime.datetime.fromtimestamp(t.created, datetime.UTC).isoformat(
                timespec="seconds"
            ),
        }
        for t in _store(ctx).list()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<24} {r['scope']:<7} {r['created']}")
    if not rows:
        click.echo("(no tokens)")


@token.command("revoke")
@click.argument("name")
@click.pass_context
def token_revoke(ctx: click.Context, name: str) -> None:
    """Revoke token NAME at once (a running relay re-reads the file)."""
    if not _store(ctx).revoke(name):
        raise click.ClickException(f"no token {name}")
    click.echo(f"token {name} revoked")
