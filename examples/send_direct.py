"""SMTPy "Test Direct SMTP Delivery": one message straight to the recipient's MX.

TO=test@example.com python examples/send_direct.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import send_direct

MAIL_FROM = os.environ.get("MAIL_FROM", "noreply@smtpy.fr")
TO = os.environ.get("TO", "test@example.com")


async def test() -> None:
    msg = EmailMessage()
    msg["Subject"] = "Test Email"
    msg["From"] = MAIL_FROM
    msg["To"] = TO
    msg.set_content("This is a test email.")

    results = await send_direct(msg, [TO])
    print(f"Results: {results}")


if __name__ == "__main__":
    asyncio.run(test())
