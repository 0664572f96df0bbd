"""Log lines an operator can follow: queue IDs, Message-ID, session IDs, hosts, attempts."""

from __future__ import annotations

import threading
from typing import Any

from ferry.envelope import Status
from ferry.events import Event, subscribe
from ferry.service import is_fqdn
from tests.delivery.relay_world import World


class Recorded:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stop = subscribe(self.add)

    def add(self, event: Event) -> None:
        # What the log line shows: the event's word and its fields.
        with self.lock:
            self.events.append((event.name, event.log_fields()))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [f for e, f in self.events if e == event]


def test_lines_about_one_message_share_its_ids(world: World) -> None:
    world.mx.refusing("mx1.b.test").publish(world.dns, "b.test", preference=10)
    world.mx("mx2.b.test").publish(world.dns, "b.test", preference=20)
    log = Recorded()
    try:
        svc = world.relay()
        qid = world.send(svc, ["bob@b.test"])
        world.wait_status(svc, qid, Status.DELIVERED)
    finally:
        log.stop()
    [accept] = [f for f in log.named("accept") if f["id"] == qid]
    assert accept["message_id"] == "<hello@sender.test>"
    [connect] = [f for f in log.named("connect") if f["session"] == accept["session"]]
    assert connect["client"] == "127.0.0.1"
    [failed] = log.named("connect_failed")
    assert failed["ids"].split(",")[0] == qid and failed["host"].startswith("mx1.b.test[")
    [delivery] = [f for f in log.named("delivery") if f["id"] == qid]
    assert delivery["attempt"] == 1 and delivery["relay"].startswith("mx2.b.test[")
    assert len(delivery["session"]) == 10 and delivery["session"] != accept["session"]
    [started] = log.named("started")
    assert started["hold"] == "no" and started["listeners"].startswith("127.0.0.1:")


def test_fqdn() -> None:
    assert is_fqdn("mail.example.com") and is_fqdn("mx.example.org.")
    for name in ("localhost", "vm", "192.0.2.1", "a..b", ""):
        assert not is_fqdn(name), name
