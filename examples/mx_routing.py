"""Zetian "MX-Based Routing": deliver to each domain's MX hosts, asking the given DNS
servers; a domain whose MX lookup fails (SERVFAIL, timeout) goes to a fallback host.

    DNS_SERVERS=8.8.8.8,1.1.1.1 TO=someone@example.net python examples/mx_routing.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig, SmartHost

DNS_SERVERS = os.environ.get("DNS_SERVERS", "8.8.8.8,1.1.1.1").split(",")
FALLBACK = os.environ.get("FALLBACK_HOST", "fallback.smtp.com")
FALLBACK_PORT = int(os.environ.get("FALLBACK_PORT", "25"))
FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@example.net").split(",")


async def main() -> int:
    config = RelayConfig.from_env()
    config.delivery.mode = "direct"  # UseMxRouting
    config.dns.nameservers = DNS_SERVERS  # "ip" or "ip:port"
    config.smart_hosts = [
        # DefaultSmartHost: used only when a domain's MX lookup fails
        SmartHost(name="fallback", host=FALLBACK, port=FALLBACK_PORT, require_tls=False)
    ]

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, ", ".join(TO), "MX routing"
    message.set_content("Delivered to the MX hosts DNS named.")

    async with Relay(config, listen=False) as relay:
        results = await relay.send(message, timeout=60)
    for rcpt, result in results.items():
        print(f"{rcpt}: {result.status} via {result.route} {result.relay} ({result.reply})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
