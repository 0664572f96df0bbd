"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme


@dataclass
class TlsFiles:
    """A test CA and a server certificate for localhost / 127.0.0.1 as PEM files."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self):  # type: ignore[no-untyped-def]
        import ssl

        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFiles]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1", "mx.ferry.test")
    ca_file, cert_file, key_file = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as fh:
        for blob in cert.cert_chain_pems:
            fh.write(blob.bytes())
    yield TlsFiles(ca, ca_file, cert_file, key_file)


@pytest.fixture
def serve_factory() -> Iterator[object]:
    """Start `ferry serve` subprocesses; every one is stopped at teardown, pass or fail."""
    from tests.harness import ServeProcess

    started: list[ServeProcess] = []

    def start(config_path: Path, port: int) -> ServeProcess:
        proc = ServeProcess(config_path, port)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


# The test world: a real DNS server, scripted MX servers, a test CA (tests/world/).
from tests.world.fixtures import dns_server, mx_factory, world_ca  # noqa: E402, F401
