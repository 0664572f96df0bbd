"""The engine classifies replies by the one rule (outcomes.classify_reply).

The table of cases is in tests/cases/replies (tests/delivery/test_outcomes.py); these
tests show that a real delivery through ``ferry serve`` follows it where the engine's
own copy of the rule used to disagree.
"""

from __future__ import annotations

from ferry.envelope import Status
from tests.delivery.relay_world import World


def test_552_5_3_4_to_rcpt_is_deferred_not_bounced(world: World) -> None:
    # RFC 5321 §4.5.3.1.10: a 552 to RCPT is treated as temporary (452), whatever its
    # enhanced code. The engine used to bounce a 552 5.3.4 here.
    mx = world.mx("mx.big.test").publish(world.dns, "big.test")
    mx.on("rcpt", "552 5.3.4 Message size exceeds fixed limit", rcpt="bob@big.test")
    svc = world.relay(retry_schedule=["1h"])
    qid = world.send(svc, ["bob@big.test"])
    m = world.wait_status(svc, qid, Status.DEFERRED, Status.FAILED)
    [r] = m.recipients
    assert r.status is Status.DEFERRED
    assert (r.last_reply.code, r.last_reply.enhanced) == (552, "5.3.4")


def test_552_to_data_is_a_bounce(world: World) -> None:
    # §4.5.3.1.10 is about RCPT only: a 552 to DATA (mailbox full) is permanent. The
    # engine used to defer every 552 that did not answer the final dot.
    mx = world.mx("mx.full.test").publish(world.dns, "full.test")
    mx.on("data", "552 5.2.2 Mailbox full")
    svc = world.relay(retry_schedule=["1h"])
    qid = world.send(svc, ["carol@full.test"])
    m = world.wait_status(svc, qid, Status.DEFERRED, Status.FAILED)
    [r] = m.recipients
    assert r.status is Status.FAILED
    assert (r.last_reply.code, r.last_reply.enhanced) == (552, "5.2.2")
