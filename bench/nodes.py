"""End-to-end throughput on a PostgreSQL queue with one and with several nodes. Not a test.

    python bench/nodes.py [--messages 10000] [--nodes 1 3] [--size 1024] [--sessions 48]

The set-up of bench/delivery.py (a loopback DNS server, 100 recipient domains, one
sink) with ``queue.backend = "postgres"``: for each node count, that many ``ferry serve``
processes share one fresh schema of a PostgreSQL server (FERRY_BENCH_PG_DSN, or a
private cluster started here from Debian's binaries and stopped at the end); the
injecting sessions are spread over the nodes. The clock runs from the first message sent
to the last recipient recorded Delivered. Every process here shares one machine (on 2
cores, more nodes mostly mean more processes competing for the same CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
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
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT COUNT(*) FROM recipients WHERE status = 'Delivered'").fetchone()
    return int(row[0]) if row else 0


def run(
    tmp: Path, dns: DnsServer, sink_port: int, dsn: str, n: int, args: argparse.Namespace
) -> dict:
    ports = [free_port() for _ in range(n)]
    procs = []
    for i, port in enumerate(ports):
        d = tmp / f"node{i}"
        d.mkdir()
        (d / "ferry.toml").write_text(
            f'[server]\nhostname = "node{i}.bench.test"\n'
            f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
            f"max_connections_per_ip = 500\n"
            f'[queue]\npath = "{d}/data"\nbackend = "postgres"\n'
            f"dsn = {json.dumps(dsn)}\n"
            f"[delivery]\nmx_port = {sink_port}\n"
            f'[dns]\nnameservers = ["{dns.address}"]\n'
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ferry.cli", "--config", str(d / "ferry.toml"), "serve"],
                stdout=open(d / "serve.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                cwd=d,
            )
        )
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
        deadline = time.monotonic() + 900
        while (done := delivered(dsn)) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        secs = time.perf_counter() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return {
        "nodes": n,
        "messages": total,
        "delivered": done,
        "accept_per_s": round(total / inject_secs),
        "end_to_end_per_s": round(done / secs),
        "seconds": round(secs, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--domains", type=int, default=100)
    args = ap.parse_args()
    dsn = os.environ.get("FERRY_BENCH_PG_DSN", "")
    cluster = base = None
    if not dsn:
        from tests.world.postgres import PostgresCluster

        base = Path(tempfile.mkdtemp(prefix="ferry-bench-pg-"))
        cluster = PostgresCluster(base)
        dsn = cluster.start()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-bench-") as d, DnsServer() as dns:
            dns.add_a("sink.bench.test", SINK_HOST)
            for i in range(args.domains):
                dns.add_mx(f"d{i}.bench.test", [(10, "sink.bench.test")])
            sink_port = free_port(SINK_HOST)
            sink = start_sink(sink_port)
            try:
                for n in args.nodes:
                    tmp = Path(d) / f"run{n}"
                    tmp.mkdir()
                    r = run(tmp, dns, sink_port, fresh_schema(dsn), n, args)
                    results.append(r)
                    print(
                        f"{n} node(s): {r['delivered']}/{r['messages']} delivered in"
                        f" {r['seconds']} s = {r['end_to_end_per_s']:,} msgs/s end to end;"
                        f" accepted at {r['accept_per_s']:,} msgs/s",
                        flush=True,
                    )
            finally:
                sink.terminate()
                sink.wait(10)
    finally:
        if cluster is not None and base is not None:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"size": args.size, "runs": results}))


if __name__ == "__main__":
    main()
