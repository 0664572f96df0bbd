"""SMTPy "Direct SMTP Service": deliver straight to the recipients' MX hosts, without
the queue (MX lookup with caching, STARTTLS, 3 attempts, 10 connections/min a domain).

    TO=user@example.com BULK_TO=user1@example.com,user2@example.com \
        python examples/direct_smtp.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import get_direct_smtp_service

MAIL_FROM = os.environ.get("MAIL_FROM", "noreply@smtpy.fr")
TO = os.environ.get("TO", "user@example.com")
BULK_TO = os.environ.get("BULK_TO", "user1@example.com,user2@example.com").split(",")


async def main() -> None:
    email_message = EmailMessage()
    email_message["From"], email_message["Subject"] = MAIL_FROM, "Direct"
    email_message.set_content("Straight to your MX.")

    service = get_direct_smtp_service()

    # Send to single recipient
    success = await service.send_email(message=email_message, recipient=TO, mail_from=MAIL_FROM)
    print(f"send_email: {success}")

    # Send to multiple recipients
    results = await service.send_email_bulk(
        message=email_message, recipients=BULK_TO, mail_from=MAIL_FROM
    )
    print(f"send_email_bulk: {results}")
    print(f"stats: {service.get_stats()}")


if __name__ == "__main__":
    asyncio.run(main())
