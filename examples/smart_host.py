"""Zetian "With Smart Host": every message leaves through one authenticated smart host.

    SMART_HOST=smtp.example.com SMART_HOST_USER=user SMART_HOST_PASSWORD=secret \
        TO=someone@example.net python examples/smart_host.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig, SmartHost

SMART_HOST = os.environ.get("SMART_HOST", "smtp.example.com")
PORT = int(os.environ.get("SMART_HOST_PORT", "587"))
USER = os.environ.get("SMART_HOST_USER", "user")
PASSWORD = os.environ.get("SMART_HOST_PASSWORD", "password")
FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@example.net")


async def main() -> int:
    config = RelayConfig.from_env()
    config.smart_hosts = [
        SmartHost(
            name="example",
            host=SMART_HOST,
            port=PORT,
            username=USER,
            password=PASSWORD,
            tls="starttls",  # UseTls; the certificate is verified, plain text refused
        )
    ]
    config.delivery.mode = "relay"  # smart hosts only

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Through a smart host"
    message.set_content("Hello from Ferry.")

    async with Relay(config, listen=False) as relay:
        results = await relay.send(message, timeout=60)
    for rcpt, result in results.items():
        print(f"{rcpt}: {result.status} via {result.route} ({result.reply})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
