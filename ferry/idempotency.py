"""Idempotency keys, as HTTP and SMTP clients send them (a shared leaf, pure functions).

The key (``Idempotency-Key:`` header, draft-ietf-httpapi-idempotency-key-header) is
stored in the same transaction as the message it came with; a repeat within the TTL
gets the first answer instead of a second message (``ferry.queue`` holds the records).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

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
