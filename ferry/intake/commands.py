"""Pure parsing of SMTP command arguments: paths, addresses and ESMTP parameters.

No I/O here: every function takes text and returns values or raises ``CommandError``
carrying the exact reply to send, so the server stays a thin edge and these rules are
unit-tested as plain functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ferry.envelope import Reply, normalize_notify, split_address


class CommandError(Exception):
    """A command was refused; ``reply`` is what the client gets."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = Reply(code, enhanced, text)


# RFC 5321 §4.1.2 grammar, with RFC 6531 (SMTPUTF8) widening atext to any non-ASCII.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_SUBDOMAIN = re.compile(
    r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
    r"[A-Za-z0-9\u0080-\U0010ffff])?)\Z"
)
_ADDR_LITERAL = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")

# RFC 5321 §4.5.3.1.1-3
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def is_valid_domain(domain: str) -> bool:
    """RFC 5321 §4.1.2 Domain or address-literal (UTF-8 labels allowed)."""
    if not domain or len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return bool(_ADDR_LITERAL.match(domain))
    labels = domain.rstrip(".").split(".") if domain != "." else [""]
    return all(len(label) <= 63 and _SUBDOMAIN.match(label) for label in labels)


def check_mailbox(address: str, *, utf8: bool) -> str | None:
    """Return a problem description for ``address``, or None when it is a valid Mailbox."""
    if not utf8 and not address.isascii():
        return "non-ASCII address without SMTPUTF8"
    local, domain = split_address(address) if "@" in address else ("", "")
    if not local:
        return "address must be local-part@domain"
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        return f"local part longer than {MAX_LOCAL_PART} octets"
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        return "invalid local part"
    if not is_valid_domain(domain):
        return "invalid domain"
    return None


@dataclass(slots=True)
class PathArg:
    """A parsed ``FROM:<path> params`` or ``TO:<path> params`` argument."""

    address: str  # "" for the null path <>
    params: dict[str, str | None] = field(default_factory=dict)


def parse_path_arg(arg: str | None, keyword: str, *, smtputf8_offered: bool) -> PathArg:
    """Parse the argument of MAIL (``keyword="FROM"``) or RCPT (``"TO"``).

    Raises CommandError with 501 for syntax problems. The address itself is not
    validated here (the caller knows whether SMTPUTF8 was requested).
    """
    usage = f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"
    if not arg or not arg[: len(keyword) + 1].upper() == keyword + ":":
        raise CommandError(501, "5.5.4", usage)
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        # RFC 5321 §4.1.2 requires the angle brackets; accepting bare addresses is how
        # ambiguous parameter parsing starts.
        raise CommandError(501, "5.5.4", f"{usage} (angle brackets required)")
    end = _find_path_end(rest)
    if end < 0:
        raise CommandError(501, "5.5.4", f"{usage} (missing '>')")
    path = rest[1:end]
    if len(path) + 2 > MAX_PATH:
        raise CommandError(501, "5.5.4", f"Path longer than {MAX_PATH} octets")
    # RFC 5321 §4.1.2 / Appendix C: source routes are accepted and ignored.
    if path.startswith("@"):
        colon = path.find(":")
        if colon < 0:
            raise CommandError(501, "5.5.4", f"{usage} (bad source route)")
        path = path[colon + 1 :]
    params = parse_params(rest[end + 1 :])
    return PathArg(path, params)


def _find_path_end(text: str) -> int:
    """Index of the '>' closing the path, honouring quoted local parts."""
    if '"' not in text:
        return text.find(">")  # nothing quoted (nearly every path): no loop per character
    in_quote = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return i
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=VALUE]`` separated by spaces (RFC 5321 §4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key) or (eq and not value):
            raise CommandError(501, "5.5.4", f"Bad parameter syntax: {item[:40]}")
        ukey = key.upper()
        if ukey in params:
            raise CommandError(501, "5.5.4", f"Duplicate parameter {ukey}")
        params[ukey] = value if eq else None
    return params


def decode_xtext(text: str) -> str:
    """RFC 3461 §4 xtext: ``+XX`` is the octet with hex value XX.

    The octets are UTF-8 (what :func:`encode_xtext` and the delivery client write, and
    RFC 6533 §3 for UTF-8 addresses); octets that are not UTF-8 are kept one character
    per octet rather than refused.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            hexpart = text[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(c in "0123456789ABCDEF" for c in hexpart):
                raise CommandError(501, "5.5.4", "Malformed xtext")
            out.append(int(hexpart, 16))
            i += 3
        elif "!" <= ch <= "~" and ch != "=":
            out.append(ord(ch))
            i += 1
        else:
            raise CommandError(501, "5.5.4", "Malformed xtext")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return out.decode("latin-1")


def encode_xtext(text: str) -> str:
    """RFC 3461 §4 xtext encoding (for passing ORCPT/ENVID on)."""
    return "".join(
        c if ("!" <= c <= "~" and c not in "+=") else "".join(f"+{b:02X}" for b in c.encode())
        for c in text
    )


def parse_notify(value: str | None) -> str:
    """RFC 3461 §4.1 NOTIFY, by the one parser (ferry.envelope): the value to store."""
    if not value:
        raise CommandError(501, "5.5.4", "NOTIFY requires a value")
    try:
        return normalize_notify(value)
    except ValueError:
        raise CommandError(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY") from None


def parse_orcpt(value: str | None) -> str:
    """RFC 3461 §4.2: ``addr-type;xtext``; stored decoded as ``type;address``."""
    if not value or ";" not in value:
        raise CommandError(501, "5.5.4", "ORCPT must be addr-type;address")
    addr_type, _, addr = value.partition(";")
    if not _ESMTP_KEYWORD.match(addr_type) or not addr:
        raise CommandError(501, "5.5.4", "ORCPT must be addr-type;address")
    return f"{addr_type.lower()};{decode_xtext(addr)}"


def parse_mt_priority(value: str | None) -> int:
    """RFC 6710 §3: an integer from -9 to 9."""
    try:
        level = int(value or "")
    except ValueError:
        raise CommandError(501, "5.5.4", "MT-PRIORITY must be -9..9") from None
    if not -9 <= level <= 9:
        raise CommandError(501, "5.5.4", "MT-PRIORITY must be -9..9")
    return level
