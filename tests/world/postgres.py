"""A private PostgreSQL cluster on loopback, for tests and CI.

Debian's ``postgresql`` package puts its binaries under /usr/lib/postgresql/<major>/bin.
``initdb`` and the server refuse to run as root, so as root they run as the ``postgres``
user, in a temporary directory that user owns. The server listens on 127.0.0.1 only, on a
free port, with its Unix socket inside its data directory (no system paths touched).
A password is required over TCP (scram-sha-256), so the way Ferry passes one is tested.

Stdlib only, so that ``.ci/run`` can use it with the system Python before the project's
virtualenv exists::

    python3 tests/world/postgres.py start DIR   # prints the DSN, leaves the server running
    python3 tests/world/postgres.py stop DIR

The test suite uses :class:`PostgresCluster` directly (tests/conftest.py: ``pg_dsn``).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

#: A test that needs PostgreSQL uses this server when the variable is set (CI exports it).
DSN_VARIABLE = "FERRY_TEST_PG_DSN"
USER = "ferry"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries, or None when none is installed."""

    def major(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """initdb + pg_ctl in ``base``; ``start()`` returns a DSN, ``stop()`` ends the server."""

    def __init__(self, base: Path, bindir: Path | None = None) -> None:
        self.base = Path(base)
        found = bindir or bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
        self.bindir = found
        self.data = self.base / "data"
        self.password_file = self.base / "password"
        self.port_file = self.base / "port"
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def dsn(self) -> str:
        password = self.password_file.read_text().strip()
        port = self.port_file.read_text().strip()
        return f"postgresql://{USER}:{password}@127.0.0.1:{port}/postgres"

    def start(self) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.base, "postgres", "postgres")
        if not self.data.exists():
            # Hex: no character a URL or a conninfo string would need to escape.
            self.password_file.write_text(secrets.token_hex(16) + "\n")
            self.password_file.chmod(0o644)  # the postgres user reads it once, at initdb
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                f"--pwfile={self.password_file}",
                "--encoding=UTF8",
                "--locale=C",
            )
            self.password_file.chmod(0o600)
        last: subprocess.CalledProcessError | None = None
        # A restart keeps its port (clients reconnect to the same DSN); else pick one.
        ports = [int(self.port_file.read_text())] if self.port_file.exists() else []
        for attempt in range(5):  # another process may take the free port first: pick again
            port = ports[attempt] if attempt < len(ports) else _free_port()
            self.port_file.write_text(f"{port}\n")
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port}"
                f" -c unix_socket_directories={self.data} -c max_connections=200"
            )
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.data / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
                return self.dsn
            except subprocess.CalledProcessError as exc:
                last = exc
                time.sleep(0.1)  # not synchronisation: a short pause before a new port
        raise RuntimeError(f"PostgreSQL did not start: {last and last.stderr!r}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    cluster = PostgresCluster(Path(argv[1]))
    if argv[0] == "start":
        print(cluster.start())
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
