"""SMTPy "Monitoring and Statistics": the hybrid relay's counters, in the seed's shape.

TO=user@example.com python examples/relay_stats.py
"""

import asyncio
import json
import os
from email.message import EmailMessage

from ferry import get_hybrid_relay, send_email_hybrid

MAIL_FROM = os.environ.get("MAIL_FROM", "noreply@smtpy.fr")
TO = os.environ.get("TO", "user@example.com")


async def main() -> None:
    email_message = EmailMessage()
    email_message["From"], email_message["To"], email_message["Subject"] = MAIL_FROM, TO, "Hi"
    email_message.set_content("Something to count.")
    await send_email_hybrid(email_message, [TO], MAIL_FROM)

    relay = get_hybrid_relay()
    stats = relay.get_stats()

    print(json.dumps(stats, indent=4))
    # {"mode": "hybrid", "direct_sent": 1, ..., "direct_service": {"sent": 1, ...}}


if __name__ == "__main__":
    asyncio.run(main())
