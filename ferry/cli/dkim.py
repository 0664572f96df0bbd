"""``ferry dkim ...``: create, list, rotate and remove DKIM signing keys.

The commands edit the keys directory (``dkim.keys_dir``) only; a running
``ferry serve`` notices the change on its next message (the key store watches
each domain directory's mtime). Attach with ``main.add_command(dkim)``.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ferry.cli.common import config_path, load_config
from ferry.dkim import DkimKey, KeyEntry, KeyStore, dns_record, txt_chunks, zone_line

console = Console()


def _store(ctx: click.Context) -> KeyStore:
    """The key store of the loaded configuration (``--keys-dir`` wins)."""
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    config = load_config(config_path(ctx))  # the one load path (exit 1 on error)
    keys_dir = obj.get("dkim_keys_dir") or config.dkim.keys_dir
    try:
        return KeyStore(keys_dir, default_selector=config.dkim.selector)
    except ValueError as exc:
        raise click.ClickException(f"dkim.selector: {exc}") from None


def _key_json(key: DkimKey, active: bool | None = None) -> dict[str, Any]:
    name, value = dns_record(key)
    out: dict[str, Any] = {
        "domain": key.domain,
        "selector": key.selector,
        "type": key.kind,
        "bits": key.bits,
        "path": str(key.path) if key.path else None,
        "record": {"name": name, "value": value, "strings": txt_chunks(value)},
        "zone": zone_line(key),
    }
    if active is not None:
        out["active"] = active
    return out


def _print_record(key: DkimKey) -> None:
    name, value = dns_record(key)
    click.echo("Publish this DNS TXT record:")
    click.echo(f"  name:  {name}")
    click.echo(f"  value: {value}")
    # Unindented: in a zone file a line starting with a blank reuses the previous owner.
    click.echo("Zone file line (the value split into 255-byte strings):")
    click.echo(zone_line(key))


def _print_new_key(key: DkimKey, what: str) -> None:
    click.echo(f"{what}: {key.path} ({key.kind}-{key.bits}, mode 0600)")
    _print_record(key)


@click.group("dkim")
@click.option(
    "--keys-dir",
    type=click.Path(file_okay=False),
    help="Keys directory (default: dkim.keys_dir from the configuration).",
)
@click.pass_context
def dkim(ctx: click.Context, keys_dir: str | None) -> None:
    """Manage DKIM signing keys (keys_dir/<domain>/<selector>.pem)."""
    ctx.ensure_object(dict)
    if keys_dir:
        ctx.obj["dkim_keys_dir"] = keys_dir


@dkim.command("keygen")
@click.argument("domain")
@click.option("--selector", "-s", help="Selector (default: dkim.selector, 'ferry').")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="Key type; a domain with both an RSA and an Ed25519 key is signed with both.",
)
@click.option("--bits", default=2048, show_default=True, help="RSA key size (1024-4096).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keygen(
    ctx: click.Context, domain: str, selector: str | None, kind: str, bits: int, as_json: bool
) -> None:
    """Create a signing key for DOMAIN and print the DNS record to publish."""
    store = _store(ctx)
    try:
        key = store.generate(domain, selector=selector, kind=kind, bits=bits)  # type: ignore[arg-type]
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(_key_json(key, True), indent=2))
        return
    _print_new_key(key, "private key")


def _entries(store: KeyStore, domain: str) -> list[KeyEntry]:
    try:
        entries = store.entries(domain)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return entries


@dkim.command("show")
@click.argument("domain", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx: click.Context, domain: str | None, as_json: bool) -> None:
    """Show DOMAIN's keys (selector, type, active, DNS record); no DOMAIN: every domain."""
    store = _store(ctx)
    domains = [domain] if domain else store.all_domains()
    data = {d: [_key_json(e.key, e.active) for e in _entries(store, d)] for d in domains}
    if as_json:
        click.echo(json.dumps(data if not domain else next(iter(data.values())), indent=2))
        return
    if domain and not data[domain]:
        raise click.ClickException(f"no DKIM keys for {domain} in {store.keys_dir}")
    if not domains:
        click.echo(f"(no DKIM keys in {store.keys_dir})")
        return
    for d in domains:
        table = Table("selector", "type", "active", "created", "path", title=d)
        for e in _entries(store, d):
            created = "-"
            if e.key.path and e.key.path.exists():
                created = datetime.datetime.fromtimestamp(
                    e.key.path.stat().st_mtime, datetime.UTC
                ).strftime("%Y-%m-%d")
            table.add_row(
                e.key.selector,
                f"{e.key.kind}-{e.key.bits}",
                "yes" if e.active else "no",
                created,
                str(e.key.path or "-") + (" (config)" if e.configured else ""),
            )
        console.print(table)
        for e in _entries(store, d):
            click.echo(f"{e.key.selector}: {zone_line(e.key)}")
        errors = store.errors_for(d)
        for error in errors:
            click.echo(f"error: {error}", err=True)


