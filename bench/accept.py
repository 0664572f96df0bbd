"""Accept throughput and latency of `ferry serve` (fsync on). Not a test.

    python bench/accept.py [--messages 20000] [--sessions 50] [--size 1024]

Starts `ferry serve` on a loopback port with a temporary queue, then:
  1. drives it with Postfix's smtp-source (if installed; `-d` reuses connections),
     once with connection reuse and once with a new connection per message;
  2. measures per-message accept latency (end of DATA -> 250) from 50 concurrent
     Python sessions.
Prints one line per measurement and a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "ferry.toml"
    cfg.write_text(
        f'[server]\nhostname = "bench.ferry.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
        f"max_connections_per_ip = 500\n"
        f'[queue]\npath = "{tmp}/data"\n'
        # Accept only: nothing is delivered (and nothing leaves this machine).
        f"[delivery]\nhold = true\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "--config", str(cfg), "serve"],
        stdout=open(tmp / "serve.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("ferry serve did not start")


def queued_count(tmp: Path) -> int:
    import sqlite3

    db = sqlite3.connect(tmp / "data" / "queue.db")
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        db.close()


def smtp_source(port: int, messages: int, sessions: int, size: int, reuse: bool) -> float:
    args = [
        "smtp-source",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        "sender@example.org",
        "-t",
        "rcpt@example.net",
    ]
    if reuse:
        args.append("-d")
    t0 = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True)
    return time.perf_counter() - t0


async def python_client(
    port: int, messages: int, sessions: int, size: int, latencies: list[float], reuse: bool = True
) -> float:
    body = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * max(1, size // 80) + b".\r\n"
    per = messages // sessions

    async def read_reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    async def session() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO bench\r\n")
        await read_reply(reader)
        for i in range(per):
            if not reuse and i:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await read_reply(reader)
                writer.write(b"EHLO bench\r\n")
                await read_reply(reader)
            # RFC 2920 pipelining: MAIL, RCPT, DATA in one write.
            writer.write(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            for _ in range(3):
                await read_reply(reader)
            t0 = time.perf_counter()
            writer.write(body)
            reply = await read_reply(reader)
            latencies.append(time.perf_counter() - t0)
            assert reply.startswith(b"250"), reply
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return time.perf_counter() - t0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    results: dict[str, float] = {}
    have_source = shutil.which("smtp-source") is not None
    for reuse in (True, False):
        label = "reuse" if reuse else "new_connection"
        with tempfile.TemporaryDirectory(prefix="ferry-bench-") as d:
            tmp = Path(d)
            port = free_port()
            proc = start_server(tmp, port)
            try:
                if have_source:
                    secs = smtp_source(port, args.messages, args.sessions, args.size, reuse)
                    tool = "smtp-source"
                else:
                    lat: list[float] = []
                    secs = asyncio.run(
                        python_client(port, args.messages, args.sessions, args.size, lat, reuse)
                    )
                    tool = "python client"
                n = queued_count(tmp)
                rate = n / secs
                results[f"accept_{label}_msgs_per_s"] = round(rate)
                print(
                    f"{label:>15}: {n} messages of {args.size} B from {args.sessions} sessions"
                    f" in {secs:.2f} s = {rate:,.0f} msgs/s ({tool})"
                )
            finally:
                proc.terminate()
                proc.wait(20)
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as d:
        tmp = Path(d)
        port = free_port()
        proc = start_server(tmp, port)
        try:
            lat = []
            n = min(args.messages, 10000)
            secs = asyncio.run(python_client(port, n, args.sessions, args.size, lat))
            results["latency_p50_ms"] = round(pct(lat, 0.50) * 1000, 2)
            results["latency_p99_ms"] = round(pct(lat, 0.99) * 1000, 2)
            print(
                f"        latency: {len(lat)} messages from {args.sessions} pipelining Python"
                f" sessions ({len(lat) / secs:,.0f} msgs/s): p50 {results['latency_p50_ms']} ms,"
                f" p99 {results['latency_p99_ms']} ms (end of DATA -> 250, fsynced)"
            )
        finally:
            proc.terminate()
            proc.wait(20)
    print(json.dumps({"cpus": os.cpu_count(), **results}))


if __name__ == "__main__":
    main()
