"""The PostgreSQL queue's operator side (as ``sqlite_ops`` for SQLite): selections,
listing pages, counts, bulk changes, suspensions and the operator event log.

A mixin of ``PostgresQueue``: every method runs in one transaction on a pooled
connection (``_tx`` for changes, ``_read`` for one read-only snapshot). The selection
rules are ``ferry.queue.selection``'s, written in PostgreSQL's SQL.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from ferry.envelope import Status
from ferry.queue.selection import (
    AGE_BUCKETS,
    WAITING,
    BulkAction,
    BulkResult,
    Counts,
    ListedMessage,
    ListedRecipient,
    Page,
    Selection,
    Summary,
    Suspension,
    normal_domain,
)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
WAITING_SQL = "(" + ",".join(f"'{s.value}'" for s in WAITING) + ")"


def _where(sel: Selection, now: float) -> tuple[list[str], list[Any], bool]:
    """Conditions on ``r`` (recipients) and ``m`` (messages); True if ``m`` is needed."""
    where: list[str] = []
    args: list[Any] = []
    need_message = False
    if sel.waiting_only:
        where.append(f"r.status IN {WAITING_SQL}")
    if sel.status is Status.PARTIALLY_DELIVERED:
        where.append("m.status = %s")
        args.append(sel.status.value)
        need_message = True
    elif sel.status is not None:
        where.append("r.status = %s")
        args.append(sel.status.value)
    if sel.ids:
        where.append("r.message_id = ANY(%s)")
        args.append(list(sel.ids))
    if sel.domain is not None:
        where.append("r.domain = %s")
        args.append(sel.domain.lower().rstrip("."))
    if sel.recipient is not None:
        where.append("lower(r.address) = lower(%s)")
        args.append(sel.recipient)
    if sel.sender is not None:
        where.append("lower(m.sender) = lower(%s)")
        args.append("" if sel.sender in ("<>", "") else sel.sender)
        need_message = True
    if sel.older_than is not None:
        where.append("r.arrival <= %s")
        args.append(now - sel.older_than)
    if sel.newer_than is not None:
        where.append("r.arrival >= %s")
        args.append(now - sel.newer_than)
    if sel.reply is not None:
        where.append("r.last_code IS NOT NULL")  # no reply, nothing to match
        where.append(
            "strpos(lower(coalesce(r.last_code::text, '') || ' ' || coalesce(r.last_enhanced, '')"
            " || ' ' || coalesce(r.last_text, '')), %s) > 0"
        )
        args.append(sel.reply.lower())
    return where, args, need_message


def _from(need_message: bool) -> str:
    join = " JOIN messages m ON m.id = r.message_id" if need_message else ""
    return f"recipients r{join}"


class PostgresOperatorMethods:
    """``PostgresQueue``'s operator side."""

    _tx: Callable[..., Awaitable[Any]]
    _read: Callable[..., Awaitable[Any]]
    # The one derivation of a message's status from its recipients (postgres.py).
    _refresh_status: Callable[[Conn, list[str], float], Awaitable[None]]
    _cancel_dsns: Callable[..., Awaitable[int]]

    async def list_page(
        self, sel: Selection, *, now: float, limit: int = 100, after: str | None = None
    ) -> Page:
        """Messages with a selected recipient, newest first; ``after`` = the last id shown."""

        async def job(conn: Conn) -> Page:
            where, args, need_message = _where(sel, now)
            everything = not sel.waiting_only and not where
            if not everything:
                if after:
                    cur = await conn.execute("SELECT arrival FROM messages WHERE id = %s", (after,))
                    row = await cur.fetchone()
                    if row is not None:
                        # Keyset pagination: continue below the last line shown.
                        where.append("(r.arrival, r.message_id) < (%s, %s)")
                        args.extend([row[0], after])
                sql = f"SELECT DISTINCT r.arrival, r.message_id FROM {_from(need_message)}"
                if where:
                    sql += " WHERE " + " AND ".join(where)
                sql += " ORDER BY r.arrival DESC, r.message_id DESC LIMIT %s"
            else:
                # Queue IDs start with their arrival time: the primary key is the order.
                sql = "SELECT NULL, id FROM messages"
                if after:
                    sql += " WHERE id < %s"
                    args.append(after)
                sql += " ORDER BY id DESC LIMIT %s"
            cur = await conn.execute(sql.encode(), (*args, limit + 1))
            ids = [row[1] for row in await cur.fetchall()]
            more = len(ids) > limit
            ids = ids[:limit]
            if not ids:
                return Page((), None)
            cur = await conn.execute(
                "SELECT id, arrival, size, sender, status, expires FROM messages"
                " WHERE id = ANY(%s)",
                (ids,),
            )
            messages = {r[0]: r for r in await cur.fetchall()}
            recipients: dict[str, list[ListedRecipient]] = {i: [] for i in ids}
            cur = await conn.execute(
                "SELECT message_id, address, status, attempts, next_attempt, last_code,"
                " last_enhanced, last_text FROM recipients WHERE message_id = ANY(%s)"
                " ORDER BY id",
                (ids,),
            )
            for r in await cur.fetchall():
                recipients[r[0]].append(
                    ListedRecipient(r[1], Status(r[2]), r[3], r[4], r[5], r[6], r[7])
                )
            out = tuple(
                ListedMessage(
                    m[0], m[1], int(m[2]), m[3], Status(m[4]), tuple(recipients[m[0]]), m[5]
                )
                for m in (messages[i] for i in ids if i in messages)
            )
            return Page(out, ids[-1] if more else None)

        result: Page = await self._read(job)
        return result

    async def counts(self) -> Counts:
        async def job(conn: Conn) -> Counts:
            cur = await conn.execute(
                f"SELECT status, COUNT(*) FROM recipients WHERE status IN {WAITING_SQL}"
                " GROUP BY status"
            )
            rows = {s: int(n) for s, n in await cur.fetchall()}
            return Counts(
                waiting_recipients=sum(rows.values()),
                held_recipients=rows.get("Held", 0),
                deferred_recipients=rows.get("Deferred", 0),
            )

        result: Counts = await self._read(job)
        return result

    async def summary(self, sel: Selection, *, now: float) -> Summary:
        """qshape's table: waiting recipients per domain and age bucket; per last reply."""

        async def job(conn: Conn) -> Summary:
            where, args, need_message = _where(sel, now)
            if not sel.waiting_only:
                where.append(f"r.status IN {WAITING_SQL}")  # a shape of the waiting queue
            cases = " ".join(
                f"WHEN r.arrival > {now - minutes * 60!r} THEN {i}"
                for i, minutes in enumerate(AGE_BUCKETS)
            )
            bucket = f"CASE {cases} ELSE {len(AGE_BUCKETS)} END"
            cur = await conn.execute(
                (
                    f"SELECT r.domain, {bucket} AS b, r.last_code, r.last_enhanced, COUNT(*)"
                    f" FROM {_from(need_message)} WHERE {' AND '.join(where)}"
                    " GROUP BY r.domain, b, r.last_code, r.last_enhanced"
                ).encode(),
                args,
            )
            by_domain: dict[str, list[int]] = {}
            by_reply: dict[tuple[int | None, str | None], int] = {}
            for domain, b, code, enhanced, n in await cur.fetchall():
                by_domain.setdefault(domain, [0] * (len(AGE_BUCKETS) + 1))[b] += int(n)
                by_reply[(code, enhanced)] = by_reply.get((code, enhanced), 0) + int(n)
            return Summary(now, by_domain, by_reply)

        result: Summary = await self._read(job)
        return result

    async def count_selected(self, sel: Selection, *, now: float) -> tuple[int, int]:
        """(messages, recipients) the selection names (for a confirmation prompt)."""

        async def job(conn: Conn) -> tuple[int, int]:
            pairs = await _selected(conn, sel, now)
            return len({m for _r, m in pairs}), len(pairs)

        result: tuple[int, int] = await self._read(job)
        return result

    async def bulk(
        self,
        action: BulkAction,
        sel: Selection,
        *,
        now: float,
        by: str,
        make_dsn: Callable[..., Any] | None = None,
        dsn_lifetime: float = 4 * 86400,
    ) -> BulkResult:
        """Apply ``action`` to the selected recipients in one transaction, with its
        operator event (and, for ``cancel`` with ``make_dsn``, the DSNs to the senders:
        ``make_dsn`` gets each message with its just-cancelled recipients)."""
        statuses = {
            "retry": (Status.QUEUED, Status.DEFERRED),
            "hold": (Status.QUEUED, Status.DEFERRED),
            "release": (Status.HELD,),
            "cancel": WAITING,
            "remove": (),
        }[action]

        async def job(conn: Conn) -> BulkResult:
            pairs = await _selected(conn, sel, now, statuses)
            ids = [r for r, _m in pairs]
            message_ids = sorted({m for _r, m in pairs})
            dsns = 0
            if action == "remove":
                touched = len(ids)
                await conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (message_ids,))
            else:
                if action == "retry":
                    sql = (
                        "UPDATE recipients SET next_attempt = %s WHERE id = ANY(%s)"
                        " AND status IN ('Queued', 'Deferred')"
                    )
                elif action == "hold":
                    sql = (
                        "UPDATE recipients SET status = 'Held' WHERE id = ANY(%s)"
                        " AND status IN ('Queued', 'Deferred')"
                    )
                elif action == "release":
                    # Released mail is due at once (it may have waited past its retry).
                    sql = (
                        "UPDATE recipients SET status = CASE WHEN attempts > 0 THEN"
                        " 'Deferred' ELSE 'Queued' END,"
                        " next_attempt = LEAST(coalesce(next_attempt, %s), %s)"
                        " WHERE id = ANY(%s) AND status = 'Held'"
                    )
                else:
                    # RETURNING: the DSNs report exactly the recipients cancelled here.
                    sql = (
                        "UPDATE recipients SET status = 'Cancelled', next_attempt = NULL,"
                        " lease_owner = NULL, lease_until = NULL"
                        f" WHERE id = ANY(%s) AND status IN {WAITING_SQL} RETURNING id"
                    )
                args: tuple[Any, ...] = (
                    (now, ids)
                    if action == "retry"
                    else (now, now, ids)
                    if action == "release"
                    else (ids,)
                )
                cur = await conn.execute(sql.encode(), args)
                touched = cur.rowcount
                if action == "cancel" and make_dsn is not None and touched:
                    done = {int(r[0]) for r in await cur.fetchall()}
                    dsns = await self._cancel_dsns(
                        conn, message_ids, done, make_dsn, now, dsn_lifetime
                    )
                await self._refresh_status(conn, message_ids, now)
            logged = action + (" with DSN" if make_dsn is not None else "")
            await _log(conn, now, by, logged, sel.describe(), len(message_ids), touched)
            return BulkResult(action, len(message_ids), touched, dsns)

        result: BulkResult = await self._tx(job)
        return result

    async def suspend(
        self, domain: str, *, now: float, until: float | None, reason: str, by: str
    ) -> None:
        """Pause delivery to ``domain`` (``*``: every destination) until ``until``."""

        async def job(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO suspensions(domain, since, until, reason, by)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (domain) DO UPDATE SET"
                " since = excluded.since, until = excluded.until, reason = excluded.reason,"
                " by = excluded.by",
                (normal_domain(domain), now, until, reason, by),
            )
            end = "resumed"
            if until is not None:
                end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
            await _log(conn, now, by, "suspend", f"{domain} until {end} {reason}".strip(), 0, 0)

        await self._tx(job)

    async def resume(
        self, domain: str, *, by: str | None = None, logged_by: str | None = None
    ) -> bool:
        """Lift ``domain``'s suspension (only one set by ``by`` when given);
        ``logged_by`` records the act as an operator event."""

        async def job(conn: Conn) -> bool:
            cur = await conn.execute(
                "DELETE FROM suspensions WHERE domain = %s AND (%s::text IS NULL OR by = %s)",
                (normal_domain(domain), by, by),
            )
            lifted = cur.rowcount > 0
            if logged_by is not None:
                what = domain if lifted else f"{domain} (was not suspended)"
                await _log(conn, time.time(), logged_by, "resume", what, 0, 0)
            return lifted

        result: bool = await self._tx(job)
        return result

    async def suspensions(self, *, now: float) -> list[Suspension]:
        async def job(conn: Conn) -> list[Suspension]:
            cur = await conn.execute(
                "SELECT domain, since, until, reason, by FROM suspensions"
                " WHERE until IS NULL OR until > %s ORDER BY domain",
                (now,),
            )
            return [Suspension(*r) for r in await cur.fetchall()]

        result: list[Suspension] = await self._read(job)
        return result

    async def operator_events(self, after: int) -> list[dict[str, Any]]:
        """Operator actions recorded after event ``after`` (``ferry serve`` logs them)."""

        async def job(conn: Conn) -> list[dict[str, Any]]:
            cur = await conn.execute(
                "SELECT id, at, by, action, selection, messages, recipients"
                " FROM operator_events WHERE id > %s ORDER BY id LIMIT 1000",
                (after,),
            )
            keys = ("id", "at", "by", "action", "selection", "messages", "recipients")
            return [dict(zip(keys, r, strict=True)) for r in await cur.fetchall()]

        result: list[dict[str, Any]] = await self._read(job)
        return result

    async def last_operator_event(self) -> int:
        async def job(conn: Conn) -> int:
            cur = await conn.execute("SELECT coalesce(MAX(id), 0) FROM operator_events")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        result: int = await self._read(job)
        return result


async def _selected(
    conn: Conn, sel: Selection, now: float, statuses: tuple[Status, ...] = ()
) -> list[tuple[int, str]]:
    """(recipient id, message id) of every recipient the selection names."""
    where, args, need_message = _where(sel, now)
    if statuses:
        where.append("r.status = ANY(%s)")
        args.append([s.value for s in statuses])
    sql = f"SELECT r.id, r.message_id FROM {_from(need_message)}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    cur = await conn.execute(sql.encode(), args)
    return [(int(a), str(b)) for a, b in await cur.fetchall()]


async def _log(
    conn: Conn, now: float, by: str, action: str, selection: str, messages: int, recipients: int
) -> None:
    """Keep the action in the queue (same transaction); `ferry serve` logs it."""
    await conn.execute(
        "INSERT INTO operator_events(at, by, action, selection, messages, recipients)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (now, by, action, selection, messages, recipients),
    )
