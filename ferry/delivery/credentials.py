"""Smart host credentials: passwords from config or a file, OAuth tokens for XOAUTH2.

Secrets are read when a connection needs them (so a rotated file takes effect without a
restart) and never logged: errors name the file or command, never its output.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

from ferry.config import SmartHost

# An access token from a command is reused for this long (tokens live ~1 h).
TOKEN_CACHE_SECONDS = 300.0


class CredentialError(Exception):
    """A secret could not be read; the message is safe to log."""


def password(host: SmartHost) -> str | None:
    """The password from ``password`` or ``password_file`` (first line), or None."""
    if host.password is not None:
        return host.password.get_secret_value()
    if host.password_file:
        return _read_secret(host.password_file, f"smart host {host.name}: password_file")
    return None


_token_cache: dict[str, tuple[float, str]] = {}


def oauth_token(host: SmartHost, *, now: float | None = None) -> str | None:
    """The XOAUTH2 access token from ``oauth_token_file`` or ``oauth_token_command``."""
    if host.oauth_token_file:
        return _read_secret(host.oauth_token_file, f"smart host {host.name}: oauth_token_file")
    if not host.oauth_token_command:
        return None
    now = time.monotonic() if now is None else now
    cached = _token_cache.get(host.name)
    if cached and now - cached[0] < TOKEN_CACHE_SECONDS:
        return cached[1]
    try:
        out = subprocess.run(
            shlex.split(host.oauth_token_command),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CredentialError(
            f"smart host {host.name}: oauth_token_command failed ({type(exc).__name__})"
        ) from None
    token = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    if not token:
        raise CredentialError(f"smart host {host.name}: oauth_token_command printed nothing")
    _token_cache[host.name] = (now, token)
    return token


def _read_secret(path: str, what: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialError(f"{what}: cannot read {path} ({exc.strerror})") from None
    value = text.splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise CredentialError(f"{what}: {path} is empty")
    return value
