"""The CLI on a PostgreSQL queue: commands that once assumed SQLite (the queue check,
webhooks, listing headers, cancel with DSNs) work on the shared database."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ferry.envelope import EnvelopeIn, RecipientIn
from ferry.queue.postgres import PostgresQueue
from tests.harness import cli_json, run_cli
from tests.queue.backends import fresh_schema


def _config(tmp_path: Path, dsn: str) -> Path:
    secret = tmp_path / "whsec"
    secret.write_text("whsec_" + "A" * 43 + "\n")
    path = tmp_path / "ferry.toml"
    path.write_text(
        '[server]\nhostname = "relay.test"\nlisten = []\n'
        f'[queue]\npath = "{tmp_path}/data"\nbackend = "postgres"\ndsn = {json.dumps(dsn)}\n'
        '[[webhooks]]\nname = "app"\nurl = "http://127.0.0.1:9/hooks"\n'
        f'secret_file = "{secret}"\n'
    )
    return path


async def test_queue_commands_that_assumed_sqlite_work_on_postgres(
    tmp_path: Path, pg_dsn: str
) -> None:
    dsn = fresh_schema(pg_dsn)
    q = await PostgresQueue(dsn, event_log=True).open()
    try:
        qid = await q.enqueue(
            EnvelopeIn(
                sender="app@x.example",
                recipients=[RecipientIn("a@y.example"), RecipientIn("b@z.example")],
                data=b"Subject: t\r\n\r\nbody\r\n",
            )
        )
    finally:
        await q.close()
    cfg = _config(tmp_path, dsn)
    password = conninfo_to_dict(dsn).get("password") or ""
    # `ferry queue check`: the database, counted (no SQLite file looked for).
    check = cli_json(cfg, "queue", "check")
    assert (check["ok"], check["messages"]) == (True, 1)
    assert check["path"].startswith("postgresql://")
    assert not password or password not in check["path"]
    # Listing headers name the database, never a password.
    listed = run_cli(cfg, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("queue postgresql://"), listed.stdout
    assert not password or password not in listed.stdout
    assert not (tmp_path / "data" / "queue.db").exists()
    # `ferry webhooks list`: the shared event log, whose one event (the message received)
    # a new endpoint starts after (an empty SQLite queue would say 0).
    hooks = cli_json(cfg, "webhooks", "list")
    assert hooks["app"]["cursor"] == 1
    assert not (tmp_path / "data" / "queue.db").exists()
    # `ferry queue cancel --dsn`: the sender is told, on PostgreSQL too.
    res = run_cli(cfg, "queue", "cancel", "--dsn", "--domain", "y.example", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    assert (json.loads(res.stdout)["recipients"], json.loads(res.stdout)["dsns"]) == (1, 1)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT m.sender, r.address FROM messages m JOIN recipients r ON r.message_id = m.id"
            " WHERE m.id != %s",
            (qid,),
        ).fetchall()
    assert rows == [("", "app@x.example")]


def test_ferry_stats_on_postgres_reads_the_database(tmp_path: Path, pg_dsn: str) -> None:
    empty = fresh_schema(pg_dsn)
    res = run_cli(_config(tmp_path, empty), "stats")
    assert res.returncode == 1 and "no queue exists" in res.stderr, res.stderr
    password = conninfo_to_dict(empty).get("password") or ""
    assert not password or password not in res.stderr + res.stdout
    assert run_cli(_config(tmp_path, empty), "queue", "migrate").returncode == 0
    data = cli_json(_config(tmp_path, empty), "stats")
    assert (data["delivery"]["sent"], data["nodes"], data["workers"]) == (0, {}, 0)
