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

import contextlib
import datetime
import functools
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ferry.domains import to_a_labels
from ferry.envelope import split_address

logger = logging.getLogger("ferry.dkim")

KeyKind = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_DOMAIN = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")
# RFC 6376 §3.1: a selector is a sub-domain; we also keep it a safe file name.
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9](?:[a-z0-9_-]{0,62}))*$")
_ACTIVE = "active"


# -- names -------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # pure; IDNA via dnspython costs ~20 us a call
def normalize_domain(domain: str) -> str:
    """``domain`` as DKIM's d= and the key directory spell it: A-labels, lower case.

    RFC 8616 §4: the d= of an internationalised domain uses A-labels. Raises
    :class:`ValueError` for something that is not a domain name (this also keeps
    path separators and ``..`` out of the keys directory).
    """
    try:
        name = to_a_labels(domain)
    except ValueError as exc:
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
        return normalize_domain(split_address(address)[1])
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
    checked_ns: int = 0  # clock_ns() when the stamp was last compared with the disk


#: A directory changed less than this long before we read it may change again within
#: the same timestamp tick (file times advance by the kernel's coarse clock, a few ms):
#: such a cache entry is re-checked on the next use ("racy" entries, as in Git's index).
_RACY_NS = 100_000_000

#: How long ``ferry serve``'s store trusts its cache before looking at the disk again:
#: a key generated, rotated or removed beside a running relay signs within a second.
SERVE_RECHECK_NS = 1_000_000_000


class KeyStore:
    """DKIM keys on disk (``keys_dir/<domain>/<selector>.pem``), parsed once and cached.

    ``extra_keys`` maps a domain to PEM files named in configuration (the file
    name's stem is the selector); they always sign, next to the directory's
    active keys. A domain's cache entry is reloaded when its directory's mtime
    changes, so ``ferry dkim ...`` run beside ``ferry serve`` takes effect without a
    restart. A reload re-reads the directory listing and the ``active`` file; PEM
    files are parsed again only when they changed.

    ``recheck_ns``: how long a trusted cache entry is used without looking at the
    disk. 0 (the default) compares the directory's stamp on every lookup: two
    ``stat`` calls per domain per message, about 3 % of a delivery process that
    signs nothing. ``ferry serve`` uses :data:`SERVE_RECHECK_NS`, so a change
    made beside it is used within that time.
    """

    def __init__(
        self,
        keys_dir: str | Path,
        *,
        extra_keys: Mapping[str, Sequence[str | Path]] | None = None,
        default_selector: str = "ferry",
        clock_ns: Callable[[], int] = time.time_ns,
        recheck_ns: int = 0,
    ) -> None:
        self.keys_dir = Path(keys_dir)
        self.clock_ns = clock_ns  # compared with file mtimes (injectable for tests)
        self.recheck_ns = recheck_ns
        self.default_selector = normalize_selector(default_selector)
        self._extra = {
            normalize_domain(d): [Path(p) for p in paths] for d, paths in (extra_keys or {}).items()
        }
        self._cache: dict[str, _Cached] = {}
        self._any: tuple[int, bool] | None = None  # (clock_ns when looked, any key found)
        self._parsed: dict[Path, tuple[tuple[int, int, int], DkimKey]] = {}
        self._lock = threading.RLock()

    # -- reading -----------------------------------------------------------------

    def _dir(self, domain: str) -> Path:
        return self.keys_dir / domain

    def _load(self, domain: str) -> _Cached:
        """The domain's entries, from the cache while the directory is unchanged."""
        cached = self._cache.get(domain)
        if cached is not None and cached.trusted and self.recheck_ns:
            now = self.clock_ns()
            if 0 <= now - cached.checked_ns < self.recheck_ns:  # a clock set back: look
                return cached
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
        if cached is not None and cached.stamp == stamp and cached.trusted:
            cached.checked_ns = self.clock_ns()
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
            now = self.clock_ns()
            trusted = stamp is None or now - max(stamp[0], stamp[2]) > _RACY_NS
            cached = _Cached(stamp, trusted, entries, errors, now)
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

    def any_keys(self) -> bool:
        """True when some domain has a key file, or a key is named in configuration.

        Cached like a domain's entry (``recheck_ns``): a relay without DKIM set up asks
        this per message and then has nothing to look up or report."""
        if self._extra:
            return True
        now = self.clock_ns()
        known = self._any
        if known is not None and self.recheck_ns and 0 <= now - known[0] < self.recheck_ns:
            return known[1]
        found = False
        try:
            with os.scandir(self.keys_dir) as entries:
                for entry in entries:
                    if entry.is_dir() and any(Path(entry.path).glob("*.pem")):
                        found = True
                        break
        except (FileNotFoundError, NotADirectoryError):
            pass
        self._any = (now, found)
        return found

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
