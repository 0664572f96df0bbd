"""The SMTP intake against real clients on real sockets (smtplib, aiosmtplib, raw)."""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from ferry.config import RelayConfig
from ferry.envelope import Priority, Status
from ferry.intake.dispatch import IntakeDispatcher
from ferry.intake.server import IntakeServer
from ferry.intake.users import UserDB
from ferry.queue import spool
from tests.harness import ThreadedService, process_running, wait_until

MSG = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
PASSWORD = "s3cret-passw0rd"


def make_config(tmp_path: Path, tls: Any, **server: Any) -> RelayConfig:
    base: dict[str, Any] = {
        "hostname": "mx.ferry.test",
        "listen": [
            {"address": "127.0.0.1", "port": 0, "mode": "mta"},
            {"address": "127.0.0.1", "port": 0, "mode": "submission"},
            {"address": "127.0.0.1", "port": 0, "mode": "smtps"},
        ],
        "tls_cert": str(tls.cert_file),
        "tls_key": str(tls.key_file),
        "users_file": str(tmp_path / "users"),
        "local_domains": ["local.test"],
        "relay_domains": ["partner.test"],
        "relay_networks": ["127.0.0.0/8", "::1/128"],
        "max_recipients": 5,
        "max_message_size": 20_000,
    }
    base.update(server)
    return RelayConfig.model_validate(
        {
            "server": base,
            "queue": {"path": str(tmp_path / "data")},
            "delivery": {"hold": True},  # these tests look at the queue, not delivery
            "aliases": {
                "info@local.test": ["a@example.net", "b@example.com"],
                "postmaster@local.test": "info@local.test",
            },
        }
    )


@pytest.fixture
def relay_factory(tmp_path: Path, tls_files: Any) -> Iterator[Any]:
    started: list[ThreadedService] = []

    def start(**server: Any) -> ThreadedService:
        cfg = make_config(tmp_path, tls_files, **server)
        users = UserDB(cfg.server.users_file)
        if not users.list():
            users.add("alice", PASSWORD, Priority.HIGH)
        svc = ThreadedService(cfg).__enter__()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.__exit__(None, None, None)


@pytest.fixture
def relay(relay_factory: Any) -> ThreadedService:
    return relay_factory()


def queued(svc: ThreadedService) -> list[Any]:
    return svc.call(svc.queue.list(limit=1000))


def body_of(svc: ThreadedService, qid: str) -> bytes:
    return svc.call(svc.queue.read_message(qid))


def strip_received(data: bytes) -> bytes:
    """Remove the Received: header Ferry prepended (it and its folded lines)."""
    assert data.startswith(b"Received: ")
    lines = data.split(b"\r\n")
    i = 1
    while lines[i].startswith((b"\t", b" ")):
        i += 1
    return b"\r\n".join(lines[i:])


