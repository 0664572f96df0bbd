"""Zetian "Message Priority": a routing hook (MessageReceived) makes mail from VIP
senders urgent; urgent mail is delivered first. The hook sees every message, whether it
arrived over SMTP or through ``relay.submit``.

    TO=someone@example.net python examples/message_priority.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import IncomingMessage, Priority, Relay, RelayConfig

VIP = os.environ.get("VIP_SENDER", "boss@vip.com")
OTHER = os.environ.get("OTHER_SENDER", "someone@example.org")
TO = os.environ.get("TO", "someone@example.net")


async def prioritise(message: IncomingMessage) -> None:
    """Urgent for @vip.com senders, normal for everyone else."""
    sender = message.from_address or message.sender
    message.priority = Priority.URGENT if sender.endswith("@vip.com") else Priority.NORMAL


async def main() -> int:
    config = RelayConfig.from_env()
    async with Relay(config, listen=False, routing=prioritise) as relay:
        queued = []
        for sender in (VIP, OTHER):
            message = EmailMessage()
            message["From"], message["To"], message["Subject"] = sender, TO, "Priority"
            message.set_content(f"From {sender}.")
            queued.append(await relay.submit(message))
        delivered = True
        for queue_id in queued:
            info = await relay.queue.get(queue_id)
            results = await relay.wait(queue_id, timeout=60)
            delivered = delivered and all(results.values())
            if info is not None:
                print(f"{info.sender}: {info.priority.name} ({info.id})")
    return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
