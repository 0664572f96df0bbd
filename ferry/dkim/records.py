"""The DNS side of a DKIM key: its TXT record and zone-file line (RFC 6376 §3.6.1)."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ferry.dkim.keys import DkimKey


def dns_record(key: DkimKey) -> tuple[str, str]:
    """The TXT record publishing ``key``: ``(name, value)``.

    RFC 6376 §3.6.1: p= is the base64 of the DER SubjectPublicKeyInfo for RSA;
    RFC 8463 §4.2: for Ed25519 it is the raw 32-byte public key.
    """
    public = key.private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    value = f"v=DKIM1; k={key.kind}; p={base64.b64encode(raw).decode('ascii')}"
    return key.dns_name, value


def txt_chunks(value: str) -> list[str]:
    """``value`` as the <= 255-byte character-strings of one TXT record (RFC 1035 §3.3.14).

    RFC 6376 §3.6.2.2: a verifier concatenates the strings, so a split anywhere is fine.
    """
    raw = value.encode("utf-8")
    return [raw[i : i + 255].decode("utf-8") for i in range(0, len(raw), 255)] or [""]


def zone_line(key: DkimKey, ttl: int = 3600) -> str:
    """A zone-file line for ``key``'s record, the value split into quoted strings."""
    name, value = dns_record(key)
    strings = " ".join(f'"{s}"' for s in txt_chunks(value))
    return f"{name}. {ttl} IN TXT ( {strings} )"
