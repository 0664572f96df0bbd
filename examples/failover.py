"""Zetian "Multiple Smart Hosts with Failover": the backups work only while the primary
cannot (a lower ``priority`` is preferred; a failing host rests, then is tried again).

    SMART_HOST_USER=user SMART_HOST_PASSWORD=pass TO=someone@example.net \
        python examples/failover.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig, SmartHost

PORT = int(os.environ.get("SMART_HOST_PORT", "587"))
USER = os.environ.get("SMART_HOST_USER", "user")
PASSWORD = os.environ.get("SMART_HOST_PASSWORD", "pass")
FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@example.net")


async def main() -> int:
    config = RelayConfig.from_env()
    config.smart_hosts = [
        SmartHost(name="primary", host="primary.smtp.com", port=PORT, priority=10,
                  username=USER, password=PASSWORD),
        SmartHost(name="backup1", host="backup1.smtp.com", port=PORT, priority=20,
                  username=USER, password=PASSWORD),
        SmartHost(name="backup2", host="backup2.smtp.com", port=PORT, priority=30),
    ]  # fmt: skip
    config.delivery.mode = "relay"

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Failover"
    message.set_content("Whichever smart host is up takes this one.")

    async with Relay(config, listen=False) as relay:
        results = await relay.send(message, timeout=60)
        hosts = relay.get_stats()["smart_hosts"]
    for rcpt, result in results.items():
        print(f"{rcpt}: {result.status} via {result.route} ({result.reply})")
    for name, host in hosts.items():
        print(f"{name}: {host.get('state', 'unused')}, sent {host['sent']}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
