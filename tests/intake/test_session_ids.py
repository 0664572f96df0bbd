"""Session ids: the label of one SMTP connection in every log line about it."""

from __future__ import annotations

import os
import re

from ferry.intake.server import new_session_id


def test_session_ids_are_ten_hex_digits_and_do_not_repeat() -> None:
    ids = [new_session_id() for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{10}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then leave at once
        os.write(write, " ".join(new_session_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    mine = {new_session_id() for _ in range(5)}
    with os.fdopen(read, "rb") as f:
        theirs = set(f.read().decode().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 5 and not mine & theirs
