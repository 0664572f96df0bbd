"""Zetian "Bounce Messages": a recipient that fails gets its sender an RFC 3464
delivery status notification (multipart/report) from the bounce address.

    BOUNCE_SENDER=postmaster@mydomain.com FROM=me@mydomain.com \
        TO=no-such-user@example.net python examples/bounces.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig

BOUNCE_SENDER = os.environ.get("BOUNCE_SENDER", "postmaster@mydomain.com")
FROM = os.environ.get("FROM", "me@mydomain.com")
TO = os.environ.get("TO", "no-such-user@example.net")


async def main() -> None:
    config = RelayConfig.from_env()
    config.delivery.bounces = True  # EnableBounceMessages
    config.delivery.bounce_sender = BOUNCE_SENDER  # BounceSender
    # EnableDsn: SMTP clients' NOTIFY, ORCPT, RET and ENVID (RFC 3461) are always honoured.

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Will it bounce?"
    message.set_content("If this cannot be delivered, the sender hears about it.")

    async with Relay(config, listen=False) as relay:
        results = await relay.send(message, timeout=60)
        for rcpt, result in results.items():
            print(f"{rcpt}: {result.status} ({result.reply})")
        await relay.drain(timeout=60)  # let the notification leave too
        bounced = relay.get_stats()["delivery"]["bounced"]
    print(f"notifications sent to {FROM} from {BOUNCE_SENDER}: {bounced}")


if __name__ == "__main__":
    asyncio.run(main())
