"""``ferry queue ...``: look at and act on the queue, like mailq, postsuper, qshape, postcat.

Everything here parses options and prints; the acts themselves are in
``ferry.operations`` (the HTTP API calls the same functions). Listings print one plain
line per message, never truncated or wrapped (pipe them to grep, awk, less -S).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ferry.cli.main import _load, _print_json, _ts, _with_queue
from ferry.envelope import Status
from ferry.operations import gives_up, listed_json, message_json
from ferry.operations import reply_text as _reply_text
from ferry.queue.base import QueueStats
from ferry.queue.selection import (
    AGE_BUCKETS,
    ALL_DESTINATIONS,
    BulkAction,
    ListedMessage,
    Page,
    Selection,
    Summary,
)

F = TypeVar("F", bound=Callable[..., Any])


@click.group("queue")
def queue_group() -> None:
    """Inspect and manage the queue (works while `ferry serve` runs).

    \b
    list / summary / show      what is waiting, its shape, one message
    retry / hold / release     act on many messages with the same filters as list
    cancel / remove
    suspend / resume           pause delivery to a domain (or '*': everything)
    suspended                  what is paused
    """


# -- shared options ------------------------------------------------------------------


def selection_options(fn: F) -> F:
    """The filters every listing and bulk action accepts."""
    options = [
        click.option(
            "--status",
            help="Recipient state: queued, deferred, inprogress, held; or with --all "
            "delivered, failed, expired, cancelled (partiallydelivered: the message's).",
        ),
        click.option("--domain", help="Recipients at this domain."),
        click.option("--sender", help="This envelope sender ('<>' for bounces)."),
        click.option("--recipient", help="This recipient address."),
        click.option("--older-than", help="Arrived at least this long ago (30m, 2h, 4d)."),
        click.option("--newer-than", help="Arrived at most this long ago."),
        click.option("--reply", help="Text in the last reply (e.g. 'greylist', '4.7.1')."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _selection(opts: dict[str, Any], ids: tuple[str, ...] = (), everything: bool = False) -> Any:
    from ferry.operations import selection

    try:
        return selection(
            status=opts.get("status"),
            domain=opts.get("domain"),
            sender=opts.get("sender"),
            recipient=opts.get("recipient"),
            older_than=opts.get("older_than"),
            newer_than=opts.get("newer_than"),
            reply=opts.get("reply"),
            ids=ids,
            everything=everything,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _age(seconds: float) -> str:
    """3s, 12m, 5h07m, 4d03h: short and sortable by eye."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _where(config: Any) -> str:
    """The queue named in a listing's header: the SQLite file or the PostgreSQL database."""
    from ferry.cli.common import queue_location

    if config.queue.backend == "postgres":
        return queue_location(config)
    return str(config.data_dir.resolve() / "queue.db")


def _read_with_header(ctx: click.Context, now: float, fn: Callable[[Any], Any]) -> tuple[Any, str]:
    """``fn(queue)``'s result and the listing's header line, from one opening of the queue."""
    from ferry.cli.stats import delivery_state

    config = _load(ctx)

    async def read(q: Any) -> tuple[Any, Any, Any]:
        return await fn(q), await q.counts(), await q.suspensions(now=now)

    result, counts, suspended = _with_queue(ctx, read, readonly=True)
    return result, (
        f"queue {_where(config)}: {counts.waiting_recipients} recipients"
        f" waiting ({counts.deferred_recipients} deferred, {counts.held_recipients} held);"
        f" delivery: {delivery_state(suspended)}"
    )


# -- list ----------------------------------------------------------------------------


def listed_line(m: ListedMessage, now: float, policy: Any = None) -> str:
    """One message, one line: ID STATUS AGE SIZE SENDER -> RECIPIENTS next=... reply."""
    waiting = [r for r in m.recipients if not r.status.is_final] or list(m.recipients)
    shown = ", ".join(r.address for r in waiting[:3])
    if len(waiting) > 3:
        shown += f" +{len(waiting) - 3}"
    nexts = [r.next_attempt for r in waiting if r.next_attempt and r.status is not Status.HELD]
    if any(r.status is Status.HELD for r in waiting):
        nxt = "held"
    elif nexts:
        due = min(nexts) - now
        nxt = "now" if due <= 0 else f"in {_age(due)}"
    else:
        nxt = "-"
    replied = [r for r in waiting if r.last_code is not None]
    reply = ""
    if replied:
        r = replied[0]
        reply = " " + (_reply_text(r.last_code, r.last_enhanced, r.last_text) or "")
    until = gives_up(m, policy) if policy is not None else None
    gives = f"  gives up in {_age(until - now)}" if until is not None else ""
    return (
        f"{m.id}  {m.status.value:<12} {_age(now - m.arrival):>7} {m.size:>8}"
        f"  {m.sender or '<>'} -> {shown}  next={nxt}{gives}{reply}"
    )


