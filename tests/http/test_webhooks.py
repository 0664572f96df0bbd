"""Webhooks end to end: ``ferry serve`` posts signed events to a real HTTP receiver."""

from __future__ import annotations

import base64
import json
import secrets
import smtplib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook as Verifier

from ferry.http.webhooks import backoff, sign, webhook_id
from ferry.queue.outbox import StoredEvent
from tests.harness import ServeProcess, free_port, run_cli, wait_until
from tests.world.mx import MxFactory


class Receiver:
    """An HTTP endpoint that verifies every request with the standardwebhooks library."""

    def __init__(self, secret: str) -> None:
        self.verifier = Verifier(secret)
        self.status = 200
        self.requests: list[tuple[str, Any]] = []  # (webhook-id, payload)
        self.rejected = 0
        self.lock = threading.Condition()
        #: Cleared: a request is recorded but not answered until it is set again.
        self.answer = threading.Event()
        self.answer.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload = receiver.verifier.verify(body, headers)
                except Exception:
                    with receiver.lock:
                        receiver.rejected += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver.lock:
                    status = receiver.status
                    if status == 200:
                        receiver.requests.append((headers["webhook-id"], payload))
                    receiver.lock.notify_all()
                receiver.answer.wait(30)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> list[str]:
        with self.lock:
            return [i for i, _ in self.requests]

    def payloads(self) -> list[Any]:
        with self.lock:
            return [p for _, p in self.requests]

    def close(self) -> None:
        self.answer.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def secret(tmp_path: Path) -> tuple[str, Path]:
    value = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    path = tmp_path / "webhook.secret"
    path.write_text(value + "\n")
    return value, path


@pytest.fixture
def receiver(secret: tuple[str, Path]) -> Iterator[Receiver]:
    r = Receiver(secret[0])
    yield r
    r.close()


def _config(tmp: Path, smtp: int, receiver: Receiver, secret_file: Path, extra: str) -> Path:
    path = tmp / "ferry.toml"
    path.write_text(
        f'[server]\nhostname = "relay.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {smtp}, mode = "mta" }}]\n'
        f'[queue]\npath = "{tmp}/data"\n'
        f"{extra}"
        f'[[webhooks]]\nname = "app"\n'
        f'url = "http://127.0.0.1:{receiver.port}/hooks"\n'
        f'secret_file = "{secret_file}"\n'
    )
    return path


def _send(port: int, n: int, domain: str = "example.net") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        for i in range(n):
            s.sendmail("app@example.org", [f"u{i}@{domain}"], f"Subject: {i}\r\n\r\nhi\r\n")


def test_signature_matches_standard_webhooks(secret: tuple[str, Path]) -> None:
    value, _ = secret
    key = base64.b64decode(value.removeprefix("whsec_"))
    event = StoredEvent(7, 1.0, "delivered", "Q1", {"recipient": "a@b.test"})
    body = json.dumps(event.as_json()).encode()
    header = sign([key], webhook_id([event]), 1_700_000_000, body)
    import datetime

    expected = Verifier(value).sign(
        "evt_7", datetime.datetime.fromtimestamp(1_700_000_000, datetime.UTC), body.decode()
    )
    assert header == expected
    # rotation: two keys, two signatures, either verifies
    other = secrets.token_bytes(32)
    assert sign([key, other], "evt_7", 1, body).count("v1,") == 2
    assert [backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0] and backoff(40) == 600.0


def test_delivery_events_reach_the_endpoint_signed(
    tmp_path: Path, mx_factory: MxFactory, receiver: Receiver, secret: tuple[str, Path]
) -> None:
    mx = mx_factory("smarthost.test")
    smtp = free_port()
    extra = (
        '[delivery]\nmode = "relay"\n'
        f'[[smart_hosts]]\nname = "up"\nhost = "{mx.host}"\nport = {mx.port}\n'
        'tls = "none"\nrequire_tls = false\n'
    )
    config = _config(tmp_path, smtp, receiver, secret[1], extra)
    with config.open("a") as fh:
        fh.write('events = ["received", "delivered"]\n')
    serve = ServeProcess(config, smtp).start()
    try:
        _send(smtp, 3)
        mx.wait_for_messages(3)
        wait_until(lambda: len(receiver.ids()) >= 6, 20, "six webhook events")
    finally:
        serve.stop()
    payloads = receiver.payloads()
    assert receiver.rejected == 0
    kinds = sorted(p["type"] for p in payloads)
    assert kinds == ["delivered"] * 3 + ["received"] * 3
    delivered = [p for p in payloads if p["type"] == "delivered"]
    assert all(p["reply"]["code"] == 250 and p["attempt"] == 1 for p in delivered)
    assert sorted(p["recipient"] for p in delivered) == [f"u{i}@example.net" for i in range(3)]
    assert len(set(receiver.ids())) == 6
    # every event is in the log for replay too, in order
    listed = run_cli(config, "webhooks", "list", "--json")
    assert json.loads(listed.stdout)["app"]["backlog"] == 0


