"""API tokens: created by ``ferry token create``, stored hashed, checked per request.

A token is 32 random bytes (``secrets``), shown once as ``ferry_<base64url>``. The file
keeps only its SHA-256: with 256 bits of entropy a token cannot be guessed from its hash,
so a slow password hash (as for SMTP users) would add cost to every request and no
safety. The file is one line per token, ``name scope sha256hex created``, mode 0600,
replaced atomically, and re-read when its modification time changes, so tokens created
or revoked while ``ferry serve`` runs take effect at once.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Scope = Literal["inject", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("inject", "read", "admin")
PREFIX = "ferry_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def allows(granted: Scope, needed: Scope) -> bool:
    """``admin`` may do everything; ``read`` and ``inject`` only what they name."""
    return granted == "admin" or granted == needed


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    scope: Scope
    digest: str
    created: float


class TokenError(ValueError):
    """A token operation that cannot be done (the message says why)."""


class TokenStore:
    """The tokens file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, Token] = {}

    def _read(self) -> builtins.list[Token]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        tokens = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[1] in SCOPES:
                tokens.append(Token(parts[0], parts[1], parts[2], float(parts[3])))
        return tokens

    def list(self) -> builtins.list[Token]:
        return sorted(self._read(), key=lambda t: t.name)

    def _write(self, tokens: builtins.list[Token]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{t.name} {t.scope} {t.digest} {t.created:.0f}\n" for t in tokens)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def create(self, name: str, scope: Scope, *, now: float | None = None) -> str:
        """A new token named ``name``; returns the secret (shown once, never stored)."""
        if not _NAME.match(name):
            raise TokenError(f"token name {name!r}: use letters, digits, '.', '_' or '-'")
        if scope not in SCOPES:
            raise TokenError(f"scope {scope!r}: one of {', '.join(SCOPES)}")
        with self._lock:
            tokens = self._read()
            if any(t.name == name for t in tokens):
                raise TokenError(f"a token named {name!r} exists (revoke it first)")
            secret = PREFIX + secrets.token_urlsafe(32)
            created = time.time() if now is None else now
            tokens.append(Token(name, scope, token_hash(secret), created))
            self._write(tokens)
        return secret

    def revoke(self, name: str) -> bool:
        with self._lock:
            tokens = self._read()
            kept = [t for t in tokens if t.name != name]
            if len(kept) == len(tokens):
                return False
            self._write(kept)
            return True

    def check(self, presented: str) -> Token | None:
        """The token ``presented`` belongs to, or None."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            with self._lock:
                self._by_digest = {t.digest: t for t in self._read()}
                self._stamp = stamp
        return self._by_digest.get(token_hash(presented))
