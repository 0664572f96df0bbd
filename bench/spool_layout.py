"""One file per body against spool segments: the cost of making bodies durable. Not a test.

    python bench/spool_layout.py [--bodies 3000] [--size 102400] [--sessions 32] [--rounds 2]

Writes ``--bodies`` bodies of ``--size`` bytes from ``--sessions`` concurrent writers
(as intake's sessions do), in a temporary directory on the disk that holds ``/tmp``,
each layout alternately, ``--rounds`` times:

- ``files``: what Ferry did before schema version 7 -- each body a file of its own
  (``bench/file_spool.py``: create, write, fdatasync), the directory fsync shared by
  the writers waiting, and every file deleted afterwards (as delivery
  does, one by one);
- ``segments``: ``spool.Writer`` as ``ferry serve`` and its intake processes use it --
  bodies appended to 16 MiB segments, one fdatasync shared by the writers waiting, and
  each segment deleted once at the end.

Prints per layout and round: bodies per second and CPU milliseconds (user + system of
this process, deletion included) per body. ``sync`` runs before every round.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ferry.queue import spool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import file_spool


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def files(directory: Path, body: bytes, bodies: int, sessions: int) -> None:
    dirsync = file_spool.DirSync(directory)

    def one(i: int) -> None:
        file_spool.store(directory, dirsync, f"{i:019X}", body)

    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        list(pool.map(one, range(bodies)))
    spool.unlink(directory, [f"{i:019X}" for i in range(bodies)])


async def segments(directory: Path, body: bytes, bodies: int, sessions: int) -> None:
    sealed: list[str] = []
    writer = spool.Writer(directory, "bench", on_sealed=sealed.append)
    writer.THREADS = sessions
    todo = iter(range(bodies))

    async def session() -> None:
        for _ in todo:
            async with writer.append(body):
                pass  # here intake commits the row that names the body

    await asyncio.gather(*(session() for _ in range(sessions)))
    await writer.close()
    for name in sealed:
        os.unlink(spool.segment_path(directory, name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--bodies", type=int, default=3000)
    ap.add_argument("--size", type=int, default=102400)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    body = os.urandom(args.size)
    print(f"{args.bodies} bodies of {args.size} bytes, {args.sessions} concurrent writers")
    for rnd in range(1, args.rounds + 1):
        for layout in ("files", "segments"):
            tmp = Path(tempfile.mkdtemp(prefix="ferry-spool-"))
            try:
                subprocess.run(["sync"], check=True)
                cpu0, t0 = _cpu(), time.perf_counter()
                if layout == "files":
                    files(tmp, body, args.bodies, args.sessions)
                else:
                    asyncio.run(segments(tmp, body, args.bodies, args.sessions))
                secs, cpu = time.perf_counter() - t0, _cpu() - cpu0
                assert not os.listdir(tmp), "every body deleted"
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(
                f"round {rnd}  {layout:9} {args.bodies / secs:7.0f} bodies/s"
                f"  {cpu * 1000 / args.bodies:.3f} ms CPU per body"
            )


if __name__ == "__main__":
    main()
