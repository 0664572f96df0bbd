"""A queue that stays small: 200,000 messages through the relay, then the database size
and `ferry queue stats` time. Not a test.

    python bench/retention.py [--messages 200000] [--size 1024] [--sessions 50]

`ferry serve` (relay mode, fsync on, one smart host: Postfix's `smtp-sink`) receives
the messages from Postfix's `smtp-source` (`apt-get install postfix` provides both;
without them a Python injector and an aiosmtpd sink are used) and delivers them. The
benchmark then measures, with the history of every message still retained (the
default `queue.history_retention` is 7 days):

- the size of queue.db (with its WAL) against the bytes that were accepted: the bodies
  went when each message was delivered, only the history rows stay;
- the wall time of `ferry queue stats` and `ferry queue list --status queued`
  (a new process each, start-up included; best of three);

then runs `ferry queue purge --older-than 0s` (what the background purge does once the
retention has passed) and measures both again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from delivery import SINK_HOST, free_port, inject, start_sink, wait_port  # noqa: E402


def db_bytes(data: Path) -> tuple[int, int]:
    """(queue.db, queue.db-wal) sizes in bytes."""
    return tuple(  # type: ignore[return-value]
        (data / name).stat().st_size if (data / name).exists() else 0
        for name in ("queue.db", "queue.db-wal")
    )


def stats_in_process(data: Path) -> float:
    """Median wall time of Queue.statistics() itself (no process start-up)."""
    import asyncio

    from ferry.queue.sqlite import SqliteQueue

    async def run() -> float:
        q = SqliteQueue(data)
        try:
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                await q.statistics(now=time.time())
                times.append(time.perf_counter() - t0)
            return sorted(times)[3]
        finally:
            await q.close()

    return asyncio.run(run())


def cli(cfg: Path, *args: str, runs: int = 3) -> tuple[float, str]:
    """Best-of-``runs`` wall time of a `ferry` command, and its output."""
    best, out = float("inf"), ""
    for _ in range(runs):
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "ferry.cli", "--config", str(cfg), *args],
            capture_output=True,
            text=True,
            check=True,
        )
        best = min(best, time.perf_counter() - t0)
        out = res.stdout
    return best, out


def delivered(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        # The counters the statistics read: one row per status and priority.
        row = conn.execute(
            "SELECT COALESCE(SUM(n), 0) FROM message_counts WHERE status='Delivered'"
        ).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        conn.close()


def injector(port: int, args: argparse.Namespace) -> float:
    t0 = time.perf_counter()
    if shutil.which("smtp-source"):
        subprocess.run(
            [
                "smtp-source",
                "-d",  # connection reuse: the relay's own cost, not TCP set-up
                "-s",
                str(args.sessions),
                "-m",
                str(args.messages),
                "-l",
                str(args.size),
                "-f",
                "sender@example.org",
                "-t",
                "rcpt@example.net",
                "-M",
                "bench.example.org",
                f"127.0.0.1:{port}",
            ],
            check=True,
        )
    else:
        import asyncio

        asyncio.run(inject(port, args.messages, args.sessions, args.size, 1))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--keep", metavar="DIR", help="Keep the data directory here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-retention-") as d:
        tmp = Path(args.keep) if args.keep else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        data = tmp / "data"
        sink_port = free_port(SINK_HOST)
        sink = start_sink(sink_port)
        port = free_port()
        cfg = tmp / "ferry.toml"
        cfg.write_text(
            f'[server]\nhostname = "ferry.bench.test"\n'
            f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
            f"max_connections_per_ip = 500\n"
            f'[queue]\npath = "{data}"\n'
            f'[delivery]\nmode = "relay"\n'
            f'[[smart_hosts]]\nname = "sink"\nhost = "{SINK_HOST}"\nport = {sink_port}\n'
            f'tls = "none"\nrequire_tls = false\nmax_connections = 20\n'
            f"max_messages_per_connection = 1000\n"
        )
        log = tmp / "serve.log"
        serve = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "--config", str(cfg), "serve"],
            stdout=open(log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env={**os.environ},
        )
        try:
            wait_port("127.0.0.1", port)
            t0 = time.perf_counter()
            inject_secs = injector(port, args)
            deadline = time.monotonic() + 3600
            while delivered(data / "queue.db") < args.messages:
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise SystemExit(f"not delivered in time; see {log}")
                time.sleep(0.5)
            secs = time.perf_counter() - t0
            with_history = db_bytes(data)
            help_secs, _ = cli(cfg, "--help")
            stats_secs, stats_out = cli(cfg, "queue", "stats", "--json")
            stats_call = stats_in_process(data)
            list_secs, _ = cli(cfg, "queue", "list", "--status", "queued", "--json")
            stats = json.loads(stats_out)
            purge_secs, purge_out = cli(
                cfg, "queue", "purge", "--older-than", "0s", "--json", runs=1
            )
            after_purge = db_bytes(data)
            stats2_secs, _ = cli(cfg, "queue", "stats", "--json")
            stats2_call = stats_in_process(data)
            list2_secs, _ = cli(cfg, "queue", "list", "--status", "queued", "--json")
        finally:
            serve.terminate()
            serve.wait(60)
            sink.terminate()
            sink.wait(10)
    accepted = args.messages * args.size
    result = {
        "messages": args.messages,
        "size": args.size,
        "injector": "smtp-source" if shutil.which("smtp-source") else "python",
        "inject_seconds": round(inject_secs, 1),
        "end_to_end_seconds": round(secs, 1),
        "delivered": stats["delivered_messages"],
        "db_bytes_with_history": with_history[0],
        "wal_bytes_with_history": with_history[1],
        "db_bytes_per_message": round(with_history[0] / args.messages),
        "accepted_bytes": accepted,
        "help_seconds": round(help_secs, 3),
        "queue_stats_seconds": round(stats_secs, 3),
        "statistics_call_seconds": round(stats_call, 4),
        "queue_list_queued_seconds": round(list_secs, 3),
        "purge": json.loads(purge_out),
        "purge_seconds": round(purge_secs, 2),
        "db_bytes_after_purge": after_purge[0],
        "wal_bytes_after_purge": after_purge[1],
        "queue_stats_seconds_after_purge": round(stats2_secs, 3),
        "statistics_call_seconds_after_purge": round(stats2_call, 4),
        "queue_list_queued_seconds_after_purge": round(list2_secs, 3),
    }
    mb = 1e6
    print(
        f"{args.messages:,} messages of {args.size} B delivered through the relay in"
        f" {secs:.0f} s ({result['injector']}, injection {inject_secs:.0f} s)\n"
        f"with every message's history kept: queue.db {with_history[0] / mb:.1f} MB"
        f" ({result['db_bytes_per_message']} B per message; {accepted / mb:.0f} MB accepted),"
        f" WAL {with_history[1] / mb:.1f} MB\n"
        f"  ferry queue stats {stats_secs:.2f} s (ferry --help {help_secs:.2f} s;"
        f" statistics() itself {stats_call * 1000:.1f} ms);"
        f" queue list --status queued {list_secs:.2f} s\n"
        f"after ferry queue purge ({purge_secs:.1f} s): queue.db {after_purge[0] / mb:.2f} MB,"
        f" WAL {after_purge[1] / mb:.1f} MB\n"
        f"  ferry queue stats {stats2_secs:.2f} s (statistics() itself"
        f" {stats2_call * 1000:.1f} ms); queue list --status queued {list2_secs:.2f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