def test_a_graceful_stop_finishes_the_batch_in_flight(
    tmp_path: Path, receiver: Receiver, secret: tuple[str, Path]
) -> None:
    """SIGTERM while a batch is posted: the answer is awaited and the cursor recorded, so
    the next start sends nothing twice. Before: the post was cancelled, backlog 1."""
    smtp = free_port()
    config = _config(tmp_path, smtp, receiver, secret[1], "[delivery]\nhold = true\n")
    with config.open("a") as fh:
        fh.write('events = ["received"]\n')
    receiver.answer.clear()  # the endpoint takes the event but does not answer yet
    serve = ServeProcess(config, smtp).start()
    try:
        _send(smtp, 1)
        wait_until(lambda: len(receiver.ids()) == 1, 20, "the event at the endpoint")
        assert serve.proc is not None
        serve.proc.terminate()
        wait_until(lambda: "stopping" in serve.log_path.read_text(), 20, "serve to stop")
        receiver.answer.set()
        assert serve.proc.wait(20) == 0
    finally:
        serve.stop()
    listed = run_cli(config, "webhooks", "list", "--json")
    assert json.loads(listed.stdout)["app"]["backlog"] == 0
    assert len(receiver.ids()) == 1


def test_events_survive_a_crash_and_arrive_once_per_id(
    tmp_path: Path, receiver: Receiver, secret: tuple[str, Path]
) -> None:
    smtp = free_port()
    config = _config(tmp_path, smtp, receiver, secret[1], "[delivery]\nhold = true\n")
    with config.open("a") as fh:
        fh.write('events = ["received"]\n')
    receiver.status = 503  # the endpoint is down: events pile up
    serve = ServeProcess(config, smtp).start()
    try:
        _send(smtp, 20)
        serve.kill()  # SIGKILL with every event still pending
    finally:
        serve.stop()
    assert receiver.ids() == []
    receiver.status = 200
    serve = ServeProcess(config, smtp).start()
    try:
        wait_until(lambda: len(set(receiver.ids())) >= 20, 30, "all twenty events")
        _send(smtp, 5)  # and the log keeps going after the restart
        wait_until(lambda: len(set(receiver.ids())) >= 25, 30, "five more events")
    finally:
        serve.stop()
    ids = receiver.ids()
    assert len(set(ids)) == 25
    assert len(ids) == len(set(ids)), f"duplicates: {len(ids) - len(set(ids))}"
    queued = {p["message_id"] for p in receiver.payloads()}
    assert len(queued) == 25


def test_failed_events_are_kept_and_retried(
    tmp_path: Path, receiver: Receiver, secret: tuple[str, Path]
) -> None:
    smtp = free_port()
    config = _config(tmp_path, smtp, receiver, secret[1], "[delivery]\nhold = true\n")
    with config.open("a") as fh:
        fh.write('events = ["received"]\nretry_for = "0s"\n')
    receiver.status = 500
    serve = ServeProcess(config, smtp).start()
    try:
        _send(smtp, 2)

        def failed() -> list[Any]:
            out = run_cli(config, "webhooks", "list", "--json")
            return json.loads(out.stdout)["app"]["failed"] if out.returncode == 0 else []

        got = wait_until(lambda: len(failed()) >= 2 and failed(), 20, "two failed events")
        assert all(f["error"] == "HTTP 500" for f in got)
        receiver.status = 200
        assert "2 failed" in run_cli(config, "webhooks", "retry").stdout
        wait_until(lambda: len(receiver.ids()) >= 2, 20, "the retried events")
        wait_until(lambda: failed() == [], 20, "no failures left")
    finally:
        serve.stop()


def test_events_api_replays_in_order(tmp_path: Path) -> None:
    smtp, http = free_port(), free_port()
    config = tmp_path / "ferry.toml"
    config.write_text(
        f'[server]\nhostname = "relay.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {smtp}, mode = "mta" }}]\n'
        f'[queue]\npath = "{tmp_path}/data"\n[delivery]\nhold = true\n'
        f'[http]\nlisten = [{{ address = "127.0.0.1", port = {http} }}]\n'
    )
    token = run_cli(config, "token", "create", "reader", "--scope", "read").stdout.strip()
    serve = ServeProcess(config, smtp).start()
    try:
        _send(smtp, 4)
        import urllib.request

        def get(after: int, limit: int) -> dict[str, Any]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{http}/v1/events?after={after}&limit={limit}&types=received",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())

        def http_up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", http), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(http_up, 20, "the HTTP API")
        first = get(0, 3)
        rest = get(first["next"], 10)
    finally:
        serve.stop()
    events = first["events"] + rest["events"]
    assert [e["type"] for e in events] == ["received"] * 4
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert [e["recipients"] for e in events] == [[f"u{i}@example.net"] for i in range(4)]
