"""The SQLite queue's operator side: selections, pages, summaries, bulk changes, suspensions.

Functions over a connection, run by ``SqliteQueue`` on its reader connections (reads)
or its writer thread (changes). Reads walk partial indexes over waiting recipients
only, and pages are keyset pages, so their cost follows the page and the waiting
queue, not the history.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ferry.envelope import Status
from ferry.queue.selection import (
    AGE_BUCKETS,
    WAITING,
    Counts,
    ListedMessage,
    ListedRecipient,
    Page,
    Selection,
    Summary,
    Suspension,
    normal_domain,
)

# The IN-list form, as the version 4 step (OPERATOR_SCHEMA) wrote its indexes: keep it
# for that step only. Queries and indexes since version 6 use ``WAITING_WHERE``.
WAITING_SQL = "(" + ",".join(f"'{s.value}'" for s in WAITING) + ")"


def one_of(column: str, statuses: tuple[Status, ...]) -> str:
    """``column`` is one of ``statuses``, as equalities joined by OR.

    For partial-index predicates (and the queries that must repeat them, word for word,
    for SQLite to use those indexes): SQLite evaluates a constant IN list of three or
    more values through a temporary b-tree it builds for each statement run -- for a
    partial index, at every insert and every update of its rows. Measured: recording a
    delivered outcome's UPDATE took 59 us with six such indexes and 25 us with OR-ed
    equalities. (As a search condition SQLite still turns the ORs into an IN.)
    """
    return "(" + " OR ".join(f"{column} = '{s.value}'" for s in statuses) + ")"


#: Pending (due, or being delivered): the claim's and the queue listing's indexes.
PENDING = (Status.QUEUED, Status.DEFERRED, Status.IN_PROGRESS)
PENDING_WHERE = one_of("status", PENDING)
#: Waiting (pending or held): the operator tools' indexes.
WAITING_WHERE = one_of("status", WAITING)
R_WAITING_WHERE = one_of("r.status", WAITING)

# -- migration step: the operator tables and indexes (idempotent) ---------------------------

OPERATOR_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS suspensions (
    domain TEXT PRIMARY KEY,          -- a recipient domain, or '*' for every destination
    since REAL NOT NULL,
    until REAL,                       -- NULL: until resumed
    reason TEXT NOT NULL DEFAULT '',
    by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS operator_events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    by TEXT NOT NULL,
    action TEXT NOT NULL,
    selection TEXT NOT NULL,
    messages INTEGER NOT NULL,
    recipients INTEGER NOT NULL
);
-- Operator reads walk only waiting recipients (partial indexes), never the history, and
-- each index holds every column its reads need (status included), so they never
-- touch the table: `queue list`, newest first;
DROP INDEX IF EXISTS recipients_waiting;  -- earlier shapes of these, never released
DROP INDEX IF EXISTS recipients_waiting_age;
DROP INDEX IF EXISTS recipients_waiting_domain;
DROP INDEX IF EXISTS recipients_waiting_status;
DROP INDEX IF EXISTS recipients_waiting_by_status;
CREATE INDEX IF NOT EXISTS recipients_waiting_by_age ON recipients(
    arrival, message_id, domain, status) WHERE status IN {WAITING_SQL};
-- `queue list --domain` and the summary's domain x age table (range counts);
CREATE INDEX IF NOT EXISTS recipients_waiting_by_domain ON recipients(
    domain, arrival, message_id, status) WHERE status IN {WAITING_SQL};
-- the counts by status and the summary's table by last reply.
CREATE INDEX IF NOT EXISTS recipients_waiting_by_reply ON recipients(
    status, last_code, last_enhanced, domain, arrival) WHERE status IN {WAITING_SQL};
-- (`queue list --all` walks the messages' primary key: queue IDs sort by arrival time.)
"""


# -- selections ----------------------------------------------------------------------


