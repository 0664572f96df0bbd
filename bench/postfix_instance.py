"""A private, throw-away Postfix relay instance for benchmarks. Not a test.

    python bench/postfix_instance.py --listen 127.0.0.1:2526 --relay-to 127.0.0.2:2527 \
        [--workdir DIR] [--process-limit 100]

prints "ready" once smtpd answers, then runs until Ctrl-C / SIGTERM and stops
Postfix again.  As a module::

    with PostfixInstance(workdir, listen=("127.0.0.1", 2526),
                         relay_to=("127.0.0.2", 2527)) as pf:
        ...                      # send mail to 127.0.0.1:2526
        while not pf.queue_empty():
            time.sleep(0.05)

Must run as root (Postfix's master needs it; daemons drop to the `postfix`
user).  The instance is fully separate from any system Postfix: its own
config_directory (``workdir/etc``, selected with ``postfix -c``), queue_directory
(``workdir/spool``, which also holds ``pid/master.pid``), data_directory
(``workdir/data``, holds ``master.lock``) and log file (``workdir/maillog``,
written by the ``postlog`` service).  The stock binaries, daemon_directory and
meta_directory (/etc/postfix/postfix-files etc., read-only) are shared.  Nothing
outside ``workdir`` is written.  Only the smtpd listener on ``listen`` is an
inet service, so nothing binds port 25 or any non-loopback address.

What differs from stock Postfix and why
---------------------------------------
Functional (make it a pure relay to the sink):
  * ``relayhost = [relay_to]:port`` -- every message goes to the sink, no MX
    lookup; ``mydestination =``, empty alias/local maps and
    ``local_transport = error:`` -- no local delivery at all.
  * ``mynetworks = 127.0.0.0/8``,
    ``smtpd_relay_restrictions = permit_mynetworks, reject``.
  * ``inet_interfaces = <listen host>``, ``inet_protocols = ipv4``.
  * master.cf has only the smtpd listener plus the internal services Postfix
    needs (pickup, cleanup, qmgr, rewrite, bounce/defer/trace, verify, flush,
    proxymap/proxywrite, smtp/relay, showq, error/retry, discard, local,
    virtual, lmtp, anvil, scache, tlsmgr, postlog).  chroot is off everywhere
    (Debian's default is chroot=y, which would need a populated jail).
  * ``maillog_file = workdir/maillog`` (+ ``maillog_file_prefixes``) so logs do
    not depend on a syslog daemon.
  * ``compatibility_level = 3.6`` just silences backwards-compat warnings.

Avoiding work Ferry does not do either / that would add noise:
  * No DNS at all: ``smtp_dns_support_level = disabled``,
    ``smtp_host_lookup = native`` (relayhost is an IP literal anyway) and
    ``smtpd_peername_lookup = no`` (no reverse lookup of each client).
  * No TLS: ``smtp_tls_security_level = none``, ``smtpd_tls_security_level = none``.
  * ``biff = no`` (no comsat notifications), ``append_dot_mydomain = no``.

Performance-relevant knobs:
  * ``default_process_limit = process_limit`` (stock: 100) -- caps concurrent
    smtpd sessions and concurrent smtp delivery agents alike.
  * ``smtp_connection_cache_destinations = [relay_to]:port`` -- always reuse
    SMTP connections to the sink (stock Postfix only caches "on demand", i.e.
    once a backlog builds up).  Ferry pools connections, so this keeps the
    comparison like for like.

Deliberately left at Postfix defaults: durability (cleanup fsyncs every queue
file before answering 250, like Ferry's fsync-on queue), delivery concurrency
(``default_destination_concurrency_limit = 20`` per destination, slow-start
``initial_destination_concurrency = 5``), ``in_flow_delay = 1s`` (Postfix's own
back-pressure on smtpd when qmgr falls behind), queue manager limits,
``smtpd_client_connection_count_limit`` (loopback clients are exempt through
``smtpd_client_event_limit_exceptions = $mynetworks`` anyway).  Any of these
can be overridden with ``extra_settings={...}``.

Tricky bits handled here:
  * The queue must have Postfix's ownership layout (root-owned queue dir and
    pid/, postfix-owned queue subdirs, maildrop/public group postdrop);
    ``postfix -c etc set-permissions`` creates/fixes it, and the parent
    ``workdir`` is made world-searchable (0755) so daemons running as
    ``postfix`` can reach ``data/``.
  * ``postqueue -c`` is set-gid and refuses a config directory that is not in
    the *system* main.cf's alternate_config_directories, so ``queue_empty``
    counts queue files instead.
  * ``stop`` uses ``postfix stop`` (which already escalates to SIGKILL of the
    master's process group after 5s), then double-checks: any process whose
    executable is in Postfix's daemon_directory and whose cwd is *this*
    instance's queue directory is killed by pid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"

# Queues that hold mail not yet delivered (hold/corrupt are not "in flight").
_PENDING_QUEUES = ("maildrop", "incoming", "active", "deferred")

# service type private unpriv chroot wakeup maxproc command (after the listener).
_INTERNAL_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    """A private Postfix relay: smtpd on `listen`, everything relayed to `relay_to`."""

    def __init__(
        self,
        workdir: Path,
        *,
        listen: tuple[str, int],
        relay_to: tuple[str, int],
        hostname: str = "postfix.bench.test",
        process_limit: int = 100,
        extra_settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.listen = (listen[0], int(listen[1]))
        self.relay_to = (relay_to[0], int(relay_to[1]))
        self.hostname = hostname
        self.process_limit = int(process_limit)
        self.extra_settings = dict(extra_settings or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.etc = self.workdir / "etc"
        self.spool = self.workdir / "spool"
        self.data = self.workdir / "data"
        self.maillog = self.workdir / "maillog"
        self.pid_file = self.spool / "pid" / "master.pid"
        self._started = False

    # ------------------------------------------------------------ config
    def main_cf_settings(self) -> dict[str, str]:
        rhost, rport = self.relay_to
        relayhost = f"[{rhost}]:{rport}"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "inet_interfaces": self.listen[0],
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": relayhost,
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtp_connection_cache_destinations": relayhost,
            "default_process_limit": str(self.process_limit),
            "biff": "no",
            "append_dot_mydomain": "no",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.workdir),
        }
        settings.update(self.extra_settings)
        return settings

    def master_cf(self) -> str:
        listener = f"{_hostport(*self.listen)} inet n - n - - smtpd\n"
        return "# generated by bench/postfix_instance.py\n" + listener + _INTERNAL_SERVICES

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Daemons run as `postfix` and open data_directory by absolute path.
        st = self.workdir.stat()
        if st.st_mode & 0o005 != 0o005:
            os.chmod(self.workdir, st.st_mode | 0o755)
        for d in (self.etc, self.spool):
            d.mkdir(exist_ok=True)
            os.chown(d, 0, 0)
            os.chmod(d, 0o755)
        self.data.mkdir(exist_ok=True)
        main = "# generated by bench/postfix_instance.py\n" + "".join(
            f"{k} = {v}\n" for k, v in self.main_cf_settings().items()
        )
        for name, text in (("main.cf", main), ("master.cf", self.master_cf())):
            path = self.etc / name
            path.write_text(text)
            os.chown(path, 0, 0)
            os.chmod(path, 0o644)

    # ------------------------------------------------------------ helpers
    def _run(self, *args: str, cmd: str = POSTFIX, timeout: float = 60) -> str:
        proc = subprocess.run(
            [cmd, "-c", str(self.etc), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=self._env(),
        )
        if proc.returncode != 0:
            raise PostfixError(
                f"{Path(cmd).name} -c {self.etc} {' '.join(args)} failed "
                f"({proc.returncode}):\n{proc.stdout}{self._log_tail()}"
            )
        return proc.stdout

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MAIL_CONFIG", None)
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        return env

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.maillog.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- " + str(self.maillog) + " (tail) ---\n" + "\n".join(tail)

    def master_pid(self) -> int | None:
        """Pid of this instance's master if it is running, else None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def instance_pids(self) -> list[int]:
        """Postfix daemons (master and children) belonging to this instance.

        Identified by executable in Postfix's daemon_directory plus cwd == our
        queue directory (master chdirs there; children inherit it).
        """
        spool = os.path.realpath(self.spool)
        daemon_dir = os.path.realpath(_daemon_directory())
        pids: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
                exe = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                continue
            if cwd == spool and os.path.dirname(exe.removesuffix(" (deleted)")) == daemon_dir:
                pids.append(int(entry))
        return pids

    def _smtpd_answers(self) -> bool:
        try:
            with socket.create_connection(self.listen, timeout=2) as s:
                s.settimeout(5)
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    try:
                        s.recv(512)
                    except OSError:
                        pass
                    return True
        except OSError:
            pass
        return False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.master_pid() is not None:
            raise PostfixError(f"a Postfix master for {self.etc} is already running")
        self.write_config()
        self._run("set-permissions")  # creates queue dirs with the right owners
        self._run("check")
        self._run("start")
        self._started = True
        deadline = time.monotonic() + self.start_timeout
        while not self._smtpd_answers():
            if time.monotonic() > deadline:
                log = self._log_tail()
                self.stop()
                raise PostfixError(f"smtpd did not answer on {_hostport(*self.listen)}{log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.master_pid() is not None:
            try:
                # `postfix stop` waits up to 5s, then SIGKILLs the process group.
                self._run("stop", timeout=self.stop_timeout + 10)
            except (PostfixError, subprocess.TimeoutExpired) as e:
                print(f"postfix_instance: {e}", file=sys.stderr)
        deadline = time.monotonic() + self.stop_timeout
        while True:
            pids = self.instance_pids()
            master = self.master_pid()
            if master is not None and master not in pids:
                pids.append(master)
            if not pids:
                break
            if time.monotonic() > deadline:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.2)
                if self.instance_pids():
                    raise PostfixError(
                        f"Postfix processes survived SIGKILL: {self.instance_pids()}"
                    )
                break
            time.sleep(0.1)
        self._started = False

    def queue_empty(self) -> bool:
        """True if no message is waiting in maildrop/incoming/active/deferred."""
        for q in _PENDING_QUEUES:
            for _root, _dirs, files in os.walk(self.spool / q):
                if files:
                    return False
        return True

    def queue_count(self) -> int:
        return sum(len(f) for q in _PENDING_QUEUES for _r, _d, f in os.walk(self.spool / q))

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_DAEMON_DIR: str | None = None


def _daemon_directory() -> str:
    global _DAEMON_DIR
    if _DAEMON_DIR is None:
        out = subprocess.run(
            [POSTCONF, "-d", "-h", "daemon_directory"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        _DAEMON_DIR = out or "/usr/lib/postfix/sbin"
    return _DAEMON_DIR


def _parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a private Postfix relay instance.")
    ap.add_argument("--listen", type=_parse_addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--relay-to", type=_parse_addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory, removed on exit")
    ap.add_argument("--hostname", default="postfix.bench.test")
    ap.add_argument("--process-limit", type=int, default=100)
    args = ap.parse_args(argv)

    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="postfix-bench-")
        workdir = Path(tmp)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pf = PostfixInstance(
        workdir,
        listen=args.listen,
        relay_to=args.relay_to,
        hostname=args.hostname,
        process_limit=args.process_limit,
    )
    try:
        pf.start()
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        pf.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
