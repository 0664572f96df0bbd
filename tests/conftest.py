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


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL server for the tests: FERRY_TEST_PG_DSN (CI starts one), else a
    private cluster started here from the installed binaries and stopped at the end."""
    import os
    import shutil
    import tempfile

    from tests.world.postgres import DSN_VARIABLE, PostgresCluster, bin_dir

    dsn = os.environ.get(DSN_VARIABLE)
    if dsn:
        yield dsn
        return
    if bin_dir() is None:
        pytest.fail(
            f"PostgreSQL is not installed: apt-get install -y postgresql, or set {DSN_VARIABLE}"
        )
    # Not under pytest's tmp_path: the postgres user must be able to enter it.
    base = Path(tempfile.mkdtemp(prefix="ferry-pg-"))
    cluster = PostgresCluster(base)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
