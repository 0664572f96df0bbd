"""Ferry and Postfix side by side, measured the same way by Postfix's own C tools. Not a test.

    python bench/side_by_side.py [--reps 3]
                                 [--configs 1k-new,1k-reuse,100k-new,100k-reuse,1k-new-accept]
                                 [--messages-1k 20000] [--messages-100k 5000] [--json FILE]
                                 [--ferry-base DIR] [--ferry-src DIR] [--quiet-timeout 60]
                                 [--run-timeout 900] [--workers N] [--intake-workers N]

``--ferry-base DIR`` adds a third relay, ``ferry-base``: Ferry run from the source tree
DIR (e.g. ``git archive <commit> | tar -x -C DIR``) with the same virtualenv, so the code
before and after a change alternate with Postfix in the same invocation. Each Ferry is
compared with Postfix pair by pair. ``--ferry-src DIR`` runs ``ferry`` itself from a
source tree too (by default the tree this script is in; a snapshot: editing the work tree
during a long run then changes nothing).

A configuration is a size and a connection mode; ``-accept`` at its end (``1k-new-accept``)
measures accepting alone: Postfix puts every message on hold (cleanup still fsyncs it;
no queue manager or delivery runs) and Ferry runs with ``delivery.hold = true``; the run
ends when ``smtp-source`` does, and the ratio printed is that of the accept rates.

For every configuration (message size x connection mode) and repetition, in one invocation:

  1. write back every dirty page (``sync``), then wait for a quiet machine (at least 90 % of
     both cores idle over one second, for at most a minute or ``--quiet-timeout`` seconds;
     the idle share found is printed with the run);
  2. start the relay on loopback: Postfix (a private instance, ``bench/postfix_instance.py``,
     fsync on, relayhost = the sink) or Ferry (``ferry serve``, fsync on, delivery mode
     ``relay`` to one smart host = the sink, 20 connections as Postfix's default
     destination concurrency);
  3. inject with ``smtp-source`` (50 sessions; ``-d`` keeps each connection for all its
     messages, without it every message has a connection of its own);
  4. receive with ``smtp-sink`` on 127.0.0.2;
  5. stop the clock when the relay's queue is empty (every message handed to the sink);
     a run that takes longer than ``--run-timeout`` seconds (smtp-source, or the queue
     draining) is stopped and the benchmark fails rather than hangs.

Postfix and Ferry alternate within each repetition, so slow drift of the machine affects
both. Printed per configuration and relay: min / median / max of the accept rate (messages
÷ smtp-source's run time), the end-to-end rate (messages ÷ time from the first connection
to the last delivery), CPU milliseconds per message (user + system of the relay's whole
process tree, children reaped included) and peak memory (the largest sum of the tree's
proportional set sizes, sampled every 0.25 s); then the Ferry/Postfix end-to-end ratio of
each pair and their median (accept-only: the accept rates), with the ratio of CPU per
message beside it.

Needs root (Postfix's master) and Debian's postfix package for smtp-source, smtp-sink and
postfix itself. Everything listens on 127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from postfix_instance import PostfixInstance  # noqa: E402

SINK_HOST = "127.0.0.2"
SESSIONS = 50
#: name -> (message size, connection reuse, accept only)
CONFIGS = {
    "1k-new": (1024, False, False),
    "1k-reuse": (1024, True, False),
    "100k-new": (102400, False, False),
    "100k-reuse": (102400, True, False),
    "1k-new-accept": (1024, False, True),
    "1k-reuse-accept": (1024, True, True),
    "100k-new-accept": (102400, False, True),
}
DEFAULT_CONFIGS = "1k-new,1k-reuse,100k-new,100k-reuse,1k-new-accept"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Relays in report order: Postfix first, then each Ferry compared with it (``ferry-wN``:
#: Ferry with ``delivery.workers = N``, from ``--workers`` with several counts;
#: ``ferry-iN``: ``server.workers = N``, from ``--intake-workers``).
RELAYS = ("postfix", "ferry-base", "ferry")


@dataclass
class Run:
    relay: str
    config: str
    rep: int
    messages: int
    idle_before: float
    accept_per_s: float
    end_to_end_per_s: float
    cpu_ms_per_msg: float
    peak_mb: float
    queued: int = -1  # accept-only: messages found in the queue afterwards


# -- the machine -------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port}")


def _cpu_times() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    return idle, sum(values[:8])


#: How long to wait for a quiet machine before each run (``--quiet-timeout``).
QUIET_TIMEOUT = [60.0]
#: The longest one run's injection or queue draining may take (``--run-timeout``).
RUN_TIMEOUT = [900.0]


def wait_quiet(threshold: float = 0.9, timeout: float | None = None) -> float:
    """The idle share of the whole machine over the last second, once it reaches
    ``threshold`` (or when ``timeout`` passes: the run then says how busy it was)."""
    deadline = time.monotonic() + (QUIET_TIMEOUT[0] if timeout is None else timeout)
    # Quiet disks too: the previous run's dirty pages (hundreds of MB of queue files at
    # 100 KB) would otherwise be written back during this run and slow its fsyncs.
    os.sync()
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(1)
        idle1, total1 = _cpu_times()
        share = (idle1 - idle0) / max(1, total1 - total0)
        if share >= threshold or time.monotonic() > deadline:
            return round(share, 3)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").glob("*"))
    except OSError:  # the process exited meanwhile (Postfix's short-lived daemons)
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(roots: list[int]) -> list[int]:
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def cpu_seconds(roots: list[int]) -> float:
    """User + system time of ``roots`` and their live descendants, plus what the roots
    reaped (cutime/cstime): a child that exits moves its time into its parent's."""
    ticks = 0
    root_set = set(roots)
    for pid in tree(roots):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        ticks += utime + stime
        if pid in root_set:
            ticks += cutime + cstime
    return ticks / CLK_TCK