def _where(sel: Selection, now: float) -> tuple[list[str], list[Any], bool]:
    """Conditions on ``r`` (recipients) and ``m`` (messages); True if ``m`` is needed."""
    where: list[str] = []
    args: list[Any] = []
    need_message = False
    if sel.waiting_only:
        where.append(R_WAITING_WHERE)
    if sel.status is Status.PARTIALLY_DELIVERED:
        where.append("m.status = ?")
        args.append(sel.status.value)
        need_message = True
    elif sel.status is not None:
        where.append("r.status = ?")
        args.append(sel.status.value)
    if sel.ids:
        where.append(f"r.message_id IN ({','.join('?' * len(sel.ids))})")
        args.extend(sel.ids)
    if sel.domain is not None:
        where.append("r.domain = ?")
        args.append(sel.domain.lower().rstrip("."))
    if sel.recipient is not None:
        where.append("r.address = ? COLLATE NOCASE")
        args.append(sel.recipient)
    if sel.sender is not None:
        where.append("m.sender = ? COLLATE NOCASE")
        args.append("" if sel.sender in ("<>", "") else sel.sender)
        need_message = True
    if sel.older_than is not None:
        where.append("r.arrival <= ?")
        args.append(now - sel.older_than)
    if sel.newer_than is not None:
        where.append("r.arrival >= ?")
        args.append(now - sel.newer_than)
    if sel.reply is not None:
        where.append("r.last_code IS NOT NULL")  # no reply, nothing to match
        where.append(
            "instr(lower(coalesce(r.last_code,'') || ' ' || coalesce(r.last_enhanced,'')"
            " || ' ' || coalesce(r.last_text,'')), ?) > 0"
        )
        args.append(sel.reply.lower())
    return where, args, need_message


def _from(sel: Selection, need_message: bool, *, whole: bool = False) -> str:
    """The FROM clause. ``whole``: every match is read (no early stop at a page), so a
    sender's messages are the cheaper start than the waiting recipients."""
    if whole and sel.sender is not None and sel.domain is None:
        return (
            "messages m INDEXED BY messages_sender"
            " CROSS JOIN recipients r INDEXED BY recipients_message ON r.message_id = m.id"
        )
    index = ""
    if whole and sel.waiting_only and sel.reply is not None and sel.domain is None:
        # Only recipients with a reply can match: the index has them apart.
        index = " INDEXED BY recipients_waiting_by_reply"
    elif sel.waiting_only:
        name = "domain" if sel.domain is not None else "age"
        index = f" INDEXED BY recipients_waiting_by_{name}"
    join = " JOIN messages m ON m.id = r.message_id" if need_message else ""
    return f"recipients r{index}{join}"


def selected_recipients(
    conn: sqlite3.Connection, sel: Selection, now: float, statuses: tuple[Status, ...] = ()
) -> list[tuple[int, str]]:
    """(recipient id, message id) of every recipient the selection names."""
    where, args, need_message = _where(sel, now)
    if statuses:
        where.append(f"r.status IN ({','.join('?' * len(statuses))})")
        args.extend(s.value for s in statuses)
    sql = f"SELECT r.id, r.message_id FROM {_from(sel, need_message, whole=True)}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [(int(a), str(b)) for a, b in conn.execute(sql, args)]


def list_page(
    conn: sqlite3.Connection, sel: Selection, *, now: float, limit: int, after: str | None
) -> Page:
    """Messages with a selected recipient, newest first, ``limit`` per page."""
    where, args, need_message = _where(sel, now)
    everything = not sel.waiting_only and not where
    if after and not everything:
        row = conn.execute("SELECT arrival FROM messages WHERE id=?", (after,)).fetchone()
        if row is not None:
            # Keyset pagination: continue below the last line shown (no OFFSET scan).
            where.append("(r.arrival, r.message_id) < (?, ?)")
            args += [row[0], after]
    if not everything:
        sql = f"SELECT DISTINCT r.arrival, r.message_id FROM {_from(sel, need_message)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.arrival DESC, r.message_id DESC LIMIT ?"
    else:
        # Everything, history included: queue IDs start with their arrival time in ms,
        # so the primary key is the arrival order (no index of our own to maintain).
        sql = "SELECT NULL, id FROM messages"
        if after:
            sql += " WHERE id < ?"
            args.append(after)
        sql += " ORDER BY id DESC LIMIT ?"
    ids = [row[1] for row in conn.execute(sql, (*args, limit + 1))]
    more = len(ids) > limit
    ids = ids[:limit]
    if not ids:
        return Page((), None)
    marks = ",".join("?" * len(ids))
    messages = {
        r[0]: r
        for r in conn.execute(
            "SELECT id, arrival, size, sender, status, expires FROM messages"
            f" WHERE id IN ({marks})",
            ids,
        )
    }
    recipients: dict[str, list[ListedRecipient]] = {i: [] for i in ids}
    for r in conn.execute(
        "SELECT message_id, address, status, attempts, next_attempt, last_code, last_enhanced,"
        f" last_text FROM recipients WHERE message_id IN ({marks}) ORDER BY id",
        ids,
    ):
        recipients[r[0]].append(ListedRecipient(r[1], Status(r[2]), r[3], r[4], r[5], r[6], r[7]))
    out = tuple(
        ListedMessage(m[0], m[1], m[2], m[3], Status(m[4]), tuple(recipients[m[0]]), m[5])
        for m in (messages[i] for i in ids if i in messages)
    )
    return Page(out, ids[-1] if more else None)