@queue_group.command("list")
@selection_options
@click.option("--all", "everything", is_flag=True, help="Include delivered and failed mail.")
@click.option("--limit", default=100, show_default=True, help="Messages per page.")
@click.option("--after", metavar="ID", help="Continue after this queue ID (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_list(
    ctx: click.Context, everything: bool, limit: int, after: str | None, as_json: bool, **opts: Any
) -> None:
    """List waiting mail, newest first, one line per message (like mailq).

    \b
    Columns: queue ID, status, age, size, sender -> waiting recipients,
    next attempt, last reply. `--all` adds delivered, failed and cancelled mail.
    """
    sel: Selection = _selection(opts, everything=everything)
    now = time.time()
    page: Page
    page, header = _read_with_header(
        ctx, now, lambda q: q.list_page(sel, now=now, limit=limit, after=after)
    )
    from ferry.delivery.retry import policy_for

    config = _load(ctx)
    policy = policy_for(config)
    if as_json:
        _print_json(
            {
                "queue": str(config.data_dir.resolve()),
                "messages": [listed_json(m, now, policy) for m in page.messages],
                "next_page_after": page.after,
            }
        )
        return
    click.echo(header)
    for m in page.messages:
        click.echo(listed_line(m, now, policy))
    if not page.messages:
        click.echo("(no messages)")
    elif page.after:
        click.echo(f"(more: ferry queue list --after {page.after})")


# -- summary -------------------------------------------------------------------------


def reply_class(code: int | None, enhanced: str | None) -> str:
    """A last reply's class for the summary: "421 4.4.1"; "never tried" without one."""
    if code is None:
        return "(no reply yet)"
    from ferry.delivery.outcomes import enhanced_from_reply
    from ferry.envelope import Reply

    return f"{code} {enhanced or enhanced_from_reply(Reply(code, None, ''))}"


def summary_json(s: Summary) -> dict[str, Any]:
    labels = [f"<{m}m" for m in AGE_BUCKETS] + [f">={AGE_BUCKETS[-1]}m"]
    classes: dict[str, int] = {}
    for (code, enhanced), n in s.by_reply.items():
        key = reply_class(code, enhanced)
        classes[key] = classes.get(key, 0) + n
    return {
        "age_buckets": labels,
        "by_domain": {
            d: {"total": sum(row), "by_age": row}
            for d, row in sorted(s.by_domain.items(), key=lambda kv: -sum(kv[1]))
        },
        "by_reply": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
    }


@queue_group.command("summary")
@selection_options
@click.option("--top", default=20, show_default=True, help="Domains shown (the biggest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_summary(ctx: click.Context, top: int, as_json: bool, **opts: Any) -> None:
    """Waiting recipients per destination and age in minutes, and per last reply (qshape)."""
    sel: Selection = _selection(opts)
    now = time.time()
    s: Summary
    s, header = _read_with_header(ctx, now, lambda q: q.summary(sel, now=now))
    data = summary_json(s)
    if as_json:
        _print_json(data)
        return
    click.echo(header)
    heads = ["T"] + [str(m) for m in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}+"]
    rows = list(data["by_domain"].items())
    totals = [0] * (len(AGE_BUCKETS) + 1)
    for _d, v in rows:
        totals = [a + b for a, b in zip(totals, v["by_age"], strict=True)]
    width = max([len("TOTAL"), *(len(d) for d, _v in rows[:top])])
    click.echo(" " * width + "".join(f"{h:>7}" for h in heads))

    def line(name: str, row: list[int]) -> str:
        return f"{name:>{width}}{sum(row):>7}" + "".join(f"{n:>7}" for n in row)

    click.echo(line("TOTAL", totals))
    for d, v in rows[:top]:
        click.echo(line(d, v["by_age"]))
    if len(rows) > top:
        click.echo(f"({len(rows) - top} more domains: --top {len(rows)})")
    if data["by_reply"]:
        click.echo("\nby last reply:")
        for label, n in data["by_reply"].items():
            click.echo(f"{n:>9}  {label}")


# -- show ----------------------------------------------------------------------------


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block with its blank line, body) of a stored message."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[: i + len(sep)], data[i + len(sep) :]
    return data, b""


