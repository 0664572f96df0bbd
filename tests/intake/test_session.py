"""The SMTP session's rules as dialogues: a transcript in, the same transcript out.

Each file in ``tests/cases/smtp_sessions/`` is one dialogue. Lines:

- ``set: key = value``: a ``server.*`` setting (JSON value) or a session option
  (``mode``, ``peer_ip``, ``tls``, ``tls_available``); before the dialogue.
- ``C: text``: a command line the client sends (Python escapes such as ``\\x00`` work;
  ``C: <too long>`` is a line over the limit).
- ``D: text``: one line of DATA content as sent on the wire (consecutive ``D:`` lines
  are one body; the terminating ``D: .`` included).
- ``E: event``: the socket side reports back: ``auth-ok USER``, ``auth-fail``,
  ``tls-started``, ``enqueued``, ``enqueue-failed ERROR``.
- ``S: line``: a reply line the server must send; ``A: action``: an action it must
  ask for (``starttls``, ``authenticate MECH USER PASSWORD``, ``receive-data LIMIT SIZE``,
  ``enqueue ...``, ``close``). A trailing ``...`` matches any rest of the line.

No socket is opened: the session is a plain object.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest

from ferry.config import RelayConfig
from ferry.envelope import Priority, Reply
from ferry.intake.aliases import AliasTable
from ferry.intake.policy import RelayPolicy
from ferry.intake.server import DataReader
from ferry.intake.session import (
    Action,
    Authenticate,
    Close,
    Enqueue,
    ReceiveData,
    Session,
    StartTls,
)

CASES = Path(__file__).resolve().parents[1] / "cases" / "smtp_sessions"
SESSION_OPTIONS = ("mode", "peer_ip", "tls", "tls_available")

BASE_SERVER: dict[str, Any] = {
    "hostname": "mx.ferry.test",
    "local_domains": ["local.test"],
    "relay_domains": ["partner.test"],
    "relay_networks": ["127.0.0.0/8"],
    "max_recipients": 3,
    "max_message_size": 2000,
    "max_line_length": 1000,
}
ALIASES = {
    "info@local.test": ["a@example.net", "b@example.com"],
    "postmaster@local.test": "info@local.test",
}


def make_session(settings: dict[str, Any]) -> Session:
    server = {**BASE_SERVER, **{k: v for k, v in settings.items() if k not in SESSION_OPTIONS}}
    cfg = RelayConfig.model_validate({"server": server, "aliases": ALIASES}).server
    ids = iter(f"QID{i}" for i in range(1, 1000))
    return Session(
        cfg,
        mode=settings.get("mode", "mta"),
        peer_ip=settings.get("peer_ip", "127.0.0.1"),
        policy=RelayPolicy.build(cfg.local_domains, cfg.relay_domains, cfg.relay_networks),
        aliases=AliasTable(ALIASES, cfg.local_domains),
        tls=settings.get("tls"),
        tls_available=settings.get("tls_available", True),
        new_id=lambda now: next(ids),
        clock=lambda: 1_700_000_000.0,
    )


def strip_received(data: bytes) -> bytes:
    """The stored message without the Received: header the session prepended."""
    end = data.index(b"\r\n", data.index(b"; "))
    return data[end + 2 :]


def describe(action: Action) -> tuple[str, str]:
    """One transcript line for what the session asked for."""
    if isinstance(action, Reply):
        return ("S", "\n".join(action.lines()))
    if isinstance(action, StartTls):
        return ("A", "starttls")
    if isinstance(action, Close):
        return ("A", "close")
    if isinstance(action, Authenticate):
        return ("A", f"authenticate {action.mechanism} {action.username} {action.password}")
    if isinstance(action, ReceiveData):
        return ("A", f"receive-data {action.limit} {action.declared_size}")
    assert isinstance(action, Enqueue)
    env = action.envelope
    rcpts = ",".join(
        f"<{r.address}>"
        + (f" notify={r.notify}" if r.notify else "")
        + (f" orcpt={r.orcpt}" if r.orcpt else "")
        for r in env.recipients
    )
    flags = [
        f"id={action.queue_id}",
        f"from=<{env.sender}>",
        f"to={rcpts}",
        f"priority={env.priority.name.lower()}",
    ]
    flags += [f"{k}={v}" for k, v in (("envid", env.envid), ("ret", env.ret)) if v]
    flags += [k for k in ("smtputf8", "body_8bit") if getattr(env, k)]
    flags.append(f"body={strip_received(env.data)!r}")
    return ("A", "enqueue " + " ".join(flags))


def parse_case(path: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    settings: dict[str, Any] = {}
    transcript: list[tuple[str, str]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        kind, sep, text = line.partition(": ")
        if not sep and line.endswith(":"):
            kind, text = line[:-1], ""
        if kind == "set":
            key, _, value = text.partition("=")
            settings[key.strip()] = json.loads(value)
        elif kind in ("C", "D", "E", "S", "A"):
            transcript.append((kind, text))
        else:
            raise ValueError(f"{path.name}:{number}: unknown line {line!r}")
    return settings, transcript


def unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode("utf-8"))[0]  # type: ignore[no-any-return]


def replay(settings: dict[str, Any], transcript: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Feed the transcript's inputs to a session; return the transcript it produces."""
    session = make_session(settings)
    out: list[tuple[str, str]] = [describe(a) for a in session.greet()]
    i = 0
    while i < len(transcript):
        kind, text = transcript[i]
        if kind == "C":
            out.append((kind, text))
            line = None if text == "<too long>" else unescape(text)
            actions = session.receive_line(line)
        elif kind == "D":
            wire = bytearray()
            while i < len(transcript) and transcript[i][0] == "D":
                out.append(transcript[i])
                wire += unescape(transcript[i][1]) + b"\r\n"
                i += 1
            i -= 1
            reader = DataReader(session.cfg.max_message_size)
            done = reader.feed(wire)
            assert done is not None, "a D: block must end with its terminating dot"
            actions = session.data_received(*done)
        elif kind == "E":
            out.append((kind, text))
            event, _, arg = text.partition(" ")
            if event == "auth-ok":
                actions = session.auth_succeeded(arg, Priority.HIGH if arg == "vip" else None)
            elif event == "auth-fail":
                actions = session.auth_failed(1)
            elif event == "tls-started":
                actions = session.tls_started("TLSv1.3")
            elif event == "enqueued":
                actions = session.enqueued()
            elif event == "enqueue-failed":
                actions = session.enqueue_failed(arg)
            else:
                raise ValueError(f"unknown event {text!r}")
        else:
            i += 1
            continue
        for action in actions:
            kind_text = describe(action)
            if kind_text[0] == "S":
                out.extend(("S", wire_line) for wire_line in kind_text[1].split("\n"))
            else:
                out.append(kind_text)
        i += 1
    return out


