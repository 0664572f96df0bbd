"""Next hops: where a recipient's mail goes next.

The values live in the shared leaf :mod:`ferry.routes` (the configuration validator
parses route strings with the same code); this module keeps the delivery stage's name.
"""

from __future__ import annotations

from ferry.routes import HopKind, NextHop, direct_hop

__all__ = ["HopKind", "NextHop", "direct_hop"]