class Wire:
    """A raw SMTP client: send exact bytes, read exact replies."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None
        )
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return (0, "")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] == b" ":
                break
        return int(lines[-1][:3]), "\n".join(x[4:] for x in lines)

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        self.send(line if isinstance(line, bytes) else line.encode())
        return self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data if data.endswith(b"\n") else data + b"\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# -- happy paths -------------------------------------------------------------------


def test_smtplib_delivery_is_queued_byte_identical(relay: ThreadedService) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port()) as c:
        code, caps = c.ehlo("client.example.org")
        assert code == 250
        for ext in (
            b"PIPELINING",
            b"SIZE 20000",
            b"8BITMIME",
            b"SMTPUTF8",
            b"ENHANCEDSTATUSCODES",
            b"DSN",
            b"STARTTLS",
            b"MT-PRIORITY",
        ):
            assert ext in caps
        assert b"AUTH" not in caps  # never offered before TLS on an mta listener
        refused = c.sendmail("alice@example.org", ["bob@example.net"], MSG)
        assert refused == {}
    [m] = queued(relay)
    assert m.sender == "alice@example.org"
    assert [r.address for r in m.recipients] == ["bob@example.net"]
    assert m.status is Status.QUEUED
    data = body_of(relay, m.id)
    assert strip_received(data) == MSG
    assert f"id {m.id}".encode() in data.split(b"\r\n\r\n")[0]
    assert b"by mx.ferry.test (Ferry)" in data


def test_starttls_and_auth_plain_and_login(relay: ThreadedService, tls_files: Any) -> None:
    for mech in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", relay.port()) as c:
            c.starttls(context=tls_files.client_context())
            code, caps = c.ehlo("client")
            assert b"AUTH PLAIN LOGIN" in caps
            assert b"STARTTLS" not in caps
            c.user, c.password = "alice", PASSWORD
            code, text = c.auth(mech, getattr(c, f"auth_{mech.lower()}"), initial_response_ok=False)
            assert (code, text) == (235, b"2.7.0 Authentication successful")
            c.sendmail("alice@example.org", ["x@elsewhere.example"], MSG)
    msgs = queued(relay)
    assert len(msgs) == 2
    assert all(m.auth_user == "alice" for m in msgs)
    # alice's default priority comes from the users file
    assert all(m.priority is Priority.HIGH for m in msgs)
    assert b"with ESMTPSA" in body_of(relay, msgs[0].id)


def test_bad_password_is_refused(relay: ThreadedService, tls_files: Any) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port()) as c:
        c.starttls(context=tls_files.client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            c.login("alice", "wrong")
        assert err.value.smtp_code == 535
        assert b"5.7.8" in err.value.smtp_error


def test_auth_before_tls_is_refused_on_mta(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    blob = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
    assert w.cmd(f"AUTH PLAIN {blob}") == (
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
    )
    w.close()


def test_submission_requires_tls_then_auth(relay: ThreadedService, tls_files: Any) -> None:
    port = relay.port("submission")
    w = Wire(port)
    w.cmd("EHLO c")
    assert w.cmd("MAIL FROM:<alice@example.org>") == (
        530,
        "5.7.0 Must issue a STARTTLS command first",
    )
    w.close()
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.starttls(context=tls_files.client_context())
        c.ehlo("c")
        code, text = c.mail("alice@example.org")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        c.rset()
        c.login("alice", PASSWORD)
        c.sendmail("alice@example.org", ["x@elsewhere.example"], MSG)
    assert len(queued(relay)) == 1


def test_smtps_implicit_tls(relay: ThreadedService, tls_files: Any) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", relay.port("smtps"), context=tls_files.client_context()
    ) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        c.login("alice", PASSWORD)
        c.sendmail("alice@example.org", ["x@elsewhere.example"], MSG)
    [m] = queued(relay)
    assert b"with ESMTPSA" in body_of(relay, m.id)


async def _aiosmtplib_send(port: int, ca: Any) -> Any:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return await aiosmtplib.send(
        MSG,
        sender="alice@example.org",
        recipients=["bob@example.net"],
        hostname="127.0.0.1",
        port=port,
        start_tls=True,
        tls_context=ctx,
        username="alice",
        password=PASSWORD,
    )


def test_aiosmtplib_with_starttls_and_auth(relay: ThreadedService, tls_files: Any) -> None:
    import asyncio

    errors, reply = asyncio.run(_aiosmtplib_send(relay.port(), tls_files.ca))
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    assert len(queued(relay)) == 1


def test_pipelined_commands_answered_in_order(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    w.send(
        b"MAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.net>\r\n"
        b"RCPT TO:<bad@@example.net>\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
    )
    assert w.reply()[0] == 250
    assert w.reply()[0] == 250
    assert w.reply()[0] == 501
    assert w.reply()[0] == 250
    assert w.reply()[0] == 354
    assert w.cmd(MSG + b".\r\n")[0] == 250
    w.send(b"MAIL FROM:<>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n")
    assert [w.reply()[0] for _ in range(3)] == [250, 250, 354]
    assert w.cmd(MSG + b".\r\n")[0] == 250
    w.close()
    msgs = queued(relay)
    assert sorted(len(m.recipients) for m in msgs) == [1, 2]
    assert {m.sender for m in msgs} == {"", "alice@example.org"}


# -- relay policy ----------------------------------------------------------------


def _try_rcpt(port: int, rcpt: str, source: str | None = None) -> tuple[int, str]:
    w = Wire(port, source)
    w.cmd("EHLO c")
    assert w.cmd("MAIL FROM:<s@example.org>")[0] == 250
    result = w.cmd(f"RCPT TO:<{rcpt}>")
    w.close()
    return result


def test_open_relay_is_refused(relay_factory: Any, tls_files: Any) -> None:
    svc = relay_factory(relay_networks=["127.0.0.2/32"])
    port = svc.port()
    # 127.0.0.1 is outside relay_networks and unauthenticated
    assert _try_rcpt(port, "x@external.example") == (
        554,
        "5.7.1 <x@external.example>: Relay access denied",
    )
    assert _try_rcpt(port, "x@partner.test") == (250, "2.1.5 Ok")  # a relay domain
    assert _try_rcpt(port, "x@external.example", source="127.0.0.2")[0] == 250
    with smtplib.SMTP("127.0.0.1", port) as c:  # authenticated
        c.starttls(context=tls_files.client_context())
        c.login("alice", PASSWORD)
        assert c.sendmail("s@example.org", ["x@external.example"], MSG) == {}
    msgs = queued(svc)
    assert [r.address for m in msgs for r in m.recipients] == ["x@external.example"]


def test_local_domain_aliases(relay: ThreadedService) -> None:
    port = relay.port()
    assert _try_rcpt(port, "nobody@local.test") == (
        550,
        "5.1.1 <nobody@local.test>: Recipient address rejected: User unknown",
    )
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail("s@example.org", ["postmaster@local.test"], MSG)
    [m] = queued(relay)
    assert [(r.address, r.orcpt) for r in m.recipients] == [
        ("a@example.net", "rfc822;postmaster@local.test"),
        ("b@example.com", "rfc822;postmaster@local.test"),
    ]


# -- DSN and priority parameters -----------------------------------------------------


def test_dsn_and_mt_priority_parameters_are_stored(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    assert w.cmd("MAIL FROM:<s@example.org> RET=HDRS ENVID=abc+2Bdef MT-PRIORITY=6")[0] == 250
    assert w.cmd("RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+40b")[0] == 250
    assert w.cmd("RCPT TO:<b@example.net> NOTIFY=NEVER")[0] == 250
    assert w.cmd("DATA")[0] == 354
    assert w.cmd(MSG + b".\r\n")[0] == 250
    w.close()
    [m] = queued(relay)
    assert (m.ret, m.envid, m.priority) == ("HDRS", "abc+def", Priority.URGENT)
    got = {r.address: (r.notify, r.orcpt) for r in m.recipients}
    assert got == {
        "a@example.net": ("SUCCESS,FAILURE", "rfc822;A@b"),
        "b@example.net": ("NEVER", None),
    }


def test_priority_from_headers(relay: ThreadedService) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port()) as c:
        c.sendmail("s@example.org", ["a@example.net"], b"X-Priority: 5 (Lowest)\r\n" + MSG)
    [m] = queued(relay)
    assert m.priority is Priority.LOW


# -- bad input: exact reply, nothing queued ---------------------------------------

BAD_COMMANDS = [
    # (setup commands, the bad command, expected reply prefix)
    ([], "RCPT TO:<a@example.net>", (503, "5.5.1 Error: need MAIL command")),
    (["MAIL FROM:<s@example.org>"], "DATA", (503, "5.5.1 Error: need RCPT command")),
    (
        [],
        "MAIL FROM:<s@example.org> SIZE=999999",
        (552, "5.3.4 Message size exceeds fixed maximum"),
    ),
    (["MAIL FROM:<s@example.org>"], "RCPT TO:<a@b@c>", (501, "5.1.3 Bad recipient address syntax")),
    ([], "MAIL FROM:s@example.org", (501, "5.5.4 Syntax: MAIL FROM:<address>")),
    (
        ["MAIL FROM:<s@example.org>"],
        "RCPT TO:a@example.net",
        (501, "5.5.4 Syntax: RCPT TO:<address>"),
    ),
    (
        ["MAIL FROM:<s@example.org>"],
        "RCPT TO:<" + "x" * 300 + "@example.net>",
        (501, "5.5.4 Path longer than 256 octets"),
    ),
    (
        ["MAIL FROM:<s@example.org>"],
        "RCPT TO:<" + "x" * 65 + "@example.net>",
        (501, "5.1.3 Bad recipient address syntax: local part longer than 64 octets"),
    ),
    (
        [],
        "MAIL FROM:<s@example.org> FOO=bar",
        (555, "5.5.4 MAIL FROM parameter FOO not recognized"),
    ),
    (
        ["MAIL FROM:<s@example.org>"],
        "RCPT TO:<a@example.net> BAR=1",
        (555, "5.5.4 RCPT TO parameter BAR not recognized"),
    ),
    ([], "MAIL FROM:<s@example.org> " + "X" * 600, (500, "5.5.2 Error: command line too long")),
    ([], "AUTH PLAIN !!!notbase64", (538, "5.7.11")),  # before TLS: refused first
    ([], "BDAT 10", (500, "5.5.2 Error: command not recognized")),
    (["MAIL FROM:<s@example.org>"], "MAIL FROM:<s@example.org>", (503, "5.5.1 Error: nested MAIL")),
]


@pytest.mark.parametrize(
    ("setup", "bad", "expected"), BAD_COMMANDS, ids=[b[1][:30] for b in BAD_COMMANDS]
)
def test_bad_command_gets_exact_reply(
    relay: ThreadedService, setup: list[str], bad: str, expected: tuple[int, str]
) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    for line in setup:
        assert w.cmd(line)[0] == 250, line
    code, text = w.cmd(bad)
    assert code == expected[0]
    assert text.startswith(expected[1])
    assert w.cmd("NOOP")[0] == 250  # the session survives
    w.close()
    assert queued(relay) == []


def test_auth_with_broken_base64_after_tls(relay: ThreadedService, tls_files: Any) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port()) as c:
        c.starttls(context=tls_files.client_context())
        c.ehlo("c")
        assert c.docmd("AUTH PLAIN !!!notbase64") == (501, b"5.5.2 Cannot decode base64 response")
        assert c.docmd("AUTH LOGIN") == (334, b"VXNlcm5hbWU6")
        assert c.docmd("%%%") == (501, b"5.5.2 Cannot decode base64 response")


def _data_exchange(port: int, body: bytes, rcpts: int = 1) -> tuple[int, str]:
    w = Wire(port)
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    for i in range(rcpts):
        w.cmd(f"RCPT TO:<r{i}@example.net>")
    assert w.cmd("DATA")[0] == 354
    result = w.cmd(body)
    assert w.cmd("NOOP")[0] == 250
    w.close()
    return result


def test_oversize_message_is_refused(relay: ThreadedService) -> None:
    body = MSG + (b"x" * 998 + b"\r\n") * 25 + b".\r\n"
    assert _data_exchange(relay.port(), body) == (552, "5.3.4 Error: message too big")
    assert queued(relay) == []


def test_too_many_recipients(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    codes = [w.cmd(f"RCPT TO:<r{i}@example.net>")[0] for i in range(6)]
    assert codes == [250] * 5 + [452]
    w.close()


def test_too_many_recipients_reply_text(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    for i in range(5):
        w.cmd(f"RCPT TO:<r{i}@example.net>")
    assert w.cmd("RCPT TO:<r9@example.net>") == (452, "4.5.3 Error: too many recipients")
    w.close()


def test_smuggling_payload_stays_one_message(relay: ThreadedService) -> None:
    smuggled = (
        b"Subject: smuggle\r\n\r\nfirst part\n.\nMAIL FROM:<evil@example.org>\n"
        b"RCPT TO:<victim@example.net>\nDATA\nspoofed\r\n.\r\n"
    )
    w = Wire(relay.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    w.cmd("RCPT TO:<a@example.net>")
    w.cmd("DATA")
    # Bare LFs are refused by default: the whole thing is one (rejected) message.
    assert w.cmd(smuggled)[0] == 554
    assert w.cmd("NOOP")[0] == 250
    w.close()
    assert queued(relay) == []


def test_smuggling_with_normalize_stays_one_message(relay_factory: Any) -> None:
    svc = relay_factory(bare_lf="normalize")
    smuggled = (
        b"Subject: smuggle\r\n\r\nfirst part\n.\nMAIL FROM:<evil@example.org>\r\n"
        b"RCPT TO:<victim@example.net>\r\nDATA\r\nspoofed\r.\r\nend\r\n.\r\n"
    )
    assert _data_exchange(svc.port(), smuggled)[0] == 250
    [m] = queued(svc)
    assert m.sender == "s@example.org"
    assert [r.address for r in m.recipients] == ["r0@example.net"]
    data = strip_received(body_of(svc, m.id))
    assert b"MAIL FROM:<evil@example.org>\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")  # every line ending normalised


def test_dot_stuffing_is_removed(relay: ThreadedService) -> None:
    body = b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\n.\r\n"
    assert _data_exchange(relay.port(), body)[0] == 250
    [m] = queued(relay)
    assert strip_received(body_of(relay, m.id)) == b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n"


def test_disconnect_mid_data_queues_nothing(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    w.cmd("RCPT TO:<a@example.net>")
    w.cmd("DATA")
    w.send(MSG + b"half a message")
    w.close()
    assert wait_until(lambda: not relay.service.intake.open_connections, what="session end")
    assert queued(relay) == []


def test_mail_loop_is_refused(relay: ThreadedService) -> None:
    body = b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 31 + MSG + b".\r\n"
    assert _data_exchange(relay.port(), body) == (554, "5.4.6 Error: too many hops (mail loop?)")
    assert queued(relay) == []


def test_too_many_connections_per_ip(relay_factory: Any) -> None:
    svc = relay_factory(max_connections_per_ip=2)
    a, b = Wire(svc.port()), Wire(svc.port())
    c = Wire(svc.port())
    assert c.greeting[0] == 421
    assert "4.7.0" in c.greeting[1]
    for w in (a, b, c):
        w.close()


def test_concurrent_sessions_share_commits(relay: ThreadedService) -> None:
    import threading

    n_threads, per_thread = 8, 10
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port()) as c:
                for _ in range(per_thread):
                    c.sendmail("s@example.org", ["a@example.net"], MSG)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    commits_before = relay.queue.commits
    threads = [threading.Thread(target=sender) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(queued(relay)) == n_threads * per_thread
    # Every message was committed (fsynced) before its 250; group commit shares fsyncs.
    assert relay.queue.commits - commits_before <= n_threads * per_thread


# -- HELO/EHLO first (RFC 5321 §4.1.4) ----------------------------------------------


def test_mail_rcpt_data_before_helo_are_refused(relay: ThreadedService) -> None:
    w = Wire(relay.port())
    for line in ("MAIL FROM:<s@example.org>", "RCPT TO:<a@example.net>", "DATA"):
        assert w.cmd(line) == (503, "5.5.1 Send HELO/EHLO first"), line
    assert w.cmd("HELO c")[0] == 250
    assert w.cmd("MAIL FROM:<s@example.org>")[0] == 250
    w.close()
    assert queued(relay) == []


def test_require_helo_false_keeps_accepting_mail_without_helo(relay_factory: Any) -> None:
    svc = relay_factory(require_helo=False)
    w = Wire(svc.port())
    assert w.cmd("MAIL FROM:<printer@example.org>")[0] == 250
    assert w.cmd("RCPT TO:<a@example.net>")[0] == 250
    assert w.cmd("DATA")[0] == 354
    assert w.cmd(MSG + b".\r\n")[0] == 250
    w.close()
    [m] = queued(svc)
    assert m.sender == "printer@example.org"
    assert body_of(svc, m.id).startswith(b"Received: from unknown ")


# -- deadlines, not idle timers ------------------------------------------------------


class Dribbler(Wire):
    """A slow client: sends bytes one small piece at a time and notices when the server
    answers. The pacing between pieces is the client's behaviour under test, not a
    synchronisation: every wait is a ``select`` on the socket that returns at once when
    the server speaks."""

    def dribble(self, data: bytes, every: float, piece: int = 1) -> tuple[int, str, int]:
        """Send ``data`` ``piece`` octets at a time; stop early when a reply arrives.
        Returns (code, text, octets sent before the reply)."""
        import select

        sent = 0
        while sent < len(data):
            self.sock.sendall(data[sent : sent + piece])
            sent = min(sent + piece, len(data))
            readable, _, _ = select.select([self.sock], [], [], every)
            if readable:
                return (*self.reply(), sent)
        return (*self.reply(), sent)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True


def test_command_deadline_cuts_off_a_dribbling_client(relay_factory: Any) -> None:
    # Before: the idle timer restarted on every byte, so this command was answered 250
    # after 40 x 0.05 s although command_timeout is 0.5 s.
    svc = relay_factory(command_timeout=0.5)
    w = Dribbler(svc.port())
    line = b"NOOP " + b"x" * 33 + b"\r\n"
    code, text, sent = w.dribble(line, every=0.05)
    assert (code, text) == (421, "4.4.2 mx.ferry.test Error: timeout exceeded")
    assert sent < len(line)
    assert w.closed_by_server()
    w.close()


def test_data_deadline_cuts_off_a_dribbling_body(relay_factory: Any) -> None:
    # Before: one body byte every 0.05 s held the connection although data_timeout = 0.6 s.
    svc = relay_factory(data_timeout=0.6, data_min_rate=1_000_000)
    w = Dribbler(svc.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    w.cmd("RCPT TO:<a@example.net>")
    assert w.cmd("DATA")[0] == 354
    body = MSG * 3 + b".\r\n"
    code, text, sent = w.dribble(body, every=0.05)
    assert (code, text) == (421, "4.4.2 mx.ferry.test Error: timeout exceeded")
    assert sent < len(body)
    assert w.closed_by_server()
    w.close()
    assert queued(svc) == []


def test_slow_large_message_above_the_minimum_rate_gets_through(relay_factory: Any) -> None:
    # data_timeout alone (0.3 s) is too short for this message, but it arrives faster
    # than data_min_rate, so the deadline grows with it: max(0.3, size / rate).
    svc = relay_factory(data_timeout=0.3, data_min_rate=500, max_message_size=100_000)
    w = Dribbler(svc.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org>")
    w.cmd("RCPT TO:<a@example.net>")
    assert w.cmd("DATA")[0] == 354
    body = MSG + (b"y" * 98 + b"\r\n") * 80 + b".\r\n"  # ~8 KB in ~0.8 s: ~10 KB/s
    code, text, sent = w.dribble(body, every=0.01, piece=100)
    assert code == 250, text
    assert sent == len(body)
    w.close()
    assert len(queued(svc)) == 1


def test_declared_size_extends_the_data_deadline(relay_factory: Any) -> None:
    # SIZE=20000 at 10,000 octets/s promises 2 s: a pause longer than data_timeout
    # (0.3 s) early in the body is within the deadline.
    svc = relay_factory(data_timeout=0.3, data_min_rate=10_000, max_message_size=100_000)
    w = Dribbler(svc.port())
    w.cmd("EHLO c")
    w.cmd("MAIL FROM:<s@example.org> SIZE=20000")
    w.cmd("RCPT TO:<a@example.net>")
    assert w.cmd("DATA")[0] == 354
    body = MSG + b".\r\n"
    code, text, _ = w.dribble(body, every=0.5, piece=len(MSG))
    assert code == 250, text
    w.close()


def test_undecodable_bytes_quoted_in_a_reply_do_not_end_the_session(
    relay: ThreadedService,
) -> None:
    # Before: the reply quoting "\xff=1" could not be encoded, the session died with
    # "421 4.3.0 Internal error". Found by tests/fuzz.
    w = Wire(relay.port())
    w.cmd("EHLO c")
    code, text = w.cmd(b"MAIL FROM:<s@example.org> \xff=1")
    assert (code, text) == (501, "5.5.4 Bad parameter syntax: ?=1")
    assert w.cmd("NOOP")[0] == 250
    w.close()


def _send_with_key(port: int, ca: Any, key: str | None, body: str, user: bool = True) -> str:
    """One message over STARTTLS (+ AUTH when ``user``); the 250 reply's text."""
    headers = f"Idempotency-Key: {key}\r\n" if key else ""
    msg = f"From: a@example.org\r\n{headers}Subject: order\r\n\r\n{body}\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.test")
        c.starttls(context=ca.client_context())
        c.ehlo("client.test")
        if user:
            c.login("alice", PASSWORD)
        c.mail("a@example.org")
        c.rcpt("b@example.net")
        code, reply = c.data(msg.encode())
    assert code in (250, 554), (code, reply)
    return f"{code} {reply.decode()}"


