"""``ferry init [DIR]``: a commented starter ferry.toml, then what to do next."""

from __future__ import annotations

import socket
from pathlib import Path

import click

STARTER = """\
# ferry.toml -- written by `ferry init` on {today}. Every key is optional; the full list,
# with defaults, is in ferry.example.toml and the README. Check it with:
#   ferry --config {config} config check

[server]
# The name this relay gives in its banner, EHLO and Received: headers, and the domain of
# its bounces (MAILER-DAEMON@...). It must be a fully qualified name whose A/AAAA record
# points here, and this machine's PTR record should name it.
hostname = "{hostname}"
# mta: port 25 style (STARTTLS offered). submission: port 587, STARTTLS and AUTH required
# (users: `ferry user add NAME`). smtps: port 465, implicit TLS.
listen = [
    {{ address = "127.0.0.1", port = 2525, mode = "mta" }},
    {{ address = "0.0.0.0", port = 587, mode = "submission" }},
]
# A certificate for {hostname} (e.g. from Let's Encrypt). Empty: a self-signed one is
# made on first start (fine for testing; clients will not trust it).
tls_cert = ""
tls_key = ""
users_file = "{data}/users"
# Clients that may send without AUTH: only this machine by default.
relay_networks = ["127.0.0.0/8", "::1/128"]

[queue]
# The queue database, the self-signed certificate and run files live here.
path = "{data}"

[delivery]
# direct: to each recipient's MX. relay: through [[smart_hosts]]. hybrid: direct, then
# a smart host when the MX refuses us. smart: per destination, whichever works.
mode = "direct"
# true: accept and queue, deliver nothing (lift it with `ferry queue resume '*'`).
hold = false

[dkim]
# Keys made with `ferry dkim keygen DOMAIN` are kept here and used at once.
keys_dir = "{data}/dkim"

[log]
level = "info"
format = "text"   # or "json": one JSON object per line
"""

NEXT_STEPS = """\
Wrote {config}

Next steps:
  1. Check it:             ferry --config {config} config check
  2. Add a sending user:   ferry --config {config} user add alice
  3. Make a DKIM key:      ferry --config {config} dkim keygen example.com
  4. Publish DNS records for each sending domain (example.com here), then verify them:
       {hostname}.  A     <this machine's public address>  (and the PTR back to it)
       example.com.  TXT  "v=spf1 a:{hostname} -all"
       <selector>._domainkey.example.com.  TXT  (printed by step 3)
       _dmarc.example.com.  TXT  "v=DMARC1; p=none; rua=mailto:postmaster@example.com"
     ferry --config {config} dns check example.com
  5. Run it:               ferry --config {config} serve
     (as a service: contrib/systemd/ferry.service, see the README)
"""


def machine_fqdn() -> str:
    """This machine's fully qualified name, as the resolver knows it."""
    return socket.getfqdn()


@click.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--hostname", help="The relay's public name (default: this machine's FQDN).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where the queue lives (default: DIRECTORY/ferry-data).",
)
@click.option("--force", is_flag=True, help="Replace an existing ferry.toml.")
def init_command(directory: str, hostname: str | None, data_dir: str | None, force: bool) -> None:
    """Write a commented starter DIRECTORY/ferry.toml and print the next steps."""
    import datetime

    from ferry.service import is_fqdn

    base = Path(directory).resolve()
    config = base / "ferry.toml"
    if config.exists() and not force:
        raise click.ClickException(f"{config} exists (--force replaces it)")
    name = hostname or machine_fqdn()
    data = Path(data_dir).resolve() if data_dir else base / "ferry-data"
    base.mkdir(parents=True, exist_ok=True)
    config.write_text(
        STARTER.format(
            today=datetime.date.today().isoformat(),
            config=config,
            hostname=name,
            data=data,
        )
    )
    click.echo(NEXT_STEPS.format(config=config, hostname=name))
    if not is_fqdn(name):
        click.echo(
            f"warning: {name!r} is not a fully qualified domain name; set server.hostname"
            " (or run again with --hostname mail.example.com)",
            err=True,
        )
