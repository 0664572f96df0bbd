"""TLS material: the self-signed certificate made on first run, and SSL contexts.

Every problem with a certificate or key is reported the same way, ``<path>: <reason>``,
so an operator knows which file to look at.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ferry.domains import domain_key
from ferry.events import SelfSignedCreated, SelfSignedRegenerated, emit
from ferry.files import write_atomic

SELF_SIGNED_CERT = "tls-selfsigned.crt"
SELF_SIGNED_KEY = "tls-selfsigned.key"


class TlsMaterialError(OSError):
    """A certificate or key that cannot be used; ``str()`` is ``"<path>: <reason>"``."""


def _read(path: Path) -> bytes:
    """The file's bytes, or a TlsMaterialError naming the file and why it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TlsMaterialError(f"{path}: no such file") from None
    except PermissionError:
        raise TlsMaterialError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise TlsMaterialError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise TlsMaterialError(f"{path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TlsMaterialError(f"{path}: empty file")
    return data


def _diagnose(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> str:
    """Why OpenSSL refused this pair, in words naming the file at fault."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return f"{cert}: not a PEM certificate (or truncated)"
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return f"{key}: the key is encrypted; Ferry needs an unencrypted key"
    except ValueError:
        return f"{key}: not a PEM private key (or truncated)"
    except Exception as exc:  # an algorithm cryptography does not know
        return f"{key}: {exc}"
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*public) != certs[0].public_key().public_bytes(*public):
        return f"{key}: does not match the certificate {cert}"
    return ""


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server-side context: TLS 1.2+, the system's default ciphers.

    Raises TlsMaterialError ("<path>: <reason>") when the pair cannot be used.
    """
    cert_path, key_path = Path(cert), Path(key)
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    if b"ENCRYPTED" in key_pem:
        # Checked first: OpenSSL would otherwise ask for a passphrase on the terminal.
        raise TlsMaterialError(f"{key_path}: the key is encrypted; Ferry needs an unencrypted key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        reason = _diagnose(cert_path, key_path, cert_pem, key_pem)
        raise TlsMaterialError(reason or f"{cert_path}, {key_path}: {exc}") from None
    return ctx


def self_signed_context(directory: str | os.PathLike[str], hostname: str) -> ssl.SSLContext:
    """The context for the self-signed pair under ``directory``, healing it if needed.

    The pair is made on first use. If it exists but cannot be used (empty or truncated
    after a crash, one file missing, a key that does not match), it is made again and
    the reason logged: it is Ferry's own material, nobody else depends on its content.
    """
    d = Path(directory)
    cert, key = d / SELF_SIGNED_CERT, d / SELF_SIGNED_KEY
    if cert.exists() or key.exists():
        try:
            return server_context(cert, key)
        except TlsMaterialError as exc:
            ensure_self_signed(d, hostname, replace=True)
            emit(SelfSignedRegenerated(str(cert), str(key), str(exc)))
            return server_context(cert, key)
    ensure_self_signed(d, hostname)
    emit(SelfSignedCreated(str(cert), str(key)))
    return server_context(cert, key)


def ensure_self_signed(
    directory: str | os.PathLike[str], hostname: str, *, replace: bool = False
) -> tuple[Path, Path]:
    """Return (cert, key) paths under ``directory``, generating them on first use.

    The key is ECDSA P-256 (fast handshakes); the certificate names the configured
    hostname, ``localhost`` and the loopback addresses, valid for ten years. Each file
    is written atomically (temporary file, fsync, rename, directory fsync); the key goes
    first, so a crash between the two renames leaves a mismatched pair, which
    ``self_signed_context`` notices and replaces.
    """
    d = Path(directory)
    cert_path, key_path = d / SELF_SIGNED_CERT, d / SELF_SIGNED_KEY
    if not replace and cert_path.exists() and key_path.exists():
        return cert_path, key_path
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if hostname and hostname != "localhost":
        alt.insert(0, x509.DNSName(domain_key(hostname)))  # an IDN name: A-labels
    alt += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """ "TLSv1.3 TLS_AES_256_GCM_SHA384" for logs and Received: headers."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    version = ssl_object.version() or "TLS"
    return f"{version} {cipher[0]}" if cipher else version
