"""Every routing example in the README, run as written against the test world.

The README's hostnames (smtp.sendgrid.net, smtp.gmail.com...) resolve, through the test
world's DNS server, to scripted SMTP servers on 127.0.0.x; only ports, CA files and
secret files are adapted to the test machine.
"""

from __future__ import annotations

import re
import smtplib
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.config import RelayConfig
from tests.delivery.relay_world import SENDER, World, msg
from tests.harness import ThreadedService, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


def examples() -> dict[str, dict[str, Any]]:
    text = README.read_text()
    found = {}
    for m in re.finditer(r"<!-- example: ([\w-]+) -->.*?```toml\n(.*?)```", text, re.S):
        found[m.group(1)] = tomllib.loads(m.group(2))
    return found


EXAMPLES = examples()


def test_the_readme_has_every_seed_example() -> None:
    assert set(EXAMPLES) == {
        "smart-host",
        "failover",
        "domain-routing",
        "mx-routing",
        "load-balancing",
        "hybrid",
        "smart",
        "direct",
    }


class Example:
    """One README example's config, its smart hosts played by test-world servers."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.data = EXAMPLES[name]
        self.servers: dict[str, Any] = {}
        for host in self.data.get("smart_hosts", []):
            tls = host.get("tls", "starttls")
            secret = "s3cret"
            server = world.mx(
                host["host"],
                starttls=tls == "starttls",
                auth={host["username"]: secret} if host.get("username") else None,
            )
            world.dns.add_a(host["host"], server.host)
            host["port"] = server.port
            host["ca_file"] = str(world.ca.ca_path)
            if "password_file" in host:
                path = world.tmp_path / f"{host['name']}.secret"
                path.write_text(secret + "\n")
                host["password_file"] = str(path)
            self.servers[host["name"]] = server

    def start(self, **delivery: Any) -> ThreadedService:
        base = self.world.config(**delivery).model_dump()
        base["smart_hosts"] = self.data.get("smart_hosts", [])
        base["routes"] = self.data.get("routes", {})
        for key, value in self.data.get("delivery", {}).items():
            base["delivery"][key] = value
        # The README's public resolvers become the test world's DNS server.
        base["dns"]["nameservers"] = [self.world.dns.address]
        svc = ThreadedService(RelayConfig.model_validate(base)).__enter__()
        self.world.relays.append(svc)
        return svc


def send(svc: ThreadedService, rcpts: list[str], n: int = 1) -> None:
    with smtplib.SMTP("127.0.0.1", svc.port()) as c:
        for i in range(n):
            for r in rcpts:
                c.sendmail(SENDER, [r], msg(f"{r} {i}"))


def test_smart_host(world: World) -> None:
    ex = Example(world, "smart-host")
    send(ex.start(), ["a@anywhere.test"])
    got = ex.servers["example"].wait_for_messages(1, 15)[0]
    assert got.auth_user == "user" and got.tls


def test_failover(world: World) -> None:
    ex = Example(world, "failover")
    svc = ex.start()
    send(svc, ["a@x.test"])
    ex.servers["primary"].wait_for_messages(1, 15)
    ex.servers["primary"].on("mail", "421 4.3.2 going down")
    send(svc, ["b@x.test"])
    ex.servers["backup1"].wait_for_messages(1, 15)
    assert ex.servers["backup2"].messages == []


def test_domain_routing(world: World) -> None:
    ex = Example(world, "domain-routing")
    send(ex.start(), ["a@gmail.com", "b@outlook.com", "c@example.org"])
    assert list(ex.servers["gmail"].wait_for_messages(1, 15)[0].rcpt_tos) == ["a@gmail.com"]
    assert list(ex.servers["outlook"].wait_for_messages(1, 15)[0].rcpt_tos) == ["b@outlook.com"]
    assert list(ex.servers["sendgrid"].wait_for_messages(1, 15)[0].rcpt_tos) == ["c@example.org"]


def test_mx_routing_with_fallback(world: World) -> None:
    ex = Example(world, "mx-routing")
    mx = world.mx("mx.direct.test").publish(world.dns, "direct.test")
    world.dns.servfail("broken.test")
    send(ex.start(), ["a@direct.test", "b@broken.test"])
    assert list(mx.wait_for_messages(1, 15)[0].rcpt_tos) == ["a@direct.test"]
    assert list(ex.servers["fallback"].wait_for_messages(1, 15)[0].rcpt_tos) == ["b@broken.test"]


def test_load_balancing(world: World) -> None:
    ex = Example(world, "load-balancing")
    send(ex.start(), ["a@lb.test"], n=200)
    servers = [ex.servers[n] for n in ("smtp1", "smtp2", "smtp3")]
    wait_until(lambda: sum(len(s.messages) for s in servers) == 200, 30, "200 delivered")
    counts = [len(s.messages) for s in servers]
    assert [abs(c - e) <= 10 for c, e in zip(counts, (100, 60, 40), strict=True)] == [True] * 3


def test_hybrid(world: World) -> None:
    ex = Example(world, "hybrid")
    world.mx("mx.ok.test").publish(world.dns, "ok.test")
    world.mx("mx.grey.test").publish(world.dns, "grey.test").on("rcpt", "450 4.2.0 greylisted")
    send(ex.start(), ["a@ok.test", "b@grey.test"])
    assert list(ex.servers["gmail"].wait_for_messages(1, 15)[0].rcpt_tos) == ["b@grey.test"]


@pytest.mark.parametrize("name", ["smart", "direct"])
def test_smart_and_direct_deliver_direct_when_all_is_well(world: World, name: str) -> None:
    ex = Example(world, name)
    mx = world.mx("mx.fine.test").publish(world.dns, "fine.test")
    send(ex.start(), ["a@fine.test"])
    assert mx.wait_for_messages(1, 15)
    assert all(s.messages == [] for s in ex.servers.values())
