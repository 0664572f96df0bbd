"""Queue ids: 19 hex digits, sortable by time, unique across threads, processes and
restarts, and made without a system call per id."""

from __future__ import annotations

import os
import random
import re
import secrets
import subprocess
import sys
import threading

import pytest

from ferry.queue import base
from ferry.queue.base import new_queue_id

_FORMAT = re.compile(r"[0-9A-F]{19}")
NOW = 1_764_590_000.1235  # a fixed time: every id below shares one millisecond


def test_format_and_time_prefix() -> None:
    qid = new_queue_id(NOW)
    assert _FORMAT.fullmatch(qid)
    assert qid[:11] == f"{int(NOW * 1000):011X}"


def test_sorted_by_time() -> None:
    # mid-millisecond times, so float rounding never moves one into the next
    times = [(1_764_590_000_000 + ms + 0.5) / 1000 for ms in range(0, 5000, 3)]
    ids = [new_queue_id(t) for t in times]
    assert ids == sorted(ids)
    assert [int(qid[:11], 16) for qid in ids] == [int(t * 1000) for t in times]


def test_unique_within_one_millisecond_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def make(slot: list[str]) -> None:
        slot.extend(new_queue_id(NOW) for _ in range(20000))

    threads = [threading.Thread(target=make, args=(slot,)) for slot in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [qid for slot in out for qid in slot]
    assert len(set(ids)) == len(ids) == 80000


def test_no_system_call_per_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading /dev/urandom for every message cost 2-6 % of intake (issue 12); ids now
    # draw randomness once per process. Fails on the old code (secrets.token_hex).
    def no_urandom(*args: object) -> bytes:
        raise AssertionError("new_queue_id read /dev/urandom")

    monkeypatch.setattr(os, "urandom", no_urandom)
    monkeypatch.setattr(random, "_urandom", no_urandom)  # SystemRandom's own reference
    for name in ("token_bytes", "token_hex", "randbits"):
        monkeypatch.setattr(secrets, name, no_urandom)
    ids = {new_queue_id() for _ in range(1000)}
    assert len(ids) == 1000


def test_unique_across_processes_and_restarts() -> None:
    # Eight fresh interpreters (as eight restarts, or intake and delivery processes),
    # all in the same millisecond: no id repeats.
    code = (
        "from ferry.queue.base import new_queue_id\n"
        f"print(' '.join(new_queue_id({NOW!r}) for _ in range(2000)))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    ids: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        ids += out.split()
    assert len(ids) == 16000
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_its_own_ids() -> None:
    before = base._id_prefix
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out without running pytest's teardown
        try:
            os.write(write, " ".join(new_queue_id(NOW) for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        child = fh.read().split()
    os.waitpid(pid, 0)
    parent = [new_queue_id(NOW) for _ in range(100)]
    assert len(child) == 100
    assert not set(child) & set(parent)
    assert base._id_prefix == before  # the parent keeps its own