def matches(expected: tuple[str, str], actual: tuple[str, str]) -> bool:
    if expected[0] != actual[0]:
        return False
    if expected[1].endswith("..."):
        return actual[1].startswith(expected[1][:-3])
    return expected[1] == actual[1]


def render(lines: list[tuple[str, str]]) -> str:
    return "\n".join(f"{k}: {t}" for k, t in lines)


@pytest.mark.parametrize("path", sorted(CASES.glob("*.txt")), ids=lambda p: p.stem)
def test_dialogue(path: Path) -> None:
    settings, expected = parse_case(path)
    actual = replay(settings, expected)
    # The greeting opens every dialogue; the files leave it out.
    expected = [("S", "220 mx.ferry.test ESMTP Ferry"), *expected]
    ok = len(actual) == len(expected) and all(map(matches, expected, actual))
    assert ok, f"{path.name}\n--- expected\n{render(expected)}\n--- actual\n{render(actual)}"


def test_cases_exist() -> None:
    assert len(list(CASES.glob("*.txt"))) >= 10


def test_session_needs_no_io() -> None:
    """The session module imports nothing that does I/O (sockets, asyncio, ssl)."""
    import ast

    import ferry.intake.session as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"asyncio", "socket", "ssl", "selectors"}


def test_data_deadline_rule() -> None:
    from ferry.intake.server import data_deadline

    # data_timeout is the floor ...
    assert data_deadline(100.0, 0, 0, 600, 10_000) == 700.0
    assert data_deadline(100.0, 5_000_000, 0, 600, 10_000) == 700.0
    # ... a large message gets size / rate: 30 MB at 10 KB/s (80 kbit/s) has 3000 s,
    assert data_deadline(0.0, 30_000_000, 0, 600, 10_000) == 3000.0
    # and SIZE= counts before the octets arrive.
    assert data_deadline(0.0, 10, 30_000_000, 600, 10_000) == 3000.0