def pss_mb(roots: list[int]) -> float:
    total = 0
    for pid in tree(roots):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


class PeakMemory(threading.Thread):
    def __init__(self, roots_of: object) -> None:
        super().__init__(daemon=True)
        self.roots_of = roots_of
        self.peak = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            self.peak = max(self.peak, pss_mb(self.roots_of()))  # type: ignore[operator]

    def stop(self) -> float:
        self.stopped.set()
        self.join(5)
        return round(self.peak, 1)


# -- the tools ---------------------------------------------------------------------


def start_sink(port: int) -> subprocess.Popen[bytes]:
    cmd = ["smtp-sink", "-u", "nobody", "-m", "1000", f"{SINK_HOST}:{port}", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(SINK_HOST, port)
    return proc


def smtp_source(port: int, messages: int, size: int, reuse: bool) -> float:
    args = ["smtp-source", "-s", str(SESSIONS), "-m", str(messages), "-l", str(size)]
    args += ["-f", "sender@example.org", "-t", "rcpt@example.net"]
    if reuse:
        args.append("-d")
    t0 = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, timeout=RUN_TIMEOUT[0])
    return time.perf_counter() - t0


def wait_until(done: object, timeout: float | None = None) -> None:
    deadline = time.monotonic() + (RUN_TIMEOUT[0] if timeout is None else timeout)
    while not done():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("the relay did not empty its queue in time")
        time.sleep(0.02)


# -- the relays ----------------------------------------------------------------------


def _files(path: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(path))


def run_postfix(tmp: Path, sink_port: int, config: str, rep: int, messages: int) -> Run:
    size, reuse, accept_only = CONFIGS[config]
    port = free_port()
    tmp.chmod(0o755)  # Postfix's unprivileged daemons must reach their directories
    # Accept only: every message goes to the hold queue (fsynced by cleanup as always);
    # the queue manager never sees it, so nothing is delivered.
    extra = {"smtpd_data_restrictions": "check_client_access static:HOLD"} if accept_only else {}
    with PostfixInstance(
        tmp / "postfix",
        listen=("127.0.0.1", port),
        relay_to=(SINK_HOST, sink_port),
        extra_settings=extra,
    ) as pf:
        idle = wait_quiet()

        def roots() -> list[int]:
            pid = pf.master_pid()
            return [pid] if pid else []

        cpu0 = cpu_seconds(roots())
        mem = PeakMemory(roots)
        mem.start()
        t0 = time.perf_counter()
        accept_secs = smtp_source(port, messages, size, reuse)
        if not accept_only:
            wait_until(pf.queue_empty)
        secs = time.perf_counter() - t0
        cpu = cpu_seconds(roots()) - cpu0
        peak = mem.stop()
        queued = _files(pf.spool / "hold") if accept_only else -1
    return Run(
        "postfix",
        config,
        rep,
        messages,
        idle,
        round(messages / accept_secs),
        0 if accept_only else round(messages / secs),
        round(cpu * 1000 / messages, 3),
        peak,
        queued,
    )


def ferry_config(
    tmp: Path,
    port: int,
    sink_port: int,
    *,
    hold: bool = False,
    workers: int | None = None,
    intake_workers: int | None = None,
) -> Path:
    """Ferry's configuration for the run: relay mode to the sink, queue under ``tmp``;
    ``hold``: accept only (``delivery.hold``); ``workers``: ``delivery.workers``;
    ``intake_workers``: ``server.workers``."""
    cfg = tmp / "ferry.toml"
    delivery = 'mode = "relay"\n'
    if hold:
        delivery += "hold = true\n"
    if workers is not None:
        delivery += f"workers = {workers}\n"
    server = "max_connections_per_ip = 500\n"
    if intake_workers is not None:
        server += f"workers = {intake_workers}\n"
    cfg.write_text(
        f'[server]\nhostname = "ferry.bench.test"\n'
        f'listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]\n'
        f"{server}"
        f'[queue]\npath = "{tmp}/data"\n'
        f"[delivery]\n{delivery}"
        f"[[smart_hosts]]\n"
        f'name = "sink"\nhost = "{SINK_HOST}"\nport = {sink_port}\ntls = "none"\n'
        f"require_tls = false\nmax_connections = 20\n"
        f"max_messages_per_connection = 1000000\n"
    )
    return cfg


