"""Where message bodies should live: BLOBs in the SQLite queue or a spool of files. Not a test.

    python bench/body_storage.py [--reps 3] [--dir /var/tmp] [--sizes 1024,102400]
                                 [--groups 1,16,64]

Writes on a real disk (``--dir``, default /var/tmp; a tmpfs would measure nothing).
For each body size and group-commit size (messages per commit), alternating the
variants within each repetition (A, B, C, A, B, C, ...: the machine is shared, so
absolute numbers are noisy and the medians over repetitions are what to compare):

- ``blob``: the body is a row in ``bodies`` in the same transaction: one WAL fsync
  per group (``secure_delete=FAST``, as Ferry now sets it);
- ``blob-secure``: the same with Debian's default ``secure_delete=ON`` (Ferry before
  issue 12): a deleted body is overwritten with zeros, through the WAL;
- ``spool-seq``: each body written to ``<id>`` and fdatasync-ed (``bench/file_spool.py``,
  the layout before schema version 7), one after the other, then one directory fsync,
  then the rows' commit;
- ``spool-pool``: the same file writes from a thread pool, all at once (what
  concurrent SMTP sessions do; ext4's journal merges concurrent fsyncs), one shared
  directory fsync, then the rows' commit (what Ferry did before its segments);
- ``spool-rename``: as ``spool-pool`` but written to ``<id>.tmp`` and renamed after
  the fdatasync (the committed row, not the name, is what makes a body visible, so
  Ferry does without).

The metadata rows are Ferry's own (``sqlite._insert_message`` on the real schema).
Each run ends with ``PRAGMA wal_checkpoint(TRUNCATE)`` so the database pays its
checkpoint. Reported per message: messages/s, bytes written to the device
(/proc/diskstats of the disk under ``--dir``: includes the file system's journal,
but also anything else the machine wrote meanwhile) and bytes this process sent to
storage (/proc/self/io write_bytes: ours alone, without the journal); then the same
for finishing the messages (body deleted; files unlinked after the commit).

With ``--serve``: the same question end to end -- ``ferry serve`` (delivery held)
accepting ``--serve-messages`` messages from Postfix's ``smtp-source`` over 50
sessions, with ``queue.spool_threshold`` at its default and with every body a row,
alternated; bytes written by the server and the final TRUNCATE checkpoint.

Then the read cost per body: ``read_messages``' query over 10 ids at a time against
a database with a long WAL (checkpoints held off, as a busy queue's readers do), the
same after a TRUNCATE checkpoint, and spool files.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ferry.envelope import EnvelopeIn, RecipientIn  # noqa: E402
from ferry.queue import spool  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import file_spool  # noqa: E402

from ferry.queue.base import new_queue_id  # noqa: E402
from ferry.queue.sqlite import (  # noqa: E402
    SCHEMA,
    _finish,
    _insert_message,
    _select_in,
    begin_immediate,
    connect,
)
from ferry.queue.sqlite_schema import migrate  # noqa: E402

VARIANTS = ("blob", "blob-secure", "spool-seq", "spool-pool", "spool-rename")


def device_of(path: Path) -> str:
    """The /proc/diskstats name of the disk holding ``path`` (its whole disk)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    name = sysfs.resolve().name
    # A partition's parent directory is its disk: count the disk (what reaches it).
    if (sysfs / "partition").exists():
        name = sysfs.resolve().parent.name
    return name


def disk_written(device: str) -> int:
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] == device:
                return int(parts[9]) * 512  # sectors written
    raise RuntimeError(f"{device} not in /proc/diskstats")


