"""Typed events: the log lines they make, their JSON form, the bus, the README catalogue.

Each file in ``tests/cases/events/`` is one event in its JSON form beside the log line it
must make, as text (without the timestamp) and as JSON (without ``ts``). The lines were
taken from the string-and-dict ``emit`` these classes replaced, so operators' and tests'
log lines stay as they were.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ferry.events as events
from ferry.envelope import Priority, Reply, Status
from ferry.events.catalogue import BEGIN, END, catalogue

ROOT = Path(__file__).resolve().parents[1]
CASES = sorted((ROOT / "tests" / "cases" / "events").glob("*.json"))


@pytest.fixture(name="log")
def log_fixture() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    """Ferry's log at DEBUG into a buffer; the previous handlers come back afterwards."""
    root = logging.getLogger("ferry")
    saved = (root.handlers[:], root.level, root.propagate)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    root.propagate = False
    try:
        yield buffer, handler
    finally:
        root.handlers[:], root.level, root.propagate = saved


def _line(
    log: tuple[io.StringIO, logging.Handler], event: events.Event, fmt: logging.Formatter
) -> str:
    buffer, handler = log
    buffer.seek(0)
    buffer.truncate()
    handler.setFormatter(fmt)
    events.emit(event)
    return buffer.getvalue().rstrip("\n")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_log_line(path: Path, log: tuple[io.StringIO, logging.Handler]) -> None:
    case = json.loads(path.read_text())
    event = events.from_dict(case["event"])
    assert events.to_dict(event) == case["event"]  # the JSON form round-trips
    text = _line(log, event, events.TextFormatter())
    assert text.split(" ", 1)[1] == case["text"]
    record = json.loads(_line(log, event, events.JsonFormatter()))
    record.pop("ts")
    assert record == case["json"]


def test_every_event_class_has_a_log_line_case() -> None:
    covered = {json.loads(p.read_text())["event"]["type"] for p in CASES}
    assert covered == set(events.EVENT_TYPES)


def test_subscribers_get_the_event_object_with_the_whole_reply() -> None:
    reply = Reply(550, "5.7.1", "\n".join("x" * 100 for _ in range(5)))
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        event = events.outcome_event(
            Status.FAILED,
            queue_id="Q1",
            recipient="a@example.net",
            route="direct",
            next_hop=None,
            tls=None,
            reply=reply,
            attempt=1,
            delay=0.5,
        )
        events.emit(event)
    finally:
        unsubscribe()
    assert seen == [event]
    assert isinstance(event, events.Failed) and event.status is Status.FAILED
    assert event.reply is reply  # nothing cut: only the log line shortens it
    assert len(event.log_fields()["reply"]) == 300


def test_a_failing_subscriber_breaks_nothing(log: tuple[io.StringIO, logging.Handler]) -> None:
    seen: list[events.Event] = []

    def broken(_event: events.Event) -> None:
        raise RuntimeError("subscriber bug")

    off_broken = events.subscribe(broken)
    off_seen = events.subscribe(seen.append)
    try:
        events.emit(events.LeasesReleased(2))
    finally:
        off_broken()
        off_seen()
    assert seen == [events.LeasesReleased(2)]
    assert "event subscriber failed" in log[0].getvalue()


def test_secret_field_names_are_masked_in_the_log(
    log: tuple[io.StringIO, logging.Handler],
) -> None:
    line = _line(
        log, events.Untyped("legacy", {"password": "hunter2", "user": "a"}), logging.Formatter()
    )
    assert "hunter2" not in line


def test_levels_decide_what_is_logged(log: tuple[io.StringIO, logging.Handler]) -> None:
    logging.getLogger("ferry").setLevel(logging.INFO)
    assert _line(log, events.Disconnected("127.0.0.1"), events.TextFormatter()) == ""
    warned = _line(
        log, events.DkimUnsigned("no key", queue_id="Q", required=True), events.TextFormatter()
    )
    assert " warning dkim_unsigned " in warned


def _string_emits(path: Path) -> list[int]:
    """Lines where ``emit`` is called with a string (the old, untyped form)."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "emit"
        and node.args
        and isinstance(node.args[0], (ast.Constant, ast.JoinedStr))
    ]


def test_ferry_emits_only_typed_events() -> None:
    found = {
        str(p.relative_to(ROOT)): lines
        for p in sorted((ROOT / "ferry").rglob("*.py"))
        if (lines := _string_emits(p))
    }
    assert found == {}, "emit an Event object (ferry/events/), not a string: " + repr(found)


def test_the_checker_sees_a_string_emit(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('emit("accept", id=1)\nemit(Accepted(x))\n')
    assert _string_emits(sample) == [1]


def test_readme_event_catalogue_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README.md lacks the event catalogue markers"
    shown = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert shown == catalogue(), "regenerate it: python -m ferry.events.catalogue"


def test_catalogue_names_every_event_and_field() -> None:
    text = catalogue()
    for name, cls in events.EVENT_TYPES.items():
        assert f"| `{name}` | `{cls.name}`" in text
    assert "`reply`: Reply" in text and "`queue_id`: str" in text


def _fields(data: dict[str, Any]) -> set[str]:
    return set(data) - {"type"}


def test_json_form_is_plain_json() -> None:
    event = events.Accepted("Q", "api", "a@b", ("c@d",), 1, Priority.HIGH)
    data = json.loads(json.dumps(events.to_dict(event)))
    assert data["priority"] == "high" and data["recipients"] == ["c@d"]
    assert events.from_dict(data) == event
    assert _fields(data) == {f.name for f in dataclasses.fields(events.Accepted)}
