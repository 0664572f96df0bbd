"""Every script in examples/, run as a real subprocess against the test world.

The scripts read their targets from the environment; here that environment points
Ferry's resolver at the test world's DNS server, every MX and smart host port at the
world's SMTP servers on 127.0.0.x, the queue at a temporary directory, and OpenSSL's
trust store (SSL_CERT_FILE) at the world's CA. Each test checks what the script promises:
the message reached the right server, the statistics moved, the queue operation happened.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import select
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.envelope import Priority, Status
from ferry.queue.base import MessageInfo
from ferry.queue.sqlite import SqliteQueue
from tests.delivery.relay_world import World
from tests.test_dkim import txt_lookup

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


class Examples:
    """Runs example scripts with the test world's environment."""

    def __init__(self, world: World, tmp_path: Path) -> None:
        self.world = world
        self.tmp_path = tmp_path
        self.servers: list[subprocess.Popen[bytes]] = []
        self.runs = 0

    def env(self, **extra: str) -> dict[str, str]:
        world = self.world
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "SMTP_"))}
        self.runs += 1
        env.update(
            {
                "FERRY_DNS__NAMESERVERS": json.dumps([world.dns.address]),
                "FERRY_DNS__TIMEOUT": "2",
                "FERRY_DELIVERY__MX_PORT": str(world.mx.port),
                "FERRY_DELIVERY__CONNECT_TIMEOUT": "5",
                "FERRY_DELIVERY__COMMAND_TIMEOUT": "5",
                "FERRY_QUEUE__PATH": str(self.tmp_path / f"queue{self.runs}"),
                "FERRY_SERVER__HOSTNAME": "relay.ferry.test",
                "FERRY_SERVER__USERS_FILE": str(self.tmp_path / "users"),
                "FERRY_SERVER__LISTEN": json.dumps([{"address": "127.0.0.1", "port": 0}]),
                "FERRY_DKIM__KEYS_DIR": str(self.tmp_path / "dkim"),
                "SSL_CERT_FILE": str(world.ca.ca_path),
                "SMART_HOST_PORT": str(world.mx.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def queue_path(self) -> Path:
        return self.tmp_path / f"queue{self.runs}"

    def run(self, name: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a script to its end; its output and exit status."""
        return subprocess.run(
            [sys.executable, str(EXAMPLES / name)],
            env=self.env(**env),
            cwd=self.tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, name: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
        """Start a serving script; returns it and the port it printed."""
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name)],
            env=self.env(**env),
            cwd=self.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.servers.append(proc)
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + 30
        while (match := re.search(rb"listening on 127\.0\.0\.1:(\d+)", output)) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{name} did not start listening: {output.decode()}"
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            assert chunk or proc.poll() is None, f"{name} exited: {output.decode()}"
            output += chunk
        return proc, int(match.group(1))

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> str:
        """SIGTERM, as a service manager would; the script must end cleanly."""
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


@pytest.fixture(name="world")
def world_fixture(
    tmp_path: Path, dns_server: Any, mx_factory: Any, world_ca: Any
) -> Iterator[World]:
    """The test world (DNS, MX servers, CA) of tests/delivery."""
    w = World(tmp_path, dns_server, mx_factory, world_ca)
    yield w
    for svc in list(w.relays):
        w.stop(svc)


@pytest.fixture
def examples(world: World, tmp_path: Path) -> Iterator[Examples]:
    ex = Examples(world, tmp_path)
    yield ex
    ex.close()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def queue_messages(path: Path) -> list[MessageInfo]:
    """What a script left in its queue, read after it exited."""

    async def read() -> list[MessageInfo]:
        queue = SqliteQueue(path)
        try:
            return await queue.list(limit=1000)
        finally:
            await queue.close()

    return asyncio.run(read())


def smart_host(world: World, name: str, **options: Any) -> Any:
    """A test-world SMTP server playing the smart host ``name`` (resolvable by name)."""
    return world.mx(name, **options).publish(world.dns)


# -- Zetian.Relay --------------------------------------------------------------------------


def test_basic_relay(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    proc, port = examples.start("basic_relay.py")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(
            "me@sender.test", ["someone@example.net"], b"Subject: via SMTP\r\n\r\nhi\r\n"
        )
    [got] = mx.wait_for_messages(1, 20)
    assert got.rcpt_tos == ("someone@example.net",) and got.mail_from == "me@sender.test"
    assert "stopped" in examples.stop(proc)


def test_smart_host(examples: Examples, world: World) -> None:
    server = smart_host(world, "smtp.example.com", starttls=True, auth={"user": "password"})
    out = ok(examples.run("smart_host.py"))
    assert "someone@example.net: Delivered via smarthost:example (250" in out
    [got] = server.messages
    assert got.auth_user == "user" and got.tls and got.rcpt_tos == ("someone@example.net",)


def test_failover(examples: Examples, world: World) -> None:
    world.mx.refusing("primary.smtp.com").publish(world.dns)  # the primary is down
    backup1 = smart_host(world, "backup1.smtp.com", starttls=True, auth={"user": "pass"})
    backup2 = smart_host(world, "backup2.smtp.com", starttls=True)
    out = ok(examples.run("failover.py"))
    assert "someone@example.net: Delivered via smarthost:backup1" in out
    assert [m.auth_user for m in backup1.messages] == ["user"]
    assert backup2.messages == []
    assert re.search(r"backup1: \w+, sent 1", out), out


def test_domain_routing(examples: Examples, world: World) -> None:
    gmail = smart_host(
        world, "smtp.gmail.com", starttls=True, auth={"user@gmail.com": "app_password"}
    )
    outlook = smart_host(
        world, "smtp-mail.outlook.com", starttls=True, auth={"user@outlook.com": "password"}
    )
    sendgrid = smart_host(world, "smtp.sendgrid.net", starttls=True, auth={"apikey": "SG.xxxxx"})
    out = ok(examples.run("domain_routing.py"))
    assert [m.rcpt_tos for m in gmail.messages] == [("someone@gmail.com",)]
    assert [m.rcpt_tos for m in outlook.messages] == [("someone@outlook.com",)]
    assert [m.rcpt_tos for m in sendgrid.messages] == [("someone@example.org",)]
    assert "someone@example.org: Delivered via smarthost:sendgrid" in out


def test_mx_routing(examples: Examples, world: World) -> None:
    mx = world.mx("mx.direct.test").publish(world.dns, "direct.test")
    world.dns.servfail("broken.test")
    fallback = smart_host(world, "fallback.smtp.com", starttls=True)
    out = ok(
        examples.run(
            "mx_routing.py",
            DNS_SERVERS=world.dns.address,
            FALLBACK_PORT=str(world.mx.port),
            TO="a@direct.test,b@broken.test",
        )
    )
    assert [m.rcpt_tos for m in mx.messages] == [("a@direct.test",)]
    assert [m.rcpt_tos for m in fallback.messages] == [("b@broken.test",)]
    assert f"a@direct.test: Delivered via direct mx.direct.test[{mx.host}]" in out
    assert "b@broken.test: Delivered via smarthost:fallback" in out


def test_relay_networks(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    proc, port = examples.start("relay_networks.py", RELAY_NETWORKS="127.0.0.2/32")
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0)) as client:
        client.sendmail("me@sender.test", ["a@example.net"], b"Subject: inside\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.3", 0)) as client:
        client.ehlo("outsider.test")
        client.mail("me@sender.test")
        code, text = client.rcpt("b@example.net")
    assert (code, text[:5]) == (554, b"5.7.1")
    [got] = mx.wait_for_messages(1, 20)
    assert got.rcpt_tos == ("a@example.net",)
    assert "stopped" in examples.stop(proc)


def test_queue_management(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    mx.on("rcpt", "451 4.7.1 greylisted, try again later")
    out = ok(examples.run("queue_management.py"))
    [queue_id] = re.findall(
        r"^(\w+) Deferred priority=HIGH \[someone@example.net Deferred\]$", out, re.M
    )
    assert "Deferred: 1\n" in out and "Delivered: 0\n" in out
    assert f"retried {queue_id}: someone@example.net Deferred after 2 attempts" in out
    assert mx.commands.count("RCPT TO:<someone@example.net>") == 2  # the retry happened
    assert f"removed {queue_id}: True" in out and out.rstrip().endswith("Total: 0")
    assert queue_messages(examples.queue_path()) == []


def test_message_priority(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    out = ok(examples.run("message_priority.py"))
    assert "boss@vip.com: URGENT" in out and "someone@example.org: NORMAL" in out
    assert sorted(m.mail_from for m in mx.wait_for_messages(2, 20)) == [
        "boss@vip.com",
        "someone@example.org",
    ]
    stored = {m.sender: m.priority for m in queue_messages(examples.queue_path())}
    assert stored == {"boss@vip.com": Priority.URGENT, "someone@example.org": Priority.NORMAL}


def test_retry_configuration(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    mx.on("rcpt", "450 4.2.0 greylisted", times=1)
    out = ok(examples.run("retry_configuration.py", RETRY_SCHEDULE="0.2s", WAIT="30"))
    assert "someone@example.net: Delivered after 2 attempt(s)" in out
    assert mx.commands.count("RCPT TO:<someone@example.net>") == 2
    assert len(mx.messages) == 1


def test_bounces(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.net").publish(world.dns, "example.net")
    mx.on("rcpt", "550 5.1.1 no such user")
    out = ok(examples.run("bounces.py", FROM="me@sender.test"))
    assert "no-such-user@example.net: Failed (550 5.1.1 no such user)" in out
    assert "notifications sent to me@sender.test from postmaster@mydomain.com: 1" in out
    [dsn] = world.bounce_mx.messages
    assert dsn.mail_from == "" and dsn.rcpt_tos == ("me@sender.test",)
    report = dsn.parsed
    assert report["From"].addresses[0].addr_spec == "postmaster@mydomain.com"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"


def test_load_balancing(examples: Examples, world: World) -> None:
    servers = [smart_host(world, f"smtp{n}.example.com") for n in (1, 2, 3)]
    out = ok(examples.run("load_balancing.py", COUNT="100", timeout=120))
    counts = [len(s.messages) for s in servers]
    assert sum(counts) == 100
    assert all(abs(c - e) <= 10 for c, e in zip(counts, (50, 30, 20), strict=True)), counts
    for n, count in enumerate(counts, 1):
        assert f"smtp{n}: {count} message(s)" in out


def test_tls(examples: Examples, world: World) -> None:
    secure = smart_host(world, "smtp.example.com", starttls=True, auth={"user": "password"})
    out = ok(examples.run("tls.py"))
    assert re.search(r"someone@example.net: Delivered over TLSv1\.[23] ", out), out
    assert secure.messages[0].tls
    # A smart host without STARTTLS gets nothing: the message waits, in the queue.
    plain = smart_host(world, "plain.smtp.test")
    result = examples.run("tls.py", SMART_HOST="plain.smtp.test")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "someone@example.net: Deferred over no TLS (451 4.7.5" in result.stdout
    assert plain.messages == [] and not any(c.startswith("MAIL") for c in plain.commands)
    [waiting] = queue_messages(examples.queue_path())
    assert waiting.status is Status.DEFERRED


# -- the SMTPy relay service -----------------------------------------------------------------


def test_direct_smtp(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.com", starttls=True).publish(world.dns, "example.com")
    mx.on("rcpt", "550 5.1.1 no such user", rcpt="user2@example.com")
    out = ok(examples.run("direct_smtp.py"))
    assert "send_email: True" in out
    bulk = re.search(r"^send_email_bulk: (.*)$", out, re.M)
    assert bulk is not None
    assert ast.literal_eval(bulk.group(1)) == {
        "user1@example.com": True,
        "user2@example.com": False,
    }
    assert [m.rcpt_tos for m in mx.messages] == [("user@example.com",), ("user1@example.com",)]
    assert all(m.tls and m.mail_from == "noreply@smtpy.fr" for m in mx.messages)
    stats = re.search(r"^stats: (.*)$", out, re.M)
    assert stats is not None
    assert ast.literal_eval(stats.group(1))["mx_cache_hits"] == 1  # the second call's lookup


def _dkim_dns(world: World) -> Any:
    """dkimpy's TXT lookup, asking the test world's DNS server."""
    return txt_lookup(world.dns)


def test_dkim_signing(examples: Examples, world: World, tmp_path: Path) -> None:
    import dkim

    from ferry.dkim import KeyStore, dns_record, txt_chunks

    key = KeyStore(tmp_path / "dkim").generate("example.com", selector="ferry", bits=1024)
    name, value = dns_record(key)
    world.dns.add_txt(name, txt_chunks(value))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "dkim_signing.py")],
        env=examples.env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().strip() == "signed"
    signed = result.stdout
    assert signed.startswith(b"DKIM-Signature:") and b"d=example.com" in signed
    assert dkim.verify(signed, dnsfunc=_dkim_dns(world))
    assert not dkim.verify(signed.replace(b"my domain", b"MY domain"), dnsfunc=_dkim_dns(world))


def test_hybrid_relay(examples: Examples, world: World) -> None:
    world.mx("mx.example.com").publish(world.dns, "example.com").on("rcpt", "450 4.2.0 greylisted")
    gmail = smart_host(
        world, "smtp.gmail.com", starttls=True, auth={"you@gmail.com": "app-password"}
    )
    out = ok(
        examples.run(
            "hybrid_relay.py",
            SMTP_DELIVERY_MODE="hybrid",
            SMTP_HOST="smtp.gmail.com",
            SMTP_PORT=str(world.mx.port),
            SMTP_USER="you@gmail.com",
            SMTP_PASSWORD="app-password",
        )
    )
    assert ast.literal_eval(out.strip()) == {"user@example.com": True}
    [got] = gmail.messages
    assert got.auth_user == "you@gmail.com" and got.rcpt_tos == ("user@example.com",)


def test_relay_stats(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.com").publish(world.dns, "example.com")
    stats = json.loads(ok(examples.run("relay_stats.py")))
    assert stats["mode"] == "direct"
    assert (stats["direct_sent"], stats["direct_failed"], stats["relay_sent"]) == (1, 0, 0)
    assert stats["direct_service"]["sent"] == 1 and stats["direct_service"]["mx_lookups"] == 1
    assert {"dkim_signed", "dkim_unsigned"} <= set(stats)
    assert len(mx.messages) == 1


def test_send_direct(examples: Examples, world: World) -> None:
    mx = world.mx("mx.example.com").publish(world.dns, "example.com")
    out = ok(examples.run("send_direct.py"))
    assert "Results: {'test@example.com': True}" in out
    [got] = mx.messages
    assert got.mail_from == "noreply@smtpy.fr" and got.parsed["Subject"] == "Test Email"


# -- bookkeeping ---------------------------------------------------------------------------


def test_every_example_has_a_test_and_a_readme_entry() -> None:
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    tests = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(scripts) <= tests, set(scripts) - tests
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"({name}.py)" in readme for name in scripts)
