"""DKIM signing: relaxed/relaxed canonicalisation and the signer (RFC 6376, RFC 8463)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ferry.dkim.keys import DkimKey, KeyStore, address_domain, normalize_domain

logger = logging.getLogger("ferry.dkim")

#: Header fields signed when present (RFC 6376 §5.4.1's list, plus the MIME, list and
#: feedback fields receivers rely on). Anything else is left unsigned, in particular
#: what relays add on the way (§5.4.1: Received, Return-Path, Authentication-Results,
#: DKIM-Signature, ARC-*, X-*): signing those would break on the first hop.
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-id",
    "content-description",
    "content-disposition",
    "in-reply-to",
    "references",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-message-id",
    "list-id",
    "list-help",
    "list-unsubscribe",
    # RFC 8058 §4: List-Unsubscribe and List-Unsubscribe-Post MUST be signed.
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "feedback-id",
    "auto-submitted",
)

#: Listed in h= once more than they occur (RFC 6376 §5.4.2, §8.15): a signed
#: "nonexistent" instance stops anyone adding a second From:, Subject: ... later.
OVERSIGNED_HEADERS: frozenset[str] = frozenset({"from", "to", "subject", "date", "message-id"})

_SIGNED = tuple((n, n.encode("ascii"), n in OVERSIGNED_HEADERS) for n in SIGNED_HEADERS)

#: Short, fixed labels for why a message went out unsigned (metrics keys).
ReasonCode = Literal["disabled", "no_domain", "no_key", "error"]

_LINE_END = re.compile(rb"\r\n|\r|\n")  # as ferry.delivery.client.dot_stuff
_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_EOL = re.compile(rb"[ \t]+\r\n")
_SIMPLE_FROM = re.compile(r"@([^\s<>@]+)>?\s*$")
_MAX_LINE = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters


# -- canonicalisation ----------------------------------------------------------------


def _crlf(message: bytes) -> bytes:
    """Bare CR / LF to CRLF, as Ferry's SMTP client sends it (three counts when clean)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _LINE_END.sub(b"\r\n", message)
    return message


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """CRLF-normalised ``message`` as ``([(name, field), ...], body)``.

    ``field`` is the whole header field as it appears, folds included, without
    its final CRLF. The body is what follows the blank line, with a final CRLF
    added when missing (the SMTP client adds it on the wire: RFC 5321 §4.1.1.4).
    """
    fields, body = split_lazily(message)
    return fields, body()


def split_lazily(message: bytes) -> tuple[list[tuple[bytes, bytes]], Callable[[], bytes]]:
    """:func:`split_message` with the body left for later: a function that makes it.

    A message whose header block is clean CRLF (what intake stores) is split without
    reading its body: the signer needs the body only when a key signs, and normalising
    100 KB costs more than everything else an unsigned message takes.
    """
    if not message.startswith((b"\r", b"\n")):
        end = message.find(b"\r\n\r\n")
        if end >= 0:
            head = message[: end + 2]
            crlf = head.count(b"\r\n")
            if head.count(b"\n") == crlf and head.count(b"\r") == crlf:
                # Normalising the whole message would leave this clean prefix as it is
                # and start the body at the same byte: the body can be done on its own.
                return _fields(head), lambda: _body(_crlf(message[end + 4 :]))
    message = _crlf(message)
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        if end < 0:
            head, body = message, b""
        else:
            head, body = message[: end + 2], message[end + 4 :]
    return _fields(head), lambda: _body(body)


def _body(body: bytes) -> bytes:
    """A CRLF body with its final CRLF (added when missing)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """``[(lower-case name, whole field), ...]`` of a CRLF header block."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[0] in (0x20, 0x09) and fields:  # RFC 5322 §2.2.3: a folded continuation
            name, text = fields[-1]
            fields[-1] = (name, text + b"\r\n" + line)
            continue
        colon = line.find(b":")
        # A line with no colon is no header field; it can never be selected.
        name = line[:colon].rstrip(b" \t").lower() if colon > 0 else b""
        fields.append((name, line))
    return fields


def relaxed_header(name: bytes, raw: bytes) -> bytes:
    """RFC 6376 §3.4.2: lower-case name, unfold, compress WSP, trim; ends in CRLF."""
    value = raw[raw.index(b":") + 1 :].replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:  # fast path: most fields have single spaces only
        value = _WSP_RUN.sub(b" ", value)
    return name + b":" + value.strip(b" ") + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 on a CRLF body: WSP at line ends removed, runs compressed,
    empty lines at the end dropped; an empty body stays empty (erratum 1384)."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:  # else nothing to reduce
        body = _WSP_EOL.sub(b"\r\n", body)
        body = _WSP_RUN.sub(b" ", body)
    body = body.rstrip(b"\r\n")  # CRLF pairs only: _crlf left no bare CR or LF
    return body + b"\r\n" if body else b""


