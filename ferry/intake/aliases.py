"""Alias expansion for the domains we are local for.

Ferry keeps no mailboxes: an address in a local domain exists only as an
alias that rewrites it to other addresses (usually external ones). Expansion
happens at RCPT time so an unknown local address is refused with
``550 5.1.1`` (RFC 3463 "bad destination mailbox address") rather than
accepted and bounced later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from ferry.envelope import Address, split_address
from ferry.intake.policy import domain_matches, normalise_domain

log = logging.getLogger("ferry.aliases")

#: Most alias rewrites applied to one address; beyond it the branch is dropped.
MAX_DEPTH = 10
#: Subaddress separator (``user+tag@domain``), as Postfix's recipient_delimiter.
SUBADDRESS_SEPARATOR = "+"


def _lookup_key(address: str) -> str:
    # Lookup is case-insensitive in both parts; RFC 5321 §2.4 lets us treat
    # our own local parts case-insensitively, and operators expect it.
    local, domain = split_address(address)
    return f"{local.lower()}@{normalise_domain(domain)}"


def _dedupe_key(address: str) -> str:
    # A remote local part may be case-sensitive (RFC 5321 §2.4), so two
    # targets differing only in local-part case are kept apart; domains not.
    local, domain = split_address(address)
    return f"{local}@{normalise_domain(domain)}"


class AliasTable:
    """A validated alias map for a set of local domains.

    Keys are ``user@domain`` or ``@domain`` (catch-all); values are one target
    address or a list of them.
    """

    def __init__(
        self,
        aliases: Mapping[str, str | Sequence[str]],
        local_domains: Iterable[str],
    ) -> None:
        self._local_domains = frozenset(normalise_domain(d) for d in local_domains)
        self._table: dict[str, tuple[str, ...]] = {}
        for key, value in aliases.items():
            targets = (value,) if isinstance(value, str) else tuple(value)
            if "@" not in key or not split_address(key)[1]:
                raise ValueError(f"alias {key!r}: key must be user@domain or @domain")
            if not self.is_local(key):
                # expand() never looks at non-local domains, so such an entry
                # would be dead configuration: say so rather than ignore it.
                raise ValueError(f"alias {key!r}: domain is not a local domain")
            if not targets:
                raise ValueError(f"alias {key!r}: no targets")
            for target in targets:
                try:
                    Address.parse(target)
                except ValueError:
                    msg = f"alias {key!r}: target {target!r} is not an address"
                    raise ValueError(msg) from None
            norm = _lookup_key(key)
            if norm in self._table:
                raise ValueError(f"alias {key!r}: duplicate of another key (case-insensitive)")
            self._table[norm] = targets

    def is_local(self, address: str) -> bool:
        """True if the address's domain is one of our local domains."""
        return domain_matches(split_address(address)[1], self._local_domains)

    def expand(self, address: str) -> list[str] | None:
        """Return the final targets of ``address``, or None if it does not exist.

        A non-local address is returned unchanged as ``[address]``. For a
        local one, targets in local domains are expanded recursively; an
        address reached a second time (a loop) or beyond MAX_DEPTH rewrites
        is dropped. None means nothing deliverable came out, so the caller
        refuses the recipient. Targets are deduplicated, first one wins.
        """
        if not self.is_local(address):
            return [address]
        found: dict[str, str] = {}
        self._walk(address, 0, {_lookup_key(address)}, found)
        return list(found.values()) or None

    def _lookup(self, address: str) -> tuple[str, ...] | None:
        local, domain = split_address(_lookup_key(address))
        candidates = [f"{local}@{domain}"]
        base, sep, _tag = local.partition(SUBADDRESS_SEPARATOR)
        if sep and base:
            candidates.append(f"{base}@{domain}")
        candidates.append(f"@{domain}")
        for key in candidates:
            if key in self._table:
                return self._table[key]
        return None

    def _walk(self, address: str, depth: int, seen: set[str], found: dict[str, str]) -> None:
        targets = self._lookup(address)
        if targets is None:
            return
        if depth >= MAX_DEPTH:
            log.warning("alias chain for %s is deeper than %d; branch dropped", address, MAX_DEPTH)
            return
        for target in targets:
            if not self.is_local(target):
                found.setdefault(_dedupe_key(target), target)
                continue
            key = _lookup_key(target)
            if key in seen:
                continue  # a loop, or a diamond already walked: nothing new there
            seen.add(key)
            self._walk(target, depth + 1, seen, found)
