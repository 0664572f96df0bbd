"""Internationalised domains: every domain table compares in one form (A-labels).

Each case of tests/cases/idn/forms.toml configures a table with one spelling of a
domain and asks with another; every table must agree with the case's ``same``.
"""

from __future__ import annotations

import smtplib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.config import ConfigError, RelayConfig
from ferry.delivery.routing import parse_route_target, plan_route
from ferry.delivery.sessions import make_shaper
from ferry.dkim.keys import KeyStore
from ferry.dkim.signing import Signer
from ferry.domains import address_domain, domain_key, to_a_labels
from ferry.envelope import EnvelopeIn, RecipientIn
from ferry.intake.aliases import AliasTable
from ferry.intake.policy import RcptDecision, RelayPolicy, decide_rcpt
from ferry.queue.sqlite import SqliteQueue
from tests.harness import ThreadedService, free_port

CASES = tomllib.loads((Path(__file__).parent / "cases" / "idn" / "forms.toml").read_text())["case"]
OUTSIDER = "203.0.113.9"  # not in relay_networks, not authenticated


def _config(**data: Any) -> RelayConfig:
    return RelayConfig.model_validate(data)


def _policy(config: RelayConfig) -> RelayPolicy:
    s = config.server
    return RelayPolicy.build(s.local_domains, s.relay_domains, s.relay_networks)


