"""DKIM signing (ferry.dkim) and key management (ferry dkim ...).

Every signature is checked by dkimpy's verifier, which fetches the public key
with a real DNS query to the test world's DNS server on loopback.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim  # dkimpy: the independent verifier
import dns.exception
import dns.resolver
import pytest
from click.testing import CliRunner

from ferry.cli.dkim import dkim as dkim_group
from ferry.delivery.client import dot_stuff
from ferry.delivery.dsn import DsnRecipient, DsnRequest, build_dsn
from ferry.dkim import (
    DkimKey,
    KeyStore,
    Signer,
    dns_record,
    normalize_domain,
    relaxed_body,
    split_lazily,
    split_message,
    txt_chunks,
)
from ferry.envelope import Reply
from tests.world import DnsServer

GetTxt = Callable[..., bytes | None]

MESSAGE = (
    b"Received: from app.example.com (app.example.com [192.0.2.1])\r\n"
    b"\tby relay.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <report-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: app 1.0\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the report is attached.\r\n"
)


# -- helpers -----------------------------------------------------------------------


def txt_lookup(server: DnsServer) -> GetTxt:
    """dkimpy's dnsfunc: a real TXT query to the test world's DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        # RFC 6376 §3.6.2.2: the strings of one TXT record are concatenated.
        return b"".join(next(iter(answer)).strings)

    return get_txt


def publish(server: DnsServer, key: DkimKey) -> None:
    name, value = dns_record(key)
    server.add_txt(name, value)


def signatures(message: bytes) -> int:
    return len(re.findall(rb"^DKIM-Signature:", message, re.M | re.I))


def verify_all(message: bytes, get_txt: GetTxt) -> list[bool]:
    """Verify every DKIM-Signature of ``message`` (dkimpy checks one per call)."""
    n = signatures(message)
    assert n > 0, "message carries no DKIM-Signature"
    results = []
    for i in range(n):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=get_txt)))
        except dkim.DKIMException:  # e.g. "body hash mismatch": dkim.verify() says False
            results.append(False)
    return results


def tags(header: bytes) -> dict[str, str]:
    """The tag=value pairs of one DKIM-Signature field (whitespace removed)."""
    value = re.sub(rb"\s+", b"", header.split(b":", 1)[1]).decode()
    return dict(part.split("=", 1) for part in value.split(";") if part)


def fields_of(headers: bytes) -> list[bytes]:
    """Split prepended DKIM-Signature fields into one bytes object each."""
    return [b"DKIM-Signature:" + f for f in headers.split(b"DKIM-Signature:")[1:]]


def on_the_wire(message: bytes) -> bytes:
    """The message as a receiving server stores it: Ferry's DATA encoding, undone."""
    data = dot_stuff(message)
    assert data.endswith(b".\r\n")
    data = data[:-3]
    if data.startswith(b".."):
        data = data[1:]
    return data.replace(b"\r\n..", b"\r\n.")


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """example.com with an RSA-2048 ("ferry") and an Ed25519 ("ed") key, both active;
    rsa.example with RSA only, ed.example with Ed25519 only."""
    d = tmp_path_factory.mktemp("dkim")
    store = KeyStore(d)
    store.generate("example.com")
    store.generate("example.com", selector="ed", kind="ed25519")
    store.generate("rsa.example")
    store.generate("ed.example", kind="ed25519")
    return d


@pytest.fixture
def store(keys_dir: Path) -> KeyStore:
    return KeyStore(keys_dir)


@pytest.fixture
def world(dns_server: DnsServer, store: KeyStore) -> Iterator[GetTxt]:
    """Every fixture key published in DNS; yields the verifier's lookup function."""
    for domain in store.all_domains():
        for key in store.keys_for(domain):
            publish(dns_server, key)
    yield txt_lookup(dns_server)


# -- signatures that verify ----------------------------------------------------------


