"""What recording a delivered outcome costs the SQLite writer, per recipient.

Enqueues N one-recipient 1 KB messages, claims them all, then records every outcome
concurrently (as delivery sessions do, so the writer groups them) and prints the wall
time and the writer's commit time per recipient. The queue lives under /var/tmp (a real
disk, not a tmpfs: the commits fsync).

    .venv/bin/python bench/record_cost.py --messages 4000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from writer_cost import record_delivered

from ferry.envelope import EnvelopeIn, RecipientIn
from ferry.queue.sqlite import SqliteQueue


async def measure(directory: Path, n: int) -> tuple[float, float]:
    q = SqliteQueue(directory)
    try:
        body = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"
        await asyncio.gather(
            *[
                q.enqueue(EnvelopeIn("a@b.test", [RecipientIn(f"r{i}@c.test")], body))
                for i in range(n)
            ]
        )
        claimed = await q.claim("bench", now=time.time(), limit=n, lease=600)
        writer = q._w
        spent = writer.commit_seconds
        t0 = time.perf_counter()
        await record_delivered(q, claimed)
        wall = (time.perf_counter() - t0) / len(claimed)
        return wall, (writer.commit_seconds - spent) / len(claimed)
    finally:
        await q.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for run in range(args.runs):
        directory = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ferry-record-"))
        try:
            wall, writer = asyncio.run(measure(directory / "q", args.messages))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print(f"run {run + 1}: {wall * 1e6:.0f} us per recipient, writer {writer * 1e6:.0f} us")


if __name__ == "__main__":
    main()
