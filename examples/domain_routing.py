"""Zetian "Domain-Specific Routing": Gmail and Outlook recipients through their own
relays, every other domain through SendGrid.

    GMAIL_PASSWORD=... OUTLOOK_PASSWORD=... SENDGRID_API_KEY=SG.... \
        python examples/domain_routing.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig, SmartHost

PORT = int(os.environ.get("SMART_HOST_PORT", "587"))
FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@gmail.com,someone@outlook.com,someone@example.org")


async def main() -> int:
    env = os.environ.get
    config = RelayConfig.from_env()
    config.smart_hosts = [
        SmartHost(name="gmail", host="smtp.gmail.com", port=PORT,
                  username="user@gmail.com", password=env("GMAIL_PASSWORD", "app_password")),
        SmartHost(name="outlook", host="smtp-mail.outlook.com", port=PORT,
                  username="user@outlook.com", password=env("OUTLOOK_PASSWORD", "password")),
        SmartHost(name="sendgrid", host="smtp.sendgrid.net", port=PORT,
                  username="apikey", password=env("SENDGRID_API_KEY", "SG.xxxxx")),
    ]  # fmt: skip
    config.routes = {
        "gmail.com": "gmail",
        "outlook.com": "outlook",
        "*": "sendgrid",  # DefaultSmartHost: every other domain
    }
    config.delivery.mode = "relay"

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Routed by domain"
    message.set_content("Each recipient's domain chose its relay.")

    async with Relay(config, listen=False) as relay:
        results = await relay.send(message, timeout=60)
    for rcpt, result in results.items():
        print(f"{rcpt}: {result.status} via {result.route} ({result.reply})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
