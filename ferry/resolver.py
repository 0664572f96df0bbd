"""Where DNS questions go: nameserver addresses (``"ip"``, ``"ip:port"``, ``"[v6]:port"``)."""

from __future__ import annotations

import ipaddress


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"`` or ``"[v6]:port"`` to ``(ip, port)``; port 53 by default."""
    host, port = text.strip(), "53"
    if host.startswith("["):  # "[v6]" or "[v6]:port"
        host, _, rest = host[1:].partition("]")
        if rest:
            port = rest[1:] if rest[0] == ":" else "invalid"
    elif host.count(":") == 1:  # "v4:port"; a bare IPv6 address has several colons
        host, port = host.split(":")
    try:
        address = str(ipaddress.ip_address(host))
        number = int(port)
    except ValueError:
        raise ValueError(f"not a nameserver address: {text!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"bad port in nameserver address: {text!r}")
    return address, number
