"""The queue: the one durable state. ``base`` is the contract, ``sqlite`` the embedded backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ferry.config import RelayConfig
    from ferry.queue.sqlite import SqliteQueue


def open_queue(config: RelayConfig, *, durable: bool = True) -> SqliteQueue:
    """The queue backend named by the configuration.

    ``durable=False`` is for a delivery worker process: its own writes (claims,
    outcomes) need not be fsynced one by one (see ``SqliteQueue``).
    """
    from ferry.queue.sqlite import SqliteQueue

    # The event log is written only when something reads it (webhooks or the HTTP API).
    event_log = bool(config.webhooks or config.http.listen)
    return SqliteQueue(
        config.queue.path, batch=config.queue.commit_batch, durable=durable, event_log=event_log
    )
