"""Zetian "TLS/SSL Configuration": encrypt to the smart host, verify its certificate,
and never send in plain text.

Zetian's SslProtocols (TLS 1.2 | 1.3) needs no setting: Python's ssl module refuses
anything older than TLS 1.2. A private relay's CA goes in ``ca_file`` (or SSL_CERT_FILE).

    SMART_HOST=smtp.example.com TO=someone@example.net python examples/tls.py
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
            name="secure",
            host=SMART_HOST,
            port=PORT,
            username=USER,
            password=PASSWORD,
            tls="starttls",  # EnableTls ("implicit" for port 465)
            require_tls=True,  # RequireTls: no STARTTLS, no delivery
            verify_certificate=True,  # ValidateServerCertificate
        )
    ]
    config.delivery.mode = "relay"

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Encrypted"
    message.set_content("This one travels over TLS or not at all.")

    async with Relay(config, listen=False) as relay:
        results = await relay.send(message, timeout=60, until="attempted")
    for rcpt, result in results.items():
        print(f"{rcpt}: {result.status} over {result.tls or 'no TLS'} ({result.reply})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
