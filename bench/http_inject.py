"""Injection over HTTP beside injection over SMTP, on the same machine. Not a test.

    python bench/http_inject.py [--seconds 10] [--connections 20] [--size 1024]

Starts ``ferry serve`` (fsync on, delivery held: accept only) with the HTTP API on
loopback, then:

  1. HTTP: ``wrk`` (C, keep-alive) with ``--connections`` connections POSTs the same raw
     1 KB message (base64 in JSON) to ``/v1/messages`` for ``--seconds``; every 202 is a
     message committed to the queue;
  2. SMTP: ``smtp-source`` (Postfix's C injector) with as many sessions, connection reuse,
     the same message size, for as many messages as HTTP managed.

Prints messages per second for each and the queue's count as a cross-check. Needs Debian's
``wrk`` and ``postfix`` packages (for smtp-source).
"""

from __future__ import annotations

import argparse
import base64
import json
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def count(tmp: Path) -> int:
    db = sqlite3.connect(f"file:{tmp}/data/queue.db?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    for tool in ("wrk", "smtp-source"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install wrk postfix")
    with tempfile.TemporaryDirectory(prefix="ferry-http-bench-") as d:
        tmp = Path(d)
        smtp, http = free_port(), free_port()
        cfg = tmp / "ferry.toml"
        cfg.write_text(
            f'[server]\nhostname = "bench.ferry.test"\n'
            f'listen = [{{ address = "127.0.0.1", port = {smtp}, mode = "mta" }}]\n'
            f"max_connections_per_ip = 500\n"
            f'[queue]\npath = "{tmp}/data"\n[delivery]\nhold = true\n'
            f'[http]\nlisten = [{{ address = "127.0.0.1", port = {http} }}]\n'
            f"rate_limit = 1000000\nrate_burst = 1000000\n"
        )
        cli = [sys.executable, "-m", "ferry.cli", "--config", str(cfg)]
        token = subprocess.run(
            [*cli, "token", "create", "bench", "--scope", "inject"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        message = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * max(1, args.size // 80)
        body = json.dumps(
            {
                "mail_from": "sender@example.org",
                "rcpt_to": ["rcpt@example.net"],
                "data": base64.b64encode(message).decode(),
            }
        )
        script = tmp / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {token}"\n'
            "local bad = 0\n"
            "response = function(status, headers, body)\n"
            "  if status ~= 202 then bad = bad + 1 end\n"
            "end\n"
        )
        serve = subprocess.Popen(
            [*cli, "serve"],
            stdout=open(tmp / "serve.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        try:
            wait_port(smtp)
            wait_port(http)
            out = subprocess.run(
                [
                    "wrk",
                    "-t2",
                    f"-c{args.connections}",
                    f"-d{args.seconds}s",
                    "--latency",
                    "-s",
                    str(script),
                    f"http://127.0.0.1:{http}/v1/messages",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            http_msgs = count(tmp)
            m = re.search(r"Requests/sec:\s+([\d.]+)", out)
            http_rate = float(m.group(1)) if m else float("nan")
            p99 = re.search(r"99%\s+(\S+)", out)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            print(
                f"HTTP: {http_msgs} messages queued in {args.seconds} s by wrk with"
                f" {args.connections} keep-alive connections = {http_rate:,.0f} msgs/s"
                f" (p99 latency {p99.group(1) if p99 else '?'};"
                f" non-2xx: {non2xx.group(1) if non2xx else 0})"
            )
            n = max(1000, http_msgs)
            t0 = time.perf_counter()
            subprocess.run(
                [
                    "smtp-source",
                    "-s",
                    str(args.connections),
                    "-m",
                    str(n),
                    "-l",
                    str(args.size),
                    "-d",
                    "-f",
                    "sender@example.org",
                    "-t",
                    "rcpt@example.net",
                    f"127.0.0.1:{smtp}",
                ],
                check=True,
            )
            secs = time.perf_counter() - t0
            total = count(tmp)
            print(
                f"SMTP: {total - http_msgs} messages queued in {secs:.2f} s by smtp-source with"
                f" {args.connections} sessions (connection reuse) = {n / secs:,.0f} msgs/s"
            )
        finally:
            serve.terminate()
            serve.wait(30)


if __name__ == "__main__":
    main()
