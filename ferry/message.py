"""Pure helpers over a received message's bytes: headers, priority, Received:, hops."""

from __future__ import annotations

import re
from email.utils import formatdate

from ferry.envelope import Priority

# RFC 5321 §6.3: a message with too many Received: headers is looping.
MAX_HOPS = 30

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def header_block(data: bytes) -> bytes:
    """The header section (without the blank line); the whole input when there is no body."""
    if data.startswith((b"\r\n", b"\n")):
        return b""  # RFC 5322 §2.1: no header fields, the body follows the empty line
    m = _HEADER_END.search(data)
    return data[: m.start()] if m else data


def header_values(block: bytes, name: str) -> list[str]:
    """Unfolded values of every header called ``name`` (case-insensitive)."""
    out: list[str] = []
    want = name.lower().encode()
    if want not in block.lower():
        return out  # most names asked for are absent: no walk over every line
    current: list[bytes] | None = None
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line.strip())
            continue
        if current is not None:
            out.append(b" ".join(current).decode("utf-8", "replace"))
            current = None
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == want:
            current = [value.strip()]
    if current is not None:
        out.append(b" ".join(current).decode("utf-8", "replace"))
    return out


def message_id(data: bytes) -> str | None:
    """The Message-ID header's value (for log lines), at most 200 characters."""
    values = header_values(header_block(data), "message-id")
    return values[0][:200] if values and values[0] else None


def count_received(block: bytes) -> int:
    """How many Received: headers the message carries (loop detection)."""
    return len(re.findall(rb"(?im)^received:", block))


def priority_from_headers(block: bytes) -> Priority | None:
    """Priority from ``Priority:`` (RFC 2156), ``X-Priority:`` or ``Importance:``."""
    for value in header_values(block, "priority"):
        v = value.strip().lower()
        if v == "urgent":
            return Priority.URGENT
        if v == "non-urgent":
            return Priority.LOW
        if v == "normal":
            return Priority.NORMAL
    for value in header_values(block, "x-priority"):
        m = re.match(r"\s*(\d)", value)
        if m:
            n = int(m.group(1))
            return Priority.HIGH if n <= 2 else Priority.LOW if n >= 4 else Priority.NORMAL
    for value in header_values(block, "importance"):
        v = value.strip().lower()
        if v == "high":
            return Priority.HIGH
        if v == "low":
            return Priority.LOW
        if v == "normal":
            return Priority.NORMAL
    return None


def protocol_name(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """The ``with`` keyword of Received: (RFC 3848, RFC 6531 §3.7.3)."""
    if utf8:
        return "UTF8SMTP" + ("S" if tls else "") + ("A" if auth else "")
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")


def received_header(
    *,
    helo: str | None,
    client_ip: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls: str | None,
    now: float,
) -> bytes:
    """An RFC 5321 §4.4 trace header, folded, CRLF-terminated.

    The authenticated user name is deliberately left out: it is private to the sender.
    """
    helo_txt = _clean(helo or "unknown")
    ip = client_ip or "unknown"
    ip_literal = f"IPv6:{ip}" if ":" in ip else ip
    parts = [f"Received: from {helo_txt} ([{ip_literal}])", f"\tby {_clean(hostname)} (Ferry)"]
    tail = f"\twith {protocol} id {queue_id}"
    if tls:
        tail += f" ({_clean(tls)})"
    parts.append(tail)
    if recipient:
        parts.append(f"\tfor <{_clean(recipient)}>")
    parts[-1] += f"; {formatdate(now, localtime=False)}"
    return ("\r\n".join(parts) + "\r\n").encode("utf-8", "surrogateescape")


def _clean(text: str) -> str:
    """Keep client-supplied text from breaking the header (no CR/LF, no parentheses)."""
    return re.sub(r"[\x00-\x1f\x7f()]", "?", text)[:200]


def needs_smtputf8(data: bytes) -> bool:
    """True when the header section has non-ASCII bytes (RFC 6532 headers)."""
    return not header_block(data).isascii()
