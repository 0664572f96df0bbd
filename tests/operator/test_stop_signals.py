"""Stopping the whole service at once, as systemd does (every process of the unit gets
SIGTERM at the same moment): a clean stop, not a child "dying"."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from tests.harness import child_pids, free_port, process_running, wait_until, write_toml


def test_sigterm_to_every_process_at_once_is_a_clean_stop(
    tmp_path: Path, serve_factory: Any
) -> None:
    port = free_port()
    cfg = write_toml(
        tmp_path / "ferry.toml",
        f"""
[server]
hostname = "mx.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
[queue]
path = "{tmp_path / "data"}"
[delivery]
hold = true
""",
    )
    serve = serve_factory(cfg, port)
    assert serve.proc is not None
    wait_until(lambda: " started " in serve.log_path.read_text(), 15, "the started line")
    # An intake process and a delivery worker.
    modules = (b"ferry.intake.process", b"ferry.delivery.process")
    children = wait_until(
        lambda: len(kids := child_pids(serve.proc.pid, *modules)) == 2 and kids, 15
    )
    for pid in (*children, serve.proc.pid):
        with contextlib.suppress(ProcessLookupError):  # stopped by serve already
            os.kill(pid, signal.SIGTERM)
    code = serve.proc.wait(30)
    log = serve.log_path.read_text()
    assert code == 0, log
    assert "stopping" in log
    assert "_died" not in log, log  # neither delivery_worker_died nor intake_worker_died
    assert not any(process_running(p) for p in children)
