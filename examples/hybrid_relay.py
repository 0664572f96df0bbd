"""SMTPy "Hybrid Relay Service": queue through Ferry in the configured mode (hybrid:
direct first, the smart host when the MX defers or blocks us) and wait for the results.

    SMTP_DELIVERY_MODE=hybrid SMTP_HOST=smtp.gmail.com SMTP_PORT=587 \
        SMTP_USER=you@gmail.com SMTP_PASSWORD=app-password \
        TO=user@example.com python examples/hybrid_relay.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import EmailPriority, send_email_hybrid

MAIL_FROM = os.environ.get("MAIL_FROM", "noreply@smtpy.fr")
TO = os.environ.get("TO", "user@example.com")


async def main() -> int:
    email_message = EmailMessage()
    email_message["From"], email_message["To"] = MAIL_FROM, TO
    email_message["Subject"] = "Hybrid"
    email_message.set_content("Direct if possible, relayed if not.")

    # Send with hybrid strategy
    results = await send_email_hybrid(
        message=email_message,
        recipients=[TO],
        mail_from=MAIL_FROM,
        priority=EmailPriority.NORMAL,
    )
    print(results)  # {"user@example.com": True}
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