def test_smtp_idempotency_key_from_an_authenticated_client(
    relay: ThreadedService, tls_files: Any
) -> None:
    port = relay.port()
    first = _send_with_key(port, tls_files, '"order-7"', "hello")
    qid = first.split("queued as ")[1].split()[0]
    # the same message again (a client that lost the 250 and retried): same id, one copy
    again = _send_with_key(port, tls_files, '"order-7"', "hello")
    assert again.startswith(f"250 2.0.0 Ok: queued as {qid}")
    assert [m.id for m in queued(relay)] == [qid]
    # the same key for other content is refused, and queues nothing
    other = _send_with_key(port, tls_files, '"order-7"', "something else")
    assert other.startswith("554") and "Idempotency-Key" in other
    # another key, or no authentication, is an ordinary new message
    assert _send_with_key(port, tls_files, "order-8", "hello").startswith("250")
    assert _send_with_key(port, tls_files, None, "hello").startswith("250")
    assert len(queued(relay)) == 3


# -- intake processes (server.workers; ferry/intake/dispatch.py) ----------------------


def _dispatcher(svc: ThreadedService) -> IntakeDispatcher:
    intake = svc.service.intake
    assert isinstance(intake, IntakeDispatcher)
    return intake


def _send_one(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        assert c.sendmail("alice@example.org", ["bob@example.net"], MSG) == {}


def test_sessions_run_in_intake_processes_and_serve_commits(relay_factory: Any) -> None:
    svc = relay_factory(workers=2)
    d = _dispatcher(svc)
    pids = {c.proc.pid for c in d.children if c.proc is not None}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(process_running(p) for p in pids)
    # Two connections open at once go to two processes (the least busy one first).
    a, b = Wire(svc.port()), Wire(svc.port())
    assert a.greeting[0] == b.greeting[0] == 220
    wait_until(lambda: sorted(c.connections for c in d.children) == [1, 1], what="1 and 1")
    for w in (a, b):
        w.close()
    _send_one(svc.port())
    assert [m.sender for m in queued(svc)] == ["alice@example.org"]
    assert d.accepted == 1
    wait_until(lambda: d.open == {} and d.counted == 0, what="connections reported over")


def test_stopping_serve_stops_its_intake_processes(tmp_path: Path, tls_files: Any) -> None:
    svc = ThreadedService(make_config(tmp_path, tls_files, workers=2)).__enter__()
    try:
        pids = [c.proc.pid for c in _dispatcher(svc).children if c.proc is not None]
        port = svc.port()
    finally:
        svc.__exit__(None, None, None)
    assert len(pids) == 2
    assert not any(process_running(p) for p in pids)
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("workers", [0, 2])
def test_connection_limits_count_the_whole_relay(relay_factory: Any, workers: int) -> None:
    svc = relay_factory(workers=workers, max_connections_per_ip=2, max_connections=3)
    a, b = Wire(svc.port()), Wire(svc.port())
    assert a.greeting[0] == b.greeting[0] == 220  # in two processes when workers = 2
    c = Wire(svc.port())
    assert c.greeting == (421, "4.7.0 mx.ferry.test Too many connections from you")
    c.close()
    a.close()
    # The one that ended no longer counts: a new one is let in.
    d = wait_until(lambda: (w := Wire(svc.port())).greeting[0] == 220 and w, what="a free slot")
    # A third from another address makes three; a fourth passes max_connections = 3.
    e = Wire(svc.port(), source="127.0.0.2")
    assert e.greeting[0] == 220
    f = Wire(svc.port(), source="127.0.0.3")
    assert f.greeting == (421, "4.7.0 mx.ferry.test Too many connections, try later")
    for w in (b, d, e, f):
        w.close()


def test_auth_failures_are_counted_once_for_every_process(
    relay_factory: Any, tls_files: Any
) -> None:
    svc = relay_factory(workers=2)
    d = _dispatcher(svc)
    clients = []
    for _ in range(2):  # held open: the second goes to the other process
        c = smtplib.SMTP("127.0.0.1", svc.port(), timeout=10)
        c.starttls(context=tls_files.client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice", "wrong")
        clients.append(c)
    assert sorted(c.connections for c in d.children) == [1, 1]
    # smtplib tries PLAIN, then LOGIN: two failures per connection, all four counted.
    assert d.throttle.failures("127.0.0.1", time.monotonic()) == 4
    clients[0].login("alice", PASSWORD)  # a success forgets the failures
    assert d.throttle.failures("127.0.0.1", time.monotonic()) == 0
    for c in clients:
        c.quit()


def test_smtps_through_an_intake_process(relay_factory: Any, tls_files: Any) -> None:
    svc = relay_factory(workers=1)
    with smtplib.SMTP_SSL("127.0.0.1", svc.port("smtps"), context=tls_files.client_context()) as c:
        c.login("alice", PASSWORD)
        c.sendmail("alice@example.org", ["x@elsewhere.example"], MSG)
    # A client that fails the handshake is counted out again.
    raw = socket.create_connection(("127.0.0.1", svc.port("smtps")), timeout=10)
    raw.sendall(b"EHLO not-tls\r\n")
    raw.recv(100)
    raw.close()
    d = _dispatcher(svc)
    wait_until(lambda: d.open == {} and d.counted == 0, what="the failed handshake counted out")
    [m] = queued(svc)
    assert b"with ESMTPSA" in body_of(svc, m.id)


def test_a_killed_intake_process_is_restarted_and_its_connections_counted_out(
    relay_factory: Any,
) -> None:
    svc = relay_factory(workers=1, max_connections_per_ip=1)
    d = _dispatcher(svc)
    [child] = d.children
    assert child.proc is not None
    first = child.proc.pid
    held = Wire(svc.port())
    assert held.greeting[0] == 220
    wait_until(lambda: d.counted == 1, what="the connection counted")
    os.kill(first, signal.SIGKILL)
    assert held.reply() == (0, "")  # its session went with it
    held.close()
    wait_until(
        lambda: child.ready and child.proc is not None and child.proc.pid != first,
        timeout=15,
        what="a new intake process",
    )
    assert d.counted == 0 and d.per_ip == {}
    _send_one(svc.port())  # max_connections_per_ip = 1: the dead one's slot is free
    assert len(queued(svc)) == 1
    assert not process_running(first)


def test_a_dead_intake_processs_segments_are_sealed(relay_factory: Any) -> None:
    svc = relay_factory(workers=1)
    d = _dispatcher(svc)
    [child] = d.children
    assert child.proc is not None
    first, tag = child.proc.pid, child.spool_tag
    big = MSG + (b"z" * 70 + b"\r\n") * 240  # 17 KB: in the spool
    with smtplib.SMTP("127.0.0.1", svc.port(), timeout=10) as c:
        assert c.sendmail("alice@example.org", ["bob@example.net"], big) == {}
    [m] = queued(svc)
    [(live,)] = svc.queue.run_sync(
        lambda c: c.execute("SELECT segment FROM messages WHERE id=?", (m.id,)).fetchall()
    )
    assert spool.segment_tag(live) == tag
    # What a body written but never committed leaves: a segment no row names.
    stray = svc.queue.spool / f"seg.{tag}.99"
    stray.write_bytes(b"x" * 100)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not stray.exists(), timeout=15, what="the dead writer's stray segment gone")
    assert (svc.queue.spool / live).is_file()  # a pending message's body is in it
    assert strip_received(body_of(svc, m.id)) == big


def test_a_before_queue_hook_keeps_sessions_in_serve(tmp_path: Path, tls_files: Any) -> None:
    seen: list[str] = []

    async def hook(envelope: Any) -> None:
        seen.append(envelope.sender)

    cfg = make_config(tmp_path, tls_files, workers=2)
    svc = ThreadedService(cfg)
    svc.service.before_queue = hook
    with svc:
        assert isinstance(svc.service.intake, IntakeServer)
        _send_one(svc.port())
    assert seen == ["alice@example.org"]


def test_an_intake_process_writes_a_large_body_to_the_spool_itself(relay_factory: Any) -> None:
    svc = relay_factory(workers=1)
    big = MSG + (b"z" * 70 + b"\r\n") * 240  # 17 KB: in the spool
    assert svc.config.queue.spool_threshold <= len(big) < svc.config.server.max_message_size
    with smtplib.SMTP("127.0.0.1", svc.port(), timeout=10) as c:
        assert c.sendmail("alice@example.org", ["bob@example.net"], big) == {}
    [m] = queued(svc)
    [(segment,)] = svc.queue.run_sync(
        lambda c: c.execute("SELECT segment FROM messages WHERE id=?", (m.id,)).fetchall()
    )
    # A segment of the intake process's own (tag), not of serve's writer.
    assert (svc.queue.spool / segment).is_file()
    assert spool.segment_tag(segment) != svc.queue._spool_writer.tag
    assert strip_received(body_of(svc, m.id)) == big
    assert m.size == len(body_of(svc, m.id))
    # serve committed the rows only: its own spool writer never ran.
    assert svc.queue._spool_writer._pool is None
