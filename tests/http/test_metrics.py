"""``GET /metrics`` from a running ``ferry serve`` (with a delivery worker process),
parsed by prometheus_client's own parser; the shipped alert rules name only real metrics."""

from __future__ import annotations

import re
import smtplib
import socket
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ServeProcess, free_port, run_cli, wait_until
from tests.world.mx import MxFactory

RULES = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "ferry.rules.yml"


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_across_processes_and_rules_match(
    tmp_path: Path, mx_factory: MxFactory
) -> None:
    mx = mx_factory("smarthost.test")
    smtp, http = free_port(), free_port()
    config = tmp_path / "ferry.toml"
    config.write_text(
        f'[server]\nhostname = "relay.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {smtp}, mode = "mta" }}]\n'
        f'[queue]\npath = "{tmp_path}/data"\n'
        f'[delivery]\nmode = "relay"\nworkers = 1\n'
        f'[http]\nlisten = [{{ address = "127.0.0.1", port = {http} }}]\n'
        f'metrics_networks = ["127.0.0.1/32"]\n'
        f'[[smart_hosts]]\nname = "up"\nhost = "{mx.host}"\nport = {mx.port}\n'
        'tls = "none"\nrequire_tls = false\n'
    )
    token = run_cli(config, "token", "create", "ops", "--scope", "read").stdout.strip()
    serve = ServeProcess(config, smtp).start()
    try:

        def scrape(headers: dict[str, str] | None = None) -> str:
            req = urllib.request.Request(f"http://127.0.0.1:{http}/metrics", headers=headers or {})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.headers["Content-Type"].startswith("text/plain")
                return resp.read().decode()

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", http), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(up, 20, "the HTTP API")
        with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as s:
            s.ehlo("client.test")
            for i in range(3):
                s.sendmail("app@example.org", [f"u{i}@example.net"], f"Subject: {i}\r\n\r\nx\r\n")
            try:
                s.sendmail("app@example.org", ["not an address"], "x")
            except smtplib.SMTPRecipientsRefused:
                pass
        mx.wait_for_messages(3)

        def delivered() -> dict:
            got = _samples(scrape())
            return (
                got
                if _value(got, "ferry_recipient_outcomes_total", outcome="delivered") >= 3
                else {}
            )

        samples = wait_until(delivered, 20, "three delivered outcomes in /metrics")
        # the same figures through a token (metrics_networks only spares the token)
        with_token = scrape({"Authorization": f"Bearer {token}"})
    finally:
        serve.stop()
    # counted in the worker process (delivery) and the serve process (intake) alike
    assert (
        _value(
            samples,
            "ferry_recipient_outcomes_total",
            outcome="delivered",
            route_kind="smarthost",
            hop="up",
            reply_class="2xx/2.0",
        )
        == 3
    )
    assert _value(samples, "ferry_messages_received_total", via="smtp") == 3
    assert _value(samples, "ferry_delivery_latency_seconds_count") == 3
    # sessions with the smart host, counted in the delivery worker: opened, open, timed
    assert _value(samples, "ferry_connections_opened_total", group="up") >= 1
    assert ("ferry_connections_open", frozenset({("group", "up")})) in samples
    assert _value(samples, "ferry_attempt_duration_seconds_count", group="up") >= 1
    assert _value(samples, "ferry_rejected_total", command="RCPT") >= 1
    assert _value(samples, "ferry_queue_messages", status="queued") == 0
    assert ("ferry_queue_oldest_pending_age_seconds", frozenset()) in samples
    assert _value(samples, "ferry_queue_commits_total") >= 1
    assert _value(samples, "ferry_data_free_bytes") > 0
    assert "ferry_info" in with_token

    # the alert rules parse and name only metrics that exist
    rules = yaml.safe_load(RULES.read_text())
    names = {n for n, _ in samples} | {
        "ferry_webhook_backlog",
        "ferry_webhook_failed_events",
        "ferry_smart_host_state",
    }
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 5
    for expr in exprs:
        for metric in re.findall(r"\bferry_[a-z_]+", expr):
            assert metric in names, f"{metric} in {expr!r} is not a metric Ferry exports"


def test_metrics_need_a_token_outside_metrics_networks(tmp_path: Path) -> None:
    smtp, http = free_port(), free_port()
    config = tmp_path / "ferry.toml"
    config.write_text(
        f'[server]\nhostname = "relay.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {smtp}, mode = "mta" }}]\n'
        f'[queue]\npath = "{tmp_path}/data"\n[delivery]\nhold = true\n'
        f'[http]\nlisten = [{{ address = "127.0.0.1", port = {http} }}]\n'
        f'metrics_networks = ["127.0.0.2/32"]\n'
    )
    serve = ServeProcess(config, smtp).start()
    try:

        def status() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5):
                    return 200
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return 0

        assert wait_until(status, 20, "the HTTP API") == 401
    finally:
        serve.stop()