def counts(conn: sqlite3.Connection) -> Counts:
    """Waiting, held and deferred recipients (counted on the partial index)."""
    rows = dict(
        conn.execute(
            "SELECT status, COUNT(*) FROM recipients INDEXED BY recipients_waiting_by_reply"
            f" WHERE {WAITING_WHERE} GROUP BY status"
        ).fetchall()
    )
    return Counts(
        waiting_recipients=sum(rows.values()),
        held_recipients=rows.get("Held", 0),
        deferred_recipients=rows.get("Deferred", 0),
    )


def summary(conn: sqlite3.Connection, sel: Selection, *, now: float) -> Summary:
    """qshape's table: waiting recipients per domain and age bucket; and per last reply."""
    if _countable(sel):
        return _summary_by_counts(conn, sel, now)
    where, args, need_message = _where(sel, now)
    if not sel.waiting_only:
        where.append(R_WAITING_WHERE)  # a shape of the waiting queue only
    cases = " ".join(
        f"WHEN r.arrival > {now - minutes * 60!r} THEN {i}" for i, minutes in enumerate(AGE_BUCKETS)
    )
    bucket = f"CASE {cases} ELSE {len(AGE_BUCKETS)} END"
    cond = " WHERE " + " AND ".join(where)
    # The waiting recipients' index (or the sender's messages).
    src = _from(
        Selection(domain=sel.domain, sender=sel.sender, reply=sel.reply), need_message, whole=True
    )
    by_domain: dict[str, list[int]] = {}
    by_reply: dict[tuple[int | None, str | None], int] = {}
    # One pass: both tables from the same groups.
    for domain, b, code, enhanced, n in conn.execute(
        f"SELECT r.domain, {bucket} AS b, r.last_code, r.last_enhanced, COUNT(*)"
        f" FROM {src}{cond} GROUP BY r.domain, b, r.last_code, r.last_enhanced",
        args,
    ):
        by_domain.setdefault(domain, [0] * (len(AGE_BUCKETS) + 1))[b] += n
        by_reply[(code, enhanced)] = by_reply.get((code, enhanced), 0) + n
    return Summary(now, by_domain, by_reply)


def _countable(sel: Selection) -> bool:
    """Can the summary be counted on the indexes alone (filters on their columns only)?"""
    return (
        sel.waiting_only
        and sel.sender is None
        and sel.recipient is None
        and sel.reply is None
        and not sel.ids
        and (sel.status is None or sel.status in WAITING)
    )


def _summary_by_counts(conn: sqlite3.Connection, sel: Selection, now: float) -> Summary:
    """The summary from index range counts: no per-row work, no sorting, no table reads.

    Per domain, the recipients younger than each bucket's limit are counted on the
    (domain, arrival) index; a count touches only the entries it counts, so the whole
    table costs a few passes over the waiting recipients' index entries at most.
    """
    where, args, _need_message = _where(sel, now)  # columns of both indexes only
    cond = " AND ".join(where)
    totals = conn.execute(
        "SELECT domain, COUNT(*) FROM recipients r INDEXED BY recipients_waiting_by_domain"
        f" WHERE {cond} GROUP BY domain",
        args,
    ).fetchall()
    by_domain: dict[str, list[int]] = {}
    for name, total in totals:
        younger = [
            conn.execute(
                "SELECT COUNT(*) FROM recipients r INDEXED BY recipients_waiting_by_domain"
                f" WHERE {cond} AND r.domain = ? AND r.arrival > ?",
                (*args, name, now - minutes * 60),
            ).fetchone()[0]
            for minutes in AGE_BUCKETS
        ]
        cumulative = [*younger, total]
        by_domain[name] = [b - a for a, b in zip([0, *cumulative], cumulative, strict=False)]
    by_reply: dict[tuple[int | None, str | None], int] = {}
    # Grouped in the index's order (status first): streamed, then merged across statuses.
    for _status, code, enhanced, n in conn.execute(
        "SELECT status, last_code, last_enhanced, COUNT(*) FROM recipients r"
        f" INDEXED BY recipients_waiting_by_reply WHERE {cond}"
        " GROUP BY status, last_code, last_enhanced",
        args,
    ):
        by_reply[(code, enhanced)] = by_reply.get((code, enhanced), 0) + n
    return Summary(now, by_domain, by_reply)


# -- changes (writer thread) ---------------------------------------------------------