def test_rsa_signature_verifies_with_the_key_from_dns(
    store: KeyStore, world: GetTxt, dns_server: DnsServer
) -> None:
    message = MESSAGE.replace(b"example.com>", b"rsa.example>")
    result = Signer(store).sign(message, envelope_sender="alice@rsa.example")
    assert result.signed and result.domain == "rsa.example" and result.selectors == ["ferry"]
    assert tags(result.headers)["a"] == "rsa-sha256"
    assert verify_all(result.headers + message, world) == [True]
    # the verifier really asked the DNS server for the key
    assert dns_server.count("ferry._domainkey.rsa.example", "TXT") >= 1


def test_ed25519_signature_verifies(store: KeyStore, world: GetTxt) -> None:
    message = MESSAGE.replace(b"example.com>", b"ed.example>")
    result = Signer(store).sign(message, envelope_sender="")
    assert result.selectors == ["ferry"]
    sig = tags(result.headers)
    assert sig["a"] == "ed25519-sha256" and sig["d"] == "ed.example"
    assert len(base64.b64decode(sig["b"])) == 64  # an Ed25519 signature (RFC 8032)
    assert verify_all(result.headers + message, world) == [True]


def test_a_domain_with_both_keys_gets_both_signatures(store: KeyStore, world: GetTxt) -> None:
    result = Signer(store).sign(MESSAGE, envelope_sender="alice@example.com")
    assert sorted(result.selectors) == ["ed", "ferry"]
    algorithms = sorted(tags(f)["a"] for f in fields_of(result.headers))
    assert algorithms == ["ed25519-sha256", "rsa-sha256"]
    assert verify_all(result.headers + MESSAGE, world) == [True, True]


CASES = {
    "8-bit body": (
        b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: 8bit\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"Gr\xfc\xdfe aus K\xf6ln \xa4\r\n\xff\xfe raw bytes\r\n"
    ),
    "SMTPUTF8 headers and body": (
        "From: José Müller <josé@example.com>\r\n"
        "To: 山田 <yamada@例え.jp>\r\n"
        "Subject: Grüße — ☃\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
        "Ünïcödé body ✓\r\n"
    ).encode(),
    "long folded headers": (
        b"From: Alice <alice@example.com>\r\n"
        b"To: a@example.net,\r\n b@example.net,\r\n\tc@example.net\r\n"
        b"Subject: a subject long enough that it had to be folded across several"
        b"\r\n   lines by the\t\tclient  that wrote it\r\n"
        b"References: "
        + b"\r\n ".join(b"<id-%d@example.com>" % i for i in range(40))
        + b"\r\nMessage-ID: <long@example.com>\r\n\r\nbody\r\n"
    ),
    "trailing blank lines and whitespace": (
        b"From: alice@example.com\r\nSubject:   spaced   out   \r\n\r\n"
        b"line with trailing spaces   \r\nline\twith \t tabs\t\r\n  \r\n\r\n\r\n \t \r\n"
    ),
    "bare LF line ends": (b"From: alice@example.com\nSubject: lf\n\nline one\nline two\n"),
    "no final CRLF": b"From: alice@example.com\r\nSubject: x\r\n\r\nlast line  ",
    "empty body": b"From: alice@example.com\r\nSubject: empty\r\n\r\n",
    "headers only": b"From: alice@example.com\r\nSubject: no body at all\r\n",
    "dots at line starts": b"From: alice@example.com\r\n\r\n.\r\n..two\r\n.end\r\n",
}


@pytest.mark.parametrize("name", list(CASES))
def test_messages_verify_as_sent(name: str, store: KeyStore, world: GetTxt) -> None:
    message = CASES[name]
    result = Signer(store).sign(message, envelope_sender="alice@example.com")
    assert result.domain == "example.com" and len(result.selectors) == 2
    # What the receiving server stores: Ferry's SMTP DATA encoding (CRLF, dot
    # stuffing, final CRLF), undone as a server does.
    assert verify_all(on_the_wire(result.headers + message), world) == [True, True]
    if b"\n" not in message.replace(b"\r\n", b"") and message.endswith(b"\r\n"):
        # a clean CRLF message verifies as it is, too
        assert verify_all(result.headers + message, world) == [True, True]


