"""Where Ferry spends its time: py-spy on every Ferry process during one side-by-side run.

    python bench/profile.py [--config 1k-reuse] [--messages 10000] [--top 25] [--out FILE]

Starts ``smtp-sink`` and ``ferry serve`` (relay mode to the sink, exactly as
``bench/side_by_side.py`` does), attaches ``py-spy record --subprocesses`` to the serve
process and so to its intake and delivery processes, injects with ``smtp-source``, stops
when every message reached the sink, and prints per process the functions with the most
self time (the innermost frame of each sample) and the most total time (anywhere on the
stack). py-spy samples only threads that run (``--idle`` adds waiting ones); samples of an
event loop waiting in ``select``/``epoll``, and of threads blocked in C that py-spy counts
as running (a thread-pool worker waiting for work, ``waitpid``), are counted apart.

Needs ``py-spy`` in the virtualenv (``.venv/bin/pip install py-spy``), root (py-spy
attaches with ptrace) and the Postfix tools. Not a test.
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import (
    CONFIGS,
    SINK_HOST,
    ferry_config,
    free_port,
    smtp_source,
    start_ferry,
    start_sink,
    wait_port,
    wait_until,
)

# py-spy raw lines: process 1:"cmd";process 2:"cmd";thread (0x..);fn (file:line);... COUNT
_PROCESS = re.compile(r'^process (\d+):"([^"]*)"')
# Innermost frames that mean waiting: an event loop in select/epoll, and threads blocked in
# C that py-spy may still report as running: a pool worker waiting for work (its only C
# call is the queue's get), a thread in waitpid, a Condition/Event wait. (function, file)
_WAITING = {
    ("select", "selectors.py"),
    ("poll", "selectors.py"),
    ("_run_once", "base_events.py"),
    ("_worker", "thread.py"),
    ("_try_wait", "subprocess.py"),
    ("wait", "threading.py"),
}


def _waiting(frame: str) -> bool:
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return "epoll" in frame
    fn, path = m.groups()
    return (fn.rpartition(".")[2], Path(path).name) in _WAITING or "epoll" in fn


def _frame_name(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``: one row per function."""
    m = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    fn, path = m.groups()
    return f"{fn} ({'/'.join(Path(path).parts[-2:])})"


def summarise(raw: Path, top: int) -> str:
    per_proc_self: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    per_proc_total: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    samples: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        proc = "?"
        while frames and (m := _PROCESS.match(frames[0])):  # parent;child;...: the last
            cmd = m.group(2)
            role = (
                "delivery"
                if "ferry.delivery" in cmd
                else "intake process"
                if "ferry.intake" in cmd
                else "serve"
            )
            proc = f"{role} pid {m.group(1)}"
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        samples[proc] += count
        leaf = frames[-1]
        if _waiting(leaf):
            idle[proc] += count
            continue
        per_proc_self[proc][_frame_name(leaf)] += count
        for name in {_frame_name(f) for f in frames}:
            per_proc_total[proc][name] += count
    out: list[str] = []
    for proc in sorted(samples):
        busy = samples[proc] - idle[proc]
        out.append(
            f"\n== {proc}: {samples[proc]} samples, {idle[proc] / samples[proc]:.0%} idle "
            f"(event loop waiting, threads blocked); shares below are of the {busy} busy samples"
        )
        out.append("-- self time")
        for name, n in per_proc_self[proc].most_common(top):
            out.append(f"{n / max(1, busy):6.1%}  {name}")
        out.append("-- total time (function anywhere on the stack)")
        for name, n in per_proc_total[proc].most_common(top):
            out.append(f"{n / max(1, busy):6.1%}  {name}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="1k-reuse", choices=list(CONFIGS))
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument(
        "--idle", action="store_true", help="also sample threads that wait (py-spy --idle)"
    )
    ap.add_argument("--out", type=Path, help="keep py-spy's raw output here")
    ap.add_argument("--ferry-src", type=Path, help="profile this source tree of Ferry")
    args = ap.parse_args()
    size, reuse, _accept_only = CONFIGS[args.config]
    py_spy = Path(sys.executable).parent / "py-spy"
    with tempfile.TemporaryDirectory(prefix="ferry-prof-") as d:
        tmp = Path(d)
        raw = args.out or tmp / "raw.txt"
        sink_port = free_port(SINK_HOST)
        sink = start_sink(sink_port)
        port = free_port()
        proc = start_ferry(ferry_config(tmp, port, sink_port), args.ferry_src)
        spy: subprocess.Popen[bytes] | None = None
        try:
            wait_port("127.0.0.1", port)
            spy = subprocess.Popen(
                [str(py_spy), "record", "-p", str(proc.pid), "--subprocesses"]
                + ["-r", str(args.rate), "-f", "raw", "-o", str(raw)]
                # Without --nonblocking py-spy stops the processes for every sample: a
                # 100 KB run took 150 s instead of 14 and the profile showed the stops.
                + ["--nonblocking"]
                + (["--idle"] if args.idle else []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)  # py-spy attaching: not a synchronisation the result depends on
            db = sqlite3.connect(f"file:{tmp}/data/queue.db?mode=ro", uri=True)

            def delivered() -> bool:
                n = db.execute("SELECT COUNT(*) FROM recipients WHERE status = 'Delivered'")
                return int(n.fetchone()[0]) >= args.messages

            t0 = time.perf_counter()
            smtp_source(port, args.messages, size, reuse)
            wait_until(delivered)
            secs = time.perf_counter() - t0
            db.close()
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        except BaseException:
            print((tmp / "serve.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
                spy.wait()
            proc.terminate()
            proc.wait(30)
            sink.terminate()
            sink.wait(10)
        print(f"{args.config}: {args.messages} messages end to end in {secs:.1f} s")
        print(summarise(raw, args.top))


if __name__ == "__main__":
    main()
