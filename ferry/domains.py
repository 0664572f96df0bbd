"""Domain names in one form: IDNA 2008 A-labels, lower case, no final dot."""

from __future__ import annotations

import dns.exception
import dns.name


def to_a_labels(domain: str) -> str:
    """The domain in lower-case ASCII (IDNA A-labels), without the final dot."""
    domain = domain.strip().rstrip(".")
    if not domain:
        raise ValueError("empty domain")
    try:
        name = dns.name.from_text(domain)  # IDNA 2008 when the idna package is present
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"invalid domain {domain!r}: {exc}") from None
    return name.to_text(omit_final_dot=True).lower()
