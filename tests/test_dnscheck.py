"""``ferry dns check``: every check against the real test DNS server on loopback,
the record parsers as pure functions, and the click command end to end."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ferry.cli.dns import dns as dns_group
from ferry.dnscheck.checks import (
    Check,
    check_domain,
    failed,
    parse_dmarc,
    parse_tags,
    same_dkim_key,
    suggest_spf,
)
from tests.world.dns import DnsServer

DOMAIN = "example.test"
HOSTNAME = "relay.ferry.test"
IP = "127.0.0.5"
GOOD_SPF = f"v=spf1 ip4:{IP} ~all"
GOOD_DMARC = f"v=DMARC1; p=quarantine; rua=mailto:dmarc@{DOMAIN}"


def p_value(private: rsa.RSAPrivateKey) -> str:
    """The DKIM p= of an RSA key: base64 DER SubjectPublicKeyInfo (RFC 6376 §3.6.1)."""
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


@pytest.fixture(scope="module")
def rsa_p() -> str:
    return p_value(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def other_rsa_p() -> str:
    return p_value(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def publish(
    server: DnsServer,
    *,
    p: str,
    spf: list[str] | None = None,
    dkim: str | None = "default",
    dmarc: str | None = GOOD_DMARC,
    ptr: str | None = HOSTNAME,
) -> None:
    """A fully correct domain; each keyword breaks (or replaces) one record."""
    server.add_mx(DOMAIN, [(10, HOSTNAME)])
    server.add_a(HOSTNAME, IP)
    for text in [GOOD_SPF] if spf is None else spf:
        server.add_txt(DOMAIN, text)
    if dkim is not None:
        server.add_txt(
            f"ferry._domainkey.{DOMAIN}", f"v=DKIM1; k=rsa; p={p}" if dkim == "default" else dkim
        )
    if dmarc is not None:
        server.add_txt(f"_dmarc.{DOMAIN}", dmarc)
    if ptr is not None:
        server.add_ptr(IP, ptr)


async def run(
    server: DnsServer, p: str, *, ip: str | None = IP, keys: bool = True
) -> dict[str, Check]:
    checks = await check_domain(
        DOMAIN,
        ip=ip,
        hostname=HOSTNAME,
        nameservers=[server.address],
        dkim_keys=[("ferry", "rsa", p)] if keys else [],
        timeout=2.0,
    )
    by_name = {c.name: c for c in checks}
    assert len(by_name) == len(checks)
    return by_name


def only_failure(checks: dict[str, Check], name: str) -> Check:
    """The one failing check is ``name``; every other one still passes (or informs)."""
    assert failed(list(checks.values()))
    bad = [c.name for c in checks.values() if c.status == "fail"]
    assert bad == [name], [c.to_dict() for c in checks.values()]
    check = checks[name]
    assert check.required and check.fix
    return check


# -- the good domain --------------------------------------------------------------


async def test_fully_correct_domain_passes_every_check(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    checks = await run(dns_server, rsa_p)
    assert list(checks) == [
        "MX",
        "SPF",
        "DKIM ferry._domainkey",
        "DMARC",
        "PTR",
        "MTA-STS",
        "TLS-RPT",
    ]
    for name in ("MX", "SPF", "DKIM ferry._domainkey", "DMARC", "PTR"):
        assert checks[name].status == "pass", checks[name]
        assert checks[name].fix is None
    assert checks["MTA-STS"].status == checks["TLS-RPT"].status == "info"
    assert not failed(list(checks.values()))
    assert "ip4:127.0.0.5" in checks["SPF"].detail
    assert checks["DMARC"].detail == (
        "policy quarantine, alignment relaxed/relaxed (DKIM/SPF), reports to "
        "mailto:dmarc@example.test"
    )
    assert checks["PTR"].detail == f"{IP} → {HOSTNAME} → {IP} (forward-confirmed)"
    assert [c.required for c in checks.values()] == [False, True, True, True, True, False, False]


# -- each broken record fails with its own message ---------------------------------


async def test_no_spf_record(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, spf=["google-site-verification=xyz"])
    check = only_failure(await run(dns_server, rsa_p), "SPF")
    assert check.detail == f"no SPF record at {DOMAIN}"
    assert check.fix == f'publish TXT at {DOMAIN}: "v=spf1 ip4:{IP} ~all"'


async def test_two_spf_records(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, spf=[GOOD_SPF, "v=spf1 a -all"])
    check = only_failure(await run(dns_server, rsa_p), "SPF")
    assert check.detail.startswith("2 SPF records at example.test")
    assert "permerror" in check.detail
    assert "merge" in (check.fix or "")


async def test_spf_not_authorising_the_ip(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, spf=["v=spf1 ip4:192.0.2.1 -all"])
    check = only_failure(await run(dns_server, rsa_p), "SPF")
    assert check.detail == f"{IP} is not authorised: fail via -all"
    assert check.fix == f'authorise {IP}: "v=spf1 ip4:192.0.2.1 ip4:{IP} -all"'


async def test_spf_softfail_is_a_warning(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, spf=["v=spf1 ip4:192.0.2.1 ~all"])
    checks = await run(dns_server, rsa_p)
    assert checks["SPF"].status == "warn"
    assert "softfail via ~all" in checks["SPF"].detail
    assert not failed(list(checks.values()))


async def test_spf_syntax_error(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, spf=["v=spf1 ip4:999.0.0.1 ~all"])
    check = only_failure(await run(dns_server, rsa_p), "SPF")
    assert "does not parse" in check.detail and "not an IPv4 address" in check.detail


async def test_spf_over_ten_lookups(dns_server: DnsServer, rsa_p: str) -> None:
    includes = " ".join(f"include:s{i}.{DOMAIN}" for i in range(11))
    publish(dns_server, p=rsa_p, spf=[f"v=spf1 {includes} ip4:{IP} -all"])
    for i in range(11):
        dns_server.add_txt(f"s{i}.{DOMAIN}", "v=spf1 ip4:192.0.2.99 -all")
    check = only_failure(await run(dns_server, rsa_p), "SPF")
    assert "more than 10 DNS lookups" in check.detail
    assert "at most 10 DNS lookups" in (check.fix or "")


async def test_spf_without_ip_uses_the_hostname_address(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    checks = await run(dns_server, rsa_p, ip=None)
    assert checks["SPF"].status == "pass"
    assert f"the address of {HOSTNAME}" in checks["SPF"].detail
    assert "PTR" not in checks  # only with --ip


async def test_spf_without_ip_or_hostname_address_warns(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    dns_server.remove(HOSTNAME)
    checks = await run(dns_server, rsa_p, ip=None)
    assert checks["SPF"].status == "warn"
    assert "sending IP was not checked" in checks["SPF"].detail


async def test_spf_lookup_failure_fails(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    dns_server.servfail(DOMAIN, "TXT")
    check = only_failure(await run(dns_server, rsa_p), "SPF")
    assert check.detail.startswith("DNS lookup failed")


async def test_dkim_key_mismatch(dns_server: DnsServer, rsa_p: str, other_rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, dkim=f"v=DKIM1; k=rsa; p={other_rsa_p}")
    check = only_failure(await run(dns_server, rsa_p), "DKIM ferry._domainkey")
    assert "published key does not match the local key" in check.detail
    assert rsa_p in (check.fix or "")


async def test_dkim_record_missing(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, dkim=None)
    check = only_failure(await run(dns_server, rsa_p), "DKIM ferry._domainkey")
    assert check.detail == f"no DKIM record at ferry._domainkey.{DOMAIN}"
    assert check.fix == f'publish TXT at ferry._domainkey.{DOMAIN}: "v=DKIM1; k=rsa; p={rsa_p}"'


async def test_dkim_key_revoked(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, dkim="v=DKIM1; k=rsa; p=")
    check = only_failure(await run(dns_server, rsa_p), "DKIM ferry._domainkey")
    assert "revoked" in check.detail


async def test_dkim_key_with_whitespace_in_p_matches(dns_server: DnsServer, rsa_p: str) -> None:
    spaced = " ".join(rsa_p[i : i + 64] for i in range(0, len(rsa_p), 64))
    publish(dns_server, p=rsa_p, dkim=f"v=DKIM1; k=rsa; p={spaced}")
    checks = await run(dns_server, rsa_p)
    assert checks["DKIM ferry._domainkey"].status == "pass"


async def test_no_local_dkim_key_warns(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    checks = await run(dns_server, rsa_p, keys=False)
    dkim = checks["DKIM"]
    assert (dkim.status, dkim.required) == ("warn", False)
    assert dkim.fix == f"run: ferry dkim keygen {DOMAIN}"
    assert not failed(list(checks.values()))


async def test_no_dmarc_record(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, dmarc=None)
    check = only_failure(await run(dns_server, rsa_p), "DMARC")
    assert check.detail == f"no DMARC record at _dmarc.{DOMAIN}"
    assert check.fix == (
        f'publish TXT at _dmarc.{DOMAIN}: "v=DMARC1; p=none; rua=mailto:dmarc-reports@{DOMAIN}"'
    )


async def test_dmarc_p_none_warns(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, dmarc="v=DMARC1; p=none; adkim=s")
    checks = await run(dns_server, rsa_p)
    dmarc = checks["DMARC"]
    assert dmarc.status == "warn"
    assert "policy none" in dmarc.detail and "alignment strict/relaxed" in dmarc.detail
    assert "no aggregate reports" in dmarc.detail
    assert not failed(list(checks.values()))


async def test_two_dmarc_records_fail(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    dns_server.add_txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject")
    check = only_failure(await run(dns_server, rsa_p), "DMARC")
    assert check.detail.startswith("2 DMARC records")


async def test_ptr_not_forward_confirmed(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, ptr="other.ferry.test")
    dns_server.add_a("other.ferry.test", "127.0.0.9")
    check = only_failure(await run(dns_server, rsa_p), "PTR")
    assert check.detail == (
        f"{IP} → other.ferry.test, but other.ferry.test → 127.0.0.9: not forward-confirmed"
    )
    assert check.fix and check.fix.startswith(f"add A other.ferry.test → {IP}")


async def test_ptr_missing(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, ptr=None)
    check = only_failure(await run(dns_server, rsa_p), "PTR")
    assert check.detail == f"{IP} has no PTR record (reverse DNS)"


async def test_ptr_confirmed_but_not_the_hostname_warns(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p, ptr="host-5.isp.test")
    dns_server.add_a("host-5.isp.test", IP)
    checks = await run(dns_server, rsa_p)
    ptr = checks["PTR"]
    assert ptr.status == "warn"
    assert f"but this relay's hostname is {HOSTNAME}" in ptr.detail
    assert not failed(list(checks.values()))


async def test_mx_elsewhere_is_info_and_no_mx_warns(dns_server: DnsServer, rsa_p: str) -> None:
    dns_server.add_mx(DOMAIN, [(5, "mx.elsewhere.test")])
    checks = await run(dns_server, rsa_p)
    assert checks["MX"].status == "info"
    assert "sending-only domains need no MX pointing here" in checks["MX"].detail
    dns_server.clear()
    dns_server.add_txt(DOMAIN, GOOD_SPF)
    checks = await run(dns_server, rsa_p)
    assert (checks["MX"].status, checks["MX"].required) == ("warn", False)
    assert checks["MX"].fix == f"add MX 10 {HOSTNAME}. if {DOMAIN} should receive mail"


async def test_mta_sts_and_tls_rpt_are_reported(dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    checks = await run(dns_server, rsa_p)
    assert "no STSv1 record" in checks["MTA-STS"].detail
    assert "no TLSRPTv1 record" in checks["TLS-RPT"].detail
    dns_server.add_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=20240101")
    dns_server.add_txt(f"_smtp._tls.{DOMAIN}", f"v=TLSRPTv1; rua=mailto:tls@{DOMAIN}")
    checks = await run(dns_server, rsa_p)
    assert checks["MTA-STS"].detail == f"_mta-sts.{DOMAIN}: v=STSv1; id=20240101"
    assert checks["TLS-RPT"].detail == f"_smtp._tls.{DOMAIN}: v=TLSRPTv1; rua=mailto:tls@{DOMAIN}"
    assert {checks["MTA-STS"].status, checks["TLS-RPT"].status} == {"info"}


async def test_bad_arguments_raise(dns_server: DnsServer) -> None:
    with pytest.raises(ValueError):
        await check_domain(DOMAIN, ip="not-an-ip", hostname=HOSTNAME, nameservers=[], dkim_keys=[])


# -- pure parsers ------------------------------------------------------------------


def test_parse_dmarc_defaults_and_tags() -> None:
    record = parse_dmarc(
        "v=DMARC1; p=reject; sp=quarantine; aspf=s; pct=50; rua=mailto:a@x.test, mailto:b@x.test"
    )
    assert (record.policy, record.subdomain_policy, record.adkim, record.aspf) == (
        "reject",
        "quarantine",
        "r",
        "s",
    )
    assert record.pct == 50
    assert record.rua == ("mailto:a@x.test", "mailto:b@x.test")
    assert parse_dmarc("v=DMARC1;p=none").subdomain_policy == "none"


@pytest.mark.parametrize("bad", ["p=reject", "v=DMARC1; p=maybe", "v=DMARC1", "v=DMARC2; p=none"])
def test_parse_dmarc_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_dmarc(bad)


def test_parse_dmarc_without_p_but_with_rua_is_none() -> None:
    record = parse_dmarc("v=DMARC1; rua=mailto:r@x.test")  # RFC 7489 §6.6.3
    assert record.policy == "none" and record.notes


def test_parse_tags() -> None:
    assert parse_tags(" v=DKIM1 ; K=rsa; p=AB CD ;") == {"v": "DKIM1", "k": "rsa", "p": "AB CD"}
    with pytest.raises(ValueError):
        parse_tags("v=DKIM1; p=a; p=b")


def test_same_dkim_key_accepts_pkcs1_for_the_same_rsa_key() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    spki = p_value(private)
    pkcs1 = base64.b64encode(
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
    ).decode()
    other = p_value(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    assert same_dkim_key(pkcs1, spki)
    assert same_dkim_key(spki[:40] + "\t " + spki[40:], spki)
    assert not same_dkim_key(other, spki)
    assert not same_dkim_key("not base64!", spki)
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert same_dkim_key(base64.b64encode(raw).decode(), base64.b64encode(raw).decode(), "ed25519")


def test_suggest_spf() -> None:
    assert suggest_spf(None, "192.0.2.1", HOSTNAME) == "v=spf1 ip4:192.0.2.1 ~all"
    assert suggest_spf(None, "2001:db8::1", HOSTNAME) == "v=spf1 ip6:2001:db8::1 ~all"
    assert suggest_spf(None, None, HOSTNAME) == f"v=spf1 a:{HOSTNAME} ~all"
    assert suggest_spf("v=spf1 mx redirect=x.test", "192.0.2.1", HOSTNAME) == (
        "v=spf1 mx ip4:192.0.2.1 redirect=x.test"
    )
    assert suggest_spf("v=spf1 mx", "192.0.2.1", HOSTNAME) == "v=spf1 mx ip4:192.0.2.1"


# -- the command -------------------------------------------------------------------


def write_config(tmp_path: Path, server: DnsServer) -> Path:
    path = tmp_path / "ferry.toml"
    path.write_text(
        f"""
