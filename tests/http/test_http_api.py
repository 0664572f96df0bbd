"""The HTTP API end to end: aiohttp as the client, ``ferry serve`` as a real subprocess."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.harness import ServeProcess, cli_json, free_port, run_cli, wait_until

MESSAGE = b"From: app@example.org\r\nTo: user@example.net\r\nSubject: t\r\n\r\nhello\r\n"


@dataclass
class Relay:
    serve: ServeProcess
    config: Path
    base: str
    inject: str
    read: str
    admin: str

    def queued(self, domain: str) -> list[dict]:
        return cli_json(self.config, "queue", "list", "--domain", domain)["messages"]


def _config(tmp: Path, smtp: int, http: int, extra: str = "") -> Path:
    path = tmp / "ferry.toml"
    path.write_text(
        f'[server]\nhostname = "relay.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {smtp}, mode = "mta" }}]\n'
        f"max_message_size = 100000\n"
        f'[queue]\npath = "{tmp}/data"\n'
        f"[delivery]\nhold = true\n"
        f'[http]\nlisten = [{{ address = "127.0.0.1", port = {http} }}]\n'
        f'metrics_networks = ["127.0.0.2/32"]\n{extra}'
    )
    return path


def _token(config: Path, name: str, scope: str) -> str:
    res = run_cli(config, "token", "create", name, "--scope", scope)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _start(tmp: Path, extra: str = "") -> Iterator[Relay]:
    smtp, http = free_port(), free_port()
    config = _config(tmp, smtp, http, extra)
    tokens = {s: _token(config, f"t-{s}", s) for s in ("inject", "read", "admin")}
    serve = ServeProcess(config, smtp).start()

    def http_listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", http), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(http_listening, 20, "the HTTP API to listen")
        base = f"http://127.0.0.1:{http}"
        yield Relay(serve, config, base, tokens["inject"], tokens["read"], tokens["admin"])
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay for the tests that only add messages (each to its own domain)."""
    yield from _start(tmp_path_factory.mktemp("http"))


@pytest.fixture
def own_relay(tmp_path: Path) -> Iterator[Relay]:
    yield from _start(tmp_path)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _raw(rcpts: list[str]) -> dict[str, object]:
    return {
        "mail_from": "app@example.org",
        "rcpt_to": rcpts,
        "data": base64.b64encode(MESSAGE).decode(),
    }


async def test_errors_have_one_shape_and_tokens_are_checked(relay: Relay) -> None:
    ok = ["user@errors.test"]
    async with aiohttp.ClientSession(relay.base) as http:
        async with http.post("/v1/messages", json=_raw(ok)) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json())["error"]["code"] == "unauthorized"
        async with http.post("/v1/messages", json=_raw(ok), headers=_auth("ferry_wrong")) as r:
            assert r.status == 401
        async with http.post("/v1/messages", json=_raw(ok), headers=_auth(relay.read)) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "forbidden"
        async with http.get("/v1/nowhere", headers=_auth(relay.admin)) as r:
            assert r.status == 404
            assert set((await r.json())["error"]) == {"code", "message"}
        async with http.post("/v1/messages", data=b"{not json", headers=_auth(relay.inject)) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "bad_json"
    assert relay.queued("errors.test") == []
    log = relay.serve.log_path.read_text()
    assert "http_auth_failed" in log
    for secret in (relay.inject, relay.read, relay.admin, "ferry_wrong"):
        assert secret not in log


async def test_raw_injection_is_durable_before_202(own_relay: Relay) -> None:
    relay = own_relay
    async with aiohttp.ClientSession(relay.base) as http:
        body = {**_raw(["a@example.net", "b@example.net"]), "metadata": {"order": "7"}}
        async with http.post("/v1/messages", json=body, headers=_auth(relay.inject)) as r:
            assert r.status == 202
            answer = await r.json()
    assert [x["address"] for x in answer["recipients"]] == ["a@example.net", "b@example.net"]
    relay.serve.kill()  # 202 means fsynced: a SIGKILL right after loses nothing
    shown = cli_json(relay.config, "queue", "show", answer["id"])
    assert shown["sender"] == "app@example.org"
    assert sorted(r["address"] for r in shown["recipients"]) == ["a@example.net", "b@example.net"]
    assert shown["auth_user"] == "token:t-inject"


