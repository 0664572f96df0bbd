"""DKIM: keys on disk (``keys``), their DNS records (``records``) and signing (``signing``).

The names below are the package's public surface; import them from ``ferry.dkim``.
"""

from ferry.dkim.keys import DkimKey, KeyEntry, KeyKind, KeyStore, load_key, normalize_domain
from ferry.dkim.records import dns_record, txt_chunks, zone_line
from ferry.dkim.signing import (
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    Signer,
    SignResult,
    body_hash,
    relaxed_body,
    relaxed_header,
    select_headers,
    sign_one,
    split_lazily,
    split_message,
)

__all__ = [
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "DkimKey",
    "KeyEntry",
    "KeyKind",
    "KeyStore",
    "SignResult",
    "Signer",
    "body_hash",
    "dns_record",
    "load_key",
    "normalize_domain",
    "relaxed_body",
    "relaxed_header",
    "select_headers",
    "sign_one",
    "split_lazily",
    "split_message",
    "txt_chunks",
    "zone_line",
]
