"""What passes between ``ferry serve`` and its intake processes (ferry/intake/dispatch.py,
ferry/intake/process.py): the header a connection is handed over with, and the calls an
intake process may make."""

from __future__ import annotations

import struct

# A connection is handed over as one SEQPACKET message: this header and the socket
# (SCM_RIGHTS). The header: the connection's id, its listener's index, and the
# connection limit it ran into (0: none; else 1 + the index in REFUSALS).
HANDOVER = struct.Struct("!QHB")
REFUSALS = ("max_connections", "max_connections_per_ip")

# The calls an intake process may make in `ferry serve` (ferry/queue/remote.py runs them).
CALLS = frozenset(
    {"enqueue", "auth_delay", "auth_failed", "auth_succeeded", "closed", "segment_sealed"}
)


def refusal_code(refused: str | None) -> int:
    return 0 if refused is None else 1 + REFUSALS.index(refused)


def refusal(code: int) -> str | None:
    return None if code == 0 else REFUSALS[code - 1]