def body_hash(message: bytes) -> str:
    """base64 SHA-256 of the relaxed body (the bh= tag, RFC 6376 §3.7)."""
    _, body = split_message(message)
    return base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")


def select_headers(fields: Sequence[tuple[bytes, bytes]]) -> tuple[list[str], bytes]:
    """The h= list and the canonicalised header data it covers (RFC 6376 §5.4.2).

    Repeated fields are taken from the bottom up; an oversigned name's extra
    entry matches no field and adds nothing to the hash (§5.4.2 "nonexistent").
    """
    present: dict[bytes, list[bytes]] = {}
    for fname, raw in fields:
        if fname:
            present.setdefault(fname, []).append(raw)
    names: list[str] = []
    data: list[bytes] = []
    for name, bname, over in _SIGNED:
        instances = present.get(bname, ())
        if not instances and not over:
            continue
        for raw in reversed(instances):
            data.append(relaxed_header(bname, raw))
        names.extend([name] * (len(instances) + over))
    return names, b"".join(data)


# -- the DKIM-Signature header ---------------------------------------------------------


def _fold(tokens: Sequence[str], start: int) -> str:
    """Join ``tokens`` with spaces, folding (CRLF SP) before one that would pass 78."""
    out: list[str] = []
    col = start
    for i, tok in enumerate(tokens):
        glue = "" if tok.startswith("\0") else " "
        tok = tok.lstrip("\0")
        if i and col + len(glue) + len(tok) > _MAX_LINE:
            out.append("\r\n ")
            col = 1
        elif i or glue:
            out.append(glue)
            col += len(glue)
        out.append(tok)
        col += len(tok)
    return "".join(out)


def _signature_prefix(
    key: DkimKey, names: Sequence[str], bh: str, timestamp: int
) -> tuple[str, int]:
    """The DKIM-Signature field through ``b=`` (empty b= value), and its last line's length."""
    tokens = [
        "v=1;",
        f"a={key.algorithm};",
        "c=relaxed/relaxed;",
        f"d={key.domain};",
        f"s={key.selector};",
        f"t={timestamp};",
    ]
    # h= may fold around its colons (RFC 6376 §3.5, sig-h-tag allows FWS there);
    # "\0" marks a piece glued to the previous one without a space.
    h = [f"{n}:" for n in names]
    h[0] = "h=" + h[0]
    h[-1] = h[-1][:-1] + ";"
    tokens.append(h[0])
    tokens.extend("\0" + piece for piece in h[1:])
    tokens.append(f"bh={bh};")
    tokens.append("b=")
    text = "DKIM-Signature:" + _fold(tokens, len("DKIM-Signature:"))
    return text, len(text) - (text.rfind("\n") + 1)


def _fold_b64(sig: str, col: int) -> str:
    """The b= value folded (RFC 6376 §3.5: FWS inside b= is ignored)."""
    room = _MAX_LINE - col
    parts = [sig[: max(room, 0)]]
    rest = sig[max(room, 0) :]
    while rest:
        parts.append("\r\n " + rest[: _MAX_LINE - 1])
        rest = rest[_MAX_LINE - 1 :]
    return "".join(parts)


def sign_one(
    key: DkimKey, names: Sequence[str], header_data: bytes, bh: str, timestamp: int
) -> bytes:
    """One DKIM-Signature field (CRLF-terminated) for already-canonicalised data.

    RFC 6376 §3.7: the hash covers the selected header fields, then this field
    itself, relaxed, with an empty b= value and without its trailing CRLF.
    """
    prefix, col = _signature_prefix(key, names, bh, timestamp)
    raw = prefix.encode("ascii")
    data = header_data + relaxed_header(b"dkim-signature", raw)[:-2]
    private = key.private
    if isinstance(private, rsa.RSAPrivateKey):
        # RFC 6376 §3.3.1: RSASSA-PKCS1-v1_5 with SHA-256.
        signature = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        # RFC 8463 §3: PureEdDSA Ed25519 over the SHA-256 hash of the same data.
        signature = private.sign(hashlib.sha256(data).digest())
    b64 = base64.b64encode(signature).decode("ascii")
    return raw + _fold_b64(b64, col).encode("ascii") + b"\r\n"


# -- the signer --------------------------------------------------------------------


@dataclass
class SignResult:
    """What :meth:`Signer.sign` did.

    ``headers`` are DKIM-Signature fields to prepend to the message (``b""`` when
    unsigned). ``required`` is True when the message is unsigned but its author
    domain must be signed: the caller defers instead of sending.
    """

    headers: bytes
    domain: str | None
    selectors: list[str]
    unsigned_reason: str | None = None
    required: bool = False
    reason_code: ReasonCode | None = None
    errors: list[str] = field(default_factory=list)
    #: No key exists for any domain (DKIM is not set up): "no_key" says nothing new.
    no_keys_at_all: bool = False

    @property
    def signed(self) -> bool:
        """True when at least one signature was made."""
        return bool(self.headers)

    @property
    def notable(self) -> bool:
        """Unsigned where a signature was to be expected: worth a log line. Not when
        DKIM is disabled, nor when no key exists at all and none is required (one line
        per message saying so would be noise; the counters still count it)."""
        if self.signed or self.reason_code == "disabled":
            return False
        return self.required or not self.no_keys_at_all