@dkim.command("rotate")
@click.argument("domain")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["rsa", "ed25519"]),
    help="Which key to rotate (default: RSA if one is active, else the active type).",
)
@click.option("--bits", default=2048, show_default=True, help="RSA key size (1024-4096).")
@click.option(
    "--activate/--no-activate",
    default=True,
    show_default=True,
    help="Sign with the new key at once, or only create it (then `ferry dkim activate`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def rotate(
    ctx: click.Context, domain: str, kind: str | None, bits: int, activate: bool, as_json: bool
) -> None:
    """Create a key under a new selector (<selector><yyyymm>) and switch signing to it.

    The old key stays on disk, inactive, until `ferry dkim remove DOMAIN SELECTOR`;
    keep its DNS record published a few days for mail still in transit.
    """
    store = _store(ctx)
    try:
        before = [e for e in store.entries(domain) if e.active]
        key = store.rotate(domain, kind=kind, bits=bits, activate=activate)  # type: ignore[arg-type]
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    retired = [e.key.selector for e in before if e.key.kind == key.kind and not e.configured]
    if as_json:
        out = _key_json(key, activate)
        out["retired"] = retired if activate else []
        click.echo(json.dumps(out, indent=2))
        return
    _print_new_key(key, "new key")
    if activate:
        click.echo(f"Signing for {key.domain} now uses selector {key.selector}.")
        click.echo("Publish the record above before mail goes out, or receivers fail the check.")
        if retired:
            click.echo(
                f"Inactive, kept on disk: {', '.join(retired)}"
                f" (remove with `ferry dkim remove {key.domain} SELECTOR`)."
            )
    else:
        click.echo(
            f"Not active yet: publish the record, then `ferry dkim activate"
            f" {key.domain} {key.selector}`."
        )


@dkim.command("activate")
@click.argument("domain")
@click.argument("selector")
@click.option(
    "--keep-others",
    is_flag=True,
    help="Keep the active keys of the same type signing too (default: replace them).",
)
@click.pass_context
def activate(ctx: click.Context, domain: str, selector: str, keep_others: bool) -> None:
    """Sign DOMAIN's mail with SELECTOR (replacing the active key of its type)."""
    store = _store(ctx)
    try:
        store.activate(domain, selector, replace_kind=not keep_others)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{domain}: selector {selector.lower()} is active")


@dkim.command("remove")
@click.argument("domain")
@click.argument("selector")
@click.option("--force", is_flag=True, help="Remove even a key that is signing now.")
@click.pass_context
def remove(ctx: click.Context, domain: str, selector: str, force: bool) -> None:
    """Delete DOMAIN's key SELECTOR (an inactive one, unless --force)."""
    store = _store(ctx)
    try:
        entries = store.entries(domain)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    entry = next((e for e in entries if e.key.selector == selector.lower()), None)
    if entry is None or entry.configured:
        where = "named in the configuration" if entry else f"in {Path(store.keys_dir) / domain}"
        raise click.ClickException(f"no removable key {selector} {where}")
    if entry.active and not force:
        raise click.ClickException(
            f"{selector} is signing {entry.key.domain}'s mail: rotate first, or use --force"
        )
    store.remove(domain, selector)
    click.echo(
        f"removed {entry.key.path}; the DNS record {entry.key.dns_name}"
        " can go once mail signed with it has been delivered (a few days)"
    )
