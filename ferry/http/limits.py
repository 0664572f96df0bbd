"""Per-token request rate: a token bucket (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