[server]
hostname = "{HOSTNAME}"

[dns]
nameservers = ["{server.address}"]
timeout = 2.0

[dkim]
keys_dir = "{tmp_path / "dkim"}"
"""
    )
    return path


def invoke(config: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(dns_group, ["check", *args], obj={"config": str(config)})


def test_cli_exit_status_and_json(tmp_path: Path, dns_server: DnsServer, rsa_p: str) -> None:
    publish(dns_server, p=rsa_p)
    config = write_config(tmp_path, dns_server)
    good = invoke(config, DOMAIN, "--ip", IP, "--json")
    assert good.exit_code == 0, good.output
    checks = json.loads(good.stdout)
    by_name = {c["name"]: c for c in checks}
    assert by_name["SPF"]["status"] == "pass" and by_name["PTR"]["status"] == "pass"
    assert by_name["DKIM"]["status"] == "warn"  # no local key in the empty keys_dir
    assert set(checks[0]) == {"name", "status", "detail", "fix", "required"}

    table = invoke(config, DOMAIN, "--ip", IP)
    assert table.exit_code == 0
    assert "✔" in table.stdout and "every required check passes" in table.stdout

    dns_server.remove(f"_dmarc.{DOMAIN}")
    bad = invoke(config, DOMAIN, "--ip", IP, "--json")
    assert bad.exit_code == 1
    dmarc = next(c for c in json.loads(bad.stdout) if c["name"] == "DMARC")
    assert dmarc["status"] == "fail" and "p=none" in dmarc["fix"]

    table = invoke(config, DOMAIN, "--ip", IP)
    assert table.exit_code == 1
    assert "✘" in table.stdout and "required checks failed: DMARC" in table.stdout


def test_cli_rejects_a_bad_ip(tmp_path: Path, dns_server: DnsServer) -> None:
    result = invoke(write_config(tmp_path, dns_server), DOMAIN, "--ip", "999.1.1.1")
    assert result.exit_code == 2
    assert "999.1.1.1" in result.output


def test_cli_checks_local_dkim_keys(tmp_path: Path, dns_server: DnsServer, rsa_p: str) -> None:
    dkim = pytest.importorskip("ferry.dkim")
    config = write_config(tmp_path, dns_server)
    key = dkim.KeyStore(tmp_path / "dkim").generate(DOMAIN, selector="ferry", bits=1024)
    name, value = dkim.dns_record(key)
    publish(dns_server, p=rsa_p, dkim=None)
    missing = invoke(config, DOMAIN, "--ip", IP, "--json")
    assert missing.exit_code == 1
    dkim_check = next(c for c in json.loads(missing.stdout) if c["name"] == "DKIM ferry._domainkey")
    assert dkim_check["status"] == "fail" and value.split("p=")[1] in dkim_check["fix"]
    dns_server.add_txt(name, value)
    ok = invoke(config, DOMAIN, "--ip", IP, "--json")
    assert ok.exit_code == 0, ok.stdout


async def test_subdomain_inherits_the_organizational_dmarc_record(dns_server: DnsServer) -> None:
    dns_server.add_txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; sp=quarantine")
    checks = await check_domain(
        f"news.{DOMAIN}",
        ip=None,
        hostname=HOSTNAME,
        nameservers=[dns_server.address],
        dkim_keys=[],
        timeout=2.0,
    )
    dmarc = next(c for c in checks if c.name == "DMARC")
    assert dmarc.status == "pass"  # RFC 7489 §6.6.3: sp= applies to the subdomain
    assert dmarc.detail.startswith("policy quarantine")
    assert f"from _dmarc.{DOMAIN} (organizational domain)" in dmarc.detail