async def test_structured_injection_and_reading_back(relay: Relay) -> None:
    body = {
        "from": "App <app@example.org>",
        "to": ["user@structured.test"],
        "subject": "Your order",
        "text": "Thanks!",
        "html": "<p>Thanks!</p>",
        "priority": "urgent",
    }
    async with aiohttp.ClientSession(relay.base) as http:
        async with http.post("/v1/messages", json=body, headers=_auth(relay.inject)) as r:
            assert r.status == 202, await r.text()
            qid = (await r.json())["id"]
        async with http.get(f"/v1/messages/{qid}", headers=_auth(relay.read)) as r:
            assert r.status == 200
            info = await r.json()
        assert info["id"] == qid and info["priority"] == "urgent"
        assert info["recipients"][0]["address"] == "user@structured.test"
        async with http.get("/v1/messages/NOPE", headers=_auth(relay.read)) as r:
            assert r.status == 404
        async with http.get("/v1/stats", headers=_auth(relay.read)) as r:
            assert (await r.json())["total_messages"] >= 1


async def test_bad_messages_are_refused_and_leave_nothing(relay: Relay) -> None:
    ok = ["user@refused.test"]
    big = {**_raw(ok), "data": base64.b64encode(b"x" * 100_001).decode()}
    async with aiohttp.ClientSession(relay.base) as http:
        for body, status in (
            (_raw(["user@refused.test", "not-an-address"]), 422),
            (big, 422),
            ({**_raw(ok), "route": "mx:bad host"}, 422),
        ):
            async with http.post("/v1/messages", json=body, headers=_auth(relay.inject)) as r:
                assert r.status == status, await r.text()
                error = (await r.json())["error"]
                assert error["code"] == "invalid_message" and error["message"]
        huge = b'{"data": "' + b"A" * 200_000 + b'"}'
        async with http.post("/v1/messages", data=huge, headers=_auth(relay.inject)) as r:
            assert r.status == 413
    assert relay.queued("refused.test") == []


async def test_idempotency_key_replays_conflicts_and_mismatches(relay: Relay) -> None:
    ok = ["user@idem.test"]
    async with aiohttp.ClientSession(relay.base) as http:
        headers = {**_auth(relay.inject), "Idempotency-Key": '"order-1"'}
        async with http.post("/v1/messages", json=_raw(ok), headers=headers) as r:
            assert r.status == 202
            first = await r.json()
        # the bare-token form of the same key
        again = {**_auth(relay.inject), "Idempotency-Key": "order-1"}
        async with http.post("/v1/messages", json=_raw(ok), headers=again) as r:
            assert r.status == 202
            assert r.headers["Idempotent-Replayed"] == "true"
            assert await r.json() == first
        async with http.post("/v1/messages", json=_raw(["x@idem.test"]), headers=again) as r:
            assert r.status == 422
            assert (await r.json())["error"]["code"] == "idempotency_key_reused"
        async with http.post(
            "/v1/messages", json=_raw(ok), headers={**headers, "Idempotency-Key": '"unterminated'}
        ) as r:
            assert r.status == 400
    assert [m["id"] for m in relay.queued("idem.test")] == [first["id"]]


