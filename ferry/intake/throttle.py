"""Slow down clients that keep failing SMTP AUTH (RFC 4954 §4 password guessing).

Pure and clock-free: every call takes ``now`` (use ``time.monotonic()``), so
tests drive time explicitly. A few failures are free, because people mistype;
after that each further failure in the sliding window doubles the delay
before the next AUTH reply, up to a cap. Delaying the reply, rather than
refusing, keeps legitimate users working while making guessing expensive.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque


def client_key(ip: str) -> str:
    """The bucket an address is counted in.

    IPv4-mapped IPv6 counts as the IPv4 address, and IPv6 is counted per /64:
    one host usually owns a whole /64, so per-address counting would let it
    rotate addresses for free. Unparseable strings are their own bucket.
    """
    try:
        addr = ipaddress.ip_address(ip.strip().partition("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class AuthThrottle:
    """Per-client AUTH failure counts in a sliding window, with bounded memory."""

    def __init__(
        self,
        *,
        window: float = 300.0,
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        max_tracked: int = 10000,
    ) -> None:
        if window <= 0 or free_failures < 0 or base_delay < 0 or max_tracked < 1:
            raise ValueError("window and max_tracked must be positive, the others >= 0")
        if max_delay < base_delay:
            raise ValueError("max_delay must be >= base_delay")
        self.window = window
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_tracked = max_tracked
        # Once the delay reaches max_delay more failures change nothing, so a
        # client's history is capped there: a flood costs O(1) memory.
        doublings = math.ceil(math.log2(max_delay / base_delay)) if base_delay > 0 else 0
        self.count_cap = free_failures + doublings + 1
        # Keyed by client, ordered by most recent failure (oldest first), so
        # both expiry and eviction pop from the front.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _expire(self, now: float) -> None:
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if now - times[-1] < self.window:
                break  # entries behind this one failed more recently
            del self._failures[key]

    def failures(self, ip: str, now: float) -> int:
        """Failures counted for this client in the window (saturates at count_cap)."""
        times = self._recent(client_key(ip), now)
        return len(times) if times else 0

    def delay_for(self, ip: str, now: float) -> float:
        """Seconds to wait before answering this client's next AUTH attempt."""
        extra = self.failures(ip, now) - self.free_failures
        if extra <= 0:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2.0 ** (extra - 1)))

    def record_failure(self, ip: str, now: float) -> int:
        """Count a failed AUTH; return the client's failures in the window.

        The count saturates at ``count_cap``, where the delay is already maximal.
        """
        self._expire(now)
        key = client_key(ip)
        times = self._recent(key, now)
        if times is None:
            times = self._failures[key] = deque(maxlen=self.count_cap)
        times.append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)  # the least recently failing client
        return len(times)

    def record_success(self, ip: str) -> None:
        """Forget the client's failures after a successful AUTH."""
        self._failures.pop(client_key(ip), None)

    def __len__(self) -> int:
        """Number of clients currently tracked."""
        return len(self._failures)
