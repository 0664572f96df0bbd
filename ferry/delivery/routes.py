"""Next hops: where a recipient's mail goes next.

Today every domain goes to its own MX hosts (``direct`` mode). The smart-host work adds
hops of kind ``smarthost`` and ``host`` and a routing function over (domain, mode,
config, health); the delivery engine only ever sees ``NextHop`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ferry.domains import domain_key

HopKind = Literal["mx", "host", "smarthost"]


@dataclass(frozen=True, slots=True)
class NextHop:
    """A place to connect to: a domain's MX set, a fixed host, or a named smart host."""

    kind: HopKind
    name: str  # the domain (mx), the host name (host), the smart host's name (smarthost)
    port: int

    @property
    def label(self) -> str:
        """How the hop appears in logs, history and ``messages_by_smart_host``."""
        if self.kind == "mx":
            return f"mx:{self.name}"
        if self.kind == "host":
            return f"host:{self.name}:{self.port}"
        return f"smarthost:{self.name}"


def direct_hop(domain: str, mx_port: int) -> NextHop:
    """RFC 5321 §5.1: the domain's MX hosts (or the domain itself without MX)."""
    return NextHop("mx", domain_key(domain), mx_port)