async def test_fifty_concurrent_requests_with_one_key_enqueue_once(relay: Relay) -> None:
    headers = {**_auth(relay.inject), "Idempotency-Key": "race-key"}
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(relay.base, connector=connector) as http:

        async def one() -> tuple[int, dict]:
            body = _raw(["user@race.test"])
            async with http.post("/v1/messages", json=body, headers=headers) as r:
                return r.status, await r.json()

        results = await asyncio.gather(*(one() for _ in range(50)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {202, 409}, statuses
    ids = {body["id"] for s, body in results if s == 202}
    assert len(ids) == 1
    assert [m["id"] for m in relay.queued("race.test")] == list(ids)


def test_openapi_lists_exactly_the_served_routes(relay: Relay) -> None:
    async def probe() -> None:
        async with aiohttp.ClientSession(relay.base) as http:
            async with http.get("/v1/openapi.json") as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["openapi"].startswith("3.")
            for path, ops in doc["paths"].items():
                for method in ops:
                    url = path.replace("{id}", "X")
                    async with http.request(method, url, headers=_auth(relay.admin)) as r:
                        assert r.status not in (404, 405) or (
                            r.status == 404
                            and (await r.json())["error"]["code"] == "not_found"
                            and "{" in path
                        ), (method, path, r.status)
            # and nothing is served that the document leaves out
            async with http.get("/v1/undocumented", headers=_auth(relay.admin)) as r:
                assert r.status == 404

    asyncio.run(probe())


def test_rate_limit_per_token(tmp_path: Path) -> None:
    for relay in _start(tmp_path, "rate_limit = 0.5\nrate_burst = 2\n"):

        async def go(relay: Relay = relay) -> list[tuple[int, str | None]]:
            async with aiohttp.ClientSession(relay.base) as http:
                out = []
                for _ in range(3):
                    async with http.get("/v1/stats", headers=_auth(relay.read)) as r:
                        out.append((r.status, r.headers.get("Retry-After")))
                # another token has its own bucket
                async with http.get("/v1/stats", headers=_auth(relay.admin)) as r:
                    out.append((r.status, None))
                return out

        got = asyncio.run(go())
        assert [s for s, _ in got] == [200, 200, 429, 200]
        assert got[2][1] is not None and int(got[2][1]) >= 1


def test_token_cli_never_shows_secrets(tmp_path: Path) -> None:
    config = _config(tmp_path, free_port(), free_port())
    secret = _token(config, "app", "inject")
    assert secret.startswith("ferry_") and len(secret) > 40
    listed = run_cli(config, "token", "list")
    assert "app" in listed.stdout and secret not in listed.stdout
    assert secret not in (tmp_path / "data" / "tokens").read_text()
    dup = run_cli(config, "token", "create", "app")
    assert dup.returncode != 0 and "exists" in dup.stderr
    assert run_cli(config, "token", "revoke", "app").returncode == 0
    assert json.loads(run_cli(config, "token", "list", "--json").stdout) == []


async def test_queue_control_over_http_uses_the_cli_functions(own_relay: Relay) -> None:
    relay = own_relay
    async with aiohttp.ClientSession(relay.base) as http:
        ids = []
        for rcpt in ("a@ctl.test", "b@ctl.test", "c@other.test"):
            async with http.post(
                "/v1/messages", json=_raw([rcpt]), headers=_auth(relay.inject)
            ) as r:
                ids.append((await r.json())["id"])
        async with http.get("/v1/messages?domain=ctl.test", headers=_auth(relay.read)) as r:
            listed = await r.json()
        assert sorted(m["id"] for m in listed["messages"]) == sorted(ids[:2])
        assert all(m["expires"] for m in listed["messages"])  # the real give-up time
        # bulk actions need the admin scope, and a selection in words
        async with http.post("/v1/messages/hold", json={}, headers=_auth(relay.read)) as r:
            assert r.status == 403
        async with http.post("/v1/messages/hold", json={}, headers=_auth(relay.admin)) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "no_selection"
        body = {"filter": {"domain": "ctl.test"}}
        async with http.post("/v1/messages/hold", json=body, headers=_auth(relay.admin)) as r:
            assert await r.json() == {"action": "hold", "messages": 2, "recipients": 2, "dsns": 0}
        async with http.post(
            "/v1/messages/cancel", json={"ids": [ids[2]]}, headers=_auth(relay.admin)
        ) as r:
            assert (await r.json())["messages"] == 1
        # the CLI sees what the API did
        held = cli_json(relay.config, "queue", "list", "--status", "held")["messages"]
        assert sorted(m["id"] for m in held) == sorted(ids[:2])
        # suspend and resume a destination
        suspend = {"domain": "ctl.test", "for": "2h", "reason": "maintenance"}
        async with http.post("/v1/suspensions", json=suspend, headers=_auth(relay.admin)) as r:
            assert r.status == 201 and (await r.json())["domain"] == "ctl.test"
        async with http.get("/v1/suspensions", headers=_auth(relay.read)) as r:
            # ("*" too: this relay runs with delivery.hold, which is the "*" suspension)
            assert [s["domain"] for s in await r.json()] == ["*", "ctl.test"]
        assert "ctl.test" in run_cli(relay.config, "queue", "suspended").stdout
        async with http.delete("/v1/suspensions/ctl.test", headers=_auth(relay.admin)) as r:
            assert r.status == 200
        async with http.delete("/v1/suspensions/ctl.test", headers=_auth(relay.admin)) as r:
            assert r.status == 404
