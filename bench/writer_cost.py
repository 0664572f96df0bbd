"""What one 1 KB one-recipient message costs the SQLite writer thread, per operation.

The three writer jobs every relayed message takes -- ``enqueue`` (intake, fsynced),
``claim`` (delivery, batches of 200 as the scheduler's) and ``record`` (delivery, one
outcome per call, many calls waiting at once as delivery sessions finish) -- run in
turn over N messages on a fresh queue under /var/tmp (a real disk: commits fsync).
Claims and outcomes go through ``relaxed()``, as ``ferry serve`` writes a delivery
worker's. For each operation it prints, per message:

- ``cpu``: the writer thread's CPU time (from /proc: what the writer can do no faster);
- ``busy``: the writer's time inside its group commits (``_Writer.commit_seconds``,
  fsync waits included);
- ``wall``: the operation's wall time over all its calls;
- ``KB``: what the writer thread wrote (write calls: WAL frames, checkpoints), and
  ``reads``: its read calls (pages SQLite did not find in its cache). Unlike times,
  these two do not depend on what else the machine is doing;
- ``ops`` (``--opcodes``, a separate pass since counting slows the writer): SQLite
  virtual-machine instructions the writer ran, triggers included -- a measure of its
  SQL work that no other load on the machine changes.

``--base DIR`` also measures the code in DIR (e.g. ``git archive main | tar -x -C DIR``),
each run alternating the two trees (each in a subprocess with its PYTHONPATH), and prints
the medians side by side::

    nice -n 10 .venv/bin/python bench/writer_cost.py --runs 5 --base /tmp/sql-base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OPS = ("enqueue", "claim", "record")
OPCODE_STEP = 20  # count virtual-machine instructions in steps of this many
CLAIM_BATCH = 200  # ferry/delivery/scheduler.py
SESSIONS = 50  # intake sessions sending at once (the side-by-side benchmark's)


def _thread_counters(tid: int) -> tuple[float, int, int]:
    """The thread's CPU seconds (scheduler statistics, in ns), bytes written, read calls."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        cpu = int(f.read().split()[0]) / 1e9
    with open(f"/proc/self/task/{tid}/io") as f:
        io = dict(line.split(": ") for line in f.read().splitlines())
    return cpu, int(io["wchar"]), int(io["syscr"])


async def record_delivered(queue: Any, claimed: list[Any]) -> None:
    """Record every claimed recipient as delivered, one outcome per call and all calls
    waiting at once (as delivery sessions finishing together): the writer groups them."""
    from ferry.envelope import Reply, Status
    from ferry.queue.base import AttemptResult

    ok = Reply(250, "2.0.0", "ok")
    await asyncio.gather(
        *[
            queue.record(
                "bench",
                [AttemptResult(c.recipient.id, Status.DELIVERED, ok, route="smarthost:sink")],
                now=time.time(),
            )
            for c in claimed
        ]
    )


async def measure(directory: Path, n: int, opcodes: bool = False) -> dict[str, dict[str, float]]:
    from ferry.envelope import EnvelopeIn, RecipientIn
    from ferry.queue.sqlite import SqliteQueue

    q = SqliteQueue(directory)
    out: dict[str, dict[str, float]] = {}
    writer = q._w
    assert writer.native_id is not None
    tid = writer.native_id
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += OPCODE_STEP
        return 0  # go on

    if opcodes:
        writer.conn.set_progress_handler(count, OPCODE_STEP)

    def start() -> tuple[tuple[float, int, int], float, float]:
        out["_steps"] = {"ops": steps}
        return _thread_counters(tid), writer.commit_seconds, time.perf_counter()

    def stop(op: str, began: tuple[tuple[float, int, int], float, float], count: int) -> None:
        (cpu, written, reads), busy, wall = began
        cpu_now, written_now, reads_now = _thread_counters(tid)
        out[op] = {
            "cpu": (cpu_now - cpu) / count,
            "busy": (writer.commit_seconds - busy) / count,
            "wall": (time.perf_counter() - wall) / count,
            "KB": (written_now - written) / count / 1e3,
            "reads": (reads_now - reads) / count,
            "ops": (steps - out.pop("_steps")["ops"]) / count,
        }

    try:
        body = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"
        sem = asyncio.Semaphore(SESSIONS)

        async def one(i: int) -> None:
            async with sem:
                await q.enqueue(EnvelopeIn("a@b.test", [RecipientIn(f"r{i}@c.test")], body))

        began = start()
        await asyncio.gather(*[one(i) for i in range(n)])
        stop("enqueue", began, n)

        worker = q.relaxed()
        claimed: list[Any] = []
        began = start()
        while len(claimed) < n:
            got = await worker.claim("bench", now=time.time(), limit=CLAIM_BATCH, lease=600)
            if not got:
                break
            claimed += got
        stop("claim", began, len(claimed))

        began = start()
        await record_delivered(worker, claimed)
        stop("record", began, len(claimed))
        return out
    finally:
        await q.close()


def one_run(n: int, opcodes: bool) -> dict[str, dict[str, float]]:
    directory = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ferry-writer-"))
    try:
        return asyncio.run(measure(directory / "q", n, opcodes))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _child(tree: Path, n: int, opcodes: bool = False) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--messages", str(n)]
        + (["--opcodes"] if opcodes else []),
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
    )
    result: dict[str, dict[str, float]] = json.loads(done.stdout)
    return result


KEYS = {"cpu": 1e6, "busy": 1e6, "wall": 1e6, "KB": 1.0, "reads": 1.0, "ops": 1.0}


def _table(name: str, runs: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Print the medians per message (times in microseconds); return them."""
    medians: dict[str, float] = {}
    for key, scale in KEYS.items():
        for op in OPS:
            medians[f"{op}.{key}"] = statistics.median(r[op][key] for r in runs) * scale
        medians[f"total.{key}"] = (
            statistics.median(sum(r[op][key] for op in OPS) for r in runs) * scale
        )
    for op in (*OPS, "total"):
        cells = "  ".join(f"{key} {medians[f'{op}.{key}']:6.1f}" for key in KEYS)
        print(f"{name:5} {op:8} {cells}")
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", type=Path, help="also measure the source tree in this directory")
    ap.add_argument(
        "--opcodes", action="store_true", help="also count SQLite instructions (one more run)"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.messages, args.opcodes)))
        return
    here = Path(__file__).resolve().parent.parent
    trees = {"new": here} if args.base is None else {"base": args.base.resolve(), "new": here}
    results: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
    for _run in range(args.runs):
        for name, tree in trees.items():  # alternated: base, new, base, new...
            results[name].append(_child(tree, args.messages))
    if args.opcodes:  # deterministic: one run each is enough
        for name, tree in trees.items():
            counted = _child(tree, args.messages, opcodes=True)
            for run in results[name]:
                for op in OPS:
                    run[op]["ops"] = counted[op]["ops"]
    print(f"{args.messages} messages x {args.runs} runs; microseconds per message, median of runs")
    medians = {name: _table(name, runs) for name, runs in results.items()}
    if "base" in medians:
        ratio = "  ".join(
            f"{op} {medians['new'][f'{op}.cpu'] / medians['base'][f'{op}.cpu']:.2f}"
            for op in (*OPS, "total")
        )
        print(f"new/base writer CPU: {ratio}")


if __name__ == "__main__":
    main()