def test_internationalised_from_domain_signs_with_a_labels(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    store = KeyStore(tmp_path)
    key = store.generate("bücher.example")
    assert key.domain == "xn--bcher-kva.example"
    assert (tmp_path / "xn--bcher-kva.example" / "ferry.pem").is_file()
    publish(dns_server, key)
    message = "From: Zoë <zoë@bücher.example>\r\nSubject: ü\r\n\r\nü\r\n".encode()
    result = Signer(store).sign(message, envelope_sender="")
    assert tags(result.headers)["d"] == "xn--bcher-kva.example"  # RFC 8616 §4
    assert verify_all(result.headers + message, txt_lookup(dns_server)) == [True]


def test_dsn_is_signed_with_the_bounce_domain_key(tmp_path: Path, dns_server: DnsServer) -> None:
    store = KeyStore(tmp_path)
    publish(dns_server, store.generate("relay.example.org"))
    dsn = build_dsn(
        DsnRequest(
            reporting_mta="relay.example.org",
            original_sender="alice@example.com",
            bounce_from="MAILER-DAEMON@relay.example.org",
            envid=None,
            arrival=1_700_000_000.0,
            queue_id="Q1",
            recipients=(
                DsnRecipient(
                    final_recipient="bob@example.net",
                    original_recipient=None,
                    action="failed",
                    status="5.1.1",
                    remote_mta="mx.example.net",
                    diagnostic=Reply(550, "5.1.1", "User unknown"),
                    last_attempt=1_700_000_060.0,
                ),
            ),
            ret="FULL",
            original=MESSAGE,
        ),
        now=1_700_000_100.0,
        message_id_domain="relay.example.org",
    )
    # A DSN goes out with the null reverse-path: the From: domain decides.
    result = Signer(store).sign(dsn, envelope_sender="")
    assert result.domain == "relay.example.org"
    assert verify_all(result.headers + dsn, txt_lookup(dns_server)) == [True]


# -- what the signature covers ---------------------------------------------------------


def test_a_header_changed_after_signing_fails(store: KeyStore, world: GetTxt) -> None:
    result = Signer(store).sign(MESSAGE, envelope_sender="alice@example.com")
    signed = result.headers + MESSAGE
    assert verify_all(signed, world) == [True, True]
    changed = signed.replace(b"Subject: Quarterly report", b"Subject: Quarterly rep0rt")
    assert verify_all(changed, world) == [False, False]
    body_changed = signed.replace(b"attached", b"attacked")
    assert verify_all(body_changed, world) == [False, False]


def test_oversigning_stops_an_added_from_or_subject(store: KeyStore, world: GetTxt) -> None:
    result = Signer(store).sign(MESSAGE, envelope_sender="alice@example.com")
    signed = result.headers + MESSAGE
    # Added at the top, where many readers look first: the bottom-up instance is still
    # the original, so only the extra ("nonexistent") h= entry catches it (§5.4.2).
    for extra in (b"From: mallory@evil.example\r\n", b"Subject: Urgent: pay now\r\n"):
        assert verify_all(extra + signed, world) == [False, False]
    # A field listed only as often as it occurs is not protected that way.
    assert verify_all(b"Content-Type: text/html\r\n" + signed, world) == [True, True]


def test_what_relays_add_or_refold_does_not_break_the_signature(
    store: KeyStore, world: GetTxt
) -> None:
    result = Signer(store).sign(MESSAGE, envelope_sender="alice@example.com")
    relayed = (
        b"Received: from relay.example.com by mx.example.net; Mon, 1 Jan 2024\r\n"
        b"Authentication-Results: mx.example.net; dkim=pass\r\n"
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.net; s=arc; b=xyz\r\n"
        + result.headers
        + MESSAGE.replace(b"X-Mailer: app 1.0\r\n", b"X-Mailer: app 1.0\r\nX-Spam: no\r\n").replace(
            b"Subject: Quarterly report", b"Subject:  Quarterly\r\n\treport "
        )
    )
    # relaxed canonicalisation (RFC 6376 §3.4.2) forgives re-folding and case
    relayed = relayed.replace(b"MIME-Version: 1.0", b"mime-version:1.0")
    assert verify_all(relayed, world) == [True, True]


def test_header_list_oversigns_and_leaves_relay_headers_out(store: KeyStore) -> None:
    message = (
        b"Return-Path: <alice@example.com>\r\nFrom: a@example.com\r\n"
        b"To: b@example.net\r\nCc: c@example.net\r\nX-Trace: 1\r\n"
        b"List-Unsubscribe: <https://example.com/u>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nhi\r\n"
    )
    result = Signer(store).sign(message, envelope_sender="")
    h = tags(fields_of(result.headers)[0])["h"].split(":")
    assert h.count("from") == 2 and h.count("to") == 2  # present once, listed twice
    assert h.count("subject") == 1 and h.count("date") == 1  # absent: listed once
    assert h.count("message-id") == 1
    assert h.count("cc") == 1  # signed, not oversigned
    assert "list-unsubscribe" in h and "list-unsubscribe-post" in h  # RFC 8058 §4
    for never in ("return-path", "received", "x-trace", "dkim-signature"):
        assert never not in h


def test_signature_lines_are_folded_to_78_characters(store: KeyStore) -> None:
    message = CASES["long folded headers"]
    result = Signer(store).sign(message, envelope_sender="")
    lines = result.headers.split(b"\r\n")
    assert lines[-1] == b""  # ends in CRLF
    assert max(len(line) for line in lines) <= 78
    assert all(line[:1] in (b" ", b"D") for line in lines[:-1])
    assert len(lines) > 8  # a 2048-bit b= alone needs several lines


def test_relaxed_body_canonicalisation() -> None:
    # RFC 6376 §3.4.4 and its examples (§3.4.6)
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""


# -- which key, and unsigned outcomes --------------------------------------------------


def test_fallbacks_parent_envelope_then_default_domain(store: KeyStore) -> None:
    signer = Signer(store, default_domain="ed.example")
    sub = MESSAGE.replace(b"alice@example.com>", b"alice@news.example.com>")
    assert signer.sign(sub, envelope_sender="").domain == "example.com"  # relaxed alignment
    other = MESSAGE.replace(b"alice@example.com>", b"alice@nokeys.example>")
    assert signer.sign(other, envelope_sender="bounce@rsa.example").domain == "rsa.example"
    assert signer.sign(other, envelope_sender="x@nokeys.example").domain == "ed.example"
    no_from = MESSAGE.replace(b"From: Alice <alice@example.com>\r\n", b"")
    assert signer.sign(no_from, envelope_sender="alice@rsa.example").domain == "rsa.example"


def test_unsigned_reasons_are_reported_and_counted(store: KeyStore) -> None:
    signer = Signer(store)
    other = MESSAGE.replace(b"alice@example.com>", b"alice@nokeys.example>")
    result = signer.sign(other, envelope_sender="x@also-none.example")
    assert result.headers == b"" and not result.signed
    assert result.unsigned_reason == "no key for nokeys.example"
    assert result.reason_code == "no_key" and result.required is False
    no_from = MESSAGE.replace(b"From: Alice <alice@example.com>\r\n", b"")
    result = signer.sign(no_from, envelope_sender="")
    assert result.unsigned_reason == "no From: domain" and result.reason_code == "no_domain"
    disabled = Signer(store, enabled=False).sign(MESSAGE, envelope_sender="")
    assert disabled.unsigned_reason == "disabled" and not disabled.signed
    assert signer.sign(MESSAGE, envelope_sender="").signed
    assert signer.counts == {"no_key": 1, "no_domain": 1, "signed": 1}


def test_a_broken_key_file_is_a_signing_error(tmp_path: Path) -> None:
    (tmp_path / "example.com").mkdir()
    (tmp_path / "example.com" / "ferry.pem").write_text("-----BEGIN PRIVATE KEY-----\nno\n")
    result = Signer(KeyStore(tmp_path)).sign(MESSAGE, envelope_sender="")
    assert result.reason_code == "error"
    assert result.unsigned_reason is not None
    assert result.unsigned_reason.startswith("signing error: ")
    assert "ferry.pem" in result.unsigned_reason


def test_required_domain_without_key_asks_to_defer(store: KeyStore) -> None:
    signer = Signer(store, default_domain="rsa.example", required_domains=["NoKeys.Example"])
    required = MESSAGE.replace(b"alice@example.com>", b"alice@nokeys.example>")
    result = signer.sign(required, envelope_sender="alice@nokeys.example")
    # no unaligned fallback to the default domain for a required author domain
    assert result.required is True and not result.signed
    assert result.unsigned_reason == "no key for nokeys.example"
    # another domain without a key falls back to the default domain's key
    other = MESSAGE.replace(b"alice@example.com>", b"alice@other.example>")
    assert signer.sign(other, envelope_sender="").domain == "rsa.example"
    # a required domain that has a key signs normally
    signed = Signer(store, required_domains=["example.com"]).sign(MESSAGE, envelope_sender="")
    assert signed.signed and signed.required is False


# -- the key store -------------------------------------------------------------------


def test_key_files_are_private_and_parsed_once(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key = store.generate("example.com")
    assert key.path == tmp_path / "example.com" / "ferry.pem"
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "example.com").stat().st_mode) & 0o077 == 0
    assert b"BEGIN PRIVATE KEY" in key.path.read_bytes()
    assert [k.selector for k in store.keys_for("EXAMPLE.com.")] == ["ferry"]
    assert store.keys_for("example.com")[0].private is store.keys_for("example.com")[0].private
    with pytest.raises(FileExistsError):
        store.generate("example.com")  # never overwrites a key


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "-x.example", "a..b"])
def test_domain_names_cannot_escape_the_keys_dir(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        normalize_domain(bad)
    with pytest.raises(ValueError):
        KeyStore(tmp_path).generate(bad)
    assert KeyStore(tmp_path).keys_for(bad) == []


def test_rotate_switches_selector_and_keeps_the_old_key(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    serving = KeyStore(tmp_path)  # what `ferry serve` holds
    old = serving.generate("example.com")
    signer = Signer(serving)
    assert signer.sign(MESSAGE, envelope_sender="").selectors == ["ferry"]
    new = KeyStore(tmp_path).rotate("example.com")  # what the CLI does, separately
    assert re.fullmatch(r"ferry\d{6}", new.selector)
    assert old.path is not None and old.path.exists()
    # the serving store notices the change without a restart
    result = signer.sign(MESSAGE, envelope_sender="")
    assert result.selectors == [new.selector]
    publish(dns_server, new)
    assert verify_all(result.headers + MESSAGE, txt_lookup(dns_server)) == [True]
    entries = {e.key.selector: e.active for e in serving.entries("example.com")}
    assert entries == {"ferry": False, new.selector: True}
    second = serving.rotate("example.com")
    assert second.selector == f"{new.selector}-2"
    assert serving.remove("example.com", "ferry") is True
    assert not old.path.exists()
    assert serving.remove("example.com", "ferry") is False
    assert [k.selector for k in serving.keys_for("example.com")] == [second.selector]


def test_an_active_file_edited_in_place_is_noticed(tmp_path: Path) -> None:
    # a clock a second ahead: the files look old enough for the cache entry to be trusted
    store = KeyStore(tmp_path, clock_ns=lambda: time.time_ns() + 1_000_000_000)
    store.generate("example.com")
    store.generate("example.com", selector="ed", kind="ed25519")
    signer = Signer(store)
    assert signer.sign(MESSAGE, envelope_sender="").selectors == ["ed", "ferry"]
    dir_mtime = (tmp_path / "example.com").stat().st_mtime_ns
    with open(tmp_path / "example.com" / "active", "w") as fh:  # no rename: dir unchanged
        fh.write("ed\n")
    assert (tmp_path / "example.com").stat().st_mtime_ns == dir_mtime
    assert signer.sign(MESSAGE, envelope_sender="").selectors == ["ed"]


def test_rotating_one_kind_keeps_the_other_signing(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.generate("example.com")
    store.generate("example.com", selector="ed", kind="ed25519")
    new = store.rotate("example.com", kind="ed25519")
    assert new.kind == "ed25519"
    assert sorted(k.selector for k in store.keys_for("example.com")) == sorted(
        ["ferry", new.selector]
    )


def test_rotate_without_activation_then_activate(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.generate("example.com")
    staged = store.rotate("example.com", activate=False)
    assert [k.selector for k in store.keys_for("example.com")] == ["ferry"]
    store.activate("example.com", staged.selector, replace_kind=True)
    assert [k.selector for k in store.keys_for("example.com")] == [staged.selector]


def test_keys_named_in_configuration_sign_too(tmp_path: Path, keys_dir: Path) -> None:
    pem = tmp_path / "outside" / "sel2024.pem"
    pem.parent.mkdir()
    shutil.copy(keys_dir / "rsa.example" / "ferry.pem", pem)
    store = KeyStore(tmp_path / "keys", extra_keys={"rsa.example": [pem]})
    assert [(k.selector, k.kind) for k in store.keys_for("rsa.example")] == [("sel2024", "rsa")]
    assert store.all_domains() == ["rsa.example"]


def test_dns_record_formats(store: KeyStore) -> None:
    ed = store.keys_for("ed.example")[0]
    name, value = dns_record(ed)
    assert name == "ferry._domainkey.ed.example"
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(value.split("p=")[1])) == 32  # RFC 8463 §4.2: raw key
    _, rsa_value = dns_record(store.keys_for("rsa.example")[0])
    assert rsa_value.startswith("v=DKIM1; k=rsa; p=MII")  # DER SubjectPublicKeyInfo
    chunks = txt_chunks(rsa_value)
    assert len(chunks) == 2 and "".join(chunks) == rsa_value
    assert all(len(c.encode()) <= 255 for c in chunks)
    assert txt_chunks("short") == ["short"]


# -- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., tuple[int, str]]:
    """Run `ferry dkim ...` against a ferry.toml whose [dkim] keys_dir is in tmp_path."""
    config = tmp_path / "ferry.toml"
    config.write_text(f'[dkim]\nkeys_dir = "{tmp_path / "keys"}"\n')
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(dkim_group, list(args), obj={"config": str(config)})
        return result.exit_code, result.output

    return run


def test_keygen_output_pasted_into_dns_verifies(
    cli: Callable[..., tuple[int, str]], tmp_path: Path, dns_server: DnsServer
) -> None:
    code, out = cli("keygen", "example.com", "--selector", "s1")
    assert code == 0, out
    pem = tmp_path / "keys" / "example.com" / "s1.pem"
    assert f"private key: {pem}" in out
    name = re.search(r"name:\s+(\S+)", out)
    value = re.search(r"value: (.+)", out)
    zone = re.search(r"^\s*(\S+)\. \d+ IN TXT \( (.+) \)$", out, re.M)
    assert name and value and zone
    assert name.group(1) == zone.group(1) == "s1._domainkey.example.com"
    strings = re.findall(r'"([^"]*)"', zone.group(2))
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == value.group(1).strip()
    # paste the zone file's strings as they are
    dns_server.add_txt(name.group(1), strings)
    store = KeyStore(tmp_path / "keys")
    result = Signer(store).sign(MESSAGE, envelope_sender="")
    assert result.selectors == ["s1"]
    assert verify_all(result.headers + MESSAGE, txt_lookup(dns_server)) == [True]


def test_cli_show_rotate_remove(cli: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
    assert cli("keygen", "example.com")[0] == 0
    code, out = cli("keygen", "example.com", "--type", "ed25519", "--selector", "ed", "--json")
    assert code == 0 and json.loads(out)["type"] == "ed25519"
    assert cli("keygen", "example.com")[0] != 0  # selector exists
    code, out = cli("rotate", "example.com", "--json")
    assert code == 0, out
    rotated = json.loads(out)
    assert rotated["retired"] == ["ferry"] and rotated["active"] is True
    code, out = cli("show", "example.com", "--json")
    shown = {k["selector"]: (k["type"], k["active"]) for k in json.loads(out)}
    assert shown == {
        "ferry": ("rsa", False),
        "ed": ("ed25519", True),
        rotated["selector"]: ("rsa", True),
    }
    code, out = cli("show", "example.com")
    assert code == 0 and "ferry._domainkey.example.com. 3600 IN TXT" in out
    code, out = cli("remove", "example.com", "ed")
    assert code != 0 and "--force" in out  # refuses to remove a signing key
    code, out = cli("remove", "example.com", "ferry")
    assert code == 0, out
    assert not (tmp_path / "keys" / "example.com" / "ferry.pem").exists()
    code, out = cli("remove", "example.com", "ferry")
    assert code != 0


def test_cli_rejects_bad_input(cli: Callable[..., tuple[int, str]]) -> None:
    code, out = cli("keygen", "../etc")
    assert code != 0 and "not a domain name" in out
    code, out = cli("keygen", "example.com", "--bits", "512")
    assert code != 0 and "1024" in out
    code, out = cli("show", "nothing.example")
    assert code != 0 and "no DKIM keys" in out


# -- cheap when nothing signs (issue 12) ----------------------------------------------


def _split_by_normalising_first(message: bytes) -> tuple[list[bytes], bytes]:
    """The reference: every line end made CRLF, then header block and body split."""
    message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    elif b"\r\n\r\n" in message:
        head, body = message.split(b"\r\n\r\n", 1)
    else:
        head, body = message, b""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return re.split(rb"\r\n(?![ \t])", head.removesuffix(b"\r\n")) if head else [], body


@pytest.mark.parametrize(
    "message",
    [
        MESSAGE,
        MESSAGE.replace(b"\r\n", b"\n"),
        MESSAGE.replace(b"\r\n", b"\r"),
        MESSAGE + b"bare\nLF and bare\rCR in the body\r\n",
        b"A: 1\r\nB: 2\r\n\r\nbody without a final line end",
        b"A: 1\r\nB: 2\r\n\r\n",
        b"A: 1\r\nB: 2\r\n",
        b"A: 1\nB: 2\r\n\r\nbody\r\n",  # a bare LF in the header block
        b"A: 1\r\r\n\r\nbody\r\n",  # a bare CR just before the blank line
        b"A: 1\r\n\r\n\nbody\r\n",  # a bare LF just after it
        b"\r\nno header at all\r\n",
        b"\nno header, bare LF\n",
        b"A: folded\r\n\tcontinued\r\nB: 2\r\n\r\nx",
        b"",
    ],
)
def test_split_leaves_the_body_for_later_with_the_same_result(message: bytes) -> None:
    fields, body_of = split_lazily(message)
    want_fields, want_body = _split_by_normalising_first(message)
    assert [raw for _, raw in fields] == [f for f in want_fields if f]
    assert body_of() == want_body
    assert split_message(message) == (fields, want_body)


class _NoBodyScan(bytes):
    """A message whose whole-buffer scans fail the test (slices are plain bytes)."""

    def count(self, *args: object) -> int:  # type: ignore[override]
        raise AssertionError("the whole message was scanned")


def test_an_unsigned_message_is_not_canonicalised(store: KeyStore) -> None:
    # Before issue 12 every message was CRLF-normalised (three counts over the whole
    # buffer, 4 % of delivery at 100 KB) even when no key signs it: this failed then.
    body = b"line\r\n" * 20000
    other = MESSAGE.replace(b"alice@example.com>", b"alice@nokeys.example>") + body
    result = Signer(store).sign(_NoBodyScan(other), envelope_sender="x@nokeys.example")
    assert result.reason_code == "no_key"
    signed = Signer(store).sign(MESSAGE + body, envelope_sender="")
    assert signed.signed


def test_the_serving_store_looks_at_the_disk_at_most_once_per_interval(tmp_path: Path) -> None:
    now = [time.time_ns() + 10_000_000_000]  # files look old enough to be trusted
    serving = KeyStore(tmp_path, clock_ns=lambda: now[0], recheck_ns=1_000_000_000)
    assert serving.keys_for("example.com") == []  # no directory yet: cached as such
    KeyStore(tmp_path).generate("example.com")  # `ferry dkim keygen` beside serve
    now[0] += 999_000_000
    assert serving.keys_for("example.com") == []  # within the interval: no look
    now[0] += 1_000_000
    assert [k.selector for k in serving.keys_for("example.com")] == ["ferry"]
    KeyStore(tmp_path).rotate("example.com")
    now[0] -= 5_000_000_000  # the clock set back: look again rather than trust it
    assert [k.selector for k in serving.keys_for("example.com")] != ["ferry"]
    # the default (every lookup compares the directory) sees a change at once
    every_time = KeyStore(tmp_path, clock_ns=lambda: now[0] + 10_000_000_000)
    before = every_time.keys_for("example.com")
    KeyStore(tmp_path).rotate("example.com")
    assert every_time.keys_for("example.com") != before


def test_no_key_at_all_is_counted_but_not_notable(tmp_path: Path) -> None:
    # Issue 12: with DKIM enabled but no key anywhere (not set up), every message logged
    # "info dkim_unsigned ... no key for ..." -- a third of the log. Still counted; only
    # a message a key was expected for (keys exist, or its domain requires one) is notable.
    now = [time.time_ns() + 10_000_000_000]
    empty = KeyStore(tmp_path / "keys", clock_ns=lambda: now[0], recheck_ns=1_000_000_000)
    signer = Signer(empty)
    result = signer.sign(_NoBodyScan(MESSAGE), envelope_sender="x@example.com")
    assert (result.reason_code, result.signed, result.notable) == ("no_key", False, False)
    assert signer.counts == {"no_key": 1}
    required = Signer(empty, required_domains=["example.com"]).sign(MESSAGE, envelope_sender="")
    assert (required.reason_code, required.required, required.notable) == ("no_key", True, True)
    assert not Signer(empty, enabled=False).sign(MESSAGE, envelope_sender="").notable
    KeyStore(tmp_path / "keys").generate("other.example")  # a key beside the running relay
    assert not signer.sign(MESSAGE, envelope_sender="").notable  # within the interval
    now[0] += 1_000_000_000
    assert empty.any_keys()
    result = signer.sign(MESSAGE, envelope_sender="")
    assert (result.reason_code, result.notable) == ("no_key", True)  # example.com has none
    signed = Signer(empty).sign(b"From: a@other.example\r\n\r\nhi\r\n", envelope_sender="")
    assert signed.signed and not signed.notable


def test_a_key_named_in_configuration_counts_as_a_key(tmp_path: Path) -> None:
    pem = KeyStore(tmp_path / "elsewhere").generate("example.org").path
    store = KeyStore(tmp_path / "empty", extra_keys={"example.org": [pem]})
    assert store.any_keys()
    assert not KeyStore(tmp_path / "empty").any_keys()