def self_written() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def body(size: int) -> bytes:
    head = b"From: a@bench.test\r\nTo: b@bench.test\r\nSubject: bench\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghij.\r\n"
    return (head + line * (size // len(line) + 1))[:size]


class Store:
    """One fresh queue directory: the real schema, and the spool beside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.conn = connect(root / "queue.db")
        migrate(self.conn, SCHEMA, begin_immediate)
        self.spool = spool.spool_dir(root)
        self.spool.mkdir()
        spool.fsync_dir(root)
        self.dirsync = file_spool.DirSync(self.spool)

    def close(self) -> None:
        self.conn.close()
        shutil.rmtree(self.root)


def write_group(
    store: Store,
    variant: str,
    items: list[tuple[str, EnvelopeIn]],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    conn, now = store.conn, time.time()
    spooled = variant.startswith("spool")
    if variant == "spool-seq":
        for qid, env in items:
            file_spool.write_file(store.spool, qid, env.data)
        spool.fsync_dir(store.spool)
    elif variant == "spool-rename":

        def renamed(it: tuple[str, EnvelopeIn]) -> None:
            file_spool.write_renamed(store.spool, it[0], it[1].data)
            store.dirsync.sync()

        list(pool.map(renamed, items))
    elif variant == "spool-pool":
        list(
            pool.map(
                lambda it: file_spool.store(store.spool, store.dirsync, it[0], it[1].data), items
            )
        )
    begin_immediate(conn)
    # A spooled body's row names where the body is instead of holding it: the same
    # columns whether that is a file or a segment (the row is all that is measured).
    elsewhere = ("seg.bench.1", 0) if spooled else None
    for qid, env in items:
        _insert_message(conn, qid, env, now, now + 86400, elsewhere)
    conn.execute("COMMIT")


def finish_group(store: Store, variant: str, ids: list[str]) -> None:
    conn = store.conn
    begin_immediate(conn)
    _finish(conn, [("Delivered", q) for q in ids], time.time())
    conn.execute("COMMIT")
    if variant.startswith("spool"):
        spool.unlink(store.spool, ids)


def measure(device: str, fn: Callable[[], None]) -> tuple[float, int, int]:
    d0, s0, t0 = disk_written(device), self_written(), time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return t, disk_written(device) - d0, self_written() - s0


def one_run(base: Path, device: str, variant: str, size: int, group: int, n: int) -> dict[str, Any]:
    store = Store(Path(tempfile.mkdtemp(dir=base)) / "q")
    if variant == "blob-secure":
        store.conn.execute("PRAGMA secure_delete=ON")  # Debian's default, Ferry before 12
    data = body(size)
    items = [
        (new_queue_id(), EnvelopeIn("s@bench.test", [RecipientIn(f"r{i}@d{i % 50}.test")], data))
        for i in range(n)
    ]
    groups = [items[i : i + group] for i in range(0, n, group)]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(group, 64))
    try:
        os.sync()  # start from a clean page cache: what follows is ours

        def write_all() -> None:
            for g in groups:
                write_group(store, variant, g, pool)
            store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        secs, disk, own = measure(device, write_all)

        def finish_all() -> None:
            for g in groups:
                finish_group(store, variant, [q for q, _e in g])
            store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        fsecs, fdisk, fown = measure(device, finish_all)
    finally:
        pool.shutdown()
        store.close()
    return {
        "variant": variant,
        "size": size,
        "group": group,
        "messages": n,
        "msgs_per_s": n / secs,
        "disk_bytes_per_msg": disk / n,
        "own_bytes_per_msg": own / n,
        "finish_msgs_per_s": n / fsecs,
        "finish_disk_bytes_per_msg": fdisk / n,
        "finish_own_bytes_per_msg": fown / n,
    }


def read_costs(base: Path, size: int, n: int, reps: int) -> dict[str, float]:
    """Microseconds per body: long WAL, checkpointed database, spool files."""
    store = Store(Path(tempfile.mkdtemp(dir=base)) / "q")
    try:
        conn = store.conn
        # Held-off checkpoints: what a queue whose readers never pause ends up with.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        data = body(size)
        ids = []
        for start in range(0, n, 64):
            now = time.time()
            begin_immediate(conn)
            for i in range(start, min(n, start + 64)):
                qid = new_queue_id()
                ids.append(qid)
                env = EnvelopeIn("s@bench.test", [RecipientIn(f"r{i}@d.test")], data)
                _insert_message(conn, qid, env, now, now + 86400)
                file_spool.write_file(
                    store.spool, qid, data
                )  # same bodies as files (no fsync needed)
            conn.execute("COMMIT")
        wal = (store.root / "queue.db-wal").stat().st_size
        reader = connect(store.root / "queue.db", create=False, readonly=True)

        def blob_reads() -> float:
            sample = random.sample(ids, min(len(ids), 2000))
            t0 = time.perf_counter()
            for i in range(0, len(sample), 10):
                reader.execute("BEGIN")
                rows = _select_in(
                    reader,
                    "SELECT message_id, data FROM bodies WHERE message_id IN ({})",
                    sample[i : i + 10],
                )
                reader.execute("COMMIT")
                assert len(rows) == len(sample[i : i + 10])
            return (time.perf_counter() - t0) / len(sample) * 1e6

        def file_reads() -> float:
            sample = random.sample(ids, min(len(ids), 2000))
            t0 = time.perf_counter()
            for mid in sample:
                assert spool.read(store.spool, mid) is not None
            return (time.perf_counter() - t0) / len(sample) * 1e6

        long_wal, files = [], []
        for _ in range(reps):
            long_wal.append(blob_reads())
            files.append(file_reads())
        reader.close()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        reader = connect(store.root / "queue.db", create=False, readonly=True)
        short_wal = [blob_reads() for _ in range(reps)]
        reader.close()
    finally:
        store.close()
    return {
        "size": size,
        "wal_mb": round(wal / 1e6, 1),
        "us_blob_long_wal": statistics.median(long_wal),
        "us_blob_checkpointed": statistics.median(short_wal),
        "us_spool_file": statistics.median(files),
    }


def _serve(tmp: Path, port: int, threshold: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "ferry.toml"
    cfg.write_text(
        f'[server]\nhostname = "bench.ferry.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
        f"max_connections_per_ip = 500\nmax_message_size = 10000000\n"
        f'[queue]\npath = "{tmp}/data"\nspool_threshold = {threshold}\n'
        f"[delivery]\nhold = true\n"  # accept only: nothing leaves this machine
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "--config", str(cfg), "serve"],
        stdout=open(tmp / "serve.log", "wb"),  # noqa: SIM115 -- the child owns it
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("ferry serve did not start")


def _proc_written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def serve_run(base: Path, device: str, size: int, n: int, threshold: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(dir=base))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = _serve(tmp, port, threshold)
    try:
        os.sync()
        d0, s0, w0 = disk_written(device), self_written(), _proc_written(proc.pid)
        t0 = time.perf_counter()
        subprocess.run(
            [
                *("smtp-source", "-s", "50", "-m", str(n), "-l", str(size), "-d"),
                *("-f", "s@example.org", "-t", "r@example.net", f"127.0.0.1:{port}"),
            ],
            check=True,
        )
        secs = time.perf_counter() - t0
        w1 = _proc_written(proc.pid)
        db = sqlite3.connect(tmp / "data" / "queue.db")
        stored = db.execute("SELECT COUNT(*), SUM(spool) FROM messages").fetchone()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        db.close()
        disk, own = disk_written(device) - d0, (w1 - w0) + (self_written() - s0)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert stored[0] == n, f"{stored[0]} of {n} messages stored"
    return {
        "size": size,
        "threshold": threshold,
        "spooled": stored[1],
        "msgs_per_s": n / secs,
        "disk_bytes_per_msg": disk / n,
        "own_bytes_per_msg": own / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="1024,102400")
    ap.add_argument("--groups", default="1,16,64")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    ap.add_argument("--no-reads", action="store_true")
    ap.add_argument("--no-writes", action="store_true")
    ap.add_argument("--serve", action="store_true", help="also ferry serve + smtp-source")
    ap.add_argument("--serve-messages", type=int, default=3000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ferry-bodies-", dir=args.dir))
    device = device_of(base)
    sizes = [int(s) for s in args.sizes.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    variants = args.variants.split(",")
    print(f"# disk {device} under {base}; medians of {args.reps} alternated repetitions")
    results: list[dict[str, Any]] = []
    try:
        for size in sizes if not args.no_writes else []:
            for group in groups:
                # Enough messages for a few seconds per run, not more (shared machine).
                n = int((300 if group == 1 else 2000 if size <= 8192 else 600) * args.scale)
                n = max(group, n - n % group)
                runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
                for _ in range(args.reps):
                    for v in variants:
                        runs[v].append(one_run(base, device, v, size, group, n))
                for v in variants:
                    row: dict[str, Any] = {"variant": v, "size": size, "group": group, "n": n}
                    for key in runs[v][0]:
                        if key.endswith("_per_msg") or key.endswith("_per_s"):
                            row[key] = round(statistics.median(r[key] for r in runs[v]), 1)
                    results.append(row)
                    print(
                        f"{size:>7} B  group {group:>3}  {v:<11}"
                        f" {row['msgs_per_s']:>8.0f} msg/s"
                        f"  disk {row['disk_bytes_per_msg'] / 1024:>7.1f} KiB/msg"
                        f" ({row['disk_bytes_per_msg'] / size:4.1f}x)"
                        f"  own {row['own_bytes_per_msg'] / 1024:>7.1f} KiB/msg"
                        f"  | finish {row['finish_msgs_per_s']:>8.0f} msg/s"
                        f"  disk {row['finish_disk_bytes_per_msg'] / 1024:>6.1f} KiB/msg",
                        flush=True,
                    )
        served: list[dict[str, Any]] = []
        if args.serve:
            for size in sizes:
                # Every body a row (above any size here), the default, every body a file.
                thresholds = [100_000_000, spool_default(), 0]
                runs2: dict[int, list[dict[str, Any]]] = {t: [] for t in thresholds}
                for _ in range(args.reps):
                    for t in thresholds:
                        runs2[t].append(serve_run(base, device, size, args.serve_messages, t))
                for t in thresholds:
                    row = {k: statistics.median(r[k] for r in runs2[t]) for k in runs2[t][0]}
                    served.append(row)
                    print(
                        f"serve {size:>7} B  spool_threshold {t:>9}"
                        f" ({int(row['spooled'])} spooled)"
                        f" {row['msgs_per_s']:>7.0f} msg/s accepted"
                        f"  disk {row['disk_bytes_per_msg'] / 1024:>7.1f} KiB/msg"
                        f"  own {row['own_bytes_per_msg'] / 1024:>7.1f} KiB/msg"
                        f" ({row['own_bytes_per_msg'] / size:4.1f}x)",
                        flush=True,
                    )
        reads = []
        if not args.no_reads:
            for size in sizes:
                n = 20000 if size <= 8192 else 1500
                r = read_costs(base, size, n, args.reps)
                reads.append(r)
                print(
                    f"read {size:>7} B: WAL {r['wal_mb']} MB: {r['us_blob_long_wal']:.0f} us/body;"
                    f" checkpointed {r['us_blob_checkpointed']:.0f} us/body;"
                    f" spool file {r['us_spool_file']:.0f} us/body",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"writes": results, "serve": served, "reads": reads}))


def spool_default() -> int:
    from ferry.queue.sqlite import SPOOL_THRESHOLD

    return SPOOL_THRESHOLD


if __name__ == "__main__":
    main()
