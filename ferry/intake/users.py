"""The SMTP AUTH users file (RFC 4954): names, scrypt hashes, default priority.

One user per line, ``name:hash`` or ``name:hash:PRIORITY``; ``#`` comments and
blank lines are kept when the file is rewritten. The hash is
``scrypt$<n>$<r>$<p>$<salt b64>$<dk b64>``; passwords are never stored.

The server and the ``ferry user`` command share the file: writes are atomic
renames and readers re-read when the file changes, so a user added while the
server runs can log in without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins  # UserDB.list shadows list in the class body
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ferry.envelope import Priority

log = logging.getLogger("ferry.users")

NAME_RE = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES, DK_BYTES = 16, 32
# scrypt needs about 128*n*r bytes; cap it so a tampered file cannot make a
# login attempt allocate gigabytes.
MAX_SCRYPT_MEM = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What callers may know about a user: never the hash."""

    name: str
    priority: Priority | None = None


@dataclass(frozen=True, slots=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    dk: bytes

    @classmethod
    def parse(cls, text: str) -> _Hash:
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not an scrypt hash")
        n, r, p = (int(x) for x in parts[1:4])
        if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r > MAX_SCRYPT_MEM:
            raise ValueError("bad scrypt parameters")
        try:
            salt = base64.b64decode(parts[4], validate=True)
            dk = base64.b64decode(parts[5], validate=True)
        except binascii.Error as exc:
            raise ValueError("bad base64") from exc
        if not salt or not dk:
            raise ValueError("empty salt or hash")
        return cls(n, r, p, salt, dk)

    @classmethod
    def make(cls, password: str) -> _Hash:
        salt = secrets.token_bytes(SALT_BYTES)
        dk = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, DK_BYTES)
        return cls(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, dk)

    def check(self, password: str) -> bool:
        dk = _scrypt(password, self.salt, self.n, self.r, self.p, len(self.dk))
        return hmac.compare_digest(dk, self.dk)  # constant time: no early exit to time

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (
            f"scrypt${self.n}${self.r}${self.p}${b64(self.salt).decode()}${b64(self.dk).decode()}"
        )


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=MAX_SCRYPT_MEM
    )


# Checked against when the user does not exist, so an unknown name costs the
# same scrypt as a wrong password and timing does not reveal which it was.
_DUMMY = _Hash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\0" * SALT_BYTES, b"\0" * DK_BYTES)


@dataclass(frozen=True, slots=True)
class _Entry:
    record: UserRecord
    hash: _Hash


def _line_name(line: str) -> str | None:
    """The user name a raw line defines, or None for comments and blanks."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    return text.split(":", 1)[0].strip()


def _parse_line(line: str) -> _Entry:
    parts = [p.strip() for p in line.strip().split(":")]
    if len(parts) not in (2, 3):
        raise ValueError("expected name:hash or name:hash:priority")
    name, hash_text = parts[0], parts[1]
    if not NAME_RE.fullmatch(name):
        raise ValueError("bad user name")
    priority = None
    if len(parts) == 3 and parts[2]:
        try:
            priority = Priority[parts[2].upper()]
        except KeyError:
            raise ValueError("unknown priority") from None
    return _Entry(UserRecord(name, priority), _Hash.parse(hash_text))


class UserDB:
    """Users allowed to AUTH, backed by a file that may change under us."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # verify() runs in worker threads
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, _Entry] = {}

    # -- reading ---------------------------------------------------------

    def _current(self) -> dict[str, _Entry]:
        """The users, re-read only if the file's identity, size or mtime changed."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._users = self._load() if stamp is not None else {}
                self._stamp = stamp
            return self._users

    def _read_lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def _load(self) -> dict[str, _Entry]:
        users: dict[str, _Entry] = {}
        for lineno, line in enumerate(self._read_lines(), 1):
            if _line_name(line) is None:
                continue
            try:
                entry = _parse_line(line)
            except ValueError as exc:
                # The reason only, never the line: it may hold a hash.
                log.warning("%s line %d: skipped (%s)", self.path, lineno, exc)
                continue
            if entry.record.name in users:
                log.warning("%s line %d: duplicate user ignored", self.path, lineno)
                continue
            users[entry.record.name] = entry
        return users

    def list(self) -> list[UserRecord]:
        """All valid users, in file order."""
        return [e.record for e in self._current().values()]

    def verify(self, name: str, password: str) -> UserRecord | None:
        """The user's record if ``password`` is right, else None.

        Costs one scrypt whether or not the user exists. Blocking: call
        :meth:`averify` from the event loop.
        """
        entry = self._current().get(name)
        if entry is None:
            _DUMMY.check(password)
            return None
        return entry.record if entry.hash.check(password) else None

    async def averify(self, name: str, password: str) -> UserRecord | None:
        """:meth:`verify` in a worker thread, so scrypt never blocks the loop."""
        return await asyncio.to_thread(self.verify, name, password)

    # -- writing ---------------------------------------------------------

    def add(self, name: str, password: str, priority: Priority | None = None) -> None:
        """Add a user, or replace an existing one's password and priority."""
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"bad user name {name!r}: 1-64 of A-Z a-z 0-9 . _ @ + -")
        if not password:
            raise ValueError("empty password")
        line = f"{name}:{_Hash.make(password)}"
        if priority is not None:
            line += f":{priority.name}"
        lines: builtins.list[str] = []
        replaced = False
        for old in self._read_lines():
            if _line_name(old) == name:
                if not replaced:  # replace in place so the file keeps its order
                    lines.append(line)
                    replaced = True
                continue
            lines.append(old)
        if not replaced:
            lines.append(line)
        self._write(lines)

    def remove(self, name: str) -> bool:
        """Remove a user; False if there was none."""
        old = self._read_lines()
        lines = [x for x in old if _line_name(x) != name]
        if len(lines) == len(old):
            return False
        self._write(lines)
        return True

    def _write(self, lines: builtins.list[str]) -> None:
        # Temp file + fsync + rename: a reader (or a crash) sees the old file
        # or the new one, never half of one. mkstemp creates it 0600.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write("".join(f"{x}\n" for x in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # Make the rename itself durable.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
