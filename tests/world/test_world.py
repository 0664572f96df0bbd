"""The test world itself works: DNS answers, MX servers receive and misbehave on cue."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.world import DnsServer, MxFactory, WorldCA, async_wait_until, wait_until

MESSAGE = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello\r\n.dot line\r\n"


def query(
    server: DnsServer, name: str, rdtype: str, *, tcp: bool = False, timeout: float = 2.0
) -> dns.message.Message:
    request = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(request, server.host, port=server.port, timeout=timeout)


def answers(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


# -- DNS -----------------------------------------------------------------------


def test_dns_answers_records_over_udp_and_tcp(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", [(20, "mx2.example.test"), (10, "mx1.example.test")], ttl=60)
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    dns_server.add_aaaa("mx1.example.test", "::1")
    dns_server.add_ptr("127.0.0.11", "mx1.example.test")

    response = query(dns_server, "example.test", "MX")
    assert answers(response) == ["10 mx1.example.test.", "20 mx2.example.test."]
    assert response.answer[0].ttl == 60
    assert answers(query(dns_server, "MX1.Example.Test.", "A", tcp=True)) == ["127.0.0.11"]
    assert answers(query(dns_server, "mx1.example.test", "AAAA")) == ["::1"]
    assert answers(query(dns_server, "11.0.0.127.in-addr.arpa", "PTR")) == ["mx1.example.test."]
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"


def test_dns_long_txt_is_split_into_255_byte_strings(dns_server: DnsServer) -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 400
    dns_server.add_txt("sel._domainkey.example.test", value)
    [rrset] = query(dns_server, "sel._domainkey.example.test", "TXT").answer
    [txt] = list(rrset)
    assert [len(s) for s in txt.strings] == [255, len(value) - 255]
    assert b"".join(txt.strings).decode() == value


def test_dns_negative_answers(dns_server: DnsServer) -> None:
    dns_server.add_a("host.example.test", "127.0.0.12")
    dns_server.negative_ttl = 42

    missing = query(dns_server, "nope.example.test", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    nodata = query(dns_server, "host.example.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    [soa] = nodata.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa[0].minimum == 42
    # An empty non-terminal exists: NODATA, not NXDOMAIN.
    assert query(dns_server, "example.test", "A").rcode() == dns.rcode.NOERROR

    dns_server.nxdomain("host.example.test")
    assert query(dns_server, "host.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    dns_server.remove("host.example.test")
    assert query(dns_server, "host.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    dns_server.null_mx("null.example.test")
    assert answers(query(dns_server, "null.example.test", "MX")) == ["0 ."]


def test_dns_faults_and_query_log(dns_server: DnsServer) -> None:
    dns_server.add_a("ok.example.test", "127.0.0.13")
    dns_server.servfail("bad.example.test")
    dns_server.timeout("ok.example.test", "AAAA")
    dns_server.delay("slow.example.test", 0.2)

    assert query(dns_server, "bad.example.test", "A").rcode() == dns.rcode.SERVFAIL
    with pytest.raises(dns.exception.Timeout):
        query(dns_server, "ok.example.test", "AAAA", timeout=0.2)
    assert answers(query(dns_server, "ok.example.test", "A")) == ["127.0.0.13"]
    started = time.monotonic()
    assert query(dns_server, "slow.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert time.monotonic() - started >= 0.2

    assert dns_server.count("ok.example.test") == 2
    assert dns_server.count("ok.example.test", "AAAA") == 1
    assert ("bad.example.test", "A") in dns_server.queries
    dns_server.clear()
    assert query(dns_server, "bad.example.test", "A").rcode() == dns.rcode.NXDOMAIN


def test_dns_serves_the_dnspython_resolver(dns_server: DnsServer) -> None:
    dns_server.add_a("münchen.example.test", "127.0.0.14")  # stored as A-labels
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port
    answer = resolver.resolve("xn--mnchen-3ya.example.test", "A")
    assert [rd.address for rd in answer] == ["127.0.0.14"]


# -- MX servers ----------------------------------------------------------------------


def test_mx_receives_a_message_in_plain_text(mx_factory: MxFactory) -> None:
    mx = mx_factory("mx1.example.test")
    assert mx.port == mx_factory.port and mx.host.startswith("127.0.0.")
    with smtplib.SMTP(mx.host, mx.port, local_hostname="client.test") as client:
        code, ehlo = client.ehlo()
        assert code == 250 and b"PIPELINING" in ehlo and b"STARTTLS" not in ehlo
        assert b"AUTH" not in ehlo and b"DSN" not in ehlo
        client.sendmail("", ["b@example.test", "c@example.test"], MESSAGE)

    [message] = mx.wait_for_messages(1)
    assert message.mail_from == ""
    assert message.rcpt_tos == ("b@example.test", "c@example.test")
    assert message.data == MESSAGE  # dot-unstuffed, CRLF kept
    assert message.parsed["Subject"] == "hi"
    assert not message.tls and message.helo == "client.test"
    assert message.peer[0] == "127.0.0.1" and message.server == mx.address
    assert mx.connections == 1
    assert mx.commands[:2] == ["EHLO client.test", "MAIL FROM:<>"]


def test_mx_counts_the_most_sessions_open_at_once(mx_factory: MxFactory) -> None:
    mx = mx_factory("mx-peak.example.test")
    assert mx.peak_connections == 0
    clients = [smtplib.SMTP(mx.host, mx.port, local_hostname="c.test") for _ in range(3)]
    for c in clients:
        c.ehlo()
    assert mx.peak_connections == 3
    for c in clients:
        c.quit()
    wait_until(lambda: mx_factory.at_once(lambda: mx.open_connections) == 0, 10)
    with smtplib.SMTP(mx.host, mx.port, local_hostname="c.test") as c:
        c.ehlo()
    assert mx.peak_connections == 3  # a peak, not the count now
    assert mx.connections == 4


def test_mx_starttls_with_the_world_ca(mx_factory: MxFactory, world_ca: WorldCA) -> None:
    mx = mx_factory("mx1.example.test", starttls=True)
    with smtplib.SMTP(mx.host, mx.port) as client:
        # smtplib checks the certificate against the host it connected to: an IP.
        client.starttls(context=world_ca.client_context())
        client.sendmail("a@example.org", ["b@example.test"], MESSAGE)
    assert mx.wait_for_messages(1)[0].tls

    # The certificate names the server, and verification really happens.
    for hostname, valid in [("mx1.example.test", True), ("other.example.test", False)]:
        with smtplib.SMTP(mx.host, mx.port) as client:
            client._host = hostname  # type: ignore[attr-defined]  # what starttls() verifies
            if valid:
                client.starttls(context=world_ca.client_context())
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    client.starttls(context=world_ca.client_context())
    assert world_ca.ca_path.read_bytes() == world_ca.ca_pem
    files = world_ca.issue("mx1.example.test")
    assert files.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert b"PRIVATE KEY" in files.key.read_bytes()


def test_mx_scripted_replies(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("rcpt", "550 5.1.1 no such user", rcpt="bob@example.test")
    mx.on("mail", "451 4.3.0 try later", times=1)
    with smtplib.SMTP(mx.host, mx.port) as client:
        client.ehlo()
        assert client.mail("a@example.org") == (451, b"4.3.0 try later")
        assert client.mail("a@example.org")[0] == 250  # times=1 used up
        assert client.rcpt("BOB@example.test") == (550, b"5.1.1 no such user")
        assert client.rcpt("carol@example.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert mx.wait_for_messages(1)[0].rcpt_tos == ("carol@example.test",)

    mx.on("dot", "554 5.6.0 rejected")
    with smtplib.SMTP(mx.host, mx.port) as client, pytest.raises(smtplib.SMTPDataError):
        client.sendmail("a@example.org", ["carol@example.test"], MESSAGE)
    assert len(mx.messages) == 1  # a rejected message is not recorded


def test_mx_421_greeting_and_drop_mid_data(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("greeting", "421 4.3.2 busy", times=1)
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP(mx.host, mx.port)

    mx.on("data", drop=True)
    with smtplib.SMTP(mx.host, mx.port) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@example.org", ["b@example.test"], MESSAGE)
    assert mx.messages == [] and mx.connections == 2


def test_mx_slow_reply_outlasts_a_client_timeout(mx_factory: MxFactory) -> None:
    mx = mx_factory()
    mx.on("mail", delay=5)
    client = smtplib.SMTP(mx.host, mx.port, timeout=0.3)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        client.mail("a@example.org")
    client.close()
    # Teardown cuts the still-sleeping session instead of waiting 5 s.


def test_mx_dsn_size_and_auth(mx_factory: MxFactory, world_ca: WorldCA) -> None:
    mx = mx_factory(starttls=True, dsn=True, size=10_000, auth={"user": "secret"})
    with smtplib.SMTP(mx.host, mx.port) as client:
        client.ehlo()
        assert client.has_extn("dsn") and client.esmtp_features["size"] == "10000"
        assert not client.has_extn("auth")  # only once encrypted (aiosmtpd's default)
        client.starttls(context=world_ca.client_context())
        client.ehlo()
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 530  # AUTH required
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("user", "wrong")
        client.login("user", "secret")
        assert client.mail("a@example.org", ["SIZE=20000"])[0] == 552  # over SIZE
        client.sendmail(
            "a@example.org",
            ["b@example.test"],
            MESSAGE,
            mail_options=["RET=HDRS", "ENVID=Id+2Bx"],
            rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;b@example.test"],
        )
    [message] = mx.wait_for_messages(1)
    assert message.auth_user == "user"
    assert "ENVID=Id+2Bx" in message.mail_options  # case kept
    assert message.rcpt_options == {
        "b@example.test": ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;b@example.test")
    }


def test_mx_without_dsn_refuses_dsn_parameters(mx_factory: MxFactory) -> None:
    mx = mx_factory(smtputf8=False, pipelining=False, eightbitmime=False)
    with smtplib.SMTP(mx.host, mx.port) as client:
        client.ehlo()
        assert not {"smtputf8", "pipelining", "8bitmime", "dsn"} & set(client.esmtp_features)
        assert client.mail("a@example.org", ["RET=HDRS"])[0] == 555


def test_many_servers_share_one_port_on_distinct_addresses(mx_factory: MxFactory) -> None:
    servers = [mx_factory(f"mx{i}.example.test") for i in range(3)]
    assert len({s.host for s in servers}) == 3 and {s.port for s in servers} == {mx_factory.port}
    for server in servers:
        with smtplib.SMTP(server.host, server.port) as client:
            assert client.ehlo()[1].startswith(server.name.encode())


def test_refusing_address_refuses(mx_factory: MxFactory) -> None:
    refusing = mx_factory.refusing()
    assert refusing.port == mx_factory.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((refusing.host, refusing.port), timeout=2).close()


def test_stop_cuts_open_sessions(world_ca: WorldCA) -> None:
    factory = MxFactory(world_ca)
    mx = factory(port=0)
    assert mx.port != factory.port
    client = smtplib.SMTP(mx.host, mx.port)
    factory.close()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()


def test_publish_wires_dns_to_the_server(dns_server: DnsServer, mx_factory: MxFactory) -> None:
    mx = mx_factory("mx1.example.test").publish(dns_server, "example.test", preference=5)
    assert answers(query(dns_server, "example.test", "MX")) == ["5 mx1.example.test."]
    assert answers(query(dns_server, "mx1.example.test", "A")) == [mx.host]


# -- waiting -------------------------------------------------------------------------


def test_wait_until_fails_with_the_message() -> None:
    wait_until(lambda: True, timeout=0.1)
    with pytest.raises(AssertionError, match="never"):
        wait_until(lambda: False, timeout=0.05, message="never")


async def test_async_waits(mx_factory: MxFactory) -> None:
    with pytest.raises(AssertionError, match="state was 3"):
        await async_wait_until(lambda: False, timeout=0.05, message=lambda: "state was 3")
    mx = mx_factory()
    with pytest.raises(AssertionError, match="0 of 1 messages"):
        await mx.async_wait_for_messages(1, timeout=0.05)
