"""The spool's layout before schema version 7, kept for the benchmarks that compare it:
each body a file of its own, ``spool/<id>``. Not used by Ferry (which still reads and
deletes such files: ``ferry.queue.spool.read`` and ``unlink``).

Writing one: create, write, ``fdatasync`` (no temporary name: the committed row, not
the name, makes a body visible), then a directory fsync shared by the writers waiting
(``DirSync``); ``store`` does both.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ferry.queue.spool import GroupSync, body_path, fsync_dir


def _write_synced(path: Path, data: bytes) -> None:
    """``data`` written to a new ``path`` and fdatasync-ed (nothing left on failure)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def write_file(spool: Path, message_id: str, data: bytes) -> Path:
    """The body under its final name, fdatasync-ed."""
    final = body_path(spool, message_id)
    _write_synced(final, data)
    return final


def write_renamed(spool: Path, message_id: str, data: bytes) -> Path:
    """The body written to ``<id>.tmp``, fdatasync-ed and renamed to ``<id>``."""
    final = body_path(spool, message_id)
    tmp = final.with_name(final.name + ".tmp")
    _write_synced(tmp, data)
    os.replace(tmp, final)
    return final


class DirSync(GroupSync):
    """Group commit for the fsyncs of a directory (new names in it made durable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(lambda: fsync_dir(path))


def store(spool: Path, dirsync: DirSync, message_id: str, data: bytes) -> Path:
    """The body durable under its final name when this returns."""
    path = write_file(spool, message_id, data)
    dirsync.sync()
    return path
