"""Moving pending mail from a SQLite queue to a PostgreSQL one (``ferry queue migrate-to``).

Every message with work left is copied whole -- envelope, body, every recipient with its
state, attempts, last reply and route, and its attempt history -- so delivery on the new
queue goes on exactly where it stopped: retry times, delay warnings and give-up limits
included. Leases are void in the new queue (``InProgress`` becomes ``Deferred``, or
``Queued`` if never tried), due at once.

Each message is one transaction on PostgreSQL, and a message whose id is already there is
skipped: a move that stopped half way is simply run again. Nothing is deleted from the
SQLite queue: the operator keeps it until the new queue has been checked.
``ferry serve`` must not be running on the SQLite queue meanwhile (the CLI holds its lock).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.queue.postgres import PostgresQueue
from ferry.queue.sqlite import connect, read_body

_MESSAGE = (
    "id, sender, size, priority, arrival, expires, status, client_address, client_helo,"
    " auth_user, envid, ret, smtputf8, body_8bit, extra"
)
_RECIPIENT = (
    "id, address, domain, orcpt, notify, status, priority, arrival, attempts, next_attempt,"
    " last_code, last_enhanced, last_text, route, delay_warned, expiry_reason"
)
_ATTEMPT = "recipient_id, at, outcome, code, enhanced, text, next_hop, tls, tried"


@dataclass
class MoveResult:
    copied: int = 0  # messages written to PostgreSQL
    skipped: int = 0  # already there (an earlier, interrupted move)
    recipients: int = 0


async def move_pending(
    db_path: Path,
    target: PostgresQueue,
    *,
    progress: Callable[[MoveResult], None] | None = None,
) -> MoveResult:
    """Copy every unfinished message of the SQLite database ``db_path`` into ``target``."""
    src = connect(db_path, readonly=True)
    result = MoveResult()
    try:
        ids = [
            r[0]
            for r in src.execute(
                "SELECT id FROM messages WHERE finished IS NULL ORDER BY arrival, id"
            )
        ]
        for mid in ids:
            copy = _read(src, db_path, mid)
            if copy is None:
                continue  # finished or removed since the listing
            if await target.import_message(*copy):
                result.copied += 1
                result.recipients += len(copy[2])
            else:
                result.skipped += 1
            if progress is not None:
                progress(result)
    finally:
        src.close()
    return result


def _read(
    src: sqlite3.Connection, db_path: Path, mid: str
) -> tuple[tuple[Any, ...], bytes, list[tuple[Any, ...]], list[tuple[Any, ...]]] | None:
    src.execute("BEGIN")  # one snapshot of the message
    try:
        msg = src.execute(f"SELECT {_MESSAGE} FROM messages WHERE id = ?", (mid,)).fetchone()
        body = read_body(src, db_path, mid)  # a row in bodies or a spool file
        if msg is None or body is None:
            return None
        rcpts = src.execute(
            f"SELECT {_RECIPIENT} FROM recipients WHERE message_id = ? ORDER BY id", (mid,)
        ).fetchall()
        attempts = src.execute(
            f"SELECT {_ATTEMPT} FROM attempts WHERE recipient_id IN"
            " (SELECT id FROM recipients WHERE message_id = ?) ORDER BY at, id",
            (mid,),
        ).fetchall()
    finally:
        src.execute("COMMIT")
    return tuple(msg), body, [tuple(r) for r in rcpts], [tuple(a) for a in attempts]
