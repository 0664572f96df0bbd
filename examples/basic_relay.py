"""Zetian "Basic Relay Setup": an SMTP relay that delivers straight to the recipients' MX.

Listens on 127.0.0.1:2525 (``server.listen``), lets the clients of ``relay_networks``
(loopback by default) relay, and keeps its queue in ./ferry-data. Ctrl-C stops it.

    python examples/basic_relay.py
    swaks --server 127.0.0.1:2525 --from me@example.org --to someone@example.net
"""

import asyncio

from ferry import Relay, RelayConfig


async def main() -> None:
    # Built-in defaults, then ferry.toml ($FERRY_CONFIG), then FERRY_* / SMTP_* variables.
    config = RelayConfig.from_env()

    async with Relay(config) as relay:
        for address, port, mode in relay.listening:
            print(f"listening on {address}:{port} ({mode})", flush=True)
        await relay.serve_forever()  # until SIGINT / SIGTERM
    print("stopped")


if __name__ == "__main__":
    asyncio.run(main())
