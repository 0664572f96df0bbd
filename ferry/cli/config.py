"""``ferry config ...``: check a configuration, show the effective settings."""

from __future__ import annotations

import json
from typing import Any

import click

from ferry.cli.common import config_path, load_config
from ferry.cli.main import _print_json


@click.group("config")
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
