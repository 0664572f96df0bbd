"""End-to-end throughput: accepted -> delivered, Ferry (and Postfix, when installed). Not a test.

    python bench/delivery.py [--messages 20000] [--size 1024] [--domains 100] [--no-postfix]

A real DNS server on loopback (the test world's dnslib server) gives 100 recipient
domains MX records pointing at one local sink (Postfix's smtp-sink when installed, else
an aiosmtpd sink). `ferry serve` (fsync on, default limits) accepts the messages from 50
pipelining sessions and delivers them; the clock runs from the first message sent to the
last recipient recorded Delivered. With Postfix installed the same load goes through a
private Postfix instance (bench/postfix_instance.py) relaying to the same sink, and the
ratio is printed from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.world.dns import DnsServer  # noqa: E402

SINK_HOST = "127.0.0.2"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port}")


def start_sink(port: int) -> subprocess.Popen[bytes]:
    if shutil.which("smtp-sink"):
        cmd = ["smtp-sink", "-u", "nobody", "-m", "1000", f"{SINK_HOST}:{port}", "1024"]
    else:
        cmd = [sys.executable, "-c", _AIOSMTPD_SINK, SINK_HOST, str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(SINK_HOST, port)
    return proc


_AIOSMTPD_SINK = """
import sys, asyncio
from aiosmtpd.controller import Controller
class H:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok"
c = Controller(H(), hostname=sys.argv[1], port=int(sys.argv[2]))
c.start()
import signal; signal.sigwait({signal.SIGTERM, signal.SIGINT})
c.stop()
"""


async def inject(port: int, messages: int, sessions: int, size: int, domains: int) -> float:
    line = b"x" * 78 + b"\r\n"
    body_tail = line * max(1, size // 80) + b".\r\n"
    per = messages // sessions

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            got = await reader.readline()
            if got[3:4] != b"-":
                return got

    async def session(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader)
        writer.write(b"EHLO bench\r\n")
        await reply(reader)
        for i in range(per):
            k = n * per + i
            rcpt = f"user{k}@d{k % domains}.bench.test".encode()
            writer.write(b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
            for _ in range(3):
                await reply(reader)
            writer.write(b"Subject: bench %d\r\n\r\n" % k + body_tail)
            got = await reply(reader)
            assert got.startswith(b"250"), got
        writer.write(b"QUIT\r\n")
        await reply(reader)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(session(n) for n in range(sessions)))
    return time.perf_counter() - t0


def peak_rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def run_ferry(tmp: Path, dns: DnsServer, sink_port: int, args: argparse.Namespace) -> dict:
    port = free_port()
    cfg = tmp / "ferry.toml"
    cfg.write_text(
        f'[server]\nhostname = "ferry.bench.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
        f"max_connections_per_ip = 500\n"
        f'[queue]\npath = "{tmp}/data"\n'
        f"[delivery]\nmx_port = {sink_port}\n"
        f'[dns]\nnameservers = ["{dns.address}"]\n'
    )
    log = tmp / "serve.log"
    # FERRY_BENCH_PYFLAGS="-m cProfile -o /tmp/ferry.prof" profiles the server (with
    # FERRY_EVENT_LOOP=asyncio so the profile sees inside the loop).
    pyflags = os.environ.get("FERRY_BENCH_PYFLAGS", "").split()
    proc = subprocess.Popen(
        [sys.executable, *pyflags, "-m", "ferry.cli", "--config", str(cfg), "serve"],
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    try:
        wait_port("127.0.0.1", port)
        t0 = time.perf_counter()
        inject_secs = asyncio.run(
            inject(port, args.messages, args.sessions, args.size, args.domains)
        )
        db = sqlite3.connect(tmp / "data" / "queue.db")
        total = args.messages // args.sessions * args.sessions
        deadline = time.monotonic() + 600
        while True:
            done = db.execute(
                "SELECT COUNT(*) FROM recipients WHERE status = 'Delivered'"
            ).fetchone()[0]
            if done >= total or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        secs = time.perf_counter() - t0
        failed = db.execute(
            "SELECT COUNT(*) FROM recipients WHERE status != 'Delivered'"
        ).fetchone()[0]
        db.close()
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    stats = {}
    for line in log.read_text().splitlines():
        if " delivery_stats " in line:
            stats = dict(re.findall(r"(\w+)=(\S+)", line))
    connections = int(stats.get("connections", 0)) or 1
    return {
        "messages": total,
        "delivered": done,
        "not_delivered": failed,
        "inject_seconds": round(inject_secs, 2),
        "seconds": round(secs, 2),
        "msgs_per_s": round(done / secs),
        "connections": connections,
        "messages_per_connection": round(done / connections, 1),
        "peak_rss_mb": round(rss, 1),
    }


def run_postfix(tmp: Path, sink_port: int, args: argparse.Namespace) -> dict | None:
    if not shutil.which("postfix"):
        return None
    sys.path.insert(0, str(REPO / "bench"))
    from postfix_instance import PostfixInstance

    port = free_port()
    tmp.chmod(0o755)  # Postfix's unprivileged daemons must reach their directories
    with PostfixInstance(
        tmp / "postfix", listen=("127.0.0.1", port), relay_to=(SINK_HOST, sink_port)
    ) as pf:
        t0 = time.perf_counter()
        inject_secs = asyncio.run(
            inject(port, args.messages, args.sessions, args.size, args.domains)
        )
        deadline = time.monotonic() + 600
        while not pf.queue_empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        secs = time.perf_counter() - t0
    total = args.messages // args.sessions * args.sessions
    return {
        "messages": total,
        "inject_seconds": round(inject_secs, 2),
        "seconds": round(secs, 2),
        "msgs_per_s": round(total / secs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--no-postfix", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as d, DnsServer() as dns:
        tmp = Path(d)
        dns.add_a("sink.bench.test", SINK_HOST)
        for i in range(args.domains):
            dns.add_mx(f"d{i}.bench.test", [(10, "sink.bench.test")])
        sink_port = free_port(SINK_HOST)
        sink = start_sink(sink_port)
        try:
            (tmp / "ferry").mkdir()
            ferry = run_ferry(tmp / "ferry", dns, sink_port, args)
            print(
                f"ferry:   {ferry['delivered']}/{ferry['messages']} messages of {args.size} B"
                f" to {args.domains} domains delivered in {ferry['seconds']} s ="
                f" {ferry['msgs_per_s']:,} msgs/s end to end (injection took"
                f" {ferry['inject_seconds']} s); {ferry['messages_per_connection']}"
                f" messages per connection; peak RSS {ferry['peak_rss_mb']} MB"
            )
            postfix = None if args.no_postfix else run_postfix(tmp, sink_port, args)
            if postfix:
                print(
                    f"postfix: {postfix['messages']} messages in {postfix['seconds']} s ="
                    f" {postfix['msgs_per_s']:,} msgs/s end to end (injection took"
                    f" {postfix['inject_seconds']} s)"
                )
                print(f"ratio ferry/postfix: {ferry['msgs_per_s'] / postfix['msgs_per_s']:.2f}")
        finally:
            sink.terminate()
            sink.wait(10)
    print(json.dumps({"size": args.size, "ferry": ferry, "postfix": postfix}))


if __name__ == "__main__":
    main()
