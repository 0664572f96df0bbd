"""SPF (RFC 7208): the check_host() evaluator as pure logic over an in-memory DNS,
the macro expander as a pure function, and DnsLookup against the real test DNS server."""

from __future__ import annotations

import ipaddress

import pytest

from ferry.dnscheck.spf import (
    DnsLookup,
    DnsNotFound,
    DnsTempError,
    MacroContext,
    SpfSyntaxError,
    check_host,
    expand_macros,
    parse_record,
    spf_records,
)
from tests.world.dns import DnsServer


class MemoryDns:
    """An in-memory :class:`ferry.dnscheck.spf.Lookup`: a name with no records at all is
    NXDOMAIN, a name with other records answers NODATA ([]), ``fail`` makes a
    name (and type) a temporary error. Every query is logged."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list] = {}
        self.temp: set[tuple[str, str | None]] = set()
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rtype: str, *values: object) -> MemoryDns:
        self.records.setdefault((name.lower(), rtype), []).extend(values)
        return self

    def spf(self, name: str, text: str) -> MemoryDns:
        return self.add(name, "TXT", text)

    def fail(self, name: str, rtype: str | None = None) -> MemoryDns:
        self.temp.add((name.lower(), rtype))
        return self

    def _get(self, name: str, rtype: str) -> list:
        name = name.lower().rstrip(".")
        self.queries.append((name, rtype))
        if (name, rtype) in self.temp or (name, None) in self.temp:
            raise DnsTempError(f"{rtype} {name}: SERVFAIL")
        if (name, rtype) in self.records:
            return list(self.records[name, rtype])
        if any(n == name or n.endswith("." + name) for n, _ in self.records):
            return []
        raise DnsNotFound(name)

    async def txt(self, name: str) -> list[str]:
        return self._get(name, "TXT")

    async def a(self, name: str) -> list[str]:
        return self._get(name, "A")

    async def aaaa(self, name: str) -> list[str]:
        return self._get(name, "AAAA")

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return self._get(name, "MX")

    async def ptr(self, ip: str) -> list[str]:
        return self._get(ipaddress.ip_address(ip).reverse_pointer, "PTR")


async def spf(record: str | list[str], ip: str, dns: MemoryDns | None = None, **kw):  # type: ignore[no-untyped-def]
    """check_host() of example.com publishing ``record``, for ``ip``."""
    dns = dns or MemoryDns()
    for text in [record] if isinstance(record, str) else record:
        dns.spf("example.com", text)
    return await check_host(ip, "example.com", kw.pop("sender", "alice@example.com"), dns, **kw)


# -- record selection (RFC 7208 §4.5) -----------------------------------------------


async def test_no_txt_records_is_none() -> None:
    dns = MemoryDns().add("example.com", "A", "192.0.2.1")
    result = await check_host("192.0.2.1", "example.com", "a@example.com", dns)
    assert result.result == "none"
    assert "no SPF record" in (result.error or "")


async def test_nxdomain_is_none() -> None:
    result = await check_host("192.0.2.1", "nowhere.example", "a@nowhere.example", MemoryDns())
    assert result.result == "none"
    assert "does not exist" in (result.error or "")


async def test_only_other_txt_records_is_none() -> None:
    result = await spf(["google-site-verification=abc", "v=spf10 -all"], "192.0.2.1")
    assert result.result == "none"


async def test_two_spf_records_is_permerror() -> None:
    result = await spf(["v=spf1 -all", "v=spf1 +all"], "192.0.2.1")
    assert result.result == "permerror"
    assert "2 SPF records" in (result.error or "")


async def test_version_is_case_insensitive_and_other_txt_ignored() -> None:
    result = await spf(["hello world", "V=SPF1 ip4:192.0.2.1 -all"], "192.0.2.1")
    assert (result.result, result.mechanism) == ("pass", "ip4:192.0.2.1")


def test_spf_records_selection() -> None:
    assert spf_records(["v=spf1", "v=spf1 -all", "v=spf10 -all", "x v=spf1"]) == [
        "v=spf1",
        "v=spf1 -all",
    ]


async def test_invalid_domain_is_none() -> None:
    dns = MemoryDns()
    for bad in ("localhost", "a..example.com", "x" * 64 + ".example.com"):
        result = await check_host("192.0.2.1", bad, "a@b.example", dns)
        assert result.result == "none", bad
    assert dns.queries == []  # RFC 7208 §4.3: not even looked up


# -- ip4 / ip6 and qualifiers --------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "ip", "expected"),
    [
        ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.2.77", "pass"),
        ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.3.1", "fail"),
        ("v=spf1 ip4:192.0.2.1 -all", "192.0.2.1", "pass"),
        ("v=spf1 ip4:192.0.2.1 -all", "192.0.2.2", "fail"),  # default /32
        ("v=spf1 ip4:0.0.0.0/0 -all", "203.0.113.9", "pass"),
        ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8:1::5", "pass"),
        ("v=spf1 ip6:2001:db8::/32 -all", "2001:db9::5", "fail"),
        ("v=spf1 ip6:2001:db8::1 -all", "2001:db8::2", "fail"),  # default /128
        ("v=spf1 ip4:192.0.2.1 -all", "2001:db8::1", "fail"),  # v4 never matches v6
        ("v=spf1 ip6:::/0 -all", "192.0.2.1", "fail"),  # nor v6 a v4 client
        ("v=spf1 ip4:192.0.2.1 -all", "::ffff:192.0.2.1", "pass"),  # §5: mapped is v4
    ],
)
async def test_ip_mechanisms(record: str, ip: str, expected: str) -> None:
    assert (await spf(record, ip)).result == expected


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("+all", "pass"),
        ("all", "pass"),
        ("-all", "fail"),
        ("~all", "softfail"),
        ("?all", "neutral"),
    ],
)
async def test_qualifiers(term: str, expected: str) -> None:
    result = await spf(f"v=spf1 {term}", "192.0.2.1")
    assert (result.result, result.mechanism) == (expected, term)


async def test_no_match_is_neutral() -> None:
    result = await spf("v=spf1 ip4:198.51.100.1", "192.0.2.1")
    assert (result.result, result.mechanism) == ("neutral", None)  # RFC 7208 §4.7


async def test_first_match_wins() -> None:
    result = await spf("v=spf1 ~ip4:192.0.2.0/24 ip4:192.0.2.1 -all", "192.0.2.1")
    assert (result.result, result.mechanism) == ("softfail", "~ip4:192.0.2.0/24")


# -- a, mx, exists, ptr --------------------------------------------------------------


async def test_a_mechanism_uses_the_current_domain() -> None:
    dns = MemoryDns().add("example.com", "A", "192.0.2.10")
    assert (await spf("v=spf1 a -all", "192.0.2.10", dns)).result == "pass"
    assert (
        await spf("v=spf1 a -all", "192.0.2.11", MemoryDns().add("example.com", "A", "192.0.2.10"))
    ).result == "fail"


async def test_a_mechanism_with_domain_and_cidr() -> None:
    dns = MemoryDns().add("mail.example.org", "A", "192.0.2.10")
    assert (await spf("v=spf1 a:mail.example.org -all", "192.0.2.10", dns)).result == "pass"
    dns = MemoryDns().add("mail.example.org", "A", "192.0.2.10")
    assert (await spf("v=spf1 a:mail.example.org/24 -all", "192.0.2.99", dns)).result == "pass"
    dns = MemoryDns().add("mail.example.org", "A", "192.0.2.10")
    assert (await spf("v=spf1 a:mail.example.org -all", "192.0.2.99", dns)).result == "fail"


async def test_a_mechanism_ipv6_uses_aaaa_and_the_ip6_cidr() -> None:
    dns = (
        MemoryDns().add("example.com", "A", "192.0.2.10").add("example.com", "AAAA", "2001:db8::10")
    )
    result = await spf("v=spf1 a/24//64 -all", "2001:db8::ffff", dns)
    assert (result.result, result.mechanism) == ("pass", "a/24//64")
    assert ("example.com", "AAAA") in dns.queries and ("example.com", "A") not in dns.queries
    dns2 = MemoryDns().add("example.com", "AAAA", "2001:db8::10")
    assert (await spf("v=spf1 a -all", "2001:db8::ffff", dns2)).result == "fail"  # /128


async def test_mx_mechanism() -> None:
    def world() -> MemoryDns:
        return (
            MemoryDns()
            .add("example.com", "MX", (10, "mx1.example.com"), (20, "mx2.example.net"))
            .add("mx1.example.com", "A", "192.0.2.1")
            .add("mx2.example.net", "A", "198.51.100.7")
        )

    result = await spf("v=spf1 mx -all", "198.51.100.7", world())
    assert (result.result, result.mechanism, result.lookups) == ("pass", "mx", 1)
    assert (await spf("v=spf1 mx -all", "198.51.100.8", world())).result == "fail"
    assert (await spf("v=spf1 mx/24 -all", "198.51.100.8", world())).result == "pass"
    other = MemoryDns().add("other.example", "MX", (0, "mx1.example.com"))
    other.add("mx1.example.com", "A", "192.0.2.1")
    assert (await spf("v=spf1 mx:other.example -all", "192.0.2.1", other)).result == "pass"


async def test_mx_with_more_than_ten_names_is_permerror() -> None:
    dns = MemoryDns()
    for i in range(11):
        dns.add("example.com", "MX", (i, f"mx{i}.example.com")).add(
            f"mx{i}.example.com", "A", f"192.0.2.{i + 1}"
        )
    result = await spf("v=spf1 mx -all", "203.0.113.1", dns)
    assert result.result == "permerror"
    assert "11 MX names" in (result.error or "")


async def test_null_mx_never_matches() -> None:
    dns = MemoryDns().add("example.com", "MX", (0, "."))
    assert (await spf("v=spf1 mx ?all", "192.0.2.1", dns)).result == "neutral"


async def test_exists_uses_a_query_and_macros() -> None:
    dns = MemoryDns().add("1.2.0.192.in-addr._spf.example.com", "A", "127.0.0.2")
    record = "v=spf1 exists:%{ir}.%{v}._spf.%{d} -all"
    assert (await spf(record, "192.0.2.1", dns)).result == "pass"
    assert (await spf(record, "192.0.2.9", MemoryDns())).result == "fail"


async def test_ptr_mechanism_needs_forward_confirmation() -> None:
    dns = (
        MemoryDns()
        .add("1.2.0.192.in-addr.arpa", "PTR", "mail.example.com", "spoof.example.com")
        .add("mail.example.com", "A", "192.0.2.1")
        .add("spoof.example.com", "A", "198.51.100.1")
    )
    result = await spf("v=spf1 ptr -all", "192.0.2.1", dns)
    assert (result.result, result.mechanism) == ("pass", "ptr")
    # The reverse name exists but does not lead back to the IP: no match.
    bad = MemoryDns().add("1.2.0.192.in-addr.arpa", "PTR", "spoof.example.com")
    bad.add("spoof.example.com", "A", "198.51.100.1")
    assert (await spf("v=spf1 ptr -all", "192.0.2.1", bad)).result == "fail"


# -- include and redirect (RFC 7208 §5.2, §6.1) ------------------------------------


@pytest.mark.parametrize(
    ("included", "expected"),
    [
        ("v=spf1 ip4:192.0.2.1 -all", "pass"),  # pass matches
        ("v=spf1 -all", "softfail"),  # fail: no match, go on to ~all
        ("v=spf1 ~all", "softfail"),
        ("v=spf1 ?all", "softfail"),
        ("v=spf1 foo", "permerror"),  # errors propagate
        ("no spf here", "permerror"),  # none becomes permerror
    ],
)
async def test_include(included: str, expected: str) -> None:
    dns = MemoryDns().spf("_spf.example.net", included)
    result = await spf("v=spf1 include:_spf.example.net ~all", "192.0.2.1", dns)
    assert result.result == expected
    if expected == "pass":
        assert result.mechanism == "include:_spf.example.net"  # the outer term that matched


async def test_include_of_missing_domain_is_permerror() -> None:
    result = await spf("v=spf1 include:missing.example.net -all", "192.0.2.1")
    assert result.result == "permerror"
    assert "include:missing.example.net" in (result.error or "")


async def test_include_temperror_propagates() -> None:
    dns = MemoryDns().fail("_spf.example.net", "TXT")
    result = await spf("v=spf1 include:_spf.example.net -all", "192.0.2.1", dns)
    assert result.result == "temperror"


async def test_redirect() -> None:
    dns = MemoryDns().spf("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all")
    result = await spf("v=spf1 redirect=_spf.example.net", "192.0.2.5", dns)
    assert (result.result, result.mechanism, result.lookups) == ("pass", "ip4:192.0.2.0/24", 1)
    dns = MemoryDns().spf("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all")
    assert (await spf("v=spf1 redirect=_spf.example.net", "198.51.100.5", dns)).result == "fail"


async def test_redirect_is_ignored_when_the_record_has_all() -> None:
    dns = MemoryDns().spf("_spf.example.net", "v=spf1 +all")
    result = await spf("v=spf1 ?all redirect=_spf.example.net", "192.0.2.5", dns)
    assert result.result == "neutral"
    assert ("_spf.example.net", "TXT") not in dns.queries


async def test_redirect_not_used_when_a_mechanism_matched() -> None:
    dns = MemoryDns().spf("_spf.example.net", "v=spf1 -all")
    result = await spf("v=spf1 ip4:192.0.2.5 redirect=_spf.example.net", "192.0.2.5", dns)
    assert result.result == "pass"


async def test_redirect_to_domain_without_record_is_permerror() -> None:
    result = await spf("v=spf1 redirect=nothing.example.net", "192.0.2.5")
    assert result.result == "permerror"


# -- limits (RFC 7208 §4.6.4) -------------------------------------------------------


def include_chain(n: int) -> MemoryDns:
    """example.com includes l1, l1 includes l2 ... : n include lookups in all."""
    dns = MemoryDns()
    dns.spf("example.com", "v=spf1 include:l1.example.net -all")
    for i in range(1, n):
        dns.spf(f"l{i}.example.net", f"v=spf1 include:l{i + 1}.example.net -all")
    dns.spf(f"l{n}.example.net", "v=spf1 ip4:192.0.2.1 -all")
    return dns


async def test_ten_dns_lookups_are_allowed() -> None:
    result = await check_host("192.0.2.1", "example.com", "a@example.com", include_chain(10))
    assert (result.result, result.lookups) == ("pass", 10)


async def test_eleven_dns_lookups_are_permerror() -> None:
    result = await check_host("192.0.2.1", "example.com", "a@example.com", include_chain(11))
    assert result.result == "permerror"
    assert "more than 10 DNS lookups" in (result.error or "")
    assert result.lookups == 11


async def test_lookup_limit_counts_a_mx_exists_but_not_ip() -> None:
    dns = MemoryDns().add("example.com", "A", "198.51.100.1")
    dns.add("example.com", "MX", (10, "example.com"))
    terms = " ".join(["a", "mx"] * 5 + ["ip4:10.0.0.1"] * 20)
    result = await spf(f"v=spf1 {terms} ip4:192.0.2.1 -all", "192.0.2.1", dns)
    assert (result.result, result.lookups) == ("pass", 10)
    dns.add("example.com", "A", "198.51.100.2")
    result = await spf(f"v=spf1 {terms} a -all", "192.0.2.1", dns)
    assert result.result == "permerror"


async def test_two_void_lookups_are_allowed_three_are_not() -> None:
    two = "v=spf1 a:nx1.example.org exists:nx2.example.org -all"
    assert (await spf(two, "192.0.2.1")).result == "fail"
    three = "v=spf1 a:nx1.example.org exists:nx2.example.org mx:nx3.example.org -all"
    result = await spf(three, "192.0.2.1")
    assert result.result == "permerror"
    assert "void" in (result.error or "")


async def test_nodata_counts_as_void() -> None:
    dns = MemoryDns().add("example.com", "MX", (10, "mx.example.com"))  # A: NODATA
    record = "v=spf1 a a:example.com a/24 -all"
    result = await spf(record, "192.0.2.1", dns)
    assert result.result == "permerror"


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 foo -all",  # unknown mechanism
        "v=spf1 ip4:300.1.1.1 -all",
        "v=spf1 ip4:192.0.2.1/33 -all",
        "v=spf1 ip4:192.0.2.1/024 -all",  # no leading zeros
        "v=spf1 ip4:2001:db8::1 -all",
        "v=spf1 ip6:192.0.2.1 -all",
        "v=spf1 ip6:2001:db8::/129 -all",
        "v=spf1 a/33 -all",
        "v=spf1 mx//129 -all",
        "v=spf1 include -all",
        "v=spf1 include: -all",
        "v=spf1 all:example.com",
        "v=spf1 a:example -all",  # domain-end needs "." toplabel
        "v=spf1 a:example.123 -all",  # a numeric top label
        "v=spf1 a:foo..example.com -all",  # empty label
        "v=spf1 exists:%{x}.example.com -all",  # unknown macro letter
        "v=spf1 exists:%{d0}.example.com -all",  # transformer 0
        "v=spf1 exists:%{c}.example.com -all",  # c only in exp=
        "v=spf1 a:%{d -all",
        "v=spf1 redirect=a.example.net redirect=b.example.net",
        "v=spf1 exp=a.example.net exp=b.example.net -all",
        "v=spf1 -all a:exa%mple.com",  # an error after a matching term still counts
    ],
)
async def test_syntax_errors_are_permerror(record: str) -> None:
    result = await spf(record, "192.0.2.1")
    assert result.result == "permerror", record
    assert result.error


async def test_unknown_modifiers_are_ignored() -> None:
    result = await spf("v=spf1 foo=bar moo=%{d}.cow ip4:192.0.2.1 -all", "192.0.2.1")
    assert result.result == "pass"


async def test_txt_temporary_error_is_temperror() -> None:
    dns = MemoryDns().fail("example.com", "TXT")
    result = await check_host("192.0.2.1", "example.com", "a@example.com", dns)
    assert result.result == "temperror"
    assert "SERVFAIL" in (result.error or "")


async def test_mechanism_temporary_error_is_temperror() -> None:
    dns = MemoryDns().fail("mail.example.org", "A")
    result = await spf("v=spf1 a:mail.example.org -all", "192.0.2.1", dns)
    assert result.result == "temperror"


# -- exp= (RFC 7208 §6.2) ------------------------------------------------------------


async def test_exp_explains_a_fail() -> None:
    dns = MemoryDns().add("why.example.com", "TXT", "%{i} may not send for %{d} (%{s})")
    result = await spf("v=spf1 ip4:192.0.2.1 -all exp=why.%{d}", "198.51.100.3", dns)
    assert result.result == "fail"
    assert result.explanation == "198.51.100.3 may not send for example.com (alice@example.com)"


async def test_exp_is_ignored_when_missing_and_not_used_for_pass() -> None:
    result = await spf("v=spf1 ip4:192.0.2.1 -all exp=missing.example.com", "198.51.100.3")
    assert (result.result, result.explanation) == ("fail", None)
    dns = MemoryDns().add("why.example.com", "TXT", "no")
    result = await spf("v=spf1 ip4:192.0.2.1 -all exp=why.example.com", "192.0.2.1", dns)
    assert (result.result, result.explanation) == ("pass", None)


# -- macros (RFC 7208 §7.4 examples) -------------------------------------------------

RFC_CTX_V4 = MacroContext(
    sender="strong-bad@email.example.com",
    local="strong-bad",
    sender_domain="email.example.com",
    domain="email.example.com",
    ip=ipaddress.ip_address("192.0.2.3"),
    helo="mx.example.org",
    validated="mx.example.org",
    receiver="relay.example.net",
    now=1700000000.9,
)


@pytest.mark.parametrize(
    ("macro", "expansion"),
    [
        ("%{s}", "strong-bad@email.example.com"),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
        ("%{h}", "mx.example.org"),
        ("%{p}", "mx.example.org"),
        ("%%%_%-", "% %20"),
    ],
)
def test_rfc_7208_macro_examples(macro: str, expansion: str) -> None:
    assert expand_macros(macro, RFC_CTX_V4) == expansion


def test_ipv6_macro_example() -> None:
    ctx = MacroContext(**{**RFC_CTX_V4.__dict__, "ip": ipaddress.ip_address("2001:db8::cb01")})
    assert expand_macros("%{ir}.%{v}._spf.%{d2}", ctx) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )
    assert expand_macros("%{c}", ctx, explanation=True) == "2001:db8::cb01"


def test_uppercase_macros_are_url_escaped() -> None:
    ctx = MacroContext(**{**RFC_CTX_V4.__dict__, "local": "a/b c", "sender": "a/b c@x.example"})
    assert expand_macros("%{L}", ctx) == "a%2Fb%20c"
    assert expand_macros("%{l}", ctx) == "a/b c"


def test_explanation_only_macros() -> None:
    assert expand_macros("%{c} %{r} %{t}", RFC_CTX_V4, explanation=True) == (
        "192.0.2.3 relay.example.net 1700000000"
    )
    for letter in "crt":
        with pytest.raises(SpfSyntaxError):
            expand_macros(f"%{{{letter}}}", RFC_CTX_V4)


@pytest.mark.parametrize("bad", ["%{x}", "%{d0}", "%{d", "%z", "a b"])
def test_macro_syntax_errors(bad: str) -> None:
    with pytest.raises(SpfSyntaxError):
        expand_macros(bad, RFC_CTX_V4)


async def test_sender_without_local_part_is_postmaster() -> None:
    dns = MemoryDns().add("postmaster.lp.example.com", "A", "127.0.0.2")
    result = await spf("v=spf1 exists:%{l}.lp.%{d} -all", "192.0.2.1", dns, sender="example.com")
    assert result.result == "pass"


async def test_p_macro_uses_the_validated_name() -> None:
    dns = (
        MemoryDns()
        .add("1.2.0.192.in-addr.arpa", "PTR", "mail.example.com")
        .add("mail.example.com", "A", "192.0.2.1")
        .add("mail.example.com.ok.example.com", "A", "127.0.0.2")
    )
    result = await spf("v=spf1 exists:%{p}.ok.%{d} -all", "192.0.2.1", dns)
    assert result.result == "pass"


def test_parse_record_keeps_terms() -> None:
    record = parse_record("v=spf1  a:mail.example.com/24//64 -ip6:2001:db8::/48 ~all exp=x.%{d}")
    assert [(m.qualifier, m.name) for m in record.mechanisms] == [
        ("+", "a"),
        ("-", "ip6"),
        ("~", "all"),
    ]
    a = record.mechanisms[0]
    assert (a.domain_spec, a.cidr4, a.cidr6) == ("mail.example.com", 24, 64)
    assert str(record.mechanisms[1].network) == "2001:db8::/48"
    assert (record.exp, record.redirect) == ("x.%{d}", None)


# -- DnsLookup against the real test DNS server ------------------------------------


async def test_dns_lookup_against_the_test_server(dns_server: DnsServer) -> None:
    long_spf = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(1, 40)) + " -all"
    dns_server.add_txt("example.test", long_spf)  # more than 255 octets: several strings
    dns_server.add_a("example.test", "192.0.2.50")
    dns_server.add_mx("example.test", [(10, "mx.example.test")])
    dns_server.add_aaaa("mx.example.test", "2001:db8::25")
    dns_server.add_ptr("192.0.2.50", "example.test")
    dns_server.servfail("broken.example.test")
    lookup = DnsLookup([dns_server.address], timeout=2.0)
    assert await lookup.txt("example.test") == [long_spf]  # RFC 7208 §3.3: joined
    assert await lookup.a("example.test") == ["192.0.2.50"]
    assert await lookup.mx("example.test") == [(10, "mx.example.test")]
    assert await lookup.aaaa("mx.example.test") == ["2001:db8::25"]
    assert await lookup.ptr("192.0.2.50") == ["example.test"]
    assert await lookup.aaaa("example.test") == []  # NODATA
    with pytest.raises(DnsNotFound):
        await lookup.a("nowhere.example.test")
    with pytest.raises(DnsTempError):
        await lookup.txt("broken.example.test")


async def test_check_host_over_real_dns(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 include:_spf.example.test mx -all")
    dns_server.add_txt("_spf.example.test", "v=spf1 ip4:198.51.100.0/24 ~all")
    dns_server.add_mx("example.test", [(10, "mx.example.test")])
    dns_server.add_a("mx.example.test", "192.0.2.25")
    lookup = DnsLookup([dns_server.address], timeout=2.0)
    ok = await check_host("198.51.100.9", "example.test", "a@example.test", lookup)
    assert (ok.result, ok.mechanism, ok.lookups) == ("pass", "include:_spf.example.test", 1)
    via_mx = await check_host("192.0.2.25", "example.test", "a@example.test", lookup)
    assert (via_mx.result, via_mx.mechanism, via_mx.lookups) == ("pass", "mx", 2)
    bad = await check_host("203.0.113.1", "example.test", "a@example.test", lookup)
    assert (bad.result, bad.mechanism) == ("fail", "-all")
    dns_server.servfail("_spf.example.test")
    temp = await check_host(
        "203.0.113.1",
        "example.test",
        "a@example.test",
        DnsLookup([dns_server.address], timeout=2.0),
    )
    assert temp.result == "temperror"
