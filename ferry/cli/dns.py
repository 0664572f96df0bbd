"""``ferry dns check DOMAIN [--ip IP] [--json]``: verify a sending domain's DNS.

Attach with ``main.add_command(dns)``. The resolver (``dns.nameservers``,
``dns.timeout``), the relay's hostname (``server.hostname``) and the local DKIM
keys (``dkim.keys_dir``, via :mod:`ferry.dkim` when it is installed) come from
the configuration named by the parent group's ``--config`` (``ctx.obj["config"]``).
Exit status: 0 when every required check passes or warns, 1 when one fails.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ferry.cli.common import config_path, load_config
from ferry.config import RelayConfig
from ferry.dnscheck.checks import Check, check_domain, failed, parse_tags, public_key_b64

MARKS = {
    "pass": ("✔", "green"),
    "warn": ("!", "yellow"),
    "fail": ("✘", "red"),
    "info": ("i", "blue"),
}


def local_dkim_keys(config: RelayConfig, domain: str) -> list[tuple[str, str, str]]:
    """``(selector, kind, p=value)`` of the keys that sign for ``domain``.

    Empty when :mod:`ferry.dkim` is absent or the domain has no key.
    """
    try:
        from ferry import dkim
    except ImportError:
        return []
    store = dkim.KeyStore(config.dkim.keys_dir, default_selector=config.dkim.selector)
    keys: list[tuple[str, str, str]] = []
    for key in store.keys_for(domain):
        keys.append((key.selector, key.kind, _expected_p(dkim, key)))
    return keys


def _expected_p(dkim: Any, key: Any) -> str:
    """The ``p=`` a key should publish: from ``dkim.dns_record`` when it exists."""
    record = getattr(dkim, "dns_record", None)
    if record is None:
        return public_key_b64(key.private.public_key())
    _, value = record(key)
    if not isinstance(value, str):  # a list of TXT character-strings
        value = "".join(value)
    return "".join(parse_tags(value).get("p", "").split())


def render(checks: list[Check], domain: str, console: Console) -> None:
    """The checks as a table: mark, name, detail and, under a failure, its fix."""
    table = Table(title=f"DNS check: {domain}", show_lines=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("Check", no_wrap=True)
    table.add_column("Result", overflow="fold")
    for check in checks:
        mark, colour = MARKS[check.status]
        result = Text(check.detail)
        if check.fix and check.status in ("fail", "warn"):
            result.append("\nfix: ", style="bold")
            result.append(check.fix)
        name = check.name + ("" if check.required else " (optional)")
        table.add_row(Text(mark, style=f"bold {colour}"), name, result)
    console.print(table)
    if failed(checks):
        names = ", ".join(c.name for c in checks if c.required and c.status == "fail")
        console.print(f"[bold red]✘ required checks failed:[/] {names}")
    else:
        console.print("[bold green]✔ every required check passes[/]")


@click.group("dns")
def dns() -> None:
    """Check a sending domain's DNS records."""


@dns.command("check")
@click.argument("domain")
@click.option("--ip", help="The relay's sending IP address (checks SPF against it, and PTR).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def dns_check(ctx: click.Context, domain: str, ip: str | None, as_json: bool) -> None:
    """Verify MX, SPF, DKIM, DMARC, PTR, MTA-STS and TLS-RPT records of DOMAIN.

    Exits 1 if a required check (SPF, DKIM with local keys, DMARC, PTR with --ip) fails.
    """
    config = load_config(config_path(ctx))  # the one load path (exit 1 on error)
    try:
        keys = local_dkim_keys(config, domain)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read DKIM keys: {exc}") from None
    try:
        checks = asyncio.run(
            check_domain(
                domain,
                ip=ip,
                hostname=config.server.hostname,
                nameservers=list(config.dns.nameservers),
                dkim_keys=keys,
                timeout=config.dns.timeout,
            )
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2, ensure_ascii=False))
    else:
        render(checks, domain, Console(highlight=False))
    ctx.exit(1 if failed(checks) else 0)
