"""A test certificate authority (trustme) for real TLS on loopback.

One CA per test session: issuing ECDSA certificates is cheap, but there is no
reason to redo it per test. Certificates are cached by the set of names they
cover, and every one is also written to PEM files because Ferry's own server
is configured with ``tls_cert`` / ``tls_key`` paths, like in production.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

#: Names every default server certificate covers, so a client may connect by
#: any loopback spelling and still verify the host name.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one issued certificate."""

    cert: Path  # leaf then chain, as servers load it
    key: Path


class WorldCA:
    """The CA of the test world: issues server certs, builds SSL contexts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name="Ferry test world")
        self.ca_path = directory / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self._issued: dict[tuple[str, ...], tuple[trustme.LeafCert, CertFiles]] = {}

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM form."""
        return self._ca.cert_pem.bytes()

    def _leaf(self, names: tuple[str, ...]) -> tuple[trustme.LeafCert, CertFiles]:
        key = names or LOOPBACK_NAMES
        if key not in self._issued:
            leaf = self._ca.issue_cert(*key)
            stem = f"server{len(self._issued)}"
            files = CertFiles(self.directory / f"{stem}.pem", self.directory / f"{stem}.key")
            leaf.private_key_pem.write_to_path(str(files.key))
            # Leaf first, then its chain: what ssl.load_cert_chain expects.
            files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            self._issued[key] = (leaf, files)
        return self._issued[key]

    def issue(self, *names: str) -> CertFiles:
        """PEM files for a server cert covering ``names`` (default: loopback names)."""
        return self._leaf(tuple(names))[1]

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side context with a cert for ``names`` (default: loopback names)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._leaf(tuple(names))[0].configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context (hostname checked) that trusts only this CA."""
        # PROTOCOL_TLS_CLIENT verifies and checks host names, and (unlike
        # create_default_context) loads no system CAs.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._ca.configure_trust(context)
        return context
