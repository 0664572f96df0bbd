"""Zetian "Load Balancing": three smart hosts of one priority share the traffic by
weight, 50 % / 30 % / 20 %.

    COUNT=100 TO=someone@example.net python examples/load_balancing.py
"""

import asyncio
import collections
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig, SmartHost

PORT = int(os.environ.get("SMART_HOST_PORT", "25"))
COUNT = int(os.environ.get("COUNT", "10"))
FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@example.net")


async def main() -> int:
    config = RelayConfig.from_env()
    config.smart_hosts = [
        SmartHost(name=f"smtp{n}", host=f"smtp{n}.example.com", port=PORT, priority=10,
                  weight=weight, tls="none", require_tls=False)
        for n, weight in ((1, 50), (2, 30), (3, 20))
    ]  # fmt: skip
    config.delivery.mode = "relay"

    def message(n: int) -> EmailMessage:
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = FROM, TO, f"Message {n}"
        m.set_content("Balanced.")
        return m

    async with Relay(config, listen=False) as relay:
        sent = await asyncio.gather(*(relay.send(message(n), timeout=60) for n in range(COUNT)))
    results = [result for per_message in sent for result in per_message.values()]
    per_host = collections.Counter(result.smart_host for result in results if result)
    for name in ("smtp1", "smtp2", "smtp3"):
        print(f"{name}: {per_host[name]} message(s)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