def set_held(conn: sqlite3.Connection, ids: list[int], held: bool, now: float) -> int:
    """Hold Queued/Deferred recipients, or release Held ones (to Queued or Deferred)."""
    n = 0
    for part in _chunks(ids):
        marks = ",".join("?" * len(part))
        if held:
            n += conn.execute(
                "UPDATE recipients SET status='Held' WHERE status IN ('Queued','Deferred')"
                f" AND id IN ({marks})",
                part,
            ).rowcount
        else:
            # Released mail is due at once (it may have waited long past its retry).
            n += conn.execute(
                "UPDATE recipients SET status=CASE WHEN attempts>0 THEN 'Deferred'"
                " ELSE 'Queued' END, next_attempt=MIN(coalesce(next_attempt, ?), ?)"
                f" WHERE status='Held' AND id IN ({marks})",
                (now, now, *part),
            ).rowcount
    return n


def make_due(conn: sqlite3.Connection, ids: list[int], now: float) -> int:
    n = 0
    for part in _chunks(ids):
        n += conn.execute(
            "UPDATE recipients SET next_attempt=? WHERE status IN ('Queued','Deferred')"
            f" AND id IN ({','.join('?' * len(part))})",
            (now, *part),
        ).rowcount
    return n


def cancel(conn: sqlite3.Connection, ids: list[int]) -> list[int]:
    """Cancel waiting recipients; returns the ids really cancelled."""
    done: list[int] = []
    for part in _chunks(ids):
        marks = ",".join("?" * len(part))
        done += [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM recipients WHERE status IN {WAITING_SQL} AND id IN ({marks})",
                part,
            )
        ]
        conn.execute(
            "UPDATE recipients SET status='Cancelled', next_attempt=NULL, lease_owner=NULL,"
            f" lease_until=NULL WHERE status IN {WAITING_SQL} AND id IN ({marks})",
            part,
        )
    return done


def remove_messages(conn: sqlite3.Connection, message_ids: list[str]) -> int:
    n = 0
    for part in _chunks(message_ids):
        n += conn.execute(
            f"DELETE FROM messages WHERE id IN ({','.join('?' * len(part))})", part
        ).rowcount
    return n


def log_operator_event(
    conn: sqlite3.Connection,
    *,
    now: float,
    by: str,
    action: str,
    selection: str,
    messages: int,
    recipients: int,
) -> int:
    """Keep the action in the queue (same transaction); `ferry serve` logs it."""
    cur = conn.execute(
        "INSERT INTO operator_events(at, by, action, selection, messages, recipients)"
        " VALUES (?,?,?,?,?,?)",
        (now, by, action, selection, messages, recipients),
    )
    return int(cur.lastrowid or 0)


def operator_events_after(conn: sqlite3.Connection, after: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT id, at, by, action, selection, messages, recipients FROM operator_events"
        " WHERE id > ? ORDER BY id LIMIT 1000",
        (after,),
    ).fetchall()
    keys = ("id", "at", "by", "action", "selection", "messages", "recipients")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def last_operator_event(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(MAX(id), 0) FROM operator_events").fetchone()[0])


# -- suspensions ---------------------------------------------------------------------


def suspend(
    conn: sqlite3.Connection, domain: str, *, now: float, until: float | None, reason: str, by: str
) -> None:
    conn.execute(
        "INSERT INTO suspensions(domain, since, until, reason, by) VALUES (?,?,?,?,?)"
        " ON CONFLICT(domain) DO UPDATE SET since=excluded.since, until=excluded.until,"
        " reason=excluded.reason, by=excluded.by",
        (normal_domain(domain), now, until, reason, by),
    )


def resume(conn: sqlite3.Connection, domain: str, by: str | None = None) -> bool:
    """Lift a suspension (only one set by ``by`` when given)."""
    sql, args = "DELETE FROM suspensions WHERE domain=?", [normal_domain(domain)]
    if by is not None:
        sql += " AND by=?"
        args.append(by)
    return conn.execute(sql, args).rowcount > 0


def suspensions(conn: sqlite3.Connection, now: float) -> list[Suspension]:
    """Suspensions in force (expired ones are left out, and deleted by the next write)."""
    rows = conn.execute(
        "SELECT domain, since, until, reason, by FROM suspensions"
        " WHERE until IS NULL OR until > ? ORDER BY domain",
        (now,),
    ).fetchall()
    return [Suspension(*r) for r in rows]


def _chunks(ids: list[Any], size: int = 500) -> list[list[Any]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def tried_json(tried: tuple[str, ...] | list[str]) -> str | None:
    return json.dumps(list(tried)) if tried else None
