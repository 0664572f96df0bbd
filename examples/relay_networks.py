"""Zetian "Relay Networks Configuration": clients in these networks may relay without
authentication; everyone else must authenticate (AUTH after STARTTLS, users from
``ferry user add``) or may only send to local and relay domains.

    RELAY_NETWORKS=192.168.1.0/24,10.0.0.0/8 python examples/relay_networks.py
"""

import asyncio
import os

from ferry import Relay, RelayConfig

NETWORKS = os.environ.get("RELAY_NETWORKS", "192.168.1.0/24,10.0.0.0/8").split(",")


async def main() -> None:
    config = RelayConfig.from_env()
    config.server.relay_networks = NETWORKS  # RelayNetworks; RequireAuthentication for others

    async with Relay(config) as relay:
        for address, port, mode in relay.listening:
            print(f"listening on {address}:{port} ({mode})", flush=True)
        print(f"relaying without AUTH for {', '.join(NETWORKS)}", flush=True)
        await relay.serve_forever()
    print("stopped")


if __name__ == "__main__":
    asyncio.run(main())