@queue_group.command("show")
@click.argument("message_id")
@click.option("--body", is_flag=True, help="Print the stored message's header (like postcat).")
@click.option("--full", is_flag=True, help="With --body: the whole message, body included.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_show(ctx: click.Context, message_id: str, body: bool, full: bool, as_json: bool) -> None:
    """Show one message: envelope, recipients and every attempt with every host tried."""
    if body or full:
        data = _with_queue(ctx, lambda q: q.read_message(message_id), readonly=True)
        if data is None:
            raise click.ClickException(f"no stored message {message_id}")
        out = data if full else split_message(data)[0]
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        return
    from ferry.delivery.retry import fill_give_up, policy_for

    m = _with_queue(ctx, lambda q: q.get(message_id), readonly=True)
    if m is None:
        raise click.ClickException(f"no message {message_id}")
    fill_give_up(policy_for(_load(ctx)), m)
    data_ = message_json(m, history=True)
    if as_json:
        from ferry.cli.common import queue_location

        _print_json({"queue": queue_location(_load(ctx)), **data_})
        return
    for key in (
        "id",
        "status",
        "sender",
        "size",
        "priority",
        "arrival",
        "expires",
        "client_address",
        "client_helo",
        "auth_user",
        "envid",
        "ret",
        "smtputf8",
    ):
        click.echo(f"{key:>15}: {data_[key] if data_[key] not in (None, '') else '-'}")
    for r in data_["recipients"]:
        click.echo(
            f"\n  {r['address']}  [{r['status']}]  attempts={r['attempts']}"
            f"  next={r['next_attempt'] or '-'}  route={r['route'] or '-'}"
        )
        if r["original_recipient"]:
            click.echo(f"    original recipient: {r['original_recipient']}")
        if r["last_reply"]:
            click.echo(f"    last reply: {r['last_reply']}")
        for n, a in enumerate(r["history"], 1):
            click.echo(
                f"    attempt {n}  {a['at']}  {a['outcome']:<10} {a['next_hop'] or '-'}"
                f"  tls={a['tls'] or 'none'}  {a['reply'] or ''}"
            )
            for host in a["hosts_tried"]:
                click.echo(f"      tried first: {host}")


# -- stats ---------------------------------------------------------------------------


def stats_json(st: QueueStats) -> dict[str, Any]:
    out = st.as_dict()
    for key in ("oldest_message_time", "oldest_pending_recipient_time"):
        out[key] = _ts(out[key]) if out[key] else None
    return out


@queue_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_stats(ctx: click.Context, as_json: bool) -> None:
    """Queue counts and ages, and delivery counters per smart host."""
    from rich.console import Console
    from rich.table import Table

    from ferry.cli.common import queue_header, queue_location
    from ferry.cli.stats import smart_host_table
    from ferry.stats import relay_stats

    st = _with_queue(ctx, lambda q: q.statistics(now=time.time()), readonly=True)
    data = stats_json(st)
    config = _load(ctx)
    relay = relay_stats(config)
    if as_json:
        _print_json({"queue": queue_location(config), **data, "smart_hosts": relay["smart_hosts"]})
        return
    queue_header(config)
    console = Console()
    smart_host_table(console, relay["smart_hosts"])
    table = Table("statistic", "value")
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    console.print(table)


# -- bulk actions --------------------------------------------------------------------

_ACTIONS: dict[str, str] = {
    "retry": "Make the selected waiting recipients due now.",
    "hold": "Put the selected messages on hold: not delivered until released (postsuper -h).",
    "release": "Release held messages: due now (postsuper -H).",
    "cancel": "Cancel delivery to the selected recipients (kept as Cancelled; --dsn tells "
    "the sender).",
    "remove": "Delete the selected messages and their history (postsuper -d).",
}


def _bulk_command(action: BulkAction) -> click.Command:
    @click.argument("ids", nargs=-1, metavar="[ID]...")
    @selection_options
    @click.option("--all", "everything", is_flag=True, help="Also final (delivered...) mail.")
    @click.option("-y", "--yes", is_flag=True, help="Do not ask before acting on >1 message.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def command(
        ctx: click.Context,
        ids: tuple[str, ...],
        everything: bool,
        yes: bool,
        as_json: bool,
        dsn: bool = False,
        **opts: Any,
    ) -> None:
        from ferry import operations

        if not ids and not any(opts.values()) and not everything and not yes:
            raise click.UsageError(
                f"name messages (IDs) or a filter; `ferry queue {action} --yes` alone "
                "acts on every waiting message"
            )
        sel: Selection = _selection(opts, ids, everything)
        config = _load(ctx)
        now = time.time()
        if not yes:
            messages, recipients = _with_queue(ctx, lambda q: q.count_selected(sel, now=now))
            if messages > 1 and not click.confirm(
                f"{action} {messages} messages ({recipients} recipients) matching"
                f" {sel.describe()}?",
                err=True,
            ):
                raise click.Abort()
        result = _with_queue(
            ctx, lambda q: operations.bulk(q, config, action, sel, dsn=dsn, now=now)
        )
        if as_json:
            _print_json(
                {
                    "action": result.action,
                    "messages": result.messages,
                    "recipients": result.recipients,
                    "dsns": result.dsns,
                }
            )
            return
        if ids and not result.recipients and len(ids) == 1:
            raise click.ClickException(f"{ids[0]}: nothing to {action}")
        extra = f", {result.dsns} DSNs queued" if result.dsns else ""
        click.echo(f"{action}: {result.messages} messages, {result.recipients} recipients{extra}")

    command.__doc__ = _ACTIONS[action] + (
        "\n\n    Name messages by ID, or select them with the filters of `queue list`."
    )
    if action == "cancel":
        command = click.option(
            "--dsn/--no-dsn", default=False, help="Send the sender a failure DSN (default: no)."
        )(command)
    return click.command(action)(command)


for _action in ("retry", "hold", "release", "cancel", "remove"):
    queue_group.add_command(_bulk_command(_action))  # type: ignore[arg-type]


@queue_group.command("clear-expired")
@click.pass_context
def queue_clear_expired(ctx: click.Context) -> None:
    """Delete messages that ended Expired."""
    n = _with_queue(ctx, lambda q: q.clear_expired())
    click.echo(f"{n} expired messages removed")


# -- suspend / resume ----------------------------------------------------------------


@queue_group.command("suspend")
@click.argument("domain")
@click.option("--for", "duration", help="For this long (30m, 2h); default: until resumed.")
@click.option("--reason", default="", help="Why (shown by `queue suspended` and logged).")
@click.pass_context
def queue_suspend(ctx: click.Context, domain: str, duration: str | None, reason: str) -> None:
    """Stop delivering to DOMAIN ('*' for every destination) without a restart.

    Stored in the queue: every delivery process obeys within a second, and it
    survives restarts. Mail for DOMAIN is still accepted and waits.
    """
    from ferry import operations

    try:
        s = _with_queue(
            ctx, lambda q: operations.suspend(q, domain, duration=duration, reason=reason)
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None
    until = f" until {_ts(s.until)}" if s.until else " until resumed"
    click.echo(f"suspended {s.domain}{until}")


@queue_group.command("resume")
@click.argument("domain")
@click.pass_context
def queue_resume(ctx: click.Context, domain: str) -> None:
    """Resume delivery to DOMAIN ('*': lift the hold on every destination)."""
    from ferry import operations

    if not _with_queue(ctx, lambda q: operations.resume(q, domain)):
        raise click.ClickException(f"{domain} was not suspended")
    click.echo(f"resumed {domain}")


@queue_group.command("suspended")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_suspended(ctx: click.Context, as_json: bool) -> None:
    """List suspended destinations ('*' = every destination: delivery is held)."""
    found = _with_queue(ctx, lambda q: q.suspensions(now=time.time()), readonly=True)
    if as_json:
        _print_json(
            [
                {
                    "domain": s.domain,
                    "since": _ts(s.since),
                    "until": _ts(s.until) if s.until else None,
                    "reason": s.reason,
                    "by": s.by,
                }
                for s in found
            ]
        )
        return
    for s in found:
        name = "* (every destination)" if s.domain == ALL_DESTINATIONS else s.domain
        until = _ts(s.until) if s.until else "resumed"
        click.echo(f"{name}  since {_ts(s.since)}  until {until}  by {s.by}  {s.reason}".rstrip())
    if not found:
        click.echo("(no destination is suspended)")


def _attach() -> None:
    """Queue commands that live in their own modules."""
    from ferry.cli.purge import purge
    from ferry.cli.queue_check import check

    queue_group.add_command(check)
    queue_group.add_command(purge)
    from ferry.cli.queue_migrate import migrate, migrate_to

    queue_group.add_command(migrate)
    queue_group.add_command(migrate_to)


_attach()
