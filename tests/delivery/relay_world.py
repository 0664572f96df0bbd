"""A Ferry relay wired to the test world (DNS, MX servers, CA), for delivery tests."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.config import RelayConfig
from ferry.envelope import Status
from tests.harness import ThreadedService, wait_until

SENDER = "alice@sender.test"


def msg(subject: str = "hello", extra: bytes = b"") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\nTo: someone\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@sender.test>\r\n".encode()
        + extra
        + b"\r\nHello.\r\n"
    )


class World:
    """DNS + MX servers + a Ferry relay wired to them."""

    def __init__(self, tmp_path: Path, dns: Any, mx: Any, ca: Any = None) -> None:
        self.tmp_path, self.dns, self.mx, self.ca = tmp_path, dns, mx, ca
        self.relays: list[ThreadedService] = []
        # The sender's own domain, where DSNs arrive.
        self.bounce_mx = mx("mx.sender.test").publish(dns, "sender.test")

    def config(
        self,
        *,
        smart_hosts: list[dict[str, Any]] | None = None,
        routes: dict[str, Any] | None = None,
        dkim: dict[str, Any] | None = None,
        shaping: dict[str, Any] | None = None,
        **delivery: Any,
    ) -> RelayConfig:
        d = {
            "workers": 0,  # in this process, so tests can look at the scheduler
            "mx_port": self.mx.port,
            "retry_schedule": ["1s"],
            "connect_timeout": 5,
            "command_timeout": 5,
        }
        d.update(delivery)
        return RelayConfig.model_validate(
            {
                "server": {
                    "hostname": "relay.ferry.test",
                    "listen": [{"address": "127.0.0.1", "port": 0, "mode": "mta"}],
                    "users_file": str(self.tmp_path / "users"),
                    "workers": 0,  # sessions in this process too: tests see their events
                },
                "queue": {"path": str(self.tmp_path / "data"), "lease_seconds": 30},
                "delivery": d,
                "dns": {"nameservers": [self.dns.address], "timeout": 2},
                "smart_hosts": smart_hosts or [],
                "routes": routes or {},
                "shaping": shaping or {},
                "dkim": dkim or {"keys_dir": str(self.tmp_path / "dkim")},
            }
        )

    def relay(self, **kw: Any) -> ThreadedService:
        svc = ThreadedService(self.config(**kw)).__enter__()
        self.relays.append(svc)
        return svc

    def stop(self, svc: ThreadedService) -> None:
        self.relays.remove(svc)
        svc.__exit__(None, None, None)

    def send(
        self,
        svc: ThreadedService,
        rcpts: list[str],
        data: bytes | None = None,
        sender: str = SENDER,
        **opts: Any,
    ) -> str:
        with smtplib.SMTP("127.0.0.1", svc.port()) as c:
            c.ehlo("client.test")
            code, text = c.mail(sender, opts.get("mail_options", []))
            assert code == 250, text
            for r in rcpts:
                code, text = c.rcpt(r, opts.get("rcpt_options", []))
                assert code == 250, text
            code, text = c.data(data or msg())
            assert code == 250, text
            return text.decode().rsplit(" ", 1)[1]

    @staticmethod
    def message(svc: ThreadedService, qid: str) -> Any:
        return svc.call(svc.queue.get(qid))

    def wait_status(
        self, svc: ThreadedService, qid: str, *statuses: Status, timeout: float = 15
    ) -> Any:
        return wait_until(
            lambda: (m := self.message(svc, qid)) is not None and m.status in statuses and m,
            timeout,
            f"{qid} to reach {statuses}",
        )

    def dsns(self, n: int = 1, timeout: float = 15) -> list[Any]:
        assert self.bounce_mx.wait_for_messages(n, timeout), "no DSN arrived"
        return self.bounce_mx.messages

    def smart_host(self, server: Any, name: str, **kw: Any) -> dict[str, Any]:
        """A [[smart_hosts]] entry for a test-world server (published in DNS)."""
        self.dns.add_a(server.name, server.host)
        entry: dict[str, Any] = {
            "name": name,
            "host": server.name,
            "port": server.port,
            "tls": "starttls" if server.starttls else "none",
            "require_tls": bool(server.starttls),
            "ca_file": str(self.ca.ca_path) if self.ca else "",
        }
        entry.update(kw)
        return entry


@pytest.fixture
def world(tmp_path: Path, dns_server: Any, mx_factory: Any, world_ca: Any) -> Iterator[World]:
    w = World(tmp_path, dns_server, mx_factory, world_ca)
    yield w
    for svc in list(w.relays):
        w.stop(svc)