def start_ferry(cfg: Path, src: Path | None = None) -> subprocess.Popen[bytes]:
    """``ferry serve`` from the source tree ``src`` (``--ferry-base``: the code before a
    change, run alternately with the code after), by default the tree this script is in:
    not whatever checkout the virtualenv's editable install points at."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src if src is not None else REPO)
    log = cfg.parent / "serve.log"
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "--config", str(cfg), "serve"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        cwd=cfg.parent,
        env=env,
    )


def run_ferry(
    tmp: Path,
    sink_port: int,
    config: str,
    rep: int,
    messages: int,
    src: Path | None = None,
    relay: str = "ferry",
    workers: int | None = None,
    intake_workers: int | None = None,
) -> Run:
    size, reuse, accept_only = CONFIGS[config]
    port = free_port()
    cfg = ferry_config(
        tmp, port, sink_port, hold=accept_only, workers=workers, intake_workers=intake_workers
    )
    proc = start_ferry(cfg, src)
    queued = -1
    try:
        try:
            wait_port("127.0.0.1", port)
        except SystemExit:
            # Say why (a missing module: run this script with the project's venv python).
            log = (cfg.parent / "serve.log").read_text(errors="replace")
            raise SystemExit(f"ferry serve did not start:\n{log[-2000:]}") from None
        idle = wait_quiet()
        db = sqlite3.connect(f"file:{tmp}/data/queue.db?mode=ro", uri=True)

        def delivered() -> bool:
            n = db.execute("SELECT COUNT(*) FROM recipients WHERE status = 'Delivered'")
            return int(n.fetchone()[0]) >= messages

        cpu0 = cpu_seconds([proc.pid])
        mem = PeakMemory(lambda: [proc.pid])
        mem.start()
        t0 = time.perf_counter()
        accept_secs = smtp_source(port, messages, size, reuse)
        if not accept_only:
            wait_until(delivered)
        secs = time.perf_counter() - t0
        cpu = cpu_seconds([proc.pid]) - cpu0
        peak = mem.stop()
        if accept_only:
            queued = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        db.close()
    finally:
        stop(proc)
    return Run(
        relay,
        config,
        rep,
        messages,
        idle,
        round(messages / accept_secs),
        0 if accept_only else round(messages / secs),
        round(cpu * 1000 / messages, 3),
        peak,
        queued,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s: a relay that does not stop must not hang the run."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- the report ----------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{min(values):,.0f} / {statistics.median(values):,.0f} / {max(values):,.0f}"


def _spread_f(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def report(runs: list[Run]) -> None:
    configs = [c for c in CONFIGS if any(r.config == c for r in runs)]
    print()
    print(
        f"{'config':<16} {'relay':<10} {'accept msgs/s':<24} {'end-to-end msgs/s':<24} "
        f"{'CPU ms/msg':<20} peak MB"
    )
    spread = "(min / med / max)"
    print(f"{'':<27} {spread:<24} {spread:<24} {spread:<20} {spread}")
    for config in configs:
        accept_only = CONFIGS[config][2]
        names = [r.relay for r in runs if r.config == config]
        relays = [r for r in RELAYS if r in names]
        relays += sorted({n for n in names if n not in RELAYS})
        for relay in relays:
            rs = [r for r in runs if r.config == config and r.relay == relay]
            if not rs:
                continue
            e2e = "-" if accept_only else _spread([r.end_to_end_per_s for r in rs])
            print(
                f"{config:<16} {relay:<10} {_spread([r.accept_per_s for r in rs]):<24} "
                f"{e2e:<24} "
                f"{_spread_f([r.cpu_ms_per_msg for r in rs]):<20} "
                f"{_spread([r.peak_mb for r in rs])}"
            )
            short = [r for r in rs if 0 <= r.queued < r.messages]
            if short:
                print(f"{'':<16} !! {relay}: fewer queued than sent in {len(short)} run(s)")
        # Accept only: the accept rates; otherwise the end-to-end rates.
        what = "accept" if accept_only else "end to end"
        ferries = [r for r in relays if r != "postfix"]
        pairs = [(f, "postfix") for f in ferries]
        pairs += [(f, ferries[0]) for f in ferries[1:]]
        for ferry, other in pairs:
            ratios, cpu = [], []
            for rep in sorted({r.rep for r in runs if r.config == config}):
                pair = {r.relay: r for r in runs if r.config == config and r.rep == rep}
                if ferry in pair and other in pair:
                    a, b = pair[ferry], pair[other]
                    rate = (
                        (a.accept_per_s, b.accept_per_s)
                        if accept_only
                        else (a.end_to_end_per_s, b.end_to_end_per_s)
                    )
                    ratios.append(rate[0] / rate[1])
                    cpu.append(a.cpu_ms_per_msg / b.cpu_ms_per_msg)
            if ratios:
                listed = ", ".join(f"{x:.2f}" for x in ratios)
                print(
                    f"{'':<16} {ferry}/{other} {what} per pair: {listed}; "
                    f"median {statistics.median(ratios):.2f} "
                    f"(CPU per message: median {statistics.median(cpu):.2f})"
                )
    idles = [r.idle_before for r in runs]
    print(f"\nidle share before the runs: {min(idles):.0%}-{max(idles):.0%} (target >= 90 %)")


def _stop_on_sigterm() -> None:
    """SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the ``finally`` blocks stop
    the Postfix instance, Ferry and the sink this run started."""

    def raise_interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def main() -> None:
    _stop_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--messages-1k", type=int, default=20000)
    ap.add_argument("--messages-100k", type=int, default=5000)
    ap.add_argument("--relays", default="postfix,ferry")
    ap.add_argument(
        "--ferry-base",
        type=Path,
        help="a source tree of Ferry (e.g. `git archive` of the commit before a change): "
        "adds the relay ferry-base, run alternately with postfix and ferry",
    )
    ap.add_argument(
        "--ferry-src",
        type=Path,
        help="run the relay ferry from this source tree (default: the one this script is in)",
    )
    ap.add_argument(
        "--workers",
        help="Ferry's delivery.workers (default: Ferry's); several (1,2) run Ferry once per "
        "count, as relays ferry-w1, ferry-w2, ... alternated with the others",
    )
    ap.add_argument(
        "--intake-workers",
        help="Ferry's server.workers (default: Ferry's); several (0,1,2) run Ferry once per "
        "count, as relays ferry-i0, ferry-i1, ... alternated with the others",
    )
    ap.add_argument("--quiet-timeout", type=float, default=60.0)
    ap.add_argument(
        "--run-timeout",
        type=float,
        default=900.0,
        help="fail (not hang) when one run's injection or draining takes longer",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install postfix (see the docstring)")
    configs = args.configs.split(",")
    for config in configs:
        if config not in CONFIGS:
            raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")
    relays = args.relays.split(",")
    if args.ferry_base is not None and "ferry-base" not in relays:
        relays.append("ferry-base")
    counts = [int(n) for n in args.workers.split(",")] if args.workers else [None]
    workers: dict[str, int | None] = {}
    if len(counts) > 1:
        at = relays.index("ferry")
        relays[at : at + 1] = [f"ferry-w{n}" for n in counts]
        workers = {f"ferry-w{n}": n for n in counts}
    else:
        workers = {r: counts[0] for r in relays}
    icounts = [int(n) for n in args.intake_workers.split(",")] if args.intake_workers else [None]
    intake: dict[str, int | None] = {r: icounts[0] for r in relays}
    if len(icounts) > 1:
        at = relays.index("ferry")
        relays[at : at + 1] = [f"ferry-i{n}" for n in icounts]
        intake = {f"ferry-i{n}": n for n in icounts}
        workers.update({f"ferry-i{n}": workers.get("ferry") for n in icounts})
    QUIET_TIMEOUT[0] = args.quiet_timeout
    RUN_TIMEOUT[0] = args.run_timeout
    runs: list[Run] = []
    sink_port = free_port(SINK_HOST)
    sink = start_sink(sink_port)
    try:
        for rep in range(1, args.reps + 1):
            for config in configs:
                size = CONFIGS[config][0]
                messages = args.messages_1k if size < 10000 else args.messages_100k
                # Alternate which relay goes first, so neither always runs on a warmer machine.
                order = relays if rep % 2 else list(reversed(relays))
                for relay in order:
                    with tempfile.TemporaryDirectory(prefix="ferry-sbs-") as d:
                        if relay == "postfix":
                            run = run_postfix(Path(d), sink_port, config, rep, messages)
                        else:
                            src = args.ferry_base if relay == "ferry-base" else args.ferry_src
                            run = run_ferry(
                                Path(d),
                                sink_port,
                                config,
                                rep,
                                messages,
                                src,
                                relay,
                                workers.get(relay),
                                intake.get(relay),
                            )
                    runs.append(run)
                    print(json.dumps(asdict(run)), flush=True)
    finally:
        sink.terminate()
        sink.wait(10)
    report(runs)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
