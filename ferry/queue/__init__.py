"""The queue: the one durable state. ``base`` is the contract, ``sqlite`` the embedded
backend, ``postgres`` the one several nodes share."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ferry.config import RelayConfig
    from ferry.queue.limits import SharedLimits
    from ferry.queue.postgres import PostgresQueue
    from ferry.queue.sqlite import SqliteQueue


def open_queue(config: RelayConfig, *, durable: bool = True) -> SqliteQueue | PostgresQueue:
    """The queue backend named by the configuration (``queue.backend``).

    ``durable=False`` is for a delivery worker process: its own writes (claims,
    outcomes) need not be fsynced one by one (see ``SqliteQueue``, ``PostgresQueue``).
    """
    # The event log is written only when something reads it (webhooks or the HTTP API).
    event_log = bool(config.webhooks or config.http.listen)
    q = config.queue
    if q.backend == "postgres":
        from ferry.queue.postgres import PostgresQueue

        return PostgresQueue(
            q.dsn.get_secret_value(),
            password_file=q.password_file,
            batch=q.commit_batch,
            durable=durable,
            event_log=event_log,
        )
    from ferry.queue.sqlite import SqliteQueue

    return SqliteQueue(
        q.path,
        batch=q.commit_batch,
        durable=durable,
        event_log=event_log,
        spool_threshold=q.spool_threshold,
    )


def open_postgres_for_tool(config: RelayConfig) -> PostgresQueue:
    """The configured PostgreSQL queue as a command-line tool reads it: one connection,
    no schema created (a tool never sets up a database the relay has not)."""
    from ferry.queue.postgres import PostgresQueue

    q = config.queue
    return PostgresQueue(
        q.dsn.get_secret_value(), password_file=q.password_file, create=False, pool_size=1
    )


def open_limits(config: RelayConfig, *, name: str = "") -> SharedLimits:
    """The delivery limits for the configured queue (``queue.limits``): shared by every
    node through PostgreSQL, or this process's own counts (SQLite). ``name``: who holds
    them (a scheduler's lease owner), for the database's view of its sessions."""
    q = config.queue
    if q.backend == "postgres":
        from ferry.queue.postgres import conninfo, describe_dsn
        from ferry.queue.postgres_limits import PostgresLimits

        dsn = q.dsn.get_secret_value()
        return PostgresLimits(
            conninfo(dsn, q.password_file), description=describe_dsn(dsn), name=name
        )
    from ferry.queue.limits import LocalLimits

    return LocalLimits()
