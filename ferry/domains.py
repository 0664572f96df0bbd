"""Domain names in one form: IDNA 2008 A-labels, lower case, no final dot.

Every table keyed by domain (local and relay domains, routes, aliases, shaping, DKIM
keys) and every domain that arrives in an envelope is compared in this form, so
``bücher.test``, ``BÜCHER.test.`` and ``xn--bcher-kva.test`` are one domain
(RFC 5890 §2.3.2.1: the A-label and the U-label are two forms of one label).
"""

from __future__ import annotations

import functools
from typing import TypeVar

import dns.exception
import dns.name

# dnspython converts names with IDNA 2008 only when the idna package is importable (else
# IDNA 2003, which maps some labels differently): a hard requirement, imported here.
import idna  # noqa: F401

T = TypeVar("T")


def to_a_labels(domain: str) -> str:
    """The domain in lower-case ASCII (IDNA 2008 A-labels), without the final dot.

    The table forms ``*.example.com`` and ``.example.com`` (any subdomain) keep their
    wildcard. Raises ValueError for something that is not a domain name.
    """
    domain = domain.strip()
    if len(domain) > 1 and domain.startswith(".") and not domain.startswith(".."):
        return "." + to_a_labels(domain[1:])
    domain = domain.rstrip(".")
    if not domain:
        raise ValueError("empty domain")
    try:
        # IDNA 2008 with UTS #46 mapping (case folding, full stops such as '。')
        name = dns.name.from_text(domain)
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"invalid domain {domain!r}: {exc}") from None
    text = name.to_text(omit_final_dot=True).lower()
    if "\\" in text:  # dnspython escaped a space, a quote...: not a host name
        raise ValueError(f"invalid domain {domain!r}")
    return text


def domain_key(domain: str) -> str:
    """``to_a_labels`` for a name from outside (an envelope, a lookup); never raises.

    What is not a valid domain name (an address literal ``[192.0.2.1]``, a U-label
    IDNA 2008 forbids) keeps its lower-case form: it then equals only itself.
    """
    text = domain.strip()
    if text.isascii():
        # Already the A-label form up to case: the common path, kept cheap.
        return text.rstrip(".").lower()
    return _unicode_key(text)


@functools.lru_cache(maxsize=4096)
def _unicode_key(text: str) -> str:
    try:
        return to_a_labels(text)
    except ValueError:
        return text.rstrip(".").lower()


def address_domain(address: str) -> str:
    """The domain of ``local@domain`` in the one form ('' when there is no '@')."""
    _local, sep, domain = address.rpartition("@")
    return domain_key(domain) if sep else ""


def a_label_keys(table: dict[str, T], what: str) -> dict[str, T]:
    """``table`` with every key in A-label form; ValueError if two keys are one domain."""
    out: dict[str, T] = {}
    written: dict[str, str] = {}
    for key, value in table.items():
        norm = to_a_labels(key)
        if norm in out:
            raise ValueError(f"{what}: {written[norm]!r} and {key!r} are the same domain")
        out[norm], written[norm] = value, key
    return out
