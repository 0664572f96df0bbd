"""TLS material: the self-signed pair heals itself; an operator's pair fails by name."""

from __future__ import annotations

import dataclasses
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from ferry.events import subscribe
from ferry.tls import (
    SELF_SIGNED_CERT,
    SELF_SIGNED_KEY,
    TlsMaterialError,
    ensure_self_signed,
    self_signed_context,
    server_context,
)
from tests.conftest import TlsFiles
from tests.harness import free_port, wait_until, write_toml


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = subscribe(lambda event: seen.append((event.name, dataclasses.asdict(event))))
    yield seen
    unsubscribe()


def _pair(d: Path) -> tuple[bytes, bytes]:
    return (d / SELF_SIGNED_CERT).read_bytes(), (d / SELF_SIGNED_KEY).read_bytes()


def test_first_run_creates_a_private_key_and_reuses_the_pair(tmp_path: Path, events) -> None:  # type: ignore[no-untyped-def]
    self_signed_context(tmp_path / "data", "mx.ferry.test")
    first = _pair(tmp_path / "data")
    assert (tmp_path / "data" / SELF_SIGNED_KEY).stat().st_mode & 0o777 == 0o600
    assert [e for e, _ in events] == ["tls_selfsigned_created"]
    self_signed_context(tmp_path / "data", "mx.ferry.test")
    assert _pair(tmp_path / "data") == first  # a usable pair is never replaced
    assert [e for e, _ in events] == ["tls_selfsigned_created"]
    # no temporary file left behind
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        SELF_SIGNED_CERT,
        SELF_SIGNED_KEY,
    ]


def _empty_cert(d: Path) -> None:
    (d / SELF_SIGNED_CERT).write_bytes(b"")


def _empty_key(d: Path) -> None:
    (d / SELF_SIGNED_KEY).write_bytes(b"")


def _truncated_cert(d: Path) -> None:
    p = d / SELF_SIGNED_CERT
    p.write_bytes(p.read_bytes()[:100])


def _missing_key(d: Path) -> None:
    (d / SELF_SIGNED_KEY).unlink()


def _missing_cert(d: Path) -> None:
    (d / SELF_SIGNED_CERT).unlink()


def _other_key(d: Path) -> None:
    # the crash between the key's rename and the certificate's: a mismatched pair
    other = d / "other"
    ensure_self_signed(other, "mx.ferry.test")
    (d / SELF_SIGNED_KEY).write_bytes((other / SELF_SIGNED_KEY).read_bytes())


DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty certificate": _empty_cert,
    "empty key": _empty_key,
    "truncated certificate": _truncated_cert,
    "key missing": _missing_key,
    "certificate missing": _missing_cert,
    "key of another pair": _other_key,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_self_signed_pair_is_made_again_and_logged(
    tmp_path: Path,
    events,  # type: ignore[no-untyped-def]
    damage: str,
) -> None:
    d = tmp_path / "data"
    ensure_self_signed(d, "mx.ferry.test")
    DAMAGE[damage](d)
    ctx = self_signed_context(d, "mx.ferry.test")
    assert isinstance(ctx, ssl.SSLContext)
    server_context(d / SELF_SIGNED_CERT, d / SELF_SIGNED_KEY)  # usable again
    regenerated = [f for e, f in events if e == "tls_selfsigned_regenerated"]
    assert len(regenerated) == 1
    assert str(d) in regenerated[0]["reason"]


def _operator_case(files: TlsFiles, tmp: Path, case: str) -> tuple[Path, Path, Path, str]:
    """(cert, key, the file the error must name, words the reason must contain)."""
    cert, key = files.cert_file, files.key_file
    if case == "certificate missing":
        cert = tmp / "nowhere" / "cert.pem"
        return cert, key, cert, "no such file"
    if case == "key missing":
        key = tmp / "key-missing.pem"
        return cert, key, key, "no such file"
    if case == "certificate empty":
        cert = tmp / "empty.pem"
        cert.write_bytes(b"")
        return cert, key, cert, "empty file"
    if case == "certificate is a directory":
        return tmp, key, tmp, "is a directory"
    if case == "certificate not PEM":
        cert = tmp / "junk.pem"
        cert.write_bytes(b"this is not a certificate\n")
        return cert, key, cert, "not a PEM certificate"
    if case == "key not PEM":
        key = tmp / "junk.key"
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        return cert, key, key, "not a PEM private key"
    if case == "key of another certificate":
        key = tmp / "other.key"
        trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(key))
        return cert, key, key, "does not match the certificate"
    if case == "key encrypted":
        from cryptography.hazmat.primitives import serialization

        private = serialization.load_pem_private_key(files.key_file.read_bytes(), None)
        key = tmp / "encrypted.key"
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        return cert, key, key, "encrypted"
    raise AssertionError(case)


OPERATOR_CASES = [
    "certificate missing",
    "key missing",
    "certificate empty",
    "certificate is a directory",
    "certificate not PEM",
    "key not PEM",
    "key of another certificate",
    "key encrypted",
]


@pytest.mark.parametrize("case", OPERATOR_CASES)
def test_an_operator_pair_that_cannot_be_used_names_the_file_and_the_reason(
    tls_files: TlsFiles, tmp_path: Path, case: str
) -> None:
    cert, key, culprit, words = _operator_case(tls_files, tmp_path, case)
    with pytest.raises(TlsMaterialError) as info:
        server_context(cert, key)
    assert str(info.value).startswith(f"{culprit}: ")
    assert words in str(info.value)
    # an operator's files are never touched
    assert not (tmp_path / SELF_SIGNED_CERT).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_operator_key_says_permission_denied(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(tls_files.key_file.read_bytes())
    key.chmod(0)
    with pytest.raises(TlsMaterialError, match=f"^{key}: permission denied"):
        server_context(tls_files.cert_file, key)


def _serve_config(tmp_path: Path, port: int, tls: str = "") -> Path:
    return write_toml(
        tmp_path / "ferry.toml",
        f"""
[server]
hostname = "mx.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
users_file = "{tmp_path}/users"
{tls}
[queue]
path = "{tmp_path}/data"
[delivery]
hold = true
""",
    )


def test_serve_starts_after_a_crash_left_the_self_signed_pair_empty(
    tmp_path: Path,
    serve_factory,  # type: ignore[no-untyped-def]
) -> None:
    # What a crash soon after the first start left behind: both files, both empty.
    data = tmp_path / "data"
    data.mkdir()
    (data / SELF_SIGNED_CERT).write_bytes(b"")
    (data / SELF_SIGNED_KEY).write_bytes(b"")
    port = free_port()
    proc = serve_factory(_serve_config(tmp_path, port), port)
    wait_until(lambda: "tls_selfsigned_regenerated" in proc.log_path.read_text(), 10, "the log")
    assert f"{data / SELF_SIGNED_CERT}: empty file" in proc.log_path.read_text()
    # STARTTLS works with the remade pair
    import smtplib

    with smtplib.SMTP("127.0.0.1", port) as c:
        c.ehlo("client.test")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert c.starttls(context=ctx)[0] == 220


def test_serve_with_a_missing_operator_certificate_names_it(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(key))
    cert = tmp_path / "certs" / "server.pem"
    cfg = _serve_config(tmp_path, free_port(), f'tls_cert = "{cert}"\ntls_key = "{key}"')
    res = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert f"{cert}: " in res.stderr
    assert "PEM lib" not in res.stderr and "Errno" not in res.stderr
