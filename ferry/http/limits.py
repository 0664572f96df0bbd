"""Per-token request rate (a token bucket) and ``Idempotency-Key`` values: pure functions."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Bucket:
    """A token bucket: ``rate`` requests a second on average, bursts up to ``burst``."""

    rate: float
    burst: float
    level: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> float:
        """0 when a request may pass now, else the seconds until one may."""
        if self.level < 0:
            self.level, self.at = self.burst, now
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1:
            self.level -= 1
            return 0.0
        return (1 - self.level) / self.rate


@dataclass(slots=True)
class RateLimiter:
    rate: float
    burst: float
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def check(self, who: str, now: float) -> float:
        bucket = self.buckets.get(who)
        if bucket is None:
            bucket = self.buckets[who] = Bucket(self.rate, self.burst)
        return bucket.take(now)


# draft-ietf-httpapi-idempotency-key-header §2: the value is an RFC 8941 sf-string
# ("..."); a bare token is accepted too, as clients commonly send one.
_SF_STRING = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$')
_BARE = re.compile(r"^[\x21-\x7e]+$")
MAX_KEY = 255


def parse_idempotency_key(value: str) -> str | None:
    """The key in an ``Idempotency-Key`` header value, or None when it is malformed."""
    value = value.strip()
    m = _SF_STRING.match(value)
    if m:
        key = re.sub(r"\\(.)", r"\1", m.group(1))
    elif _BARE.match(value) and '"' not in value:
        key = value
    else:
        return None
    return key if 0 < len(key) <= MAX_KEY else None


def fingerprint(body: Any) -> str:
    """A hash of a JSON request body, insensitive to key order and spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
