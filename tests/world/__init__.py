"""A real little Internet on loopback: a CA, a DNS server, scripted MX servers.

Everything binds to 127.0.0.0/8 (or ::1) only, and everything a test starts it
also stops (the fixtures in :mod:`tests.world.fixtures` do so at teardown).
"""

from .ca import CertFiles, WorldCA
from .dns import DnsServer
from .mx import (
    MxFactory,
    MxServer,
    ReceivedMessage,
    RefusingAddress,
    Rule,
    free_port,
)
from .wait import async_wait_until, wait_until

__all__ = [
    "CertFiles",
    "DnsServer",
    "MxFactory",
    "MxServer",
    "ReceivedMessage",
    "RefusingAddress",
    "Rule",
    "WorldCA",
    "async_wait_until",
    "free_port",
    "wait_until",
]
