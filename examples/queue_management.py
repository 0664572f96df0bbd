"""Zetian "Queue Management": queue a message by hand, read the statistics, list the
queue, retry what is deferred, remove a message, clear the expired ones.

    TO=someone@example.net python examples/queue_management.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Priority, Relay, RelayConfig, Status

FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@example.net")


async def main() -> None:
    config = RelayConfig.from_env()
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Queued by hand"
    message.set_content("Queued with high priority.")

    async with Relay(config, listen=False) as relay:
        # Queue a message manually (QueueForRelayAsync), then let it have one attempt
        queue_id = await relay.submit(message, priority=Priority.HIGH)
        await relay.wait(queue_id, until="attempted", timeout=60)

        stats = await relay.queue.statistics()
        print(f"Queued: {stats.queued_messages}")
        print(f"In Progress: {stats.in_progress_messages}")
        print(f"Deferred: {stats.deferred_messages}")
        print(f"Delivered: {stats.delivered_messages}")
        print(f"Failed: {stats.failed_messages}")

        for info in await relay.queue.get_all():
            rcpts = ", ".join(f"{r.address} {r.status}" for r in info.recipients)
            print(f"{info.id} {info.status} priority={info.priority.name} [{rcpts}]")

        for info in await relay.queue.get_by_status(Status.DEFERRED):
            await relay.queue.retry(info.id)  # due now instead of at its retry time
            results = await relay.wait(info.id, until="attempted", timeout=60)
            for rcpt, result in results.items():
                print(f"retried {info.id}: {rcpt} {result.status} after {result.attempts} attempts")

        removed = await relay.queue.remove(queue_id)
        print(f"removed {queue_id}: {removed}")
        cleared = await relay.queue.clear_expired()
        print(f"cleared {cleared} expired message(s)")
        print(f"Total: {(await relay.queue.statistics()).total_messages}")


if __name__ == "__main__":
    asyncio.run(main())
