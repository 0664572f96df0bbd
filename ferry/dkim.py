"""DKIM signing (RFC 6376, Ed25519 per RFC 8463) and key management.

The signer is written on top of ``cryptography`` (OpenSSL): dkimpy's pure-Python
RSA costs ~7 ms a signature, OpenSSL's well under 1 ms. Canonicalisation is our
own too (relaxed/relaxed, RFC 6376 §3.4.2 and §3.4.4); it is a few regular
expressions over bytes, so 8-bit and UTF-8 (SMTPUTF8) headers and bodies are
signed byte for byte.

Line ends: Ferry always sends CRLF (``ferry.delivery.client.dot_stuff`` turns a
bare CR or LF into CRLF and ends the data with CRLF). The signer hashes the
message exactly as it will be sent: it applies the same normalisation before
canonicalising, so bare-LF input signs and verifies.

Keys live on disk, one directory per domain (A-label, lower case)::

    keys_dir/
      example.com/
        ferry.pem            PKCS#8 PEM, mode 0600 (RSA or Ed25519)
        ferry202607.pem      an older or newer selector
        active               the selectors that sign, one per line

Without an ``active`` file every key of the domain signs; :meth:`KeyStore.generate`
and :meth:`KeyStore.rotate` always write one. Every write is atomic (a temporary
file renamed into place), so a reader sees either the old or the new state, and
the domain directory's mtime changes with each write: that is what invalidates
the store's cache.

Use::

    signer = Signer(KeyStore("/var/lib/ferry/dkim"), default_domain="relay.example.net")
    result = signer.sign(message, envelope_sender="alice@example.com")
    if result.required:        # unsigned, but the domain must be signed: defer
        ...
    wire = result.headers + message

A :class:`SignResult` covers no envelope data, so one result serves every
transaction (every recipient and destination) of the same message.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import idna
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

logger = logging.getLogger("ferry.dkim")

KeyKind = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

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
_DOMAIN = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")
# RFC 6376 §3.1: a selector is a sub-domain; we also keep it a safe file name.
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9](?:[a-z0-9_-]{0,62}))*$")
_SIMPLE_FROM = re.compile(r"@([^\s<>@]+)>?\s*$")
_MAX_LINE = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
_ACTIVE = "active"


# -- names -------------------------------------------------------------------------


def normalize_domain(domain: str) -> str:
    """``domain`` as DKIM's d= and the key directory spell it: A-labels, lower case.

    RFC 8616 §4: the d= of an internationalised domain uses A-labels. Raises
    :class:`ValueError` for something that is not a domain name (this also keeps
    path separators and ``..`` out of the keys directory).
    """
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"{domain!r} is not a domain name: {exc}") from None
    if len(name) > 253 or not _DOMAIN.match(name):
        raise ValueError(f"{domain!r} is not a domain name")
    return name


def normalize_selector(selector: str) -> str:
    """A DKIM selector (RFC 6376 §3.1), lower case; raises :class:`ValueError`."""
    name = selector.strip().lower()
    if not _SELECTOR.match(name):
        raise ValueError(
            f"{selector!r} is not a selector (letters, digits, '-', '_', dot-separated labels)"
        )
    return name


def address_domain(address: str) -> str | None:
    """The normalised domain of ``local@domain`` (angle brackets allowed), or None."""
    address = address.strip().strip("<>").strip()
    if "@" not in address:
        return None
    try:
        return normalize_domain(address.rsplit("@", 1)[1])
    except ValueError:
        return None


# -- keys ------------------------------------------------------------------------


@dataclass(frozen=True)
class DkimKey:
    """One signing key: the domain (d=), the selector (s=) and the private key."""

    domain: str
    selector: str
    kind: KeyKind
    private: PrivateKey = field(repr=False, compare=False)
    path: Path | None = None

    @property
    def algorithm(self) -> str:
        """The a= tag value (RFC 6376 §3.3, RFC 8463 §3)."""
        return "rsa-sha256" if self.kind == "rsa" else "ed25519-sha256"

    @property
    def bits(self) -> int:
        """The key size (256 for Ed25519)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.key_size
        return 256

    @property
    def dns_name(self) -> str:
        """Where the public key is published (RFC 6376 §3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class KeyEntry:
    """A key and whether it signs (for listings); ``configured`` = named in config."""

    key: DkimKey
    active: bool
    configured: bool = False


def _kind_of(private: object) -> KeyKind:
    if isinstance(private, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"unsupported key type {type(private).__name__} (rsa or ed25519 only)")


def load_key(path: str | Path, domain: str, selector: str | None = None) -> DkimKey:
    """Parse a PEM private key file (PKCS#8 or PKCS#1, unencrypted)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    kind = _kind_of(private)
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < 1024:
        # RFC 8301 §3.2: verifiers must not accept RSA keys under 1024 bits.
        raise ValueError(f"{path}: RSA key of {private.key_size} bits (1024 is the minimum)")
    mode = path.stat().st_mode
    if mode & 0o077:
        logger.warning("DKIM key %s is readable by group or others (mode %o)", path, mode & 0o777)
    return DkimKey(
        domain=normalize_domain(domain),
        selector=normalize_selector(selector or path.stem),
        kind=kind,
        private=private,  # type: ignore[arg-type]
        path=path,
    )


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


def _write_atomic(path: Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (or link)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path exists: never overwrite a key
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class _Cached:
    stamp: tuple[int, int, int] | None  # dir (mtime_ns, inode), active file mtime_ns
    trusted: bool  # False when loaded too soon after a change to rule out a missed one
    entries: list[KeyEntry]
    errors: list[str]


#: A directory changed less than this long before we read it may change again within
#: the same timestamp tick (file times advance by the kernel's coarse clock, a few ms):
#: such a cache entry is re-checked on the next use ("racy" entries, as in Git's index).
_RACY_NS = 100_000_000


class KeyStore:
    """DKIM keys on disk (``keys_dir/<domain>/<selector>.pem``), parsed once and cached.

    ``extra_keys`` maps a domain to PEM files named in configuration (the file
    name's stem is the selector); they always sign, next to the directory's
    active keys. A domain's cache entry is reloaded when its directory's mtime
    changes, so ``ferry dkim ...`` run beside ``ferry serve`` takes effect on the
    next message without a restart. A reload re-reads the directory listing and
    the ``active`` file; PEM files are parsed again only when they changed.
    """

    def __init__(
        self,
        keys_dir: str | Path,
        *,
        extra_keys: Mapping[str, Sequence[str | Path]] | None = None,
        default_selector: str = "ferry",
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.keys_dir = Path(keys_dir)
        self.clock_ns = clock_ns  # compared with file mtimes (injectable for tests)
        self.default_selector = normalize_selector(default_selector)
        self._extra = {
            normalize_domain(d): [Path(p) for p in paths] for d, paths in (extra_keys or {}).items()
        }
        self._cache: dict[str, _Cached] = {}
        self._parsed: dict[Path, tuple[tuple[int, int, int], DkimKey]] = {}
        self._lock = threading.RLock()

    # -- reading -----------------------------------------------------------------

    def _dir(self, domain: str) -> Path:
        return self.keys_dir / domain

    def _load(self, domain: str) -> _Cached:
        """The domain's entries, from the cache while the directory is unchanged."""
        d = self._dir(domain)
        try:
            st = os.stat(d)
        except FileNotFoundError:
            stamp: tuple[int, int, int] | None = None
        else:
            try:
                # an editor may rewrite the active file in place: watch it too
                active_mtime = os.stat(d / _ACTIVE).st_mtime_ns
            except FileNotFoundError:
                active_mtime = 0
            stamp = (st.st_mtime_ns, st.st_ino, active_mtime)
        cached = self._cache.get(domain)
        if cached is not None and cached.stamp == stamp and cached.trusted:
            return cached
        with self._lock:
            entries: list[KeyEntry] = []
            errors: list[str] = []
            if stamp is not None:
                active = self._read_active(d)
                for pem in sorted(d.glob("*.pem")):
                    try:
                        key = self._parse(pem, domain)
                    except (OSError, ValueError) as exc:
                        errors.append(str(exc))
                        continue
                    entries.append(KeyEntry(key, active is None or key.selector in active))
            seen = {e.key.selector for e in entries}
            for path in self._extra.get(domain, ()):
                try:
                    key = self._parse(path, domain)
                except (OSError, ValueError) as exc:
                    errors.append(str(exc))
                    continue
                if key.selector not in seen:
                    entries.append(KeyEntry(key, True, configured=True))
            for error in errors:
                if cached is None or error not in cached.errors:
                    logger.error("DKIM key not loaded: %s", error)
            trusted = stamp is None or self.clock_ns() - max(stamp[0], stamp[2]) > _RACY_NS
            cached = _Cached(stamp, trusted, entries, errors)
            self._cache[domain] = cached
            return cached

    def _parse(self, path: Path, domain: str) -> DkimKey:
        """Load a PEM file, or reuse the key parsed from the same unchanged file."""
        st = path.stat()
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        hit = self._parsed.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1]
        key = load_key(path, domain)
        self._parsed[path] = (sig, key)
        return key

    @staticmethod
    def _read_active(d: Path) -> set[str] | None:
        try:
            text = (d / _ACTIVE).read_text()
        except FileNotFoundError:
            return None
        return {line.strip().lower() for line in text.splitlines() if line.strip()}

    def keys_for(self, domain: str) -> list[DkimKey]:
        """The keys that sign for ``domain`` (active ones), cached."""
        try:
            domain = normalize_domain(domain)
        except ValueError:
            return []
        return [e.key for e in self._load(domain).entries if e.active]

    def errors_for(self, domain: str) -> list[str]:
        """Why some of ``domain``'s key files could not be loaded (empty when all did)."""
        try:
            domain = normalize_domain(domain)
        except ValueError:
            return []
        return list(self._load(domain).errors)

    def entries(self, domain: str) -> list[KeyEntry]:
        """Every key of ``domain``, active or not, in selector order."""
        return list(self._load(normalize_domain(domain)).entries)

    def all_domains(self) -> list[str]:
        """Domains with at least one key file (or a key named in configuration)."""
        found = set(self._extra)
        if self.keys_dir.is_dir():
            for d in self.keys_dir.iterdir():
                if d.is_dir() and any(d.glob("*.pem")):
                    found.add(d.name)
        return sorted(found)

    # -- writing -----------------------------------------------------------------

    def _write_active(self, domain: str, selectors: Iterable[str]) -> None:
        text = "".join(f"{s}\n" for s in selectors)
        _write_atomic(self._dir(domain) / _ACTIVE, text.encode("ascii"), 0o600)
        self._cache.pop(domain, None)  # our own change: never wait for the mtime

    def _active_selectors(self, domain: str) -> list[str]:
        """Active selectors of the domain's directory (not those named in config)."""
        entries = self._load(domain).entries
        return [e.key.selector for e in entries if e.active and not e.configured]

    def generate(
        self,
        domain: str,
        *,
        selector: str | None = None,
        kind: KeyKind = "rsa",
        bits: int = 2048,
        activate: bool = True,
    ) -> DkimKey:
        """Create a key, write it (PKCS#8 PEM, mode 0600, atomically) and mark it active.

        Never overwrites: an existing selector raises :class:`FileExistsError`.
        RFC 8301 §3.2: RSA keys are at least 1024 bits (2048 recommended).
        """
        domain = normalize_domain(domain)
        selector = normalize_selector(selector or self.default_selector)
        private: PrivateKey
        if kind == "rsa":
            if not 1024 <= bits <= 4096:
                raise ValueError(f"RSA key size {bits}: choose 1024 to 4096 bits (2048 advised)")
            private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        elif kind == "ed25519":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unknown key type {kind!r} (rsa or ed25519)")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        d = self._dir(domain)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = d / f"{selector}.pem"
        with self._lock:
            if path.exists():
                raise FileExistsError(f"{path} exists: choose another selector")
            had_active_file = (d / _ACTIVE).exists()
            active = self._active_selectors(domain)  # every key, without an active file
            _write_atomic(path, pem, 0o600, exclusive=True)
            self._cache.pop(domain, None)
            if activate and selector not in active:
                active.append(selector)
            if activate or not had_active_file:
                self._write_active(domain, active)
        return DkimKey(domain, selector, kind, private, path)

    def next_selector(self, domain: str, now: float | None = None) -> str:
        """The selector :meth:`rotate` will use: ``<default><yyyymm>``, then ``-2``, ``-3``...

        E.g. ``ferry202607``, and for a second rotation that month ``ferry202607-2``.
        """
        domain = normalize_domain(domain)
        stamp = datetime.datetime.fromtimestamp(
            time.time() if now is None else now, datetime.UTC
        ).strftime("%Y%m")
        base = f"{self.default_selector}{stamp}"
        d = self._dir(domain)
        candidate, n = base, 1
        while (d / f"{candidate}.pem").exists():
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def rotate(
        self,
        domain: str,
        *,
        kind: KeyKind | None = None,
        bits: int = 2048,
        activate: bool = True,
    ) -> DkimKey:
        """Create a key under a new selector (:meth:`next_selector`) and sign with it.

        The new key replaces the active key(s) of the same kind; keys of the other
        kind keep signing (a dual RSA + Ed25519 domain rotates one kind at a time).
        ``kind`` defaults to RSA if an RSA key is active, else to the active kind.
        Old keys stay on disk, inactive, until :meth:`remove`.
        """
        domain = normalize_domain(domain)
        entries = self._load(domain).entries
        active_kinds = {e.key.kind for e in entries if e.active}
        if kind is None:
            kind = "rsa" if "rsa" in active_kinds or not active_kinds else "ed25519"
        key = self.generate(
            domain, selector=self.next_selector(domain), kind=kind, bits=bits, activate=False
        )
        if activate:
            self.activate(domain, key.selector, replace_kind=True)
        return key

    def activate(self, domain: str, selector: str, *, replace_kind: bool = False) -> None:
        """Make ``selector`` sign; with ``replace_kind``, it replaces active keys of its kind."""
        domain = normalize_domain(domain)
        selector = normalize_selector(selector)
        entries = self._load(domain).entries
        target = next(
            (e.key for e in entries if e.key.selector == selector and not e.configured), None
        )
        if target is None:
            raise FileNotFoundError(f"no key {selector} for {domain}")
        keep = [
            e.key.selector
            for e in entries
            if e.active
            and not e.configured
            and e.key.selector != selector
            and not (replace_kind and e.key.kind == target.kind)
        ]
        self._write_active(domain, [*keep, selector])

    def remove(self, domain: str, selector: str) -> bool:
        """Delete ``selector``'s key file and drop it from the active list."""
        domain = normalize_domain(domain)
        selector = normalize_selector(selector)
        path = self._dir(domain) / f"{selector}.pem"
        active_file = (self._dir(domain) / _ACTIVE).exists()
        active = self._active_selectors(domain)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        self._cache.pop(domain, None)
        if active_file or selector in active:
            self._write_active(domain, [s for s in active if s != selector])
        return True


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
    message = _crlf(message)
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        if end < 0:
            head, body = message, b""
        else:
            head, body = message[: end + 2], message[end + 4 :]
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
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
    return fields, body


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

    @property
    def signed(self) -> bool:
        """True when at least one signature was made."""
        return bool(self.headers)


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
        fields, body = split_message(message)
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
            return self._unsigned(target, f"no key for {target}", "no_key", required)
        names, header_data = select_headers(fields)
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")
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
