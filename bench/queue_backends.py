"""The queue contract's hot paths on SQLite and PostgreSQL, side by side. Not a test.

    python bench/queue_backends.py [--messages 5000] [--concurrency 100] [--size 1024]
                                   [--rounds 3]

For each backend, in a fresh queue:
  1. enqueue: ``--messages`` messages of ``--size`` bytes, one recipient each, from
     ``--concurrency`` concurrent callers (intake's shape: many sessions, group commit),
     durable (fsync on every commit);
  2. claim + record: claim batches of 50 due recipients and record them delivered,
     until the queue is drained (the delivery engine's shape), with a delivery worker's
     settings (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off).
``claim`` is the rate of the claims alone (the time spent in ``claim`` calls), with
``--messages`` recipients due at the start; ``queue stats`` the time of one
``statistics()`` (``ferry queue stats``) over the ``--messages`` finished messages.
Rounds alternate the backends (SQLite, PostgreSQL, PostgreSQL, SQLite, ...) and the
medians are printed, since the machine may be shared. PostgreSQL: the server in
FERRY_BENCH_PG_DSN, or a private cluster started here from Debian's binaries
(tests/world/postgres.py) and stopped at the end. Prints one line per measurement and a
JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ferry.envelope import EnvelopeIn, RecipientIn, Reply, Status  # noqa: E402
from ferry.queue.base import AttemptResult, Queue  # noqa: E402
from ferry.queue.postgres import PostgresQueue  # noqa: E402
from ferry.queue.sqlite import SqliteQueue  # noqa: E402

OK = Reply(250, "2.0.0", "ok")


async def enqueue_rate(q: Queue, n: int, concurrency: int, size: int) -> float:
    data = (b"Subject: bench\r\n\r\n" + b"x" * size)[:size] + b"\r\n"
    left = iter(range(n))

    async def caller() -> None:
        for i in left:
            await q.enqueue(EnvelopeIn("s@bench.test", [RecipientIn(f"r{i}@d{i % 50}.test")], data))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def claim_rate(q: Queue, n: int) -> tuple[float, float]:
    """(claims + records per second, claims alone per second) until the queue is empty."""
    done = 0
    claiming = 0.0
    started = time.perf_counter()
    while True:
        t = time.perf_counter()
        claimed = await q.claim("bench", now=time.time() + 1, limit=50, lease=60)
        claiming += time.perf_counter() - t
        if not claimed:
            break
        await q.record(
            "bench",
            [AttemptResult(c.recipient.id, Status.DELIVERED, OK) for c in claimed],
            now=time.time(),
        )
        done += len(claimed)
    assert done == n, (done, n)
    return n / (time.perf_counter() - started), n / claiming


async def _opened(q: Any) -> Queue:
    return await q if asyncio.iscoroutine(q) else q  # type: ignore[no-any-return]


def pg_schema(dsn: str) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}".encode())
    return make_conninfo(dsn, options=f"-csearch_path={name}")


async def one_run(name: str, intake: Any, delivery: Any, args: argparse.Namespace) -> dict:
    q = await _opened(intake())
    try:
        e = await enqueue_rate(q, args.messages, args.concurrency, args.size)
    finally:
        await q.close()
    q = await _opened(delivery())
    try:
        c, claims = await claim_rate(q, args.messages)
        # `ferry queue stats` over the --messages finished messages' history.
        t = time.perf_counter()
        await q.statistics(now=time.time())
        stats_ms = (time.perf_counter() - t) * 1000
    finally:
        await q.close()
    print(
        f"{name:9} enqueue {e:8.0f}/s   claim+record {c:8.0f}/s   claim {claims:8.0f}/s"
        f"   queue stats {stats_ms:6.0f} ms",
        flush=True,
    )
    return {
        "enqueue_per_s": round(e),
        "claim_record_per_s": round(c),
        "claim_per_s": round(claims),
        "stats_ms": round(stats_ms),
    }


async def run(args: argparse.Namespace, pg_dsn: str) -> dict[str, Any]:
    runs: dict[str, list[dict]] = {"sqlite": [], "postgres": []}
    for r in range(args.rounds):
        order = ["sqlite", "postgres"] if r % 2 == 0 else ["postgres", "sqlite"]
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                # Intake's queue is durable (fsync per group commit); a delivery worker's
                # is not (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off),
                # as in serve. Each run on a fresh queue.
                if name == "sqlite":
                    intake: Any = lambda: SqliteQueue(Path(tmp) / "q")  # noqa: E731
                    delivery: Any = lambda: SqliteQueue(Path(tmp) / "q", durable=False)  # noqa: E731
                else:
                    pg = pg_schema(pg_dsn)
                    intake = lambda pg=pg: PostgresQueue(pg).open()  # noqa: E731
                    delivery = lambda pg=pg: PostgresQueue(pg, durable=False).open()  # noqa: E731
                runs[name].append(await one_run(name, intake, delivery, args))
    medians = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()
    }
    print("medians:")
    for name, m in medians.items():
        print(
            f"{name:9} enqueue {m['enqueue_per_s']:8.0f}/s   claim+record"
            f" {m['claim_record_per_s']:8.0f}/s   claim {m['claim_per_s']:8.0f}/s"
            f"   queue stats {m['stats_ms']:6.0f} ms",
            flush=True,
        )
    return {"medians": medians, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dsn = os.environ.get("FERRY_BENCH_PG_DSN", "")
    cluster = None
    base = None
    if not dsn:
        from tests.world.postgres import PostgresCluster

        base = Path(tempfile.mkdtemp(prefix="ferry-bench-pg-"))
        cluster = PostgresCluster(base)
        dsn = cluster.start()
    try:
        result = asyncio.run(run(args, dsn))
    finally:
        if cluster is not None and base is not None:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"messages": args.messages, "size": args.size, **result}))


if __name__ == "__main__":
    main()