def local_domains(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(server={"local_domains": [configured]})
    domain = address_domain(f"x@{asked}")  # as intake takes it from RCPT TO
    decision = decide_rcpt(
        _policy(config), recipient_domain=domain, client_ip=OUTSIDER, authenticated=False
    )
    return decision is RcptDecision.LOCAL


def relay_domains(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(server={"relay_domains": [configured]})
    domain = address_domain(f"x@{asked}")
    decision = decide_rcpt(
        _policy(config), recipient_domain=domain, client_ip=OUTSIDER, authenticated=False
    )
    return decision is RcptDecision.RELAY


def relay_domains_wildcard(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(server={"relay_domains": [f"*.{configured}"]})
    domain = address_domain(f"x@mail.{asked}")
    decision = decide_rcpt(
        _policy(config), recipient_domain=domain, client_ip=OUTSIDER, authenticated=False
    )
    return decision is RcptDecision.RELAY


def aliases(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(
        server={"local_domains": [configured]}, aliases={f"info@{configured}": "t@ext.test"}
    )
    table = AliasTable(config.aliases, config.server.local_domains)
    return table.expand(f"info@{asked}") == ["t@ext.test"]


def alias_key_only(configured: str, asked: str, tmp: Path) -> bool:
    # local domain written one way, the alias key the other way
    config = _config(server={"local_domains": [asked]}, aliases={f"info@{configured}": "t@e.test"})
    try:
        table = AliasTable(config.aliases, config.server.local_domains)
    except ValueError:  # "domain is not a local domain"
        return False
    return table.expand(f"info@{asked}") == ["t@e.test"]


def routes(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(smart_hosts=[{"name": "sh", "host": "127.0.0.1"}], routes={configured: "sh"})
    plan = plan_route(
        RecipientIn(f"x@{asked}").domain,
        mode="direct",
        routes=config.routes,
        smart_hosts=["sh"],
        mx_port=25,
    )
    return plan.hops[0].kind == "smarthost"


def routes_wildcard(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(
        smart_hosts=[{"name": "sh", "host": "127.0.0.1"}], routes={f"*.{configured}": "sh"}
    )
    plan = plan_route(
        RecipientIn(f"x@a.{asked}").domain,
        mode="direct",
        routes=config.routes,
        smart_hosts=["sh"],
        mx_port=25,
    )
    return plan.hops[0].kind == "smarthost"


def shaping(configured: str, asked: str, tmp: Path) -> bool:
    config = _config(shaping={configured: {"connections": 3}})
    assert config.delivery.connections_per_destination != 3
    # the scheduler keys destinations by the queued recipient's domain
    return make_shaper(config, RecipientIn(f"x@{asked}").domain).max_connections == 3


def dkim_keys(configured: str, asked: str, tmp: Path) -> bool:
    store = KeyStore(tmp / "dkim")
    store.generate(configured, kind="ed25519")
    message = f"From: a@{asked}\r\nTo: b@example.org\r\nSubject: s\r\n\r\nhello\r\n"
    result = Signer(store).sign(message.encode(), envelope_sender="")
    return bool(result.headers)


def dkim_required_domains(configured: str, asked: str, tmp: Path) -> bool:
    signer = Signer(KeyStore(tmp / "dkim"), required_domains=[configured])
    message = f"From: a@{asked}\r\nTo: b@example.org\r\n\r\nhello\r\n"
    return signer.sign(message.encode(), envelope_sender="").required


def queue_domain_filter(configured: str, asked: str, tmp: Path) -> bool:
    import asyncio

    async def run() -> bool:
        q = SqliteQueue(tmp / "q")
        try:
            env = EnvelopeIn("s@example.org", [RecipientIn(f"x@{configured}")], b"x\r\n")
            await q.enqueue(env)
            return len(await q.list(domain=asked)) == 1
        finally:
            await q.close()

    return asyncio.run(run())


TABLES: dict[str, Callable[[str, str, Path], bool]] = {
    f.__name__: f
    for f in (
        local_domains,
        relay_domains,
        relay_domains_wildcard,
        aliases,
        alias_key_only,
        routes,
        routes_wildcard,
        shaping,
        dkim_keys,
        dkim_required_domains,
        queue_domain_filter,
    )
}


@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_every_table_compares_domains_in_one_form(
    table: str, case: dict[str, Any], tmp_path: Path
) -> None:
    assert TABLES[table](case["configured"], case["asked"], tmp_path) is case["same"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_one_form(case: dict[str, Any]) -> None:
    same = to_a_labels(case["configured"]) == to_a_labels(case["asked"])
    assert same is case["same"]
    assert domain_key(case["configured"]) == to_a_labels(case["configured"])
    assert to_a_labels(case["configured"]).isascii()


def test_config_stores_tables_in_a_labels() -> None:
    config = _config(
        server={"local_domains": ["Bücher.TEST."], "relay_domains": ["*.bücher.test"]},
        shaping={"bücher.test": {"connections": 2}},
        smart_hosts=[{"name": "sh", "host": "smtp.bücher.test"}],
    )
    assert config.server.local_domains == ["xn--bcher-kva.test"]
    assert config.server.relay_domains == ["*.xn--bcher-kva.test"]
    assert list(config.shaping) == ["xn--bcher-kva.test"]
    assert config.smart_hosts[0].host == "smtp.xn--bcher-kva.test"


def test_config_refuses_two_spellings_of_one_shaping_key() -> None:
    with pytest.raises(ValueError, match="are the same domain"):
        _config(shaping={"bücher.test": {}, "xn--bcher-kva.test": {}})


def test_config_refuses_a_domain_idna_forbids() -> None:
    with pytest.raises(ValueError, match="invalid domain"):
        _config(server={"relay_domains": ["☃-⌘.😀.test"]})


def test_an_mx_route_target_may_be_an_idn_host() -> None:
    (hop,) = parse_route_target("mx:mx.bücher.test:2525", set(), domain="x.test", mx_port=25)
    assert (hop.name, hop.port) == ("mx.xn--bcher-kva.test", 2525)


def test_recipient_domains_are_queued_in_a_labels(tmp_path: Path) -> None:
    assert RecipientIn("x@Bücher.TEST").domain == "xn--bcher-kva.test"
    assert address_domain("x@[192.0.2.1]") == "[192.0.2.1]"  # an address literal stays


@pytest.mark.parametrize(
    ("configured", "rcpt"),
    [("xn--bcher-kva.test", "x@bücher.test"), ("bücher.test", "x@xn--bcher-kva.test")],
)
def test_intake_relays_an_idn_recipient_for_its_relay_domain(
    tmp_path: Path, configured: str, rcpt: str
) -> None:
    config = _config(
        server={
            "hostname": "mx.ferry.test",
            "listen": [{"address": "127.0.0.1", "port": free_port(), "mode": "mta"}],
            "relay_domains": [configured],
            "relay_networks": [],  # the client is an outsider: only relay_domains count
            "users_file": str(tmp_path / "users"),
        },
        queue={"path": str(tmp_path / "data")},
        delivery={"hold": True},
    )
    with ThreadedService(config) as svc, smtplib.SMTP("127.0.0.1", svc.port()) as c:
        c.ehlo("client.test")
        c.sendmail(
            "s@example.org",
            [rcpt],
            b"Subject: idn\r\n\r\nbody\r\n",
            mail_options=["SMTPUTF8"] if not rcpt.isascii() else [],
        )
        (msg,) = svc.call(svc.queue.list())
        assert [r.address for r in msg.recipients] == [rcpt]
        assert svc.call(svc.queue.list(domain="bücher.test"))


def test_config_error_names_the_bad_domain(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text('[server]\nrelay_domains = ["ok.test", "bad..test"]\n')
    with pytest.raises(ConfigError, match="relay_domains"):
        RelayConfig.load(path, env={})
