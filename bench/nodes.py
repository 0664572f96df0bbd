"""End-to-end throughput on a PostgreSQL queue with one and with several nodes, beside
SQLite. Not a test.

    python bench/nodes.py [--messages 6000] [--setups sqlite:1 postgres:1 postgres:3]
                          [--rounds 3] [--size 1024] [--sessions 48]

The set-up of bench/delivery.py (a loopback DNS server, 100 recipient domains, one
sink). A setup ``BACKEND:N`` is N ``ferry serve`` processes on one queue: ``postgres``
share one fresh schema of a PostgreSQL server (FERRY_BENCH_PG_DSN, or a private cluster
started here from Debian's binaries and stopped at the end), ``sqlite`` is the embedded
default (N = 1). The injecting sessions are spread over the nodes. Per run: the accept
rate (messages over the time the injecting sessions took, every one answered 250 after
its commit) and the end-to-end rate (the clock runs from the first message sent to the
last recipient recorded Delivered; ``--accept-only`` holds delivery, so intake is
measured alone). Rounds alternate the setups (A, B, C, A, B, C...)
and the medians are printed, since the machine may be shared. Every process here shares
one machine (on 2 cores, more nodes mostly mean more processes competing for the same
CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from delivery import SINK_HOST, free_port, inject, start_sink, wait_port  # noqa: E402

from tests.world.dns import DnsServer  # noqa: E402


def fresh_schema(dsn: str) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}".encode())
    return make_conninfo(dsn, options=f"-csearch_path={name}")


def delivered(dsn: str) -> int:
    """Recipients Delivered so far (``dsn``: PostgreSQL, or a SQLite queue's path)."""
    sql = "SELECT COUNT(*) FROM recipients WHERE status = 'Delivered'"
    if dsn.startswith("sqlite:"):
        import sqlite3

        db = sqlite3.connect(f"file:{dsn[len('sqlite:') :]}?mode=ro", uri=True, timeout=30)
        try:
            row = db.execute(sql).fetchone()
        finally:
            db.close()
        return int(row[0]) if row else 0
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def run(
    tmp: Path, dns: DnsServer, sink_port: int, dsn: str, n: int, args: argparse.Namespace
) -> dict:
    """``n`` nodes on the PostgreSQL queue ``dsn``, or one on SQLite (``dsn`` = "")."""
    ports = [free_port() for _ in range(n)]
    procs = []
    for i, port in enumerate(ports):
        d = tmp / f"node{i}"
        d.mkdir()
        backend = (
            f'backend = "postgres"\ndsn = {json.dumps(dsn)}\n' if dsn else 'backend = "sqlite"\n'
        )
        (d / "ferry.toml").write_text(
            f'[server]\nhostname = "node{i}.bench.test"\n'
            f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
            f"max_connections_per_ip = 500\n"
            f'[queue]\npath = "{d}/data"\n{backend}'
            f"[delivery]\nmx_port = {sink_port}\n"
            + ("hold = true\n" if args.accept_only else "")
            + f'[dns]\nnameservers = ["{dns.address}"]\n'
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ferry.cli", "--config", str(d / "ferry.toml"), "serve"],
                stdout=open(d / "serve.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                cwd=d,
            )
        )
    if not dsn:
        dsn = f"sqlite:{tmp / 'node0' / 'data' / 'queue.db'}"
    try:
        for port in ports:
            wait_port("127.0.0.1", port)
        per_node = args.messages // n
        t0 = time.perf_counter()

        async def all_nodes() -> None:
            await asyncio.gather(
                *(
                    inject(port, per_node, max(1, args.sessions // n), args.size, args.domains)
                    for port in ports
                )
            )

        asyncio.run(all_nodes())
        inject_secs = time.perf_counter() - t0
        total = per_node // max(1, args.sessions // n) * max(1, args.sessions // n) * n
        deadline = time.monotonic() + (0 if args.accept_only else 900)
        while (done := delivered(dsn)) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        secs = time.perf_counter() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return {
        "backend": "sqlite" if dsn.startswith("sqlite:") else "postgres",
        "nodes": n,
        "messages": total,
        "delivered": done,
        "accept_per_s": round(total / inject_secs),
        "end_to_end_per_s": round(done / secs),
        "seconds": round(secs, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument(
        "--setups", nargs="+", default=["sqlite:1", "postgres:1", "postgres:3"], metavar="B:N"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument(
        "--accept-only",
        action="store_true",
        help="delivery.hold = true: intake alone (the accept rate without delivery beside it)",
    )
    args = ap.parse_args()
    setups = [(b, int(n)) for b, n in (x.split(":") for x in args.setups)]
    dsn = os.environ.get("FERRY_BENCH_PG_DSN", "")
    cluster = base = None
    if not dsn and any(b == "postgres" for b, _n in setups):
        from tests.world.postgres import PostgresCluster

        base = Path(tempfile.mkdtemp(prefix="ferry-bench-pg-"))
        cluster = PostgresCluster(base)
        dsn = cluster.start()
    results: dict[str, list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-bench-") as d, DnsServer() as dns:
            dns.add_a("sink.bench.test", SINK_HOST)
            for i in range(args.domains):
                dns.add_mx(f"d{i}.bench.test", [(10, "sink.bench.test")])
            sink_port = free_port(SINK_HOST)
            sink = start_sink(sink_port)
            try:
                for r in range(args.rounds):
                    for backend, n in setups:
                        tmp = Path(d) / f"round{r}-{backend}{n}"
                        tmp.mkdir()
                        queue = fresh_schema(dsn) if backend == "postgres" else ""
                        res = run(tmp, dns, sink_port, queue, n, args)
                        results.setdefault(f"{backend}:{n}", []).append(res)
                        print(
                            f"round {r + 1} {backend}, {n} node(s): {res['delivered']}/"
                            f"{res['messages']} delivered in {res['seconds']} s ="
                            f" {res['end_to_end_per_s']:,} msgs/s end to end; accepted at"
                            f" {res['accept_per_s']:,} msgs/s",
                            flush=True,
                        )
            finally:
                sink.terminate()
                sink.wait(10)
    finally:
        if cluster is not None and base is not None:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    medians = {}
    print("\nmedians:")
    for key, runs in results.items():
        med = {
            k: statistics.median(r[k] for r in runs) for k in ("accept_per_s", "end_to_end_per_s")
        }
        medians[key] = med
        print(
            f"{key:11} accepted {med['accept_per_s']:7,.0f} msgs/s, end to end"
            f" {med['end_to_end_per_s']:7,.0f} msgs/s  (runs: "
            + ", ".join(f"{r['accept_per_s']}/{r['end_to_end_per_s']}" for r in runs)
            + ")"
        )
    print(
        json.dumps(
            {"size": args.size, "messages": args.messages, "medians": medians, "runs": results}
        )
    )


if __name__ == "__main__":
    main()
