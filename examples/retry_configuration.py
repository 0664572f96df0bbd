"""Zetian "Retry Configuration": how often, how long and how patiently to retry.

Ferry needs no QueueProcessingInterval: new mail wakes delivery at once, and each
deferred recipient is retried when its time comes.

    RETRY_SCHEDULE=1m,2m,4m,8m,16m,32m,1h,2h,4h TO=someone@example.net \
        python examples/retry_configuration.py
"""

import asyncio
import os
from email.message import EmailMessage

from ferry import Relay, RelayConfig

SCHEDULE = os.environ.get("RETRY_SCHEDULE", "1m,2m,4m,8m,16m,32m,1h,2h,4h").split(",")
WAIT = float(os.environ.get("WAIT", "600"))  # how long this script waits for the outcome
FROM = os.environ.get("FROM", "me@example.org")
TO = os.environ.get("TO", "someone@example.net")


async def main() -> int:
    config = RelayConfig.from_env()
    config.delivery.max_retries = 10  # MaxRetryCount
    config.delivery.message_lifetime = "4d"  # MessageLifetime
    config.delivery.command_timeout = 300  # ConnectionTimeout: 5 minutes per reply
    config.delivery.retry_schedule = SCHEDULE  # each ±10 %; the last one repeats

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = FROM, TO, "Retried"
    message.set_content("Delivered, sooner or later.")

    # CleanupInterval: delete expired messages every hour
    async with Relay(config, listen=False, cleanup_interval=3600) as relay:
        results = await relay.send(message, timeout=WAIT)
    for rcpt, result in results.items():
        print(f"{rcpt}: {result.status} after {result.attempts} attempt(s) ({result.reply})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
