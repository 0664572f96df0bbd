"""`ferry queue ...` against a running `ferry serve` (subprocesses, real SMTP)."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, cli_json, free_port, run_cli, wait_until, write_toml


def _config(tmp_path: Path, port: int, hostname: str = "mx.ferry.test") -> Path:
    return write_toml(
        tmp_path / "ferry.toml",
        f"""
[server]
hostname = "{hostname}"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
users_file = "{tmp_path}/users"
[queue]
path = "{tmp_path}/data"
[delivery]
hold = true   # nothing may leave this machine
""",
    )


def _send(port: int, sender: str, rcpts: list[str], i: int) -> str:
    body = f"From: {sender}\r\nSubject: m{i}\r\nMessage-ID: <m{i}@t>\r\n\r\nbody {i}\r\n"
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.ehlo("client.test")
        c.mail(sender)
        for r in rcpts:
            c.rcpt(r)
        code, text = c.data(body.encode())
        assert code == 250
        return text.decode().rsplit(" ", 1)[1]


@pytest.fixture
def served(tmp_path: Path, serve_factory: Any) -> tuple[Path, int, Any]:
    port = free_port()
    cfg = _config(tmp_path, port)
    return cfg, port, serve_factory(cfg, port)


def test_list_summary_and_bulk_actions(served: tuple[Path, int, Any]) -> None:
    cfg, port, proc = served
    ids = [
        _send(port, "app@example.org", [f"u{i}@gmail.test", f"v{i}@yahoo.test"], i)
        for i in range(3)
    ]
    ids.append(_send(port, "other@example.org", ["w@gmail.test"], 3))

    out = run_cli(cfg, "queue", "list")
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert "7 recipients waiting" in header and "HELD" in header
    assert str(cfg.parent / "data" / "queue.db") in header
    # One line per message, newest first, with the whole queue ID (piped: no truncation).
    assert [line.split()[0] for line in lines] == ids[::-1]
    assert "other@example.org -> w@gmail.test" in lines[0]

    page = cli_json(cfg, "queue", "list", "--limit", "2")
    assert [m["id"] for m in page["messages"]] == ids[:1:-1]
    rest = cli_json(cfg, "queue", "list", "--limit", "2", "--after", page["next_page_after"])
    assert [m["id"] for m in rest["messages"]] == ids[1::-1] and rest["next_page_after"] is None

    def listed(*args: str) -> list[str]:
        return [m["id"] for m in cli_json(cfg, "queue", "list", *args)["messages"]]

    assert listed("--sender", "other@example.org") == ids[3:]
    assert listed("--recipient", "v1@yahoo.test") == [ids[1]]
    assert listed("--domain", "yahoo.test") == ids[2::-1]
    assert listed("--older-than", "1h") == []
    assert len(listed("--newer-than", "1h")) == 4

    summary = cli_json(cfg, "queue", "summary")
    assert summary["by_domain"]["gmail.test"]["total"] == 4
    assert summary["by_domain"]["yahoo.test"]["by_age"][0] == 3
    assert summary["by_reply"] == {"(no reply yet)": 7}
    table = run_cli(cfg, "queue", "summary").stdout.splitlines()
    assert table[1].split() == [
        "T",
        "5",
        "10",
        "20",
        "40",
        "80",
        "160",
        "320",
        "640",
        "1280",
        "1280+",
    ]
    assert table[2].split()[:3] == ["TOTAL", "7", "7"]
    assert table[3].split()[:2] == ["gmail.test", "4"]

    # More than one message without --yes: asks, and "no" changes nothing.
    res = run_cli(cfg, "queue", "hold", "--domain", "gmail.test", input="n\n")
    assert res.returncode == 1 and "hold 4 messages (4 recipients)" in res.stderr
    assert listed("--status", "held") == []
    res = run_cli(cfg, "queue", "hold", "--domain", "gmail.test", "--yes")
    assert res.stdout.strip() == "hold: 4 messages, 4 recipients"
    assert len(listed("--status", "held")) == 4
    assert run_cli(cfg, "queue", "release", "--sender", "other@example.org", "--yes").stdout == (
        "release: 1 messages, 1 recipients\n"
    )
    res = run_cli(cfg, "queue", "cancel", ids[0], "--dsn")
    assert res.stdout.strip() == "cancel: 1 messages, 2 recipients, 1 DSNs queued"
    dsn = cli_json(cfg, "queue", "list", "--sender", "<>")["messages"]
    assert [r["address"] for r in dsn[0]["recipients"]] == ["app@example.org"]
    res = run_cli(cfg, "queue", "remove", "--sender", "<>", "--yes")
    assert res.stdout.strip() == "remove: 1 messages, 1 recipients"
    assert run_cli(cfg, "queue", "retry").returncode == 2  # no filter, no --yes: refused

    # Every action is an operator event in the relay's log.
    def logged() -> list[str]:
        return [line for line in proc.log_path.read_text().splitlines() if " operator " in line]

    events = wait_until(lambda: len(logged()) >= 4 and logged(), 10, "operator events")
    assert "action=hold" in events[0] and 'selection="--domain gmail.test"' in events[0]
    assert "messages=4" in events[0] and "by=" in events[0]
    assert any('action="cancel with DSN"' in e for e in events)


def test_show_body_prints_the_stored_header_or_all(served: tuple[Path, int, Any]) -> None:
    cfg, port, _proc = served
    qid = _send(port, "app@example.org", ["u@gmail.test"], 7)
    head = run_cli(cfg, "queue", "show", qid, "--body").stdout
    assert head.startswith("Received: from client.test")
    assert "Message-ID: <m7@t>" in head and "body 7" not in head
    assert run_cli(cfg, "queue", "show", qid, "--body", "--full").stdout.endswith("body 7\n")


def test_start_line_stats_and_fqdn_warning(tmp_path: Path, serve_factory: Any) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, hostname="localhost")
    proc = serve_factory(cfg, port)
    log = wait_until(
        lambda: "hostname_not_fqdn" in (t := proc.log_path.read_text()) and t, 10, "start lines"
    )
    [started] = [line for line in log.splitlines() if " started " in line]
    for field in (
        "version=0.1.0",
        f"config={cfg}",
        f"data_dir={tmp_path / 'data'}",
        f"listeners=127.0.0.1:{port}/mta",
        "mode=direct",
        "hold=all",
    ):
        assert field in started, field
    stats = run_cli(cfg, "stats")
    assert "ferry serve: running (pid" in stats.stdout
    assert "delivery: HELD" in stats.stdout
    assert cli_json(cfg, "stats")["held"] is True


def test_help_imports_only_click() -> None:
    """`ferry --help` must stay instant: no pydantic, rich, asyncio or queue behind it."""
    code = (
        "import sys\nfrom ferry.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    modules = set(out.split("MODULES", 1)[1].split())
    heavy = {"pydantic", "rich", "asyncio", "sqlite3", "ferry.config", "ferry.queue", "dns"}
    assert not heavy & modules, heavy & modules
    helped = " ".join(out.split("MODULES")[0].split())  # column widths vary
    assert "queue Inspect and manage the queue" in helped


def test_list_with_no_queue_says_so_and_creates_none(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "f.toml", f'[queue]\npath = "{tmp_path}/d"\n')
    res = run_cli(cfg, "queue", "list", "--json")
    assert res.returncode == 1 and "no queue exists at" in res.stderr
    assert not (tmp_path / "d" / "queue.db").exists()