def _from_domain(fields: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the first mailbox in the (first) From: field (RFC 5322 §3.6.2)."""
    for name, raw in fields:
        if name == b"from":
            text = raw[raw.index(b":") + 1 :].replace(b"\r\n", b"")
            value = text.decode("utf-8", "surrogateescape")
            if value.count("@") == 1 and not any(c in value for c in '",(;:\\'):
                # Fast path: "Name <local@domain>" or a bare address, nothing to parse.
                match = _SIMPLE_FROM.search(value)
                if match:
                    return address_domain("x@" + match.group(1))
            for _, addr in email.utils.getaddresses([value]):
                domain = address_domain(addr)
                if domain:
                    return domain
            return None
    return None


def _parents(domain: str) -> list[str]:
    """``domain`` then its parents down to two labels (relaxed DMARC alignment)."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))]


class Signer:
    """Signs outgoing messages with the keys of the right domain.

    The signing domain: the From: header's domain, or a parent of it with keys
    (``news.example.com`` may sign as ``example.com``: DMARC relaxed alignment,
    RFC 7489 §3.1.1); else the envelope sender's domain; else ``default_domain``.
    Every active key of that domain signs (RSA and Ed25519 both, when present).

    ``required_domains``: author domains that must never leave unsigned, and only
    with an aligned signature (From: domain or a parent); otherwise the result
    has ``required=True``. ``counts`` tallies ``signed`` and each reason code.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        default_domain: str | None = None,
        required_domains: Collection[str] = (),
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.default_domain = normalize_domain(default_domain) if default_domain else None
        self.required_domains = frozenset(normalize_domain(d) for d in required_domains)
        self.enabled = enabled
        self.clock = clock
        self.counts: Counter[str] = Counter()

    def _unsigned(
        self,
        domain: str | None,
        reason: str,
        code: ReasonCode,
        required: bool,
        errors: list[str] | None = None,
    ) -> SignResult:
        self.counts[code] += 1
        return SignResult(b"", domain, [], reason, required, code, errors or [])

    def sign(self, message: bytes, *, envelope_sender: str) -> SignResult:
        """Sign ``message`` (bytes as stored; any line ends) for sending.

        The body is canonicalised and hashed once, whatever the number of keys.
        """
        if not self.enabled:
            return self._unsigned(None, "disabled", "disabled", False)
        no_keys = not self.store.any_keys()
        if no_keys and not self.required_domains:
            # Nothing can sign and nothing must: no need to parse the header.
            result = self._unsigned(None, "no DKIM key configured", "no_key", False)
            result.no_keys_at_all = True
            return result
        fields, body_of = split_lazily(message)
        author = _from_domain(fields)
        envelope = address_domain(envelope_sender) if envelope_sender else None
        first = author or envelope
        required = first is not None and first in self.required_domains
        candidates: list[str] = _parents(author) if author else []
        if not required:
            # Unaligned fallbacks are fine unless the author domain demands alignment.
            candidates += [d for d in (envelope, self.default_domain) if d]
        elif not author and envelope:
            candidates = _parents(envelope)
        domain, keys = None, []
        load_errors: list[str] = []
        for candidate in dict.fromkeys(candidates):
            keys = self.store.keys_for(candidate)
            if keys:
                domain = candidate
                break
            load_errors.extend(self.store.errors_for(candidate))
        if domain is None:
            target = first or self.default_domain
            if target is None:
                return self._unsigned(None, "no From: domain", "no_domain", False)
            if load_errors:
                reason = f"signing error: {load_errors[0]}"
                return self._unsigned(target, reason, "error", required, load_errors)
            result = self._unsigned(target, f"no key for {target}", "no_key", required)
            result.no_keys_at_all = no_keys
            return result
        names, header_data = select_headers(fields)
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body_of())).digest()).decode("ascii")
        timestamp = int(self.clock())
        out: list[bytes] = []
        selectors: list[str] = []
        errors = []
        for key in keys:
            try:
                out.append(sign_one(key, names, header_data, bh, timestamp))
                selectors.append(key.selector)
            except Exception as exc:  # one bad key must not stop the others
                errors.append(f"{key.domain}/{key.selector}: {exc}")
                logger.error("DKIM signing failed for %s/%s: %s", key.domain, key.selector, exc)
        if not out:
            return self._unsigned(domain, f"signing error: {errors[0]}", "error", required, errors)
        self.counts["signed"] += 1
        return SignResult(b"".join(out), domain, selectors, errors=errors)
