"""How fast do the operator's read-only queue commands answer with a million messages queued?

Fills a queue with N held messages (default 1,000,000: one recipient each, 50 destination
domains, ages spread over two days, a fifth deferred once with a reply before being
held) directly through the queue's writer in big transactions, then runs each command
as an operator would -- a new `ferry` process, start-up included -- and prints the
median wall time of a few runs as a Markdown table.

    .venv/bin/python bench/queue_tools.py [--messages 1000000] [--dir /tmp/ferry-bench]
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ferry.queue.base import new_queue_id
from ferry.queue.sqlite import SqliteQueue

BATCH = 50_000
DOMAINS = [f"d{i}.example" for i in range(50)]
REPLIES = [
    (421, "4.7.0", "Try again later, closing connection"),
    (451, "4.7.1", "Greylisted, please retry in 5 minutes"),
    (450, "4.2.0", "Mailbox busy"),
]
BODY = (
    b"Received: from app (app [127.0.0.1]) by bench.example with ESMTP\r\n"
    b"From: app@bench.example\r\nTo: someone\r\nSubject: bench\r\n"
    b"Message-ID: <bench@bench.example>\r\n\r\n" + b"x" * 200 + b"\r\n"
)


def fill(path: Path, n: int, seed: int = 1) -> float:
    """Queue ``n`` held messages; returns the seconds it took."""
    rng = random.Random(seed)
    queue = SqliteQueue(path)
    now = time.time()
    started = time.perf_counter()
    done = 0
    while done < n:
        count = min(BATCH, n - done)
        messages, bodies, recipients = [], [], []
        for i in range(count):
            arrival = now - rng.random() * 2 * 86400
            qid = new_queue_id(arrival) + f"{done + i:07d}"  # unique even at one ms
            sender = f"app{rng.randrange(20)}@bench.example"
            messages.append((qid, sender, len(BODY), 1, arrival, arrival + 4 * 86400, "Held"))
            bodies.append((qid, BODY))
            domain = DOMAINS[min(int(rng.expovariate(0.15)), len(DOMAINS) - 1)]
            code, enh, text = (None, None, None)
            attempts = 0
            if rng.random() < 0.2:
                code, enh, text = rng.choice(REPLIES)
                attempts = 1
            recipients.append(
                (
                    qid,
                    f"user{done + i}@{domain}",
                    domain,
                    "Held",
                    1,
                    arrival,
                    attempts,
                    arrival + 60,
                    code,
                    enh,
                    text,
                )
            )

        def job(conn: sqlite3.Connection, m=messages, b=bodies, r=recipients) -> None:
            conn.executemany(
                "INSERT INTO messages(id, sender, size, priority, arrival, expires, status)"
                " VALUES (?,?,?,?,?,?,?)",
                m,
            )
            conn.executemany("INSERT INTO bodies(message_id, data) VALUES (?,?)", b)
            conn.executemany(
                "INSERT INTO recipients(message_id, address, domain, status, priority, arrival,"
                " attempts, next_attempt, last_code, last_enhanced, last_text)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                r,
            )

        queue.run_sync(job)
        done += count
        print(f"  {done:>9,} queued", file=sys.stderr)
    elapsed = time.perf_counter() - started
    import asyncio

    asyncio.run(queue.close())
    return elapsed


def timed(cmd: list[str], runs: int) -> tuple[float, float, str]:
    """Median wall time and median CPU time (user + system) of the command's process."""
    walls, cpus, out = [], [], ""
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out = res.stdout if res.returncode == 0 else f"exit {res.returncode}: {res.stderr[-300:]}"
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: {out}")
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/ferry-bench-queue-tools")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="Reuse a filled queue in --dir.")
    args = ap.parse_args()
    base = Path(args.dir)
    data = base / "data"
    if not (args.keep and (data / "queue.db").exists()):
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        secs = fill(data, args.messages)
        print(f"filled {args.messages:,} held messages in {secs:.0f} s", file=sys.stderr)
    # Open once: builds any index a newer Ferry adds (the migration step), untimed.
    started = time.perf_counter()
    import asyncio

    asyncio.run(SqliteQueue(data).close())
    print(f"opened the queue in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    config = base / "ferry.toml"
    config.write_text(f'[queue]\npath = "{data}"\n')
    db = sqlite3.connect(data / "queue.db")
    some_id = db.execute("SELECT id FROM messages ORDER BY arrival LIMIT 1 OFFSET 5000").fetchone()[
        0
    ]
    db.close()
    size = (data / "queue.db").stat().st_size
    ferry = [sys.executable, "-m", "ferry.cli", "--config", str(config)]
    commands = [
        ("ferry --help", [sys.executable, "-m", "ferry.cli", "--help"]),
        ("ferry queue list", [*ferry, "queue", "list"]),
        ("ferry queue list --after ID (next page)", [*ferry, "queue", "list", "--after", some_id]),
        (
            "ferry queue list --domain d7.example",
            [*ferry, "queue", "list", "--domain", "d7.example"],
        ),
        (
            "ferry queue list --sender app3@bench.example",
            [*ferry, "queue", "list", "--sender", "app3@bench.example"],
        ),
        ("ferry queue list --reply greylisted", [*ferry, "queue", "list", "--reply", "greylisted"]),
        ("ferry queue list --older-than 1d", [*ferry, "queue", "list", "--older-than", "1d"]),
        ("ferry queue list --status held", [*ferry, "queue", "list", "--status", "held"]),
        ("ferry queue summary", [*ferry, "queue", "summary"]),
        (
            "ferry queue summary --older-than 1h",
            [*ferry, "queue", "summary", "--older-than", "1h"],
        ),
        (
            "ferry queue summary --reply greylisted",
            [*ferry, "queue", "summary", "--reply", "greylisted"],
        ),
        (
            "ferry queue summary --sender app3@bench.example",
            [*ferry, "queue", "summary", "--sender", "app3@bench.example"],
        ),
        ("ferry queue show ID", [*ferry, "queue", "show", some_id]),
        ("ferry queue suspended", [*ferry, "queue", "suspended"]),
        ("ferry queue stats", [*ferry, "queue", "stats"]),
        ("ferry stats", [*ferry, "stats"]),
    ]
    print(
        f"\n{args.messages:,} held messages, queue.db {size / 1e6:,.0f} MB;"
        f" median of {args.runs} runs, a new process each (start-up included)\n"
    )
    print("| command | wall s | CPU s |")
    print("|---|---:|---:|")
    for name, cmd in commands:
        wall, cpu, _out = timed(cmd, args.runs)
        print(f"| `{name}` | {wall:.2f} | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
