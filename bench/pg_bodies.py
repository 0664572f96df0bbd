"""Message bodies in PostgreSQL: ``bytea`` (TOAST) against large objects. Not a test.

    python bench/pg_bodies.py [--messages 300] [--size 102400] [--rounds 3] [--batch 16]

Issue 14.4: a 100 KB message must not cost more than its size in writes. For each
design and each kind of body, in a fresh table, ``--messages`` bodies are written in
transactions of ``--batch`` (intake's group commit, ``synchronous_commit = on``), read
back whole in random order, and deleted (a finished message's body goes). Reported per
message: WAL written (``pg_current_wal_lsn`` before and after: what reaches the disk,
fsynced), space taken, and the rates. Designs:

- ``bytea-external``: ``bytea`` with ``STORAGE EXTERNAL`` (out of line, never
  compressed): what ``postgres_schema`` creates;
- ``bytea-extended``: ``bytea`` with the default ``STORAGE EXTENDED`` (TOAST tries to
  compress, pglz unless ``default_toast_compression`` says lz4);
- ``bytea-lz4``: the same with ``COMPRESSION lz4`` (PostgreSQL 14+, built with lz4);
- ``large-object``: the body in ``pg_largeobject`` (``lo_from_bytea``, read with
  ``lo_get``, deleted with ``lo_unlink``), its oid in the table.

Bodies: ``text`` (a plain-text mail of English-like words and a quoted reply, as people
write it) and ``attachment`` (a short text part and a base64 attachment of random bytes,
like a PDF or a JPEG: already compressed). Rounds alternate the designs (A, B, C, A, B,
C...) and the medians are printed, since the machine may be shared. PostgreSQL: the server
in FERRY_BENCH_PG_DSN, or a private cluster started here (tests/world/postgres.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DESIGNS = ("bytea-external", "bytea-extended", "bytea-lz4", "large-object")

_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "can",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "meeting",
    "invoice",
    "report",
    "account",
    "order",
    "shipment",
    "delivery",
    "attached",
    "please",
    "regards",
    "thanks",
    "review",
    "quarter",
    "budget",
    "schedule",
    "project",
    "customer",
    "team",
    "update",
    "question",
    "answer",
    "tomorrow",
    "monday",
    "friday",
    "office",
    "contract",
    "payment",
    "reference",
)


def text_body(size: int, rng: random.Random) -> bytes:
    """A plain-text mail: headers, paragraphs of words, a quoted reply below."""
    head = (
        "From: Alice Example <alice@example.com>\r\nTo: bob@example.net\r\n"
        "Subject: Re: quarterly report\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    out = [head]
    n = len(head)
    quote = ""
    while n < size:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 14))]
        line = quote + " ".join(words).capitalize() + ".\r\n"
        if rng.random() < 0.02:
            quote = "> " if not quote else ""
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def attachment_body(size: int, rng: random.Random) -> bytes:
    """A short text part and a base64 attachment of random (already compressed) bytes."""
    head = (
        "From: a@example.com\r\nTo: b@example.net\r\nSubject: the scan\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nHere is the scan you asked for.\r\n"
        '--b1\r\nContent-Type: application/pdf; name="scan.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    raw = rng.randbytes(size * 3 // 4)
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return (head.encode() + b64)[: size - 8] + b"--b1--\r\n"


def setup(conn: psycopg.Connection[Any], design: str) -> None:
    conn.execute("DROP TABLE IF EXISTS bodies")
    if design == "large-object":
        conn.execute("CREATE TABLE bodies (id text PRIMARY KEY, lo oid NOT NULL)")
    else:
        conn.execute("CREATE TABLE bodies (id text PRIMARY KEY, data bytea NOT NULL)")
        storage = "EXTERNAL" if design == "bytea-external" else "EXTENDED"
        conn.execute(f"ALTER TABLE bodies ALTER COLUMN data SET STORAGE {storage}".encode())
        if design == "bytea-lz4":
            conn.execute("ALTER TABLE bodies ALTER COLUMN data SET COMPRESSION lz4")
    conn.execute("CHECKPOINT")  # full-page images after it hit every design alike


def wal(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def lo_bytes(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_total_relation_size('pg_largeobject')").fetchone()
    assert row is not None
    return int(row[0])


def one_run(dsn: str, design: str, bodies: list[bytes], batch: int) -> dict[str, float]:
    n = len(bodies)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")
        setup(conn, design)
        lo_before = lo_bytes(conn)
        w0 = wal(conn)
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            with conn.transaction(), conn.cursor() as cur:
                rows = [(f"m{i}", bodies[i]) for i in range(start, min(n, start + batch))]
                if design == "large-object":
                    cur.executemany(
                        "INSERT INTO bodies(id, lo) VALUES (%s, lo_from_bytea(0, %s))", rows
                    )
                else:
                    cur.executemany("INSERT INTO bodies(id, data) VALUES (%s, %s)", rows)
        write_s = time.perf_counter() - t0
        w1 = wal(conn)
        row = conn.execute("SELECT pg_total_relation_size('bodies')").fetchone()
        assert row is not None
        space = int(row[0]) + lo_bytes(conn) - lo_before
        order = list(range(n))
        random.Random(1).shuffle(order)
        read_sql = (
            "SELECT lo_get(lo) FROM bodies WHERE id = %s"
            if design == "large-object"
            else "SELECT data FROM bodies WHERE id = %s"
        )
        t0 = time.perf_counter()
        for i in order:
            got = conn.execute(read_sql.encode(), (f"m{i}",)).fetchone()
            assert got is not None and len(got[0]) == len(bodies[i])
        read_s = time.perf_counter() - t0
        w2 = wal(conn)
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            ids = [f"m{i}" for i in range(start, min(n, start + batch))]
            with conn.transaction():
                if design == "large-object":
                    conn.execute("SELECT lo_unlink(lo) FROM bodies WHERE id = ANY(%s)", (ids,))
                conn.execute("DELETE FROM bodies WHERE id = ANY(%s)", (ids,))
        delete_s = time.perf_counter() - t0
        w3 = wal(conn)
        conn.execute("DROP TABLE bodies")
    size = sum(len(b) for b in bodies) / n
    return {
        "write_per_s": n / write_s,
        "read_per_s": n / read_s,
        "delete_per_s": n / delete_s,
        "wal_per_msg": (w1 - w0) / n,
        "wal_ratio": (w1 - w0) / n / size,
        "space_ratio": space / n / size,
        "delete_wal_per_msg": (w3 - w2) / n,
    }


def run(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    kinds = {
        "text": [text_body(args.size, rng) for _ in range(args.messages)],
        "attachment": [attachment_body(args.size, rng) for _ in range(args.messages)],
    }
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW default_toast_compression").fetchone()
        version = conn.execute("SHOW server_version").fetchone()
    print(
        f"PostgreSQL {version[0] if version else '?'},"
        f" default_toast_compression = {row[0] if row else '?'}",
        flush=True,
    )
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for r in range(args.rounds):
        for kind, bodies in kinds.items():
            for design in DESIGNS:
                m = one_run(dsn, design, bodies, args.batch)
                results.setdefault(kind, {}).setdefault(design, []).append(m)
                print(
                    f"round {r + 1} {kind:10} {design:15} write {m['write_per_s']:7.0f}/s"
                    f"  read {m['read_per_s']:7.0f}/s  delete {m['delete_per_s']:7.0f}/s"
                    f"  WAL {m['wal_ratio']:.2f}x size  space {m['space_ratio']:.2f}x",
                    flush=True,
                )
    medians: dict[str, Any] = {}
    print("\nmedians:")
    for kind, designs in results.items():
        for design, runs in designs.items():
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            medians.setdefault(kind, {})[design] = {k: round(v, 2) for k, v in med.items()}
            print(
                f"{kind:10} {design:15} write {med['write_per_s']:7.0f}/s"
                f"  read {med['read_per_s']:7.0f}/s  delete {med['delete_per_s']:7.0f}/s"
                f"  WAL {med['wal_ratio']:.2f}x size  space {med['space_ratio']:.2f}x",
                flush=True,
            )
    return medians


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--size", type=int, default=100 * 1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    dsn = os.environ.get("FERRY_BENCH_PG_DSN", "")
    cluster = base = None
    if not dsn:
        from tests.world.postgres import PostgresCluster

        base = Path(tempfile.mkdtemp(prefix="ferry-bench-pg-"))
        cluster = PostgresCluster(base)
        dsn = cluster.start()
    try:
        medians = run(dsn, args)
    finally:
        if cluster is not None and base is not None:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"messages": args.messages, "size": args.size, "medians": medians}))


if __name__ == "__main__":
    main()
