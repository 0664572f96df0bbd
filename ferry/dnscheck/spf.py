"""SPF: RFC 7208 ``check_host()`` over an injected DNS lookup.

The evaluator is pure logic over a small :class:`Lookup` protocol (async ``txt``,
``a``, ``aaaa``, ``mx``, ``ptr``), so unit tests drive it with an in-memory table
and ``ferry dns check`` drives it with :class:`DnsLookup` (dnspython, the
configured nameservers). A lookup returns a list (empty: the name exists but has
no such record, "NODATA") or raises :class:`DnsNotFound` (NXDOMAIN) or
:class:`DnsTempError` (SERVFAIL, timeout, ...): RFC 7208 treats the two failures
differently (§4.4, §5).

What is implemented: record selection (§4.5), the whole-record syntax check before
evaluation (§4.6), the mechanisms ``all include a mx ptr ip4 ip6 exists`` with
dual CIDR lengths (§5), qualifiers (§4.6.2), ``redirect=`` and ``exp=`` (§6), the
ten-DNS-mechanism limit, the two-void-lookup limit and the ten-names limit of
``mx`` and ``ptr`` (§4.6.4), and every macro letter and transformer (§7).

Choices where the RFC leaves room, all documented here:

* ``ptr`` (§5.5) and ``%{p}`` (§7.3) are evaluated, although the RFC says they
  SHOULD NOT be published; an error during the reverse lookup just means "no
  match" / ``unknown``, as §5.5 says.
* Void lookups (§4.6.4) are counted for the primary query of ``a``, ``mx``,
  ``ptr`` and ``exists`` (not for the address lookups of each MX host, which
  would punish every dual-stack domain whose MX has no AAAA).
* A target name that is malformed after macro expansion (an empty label, a label
  over 63 octets) is a ``permerror``, as for ``include``/``redirect`` of a
  malformed domain (§4.3 gives "none", which §5.2 and §6.1 turn into permerror).
* ``%{h}`` (HELO) defaults to the sender's domain, ``%{r}`` to ``unknown``.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

from ferry.envelope import split_address
from ferry.resolver import parse_nameserver

__all__ = [
    "MAX_DNS_LOOKUPS",
    "MAX_VOID_LOOKUPS",
    "DnsLookup",
    "DnsNotFound",
    "DnsTempError",
    "Lookup",
    "MacroContext",
    "Mechanism",
    "SpfRecord",
    "SpfResult",
    "SpfSyntaxError",
    "check_host",
    "expand_macros",
    "is_spf_record",
    "parse_record",
    "spf_records",
]

T = TypeVar("T")
SpfResultCode = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]

#: RFC 7208 §4.6.4: at most 10 terms that cause DNS queries per check_host().
MAX_DNS_LOOKUPS = 10
#: RFC 7208 §4.6.4: at most 2 lookups that return no answer (NODATA or NXDOMAIN).
MAX_VOID_LOOKUPS = 2
#: RFC 7208 §4.6.4: an "mx" or "ptr" term looks at no more than 10 names.
MAX_NAMES_PER_TERM = 10

#: RFC 7208 §4.6.2: qualifier to result.
QUALIFIERS: dict[str, SpfResultCode] = {
    "+": "pass",
    "-": "fail",
    "~": "softfail",
    "?": "neutral",
}
MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})


# -- the DNS interface ---------------------------------------------------------------


class DnsNotFound(Exception):
    """The name does not exist (NXDOMAIN, RCODE 3)."""


class DnsTempError(Exception):
    """The lookup failed for now: SERVFAIL, timeout, refused, no nameserver answered."""


class Lookup(Protocol):
    """The DNS queries check_host() needs. Empty list: NODATA; exceptions as above."""

    async def txt(self, name: str) -> list[str]:
        """TXT records of ``name``, each one's strings concatenated (RFC 7208 §3.3)."""
        ...

    async def a(self, name: str) -> list[str]:
        """IPv4 addresses of ``name``."""
        ...

    async def aaaa(self, name: str) -> list[str]:
        """IPv6 addresses of ``name``."""
        ...

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """MX records of ``name`` as ``(preference, exchange)``, exchange without final dot."""
        ...

    async def ptr(self, ip: str) -> list[str]:
        """Names the reverse record of ``ip`` points at, without final dot."""
        ...


class DnsLookup:
    """:class:`Lookup` over dnspython, asking ``nameservers`` (``"ip"`` / ``"ip:port"``;
    empty: the system's resolvers). Answers are remembered for the object's lifetime,
    which is one check: the same name is never asked twice."""

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 5.0) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)  # per try: a lost UDP packet is retried
        self._memo: dict[tuple[str, str], list[object] | Exception] = {}

    async def _query(self, qname: dns.name.Name, rdtype: str) -> list[object]:
        key = (qname.to_text().lower(), rdtype)
        if key not in self._memo:
            self._memo[key] = await self._fetch(qname, rdtype)
        found = self._memo[key]
        if isinstance(found, Exception):
            raise found
        return found

    async def _fetch(self, qname: dns.name.Name, rdtype: str) -> list[object] | Exception:
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return DnsNotFound(f"{qname} does not exist")
        except dns.resolver.NoNameservers:
            return DnsTempError(f"{rdtype} {qname}: no nameserver answered (SERVFAIL or refused)")
        except dns.exception.Timeout:
            return DnsTempError(f"{rdtype} {qname}: timed out")
        except dns.exception.DNSException as exc:
            return DnsTempError(f"{rdtype} {qname}: {type(exc).__name__}: {exc}")
        return list(answer.rrset) if answer.rrset is not None else []

    @staticmethod
    def _name(name: str) -> dns.name.Name:
        try:
            return dns.name.from_text(name.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise DnsNotFound(f"{name!r} is not a valid domain name") from None

    async def txt(self, name: str) -> list[str]:
        """TXT records of ``name``, each one's strings joined without spaces (RFC 7208 §3.3)."""
        rdatas = await self._query(self._name(name), "TXT")
        return [b"".join(rd.strings).decode("utf-8", "replace") for rd in rdatas]  # type: ignore[attr-defined]

    async def a(self, name: str) -> list[str]:
        """IPv4 addresses of ``name``."""
        return [rd.address for rd in await self._query(self._name(name), "A")]  # type: ignore[attr-defined]

    async def aaaa(self, name: str) -> list[str]:
        """IPv6 addresses of ``name``."""
        return [rd.address for rd in await self._query(self._name(name), "AAAA")]  # type: ignore[attr-defined]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """``(preference, exchange)`` of ``name``; a null MX exchange is ``"."``."""
        rdatas = await self._query(self._name(name), "MX")
        return [
            (rd.preference, rd.exchange.to_text(omit_final_dot=True).lower())  # type: ignore[attr-defined]
            for rd in rdatas
        ]

    async def ptr(self, ip: str) -> list[str]:
        """Names ``ip``'s reverse record points at."""
        qname = dns.reversename.from_address(str(ipaddress.ip_address(ip)))
        rdatas = await self._query(qname, "PTR")
        return [rd.target.to_text(omit_final_dot=True).lower() for rd in rdatas]  # type: ignore[attr-defined]


# -- records: selection and syntax ---------------------------------------------------


class SpfSyntaxError(ValueError):
    """The record (or a macro string) does not follow RFC 7208's grammar: permerror."""


@dataclass(frozen=True)
class Mechanism:
    """One directive: ``[qualifier] name [":" domain-spec | ":" network] [cidr]``."""

    qualifier: str  # "+", "-", "~" or "?"
    name: str  # one of MECHANISMS, lower case
    text: str  # as written in the record
    domain_spec: str | None = None  # include a mx ptr exists
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # ip4 ip6
    cidr4: int = 32  # a mx: RFC 7208 §5.6 ip4-cidr-length, default /32
    cidr6: int = 128  # a mx: ip6-cidr-length, default /128


@dataclass(frozen=True)
class SpfRecord:
    """A parsed ``v=spf1`` record."""

    text: str
    mechanisms: tuple[Mechanism, ...]
    redirect: str | None = None
    exp: str | None = None
    modifiers: tuple[tuple[str, str], ...] = ()  # unknown ones, kept but ignored (§6)


_VERSION = re.compile(r"v=spf1(?: |$)", re.IGNORECASE)
_NAME = r"[A-Za-z][A-Za-z0-9\-_.]*"
_MODIFIER = re.compile(rf"({_NAME})=(.*)", re.DOTALL)
_DIRECTIVE = re.compile(rf"([+\-~?]?)({_NAME})(.*)", re.DOTALL)
# RFC 7208 §5.6: ip4-cidr-length / ip6-cidr-length, no leading zeros.
_DUAL_CIDR = re.compile(r"(?P<spec>.*?)(?:/(?P<c4>0|[1-9]\d*))?(?://(?P<c6>0|[1-9]\d*))?")
_NETWORK = re.compile(r":(?P<addr>[^/]+)(?:/(?P<len>0|[1-9]\d*))?")
# RFC 7208 §7.1: toplabel = ( *alphanum ALPHA *alphanum ) /
#                           ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_TOPLABEL = r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])"
_DOMAIN_END = re.compile(rf".*\.{_TOPLABEL}\.?", re.DOTALL)


def is_spf_record(text: str) -> bool:
    """RFC 7208 §4.5: ``v=spf1`` (any case) followed by a space or the end."""
    return _VERSION.match(text) is not None


def spf_records(txts: Sequence[str]) -> list[str]:
    """The SPF records among a name's TXT records (§4.5); more than one is a permerror."""
    return [t for t in txts if is_spf_record(t)]


def parse_record(text: str) -> SpfRecord:
    """Parse a whole record; any syntax error anywhere is :class:`SpfSyntaxError`
    (RFC 7208 §4.6: permerror without evaluating any term)."""
    if not is_spf_record(text):
        raise SpfSyntaxError("not an SPF record (no v=spf1)")
    mechanisms: list[Mechanism] = []
    redirect = exp = None
    others: list[tuple[str, str]] = []
    # RFC 7208 §4.6.1: terms are separated by one or more spaces.
    for term in text[len("v=spf1") :].split(" "):
        if not term:
            continue
        if any(not 0x21 <= ord(c) <= 0x7E for c in term):
            raise SpfSyntaxError(f"{term!r}: character outside printable US-ASCII")
        modifier = _MODIFIER.fullmatch(term)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                # RFC 7208 §6: these two modifiers MUST NOT appear more than once.
                if (redirect if name == "redirect" else exp) is not None:
                    raise SpfSyntaxError(f"{name}= appears more than once")
                check_domain_spec(value)
                if name == "redirect":
                    redirect = value
                else:
                    exp = value
            else:
                _tokenize(value)  # unknown-modifier = name "=" macro-string
                others.append((name, value))
            continue
        mechanisms.append(_parse_directive(term))
    return SpfRecord(text, tuple(mechanisms), redirect, exp, tuple(others))


def _parse_directive(term: str) -> Mechanism:
    match = _DIRECTIVE.fullmatch(term)
    if match is None:
        raise SpfSyntaxError(f"{term!r} is not a mechanism or modifier")
    qualifier, name, rest = match.group(1) or "+", match.group(2).lower(), match.group(3)
    if name not in MECHANISMS:
        raise SpfSyntaxError(f"unknown mechanism {match.group(2)!r}")
    if name == "all":
        if rest:
            raise SpfSyntaxError(f"{term!r}: 'all' takes no argument")
        return Mechanism(qualifier, name, term)
    if name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise SpfSyntaxError(f"{term!r}: {name} needs ':domain'")
        return Mechanism(qualifier, name, term, domain_spec=check_domain_spec(rest[1:]))
    if name in ("ip4", "ip6"):
        net = _NETWORK.fullmatch(rest)
        if net is None:
            raise SpfSyntaxError(f"{term!r}: {name} needs ':address[/length]'")
        version = 4 if name == "ip4" else 6
        try:
            address = ipaddress.ip_address(net.group("addr"))
        except ValueError:
            raise SpfSyntaxError(f"{term!r}: not an IPv{version} address") from None
        maxlen = 32 if version == 4 else 128
        length = int(net.group("len")) if net.group("len") is not None else maxlen
        if address.version != version or length > maxlen:
            raise SpfSyntaxError(f"{term!r}: not an IPv{version} address or prefix")
        network = ipaddress.ip_network(f"{address}/{length}", strict=False)
        return Mechanism(qualifier, name, term, network=network)
    # a, mx, ptr: [":" domain-spec] and, for a / mx, [dual-cidr-length]
    cidr = _DUAL_CIDR.fullmatch(rest)
    assert cidr is not None  # the pattern matches every string
    spec, c4, c6 = cidr.group("spec"), cidr.group("c4"), cidr.group("c6")
    if name == "ptr" and (c4 or c6):
        spec, c4, c6 = rest, None, None  # ptr has no CIDR: the spec check below decides
    if spec and (not spec.startswith(":") or len(spec) < 2):
        raise SpfSyntaxError(f"{term!r}: bad argument {rest!r}")
    cidr4 = int(c4) if c4 is not None else 32
    cidr6 = int(c6) if c6 is not None else 128
    if cidr4 > 32 or cidr6 > 128:
        raise SpfSyntaxError(f"{term!r}: CIDR length out of range")
    domain_spec = check_domain_spec(spec[1:]) if spec else None
    return Mechanism(qualifier, name, term, domain_spec=domain_spec, cidr4=cidr4, cidr6=cidr6)


# -- macros (RFC 7208 §7) ----------------------------------------------------------

_MACRO = re.compile(
    r"%(?:\{(?P<letter>[A-Za-z])(?P<digits>\d*)(?P<rev>[rR]?)(?P<delims>[.\-+,/_=]*)\}"
    r"|(?P<esc>[%_-]))"
)
_LETTERS = frozenset("slodiphv")
_EXP_LETTERS = frozenset("crt")  # only in explanation strings (§7.2)


@dataclass(frozen=True)
class _Macro:
    letter: str  # as written: upper case means URL-escape (§7.3)
    digits: int | None
    reverse: bool
    delimiters: str


@dataclass(frozen=True)
class _Escape:
    text: str  # "%%" -> "%", "%_" -> " ", "%-" -> "%20"


def _tokenize(text: str, *, spaces: bool = False) -> list[str | _Macro | _Escape]:
    """A macro-string into literals, macros and escapes; raises :class:`SpfSyntaxError`.

    ``spaces``: allow SP between them, as an explain-string does (RFC 7208 §7.1).
    """
    tokens: list[str | _Macro | _Escape] = []
    low = 0x20 if spaces else 0x21
    i = 0
    while i < len(text):
        if text[i] != "%":
            j = text.find("%", i)
            j = len(text) if j < 0 else j
            literal = text[i:j]
            if any(not low <= ord(c) <= 0x7E for c in literal):  # macro-literal, §7.1
                raise SpfSyntaxError(f"{text!r}: character outside printable US-ASCII")
            tokens.append(literal)
            i = j
            continue
        match = _MACRO.match(text, i)
        if match is None:
            raise SpfSyntaxError(f"{text!r}: bad macro at {text[i:]!r}")
        if match.group("esc"):
            tokens.append(_Escape({"%": "%", "_": " ", "-": "%20"}[match.group("esc")]))
        else:
            letter, digits = match.group("letter"), match.group("digits")
            if letter.lower() not in _LETTERS | _EXP_LETTERS:
                raise SpfSyntaxError(f"{text!r}: unknown macro letter {letter!r}")
            if digits and int(digits) == 0:
                # RFC 7208 §7.3: "If a DIGIT is specified, the value MUST be at least one."
                raise SpfSyntaxError(f"{text!r}: macro transformer 0")
            tokens.append(
                _Macro(
                    letter,
                    int(digits) if digits else None,
                    bool(match.group("rev")),
                    match.group("delims") or ".",
                )
            )
        i = match.end()
    return tokens


def check_domain_spec(spec: str) -> str:
    """RFC 7208 §7.1: ``domain-spec = macro-string domain-end`` where ``domain-end``
    is ``"." toplabel ["."]`` or a macro-expand. Returns ``spec``; raises on bad syntax."""
    tokens = _tokenize(spec)
    if not tokens:
        raise SpfSyntaxError("empty domain")
    last = tokens[-1]
    if isinstance(last, str):
        if not _DOMAIN_END.fullmatch(last):
            raise SpfSyntaxError(f"{spec!r} does not end in a valid top-level label")
        if len(tokens) == 1:
            _check_name(spec)  # no macro: the name is known now
    return spec


def _check_name(name: str) -> str:
    """A name to query: labels 1-63 octets; over 253 octets, left labels are dropped
    (RFC 7208 §7.3). Raises :class:`SpfSyntaxError` for an empty or long label."""
    name = name[:-1] if name.endswith(".") else name
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    labels = name.split(".")
    if not name or any(not 0 < len(label) <= 63 for label in labels):
        raise SpfSyntaxError(f"{name!r} is not a valid domain name")
    return name


@dataclass(frozen=True)
class MacroContext:
    """What the macro letters expand to (RFC 7208 §7.3)."""

    sender: str  # s
    local: str  # l
    sender_domain: str  # o
    domain: str  # d: the domain being evaluated (changes with include / redirect)
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # i, c, v
    helo: str  # h
    validated: str = "unknown"  # p: see _validated_name(); only looked up when used
    receiver: str = "unknown"  # r
    now: float = field(default_factory=time.time)  # t


def _value(letter: str, ctx: MacroContext) -> str:
    if letter == "s":
        return ctx.sender
    if letter == "l":
        return ctx.local
    if letter == "o":
        return ctx.sender_domain
    if letter == "d":
        return ctx.domain
    if letter == "i":
        if ctx.ip.version == 4:
            return str(ctx.ip)
        return ".".join(ctx.ip.exploded.replace(":", ""))  # §7.3: dot-format nibbles
    if letter == "p":
        return ctx.validated
    if letter == "v":
        return "in-addr" if ctx.ip.version == 4 else "ip6"
    if letter == "h":
        return ctx.helo
    if letter == "c":
        return str(ctx.ip)
    if letter == "r":
        return ctx.receiver
    return str(int(ctx.now))  # t


def expand_macros(text: str, ctx: MacroContext, *, explanation: bool = False) -> str:
    """Expand a macro-string (RFC 7208 §7.3); ``c``, ``r``, ``t`` only if ``explanation``.

    Transformers: split on the delimiters (default "."), reverse if ``r``, keep the
    rightmost N parts, join with "."; an upper-case letter URL-escapes the value.
    """
    out: list[str] = []
    for token in _tokenize(text, spaces=explanation):
        if isinstance(token, str):
            out.append(token)
            continue
        if isinstance(token, _Escape):
            out.append(token.text)
            continue
        letter = token.letter.lower()
        if letter in _EXP_LETTERS and not explanation:
            raise SpfSyntaxError(f"%{{{token.letter}}} is only allowed in exp= text")
        parts = re.split("[" + re.escape(token.delimiters) + "]", _value(letter, ctx))
        if token.reverse:
            parts.reverse()
        if token.digits is not None:
            parts = parts[-token.digits :]
        value = ".".join(parts)
        if token.letter.isupper():
            value = urllib.parse.quote(value, safe="")  # RFC 3986 unreserved kept
        out.append(value)
    return "".join(out)


def _uses_p(text: str) -> bool:
    return any(isinstance(t, _Macro) and t.letter.lower() == "p" for t in _tokenize(text))


# -- evaluation ------------------------------------------------------------------------


@dataclass(frozen=True)
class SpfResult:
    """The outcome of check_host().

    ``mechanism``: the term that matched as written (``"ip4:192.0.2.0/24"``,
    ``"-all"``), or None when none did (the default "neutral", or an error).
    ``explanation``: the expanded ``exp=`` text for a "fail", when published.
    ``lookups``: DNS-querying terms evaluated (the §4.6.4 limit is 10).
    ``error``: why the result is permerror / temperror / none.
    """

    result: SpfResultCode
    mechanism: str | None = None
    explanation: str | None = None
    lookups: int = 0
    error: str | None = None


class _Abort(Exception):
    """permerror / temperror: ends the whole evaluation, through include and redirect."""

    def __init__(self, result: SpfResultCode, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass
class _State:
    lookup: Lookup
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    local: str
    sender_domain: str
    helo: str
    receiver: str
    lookups: int = 0
    voids: int = 0
    validated: dict[str, list[str]] = field(default_factory=dict)

    def count(self, term: str) -> None:
        # RFC 7208 §4.6.4: include, a, mx, ptr, exists and redirect count.
        self.lookups += 1
        if self.lookups > MAX_DNS_LOOKUPS:
            raise _Abort(
                "permerror",
                f"more than {MAX_DNS_LOOKUPS} DNS lookups (RFC 7208 §4.6.4), at {term!r}",
            )

    def void(self, term: str) -> None:
        # RFC 7208 §4.6.4: lookups answering NODATA or NXDOMAIN, limit 2.
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _Abort(
                "permerror",
                f"more than {MAX_VOID_LOOKUPS} void DNS lookups (RFC 7208 §4.6.4), at {term!r}",
            )

    def context(self, domain: str, validated: str = "unknown") -> MacroContext:
        return MacroContext(
            sender=self.sender,
            local=self.local,
            sender_domain=self.sender_domain,
            domain=domain,
            ip=self.ip,
            helo=self.helo,
            validated=validated,
            receiver=self.receiver,
        )


async def check_host(
    ip: str,
    domain: str,
    sender: str,
    lookup: Lookup,
    *,
    helo: str | None = None,
    receiver: str = "unknown",
) -> SpfResult:
    """RFC 7208 §4: is ``ip`` allowed to send mail from ``domain`` for ``sender``?

    ``sender`` is the MAIL FROM address (no local part: "postmaster" is used, §4.3).
    Raises ValueError only for an ``ip`` that is not an IP address.
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # RFC 7208 §5: an IPv4-mapped address is IPv4
    local, sender_domain = split_address(sender) if "@" in sender else ("", sender)
    sender_domain = sender_domain or domain
    local = local or "postmaster"  # RFC 7208 §4.3
    state = _State(
        lookup=lookup,
        ip=address,
        sender=f"{local}@{sender_domain}",
        local=local,
        sender_domain=sender_domain,
        helo=helo or sender_domain,
        receiver=receiver,
    )
    try:
        result = await _check(state, domain)
    except _Abort as abort:
        return SpfResult(abort.result, lookups=state.lookups, error=abort.reason)
    return SpfResult(
        result.result,
        result.mechanism,
        result.explanation,
        lookups=state.lookups,
        error=result.error,
    )


def _valid_domain(domain: str) -> str | None:
    """RFC 7208 §4.3: a multi-label name with labels of 1-63 octets, else None."""
    try:
        name = _check_name(domain.strip().lower())
    except SpfSyntaxError:
        return None
    return name if "." in name else None


async def _check(state: _State, domain: str) -> SpfResult:
    """One level of check_host(): none / pass / fail / softfail / neutral; errors raise."""
    name = _valid_domain(domain)
    if name is None:
        return SpfResult("none", error=f"{domain!r} is not a valid domain (RFC 7208 §4.3)")
    try:
        txts = await state.lookup.txt(name)
    except DnsNotFound:
        return SpfResult("none", error=f"{name} does not exist")
    except DnsTempError as exc:
        raise _Abort("temperror", f"TXT lookup for {name} failed: {exc}") from None
    records = spf_records(txts)
    if not records:
        return SpfResult("none", error=f"{name} has no SPF record")
    if len(records) > 1:  # RFC 7208 §4.5
        raise _Abort("permerror", f"{name} has {len(records)} SPF records (RFC 7208 §4.5)")
    try:
        record = parse_record(records[0])
    except SpfSyntaxError as exc:
        raise _Abort("permerror", f"{name}: {exc}") from None
    for mechanism in record.mechanisms:
        if await _matches(state, mechanism, name):
            code = QUALIFIERS[mechanism.qualifier]
            explanation = None
            if code == "fail" and record.exp is not None:
                explanation = await _explain(state, record.exp, name)
            return SpfResult(code, mechanism.text, explanation)
    # RFC 7208 §6.1: redirect applies when nothing matched, and not at all if the
    # record has an "all" mechanism anywhere.
    if record.redirect is not None and not any(m.name == "all" for m in record.mechanisms):
        state.count(f"redirect={record.redirect}")
        target = await _target(state, record.redirect, name)
        redirected = await _check(state, target)
        if redirected.result == "none":
            raise _Abort(
                "permerror", f"redirect={target}: no SPF record there ({redirected.error})"
            )
        return redirected
    return SpfResult("neutral")  # RFC 7208 §4.7: nothing matched


async def _target(state: _State, spec: str, domain: str) -> str:
    """Expand a domain-spec to the name to query (permerror if malformed)."""
    try:
        validated = "unknown"
        if _uses_p(spec):
            validated = await _p_value(state, domain)
        return _check_name(expand_macros(spec, state.context(domain, validated)))
    except SpfSyntaxError as exc:
        raise _Abort("permerror", str(exc)) from None


async def _matches(state: _State, mech: Mechanism, domain: str) -> bool:
    """Does ``mech`` match? RFC 7208 §5."""
    ip = state.ip
    if mech.name == "all":  # §5.1
        return True
    if mech.name in ("ip4", "ip6"):  # §5.6: a v4 network never matches a v6 client
        assert mech.network is not None
        return ip.version == mech.network.version and ip in mech.network
    state.count(mech.text)
    if mech.domain_spec is None:  # a, mx, ptr default to the current domain
        target = domain
    else:
        target = await _target(state, mech.domain_spec, domain)
    if mech.name == "include":  # §5.2
        result = await _check(state, target)
        if result.result == "none":
            raise _Abort("permerror", f"include:{target}: no SPF record there ({result.error})")
        return result.result == "pass"
    if mech.name == "exists":  # §5.7: always an A query, whatever the client's family
        addresses = await _guard(state, mech.text, state.lookup.a(target), void=True)
        return bool(addresses)
    if mech.name == "a":  # §5.3
        addresses = await _addresses(state, mech.text, target, void=True)
        return _in_any(ip, addresses, mech)
    if mech.name == "mx":  # §5.4
        records = await _guard(state, mech.text, state.lookup.mx(target), void=True)
        hosts = [host for _, host in records if host not in ("", ".")]
        if len(hosts) > MAX_NAMES_PER_TERM:
            raise _Abort(
                "permerror",
                f"{mech.text}: {len(hosts)} MX names, more than {MAX_NAMES_PER_TERM} "
                "(RFC 7208 §4.6.4)",
            )
        for host in hosts:
            if _in_any(ip, await _addresses(state, mech.text, host, void=False), mech):
                return True
        return False
    # ptr, §5.5 (deprecated: "SHOULD NOT be used", but still defined)
    names = await _validated_names(state, mech.text)
    return any(n == target or n.endswith("." + target) for n in names)


def _in_any(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, addresses: list[str], mech: Mechanism
) -> bool:
    length = mech.cidr4 if ip.version == 4 else mech.cidr6
    for address in addresses:
        try:
            network = ipaddress.ip_network(f"{address}/{length}", strict=False)
        except ValueError:
            continue
        if network.version == ip.version and ip in network:
            return True
    return False


async def _guard(state: _State, term: str, query: Awaitable[list[T]], *, void: bool) -> list[T]:
    """Await one lookup: NXDOMAIN is an empty answer, a temporary failure a temperror.
    ``void``: count an empty answer against the void-lookup limit."""
    try:
        found = await query
    except DnsNotFound:
        found = []
    except DnsTempError as exc:
        raise _Abort("temperror", f"{term}: {exc}") from None
    if not found and void:
        state.void(term)
    return found


async def _addresses(state: _State, term: str, name: str, *, void: bool) -> list[str]:
    """A or AAAA of ``name``, matching the client's address family (§5.3)."""
    query = state.lookup.a(name) if state.ip.version == 4 else state.lookup.aaaa(name)
    return await _guard(state, term, query, void=void)


async def _validated_names(state: _State, term: str) -> list[str]:
    """RFC 7208 §5.5: PTR names of the client whose A/AAAA lead back to it.

    DNS errors make a name (or the whole lookup) not count; never a temperror.
    """
    key = str(state.ip)
    if key in state.validated:
        return state.validated[key]
    try:
        names = await state.lookup.ptr(key)
    except (DnsNotFound, DnsTempError):
        names = []
    if not names and term:
        state.void(term)
    validated = []
    for name in names[:MAX_NAMES_PER_TERM]:  # §4.6.4: at most 10 PTR names
        try:
            query = state.lookup.a(name) if state.ip.version == 4 else state.lookup.aaaa(name)
            addresses = await query
        except (DnsNotFound, DnsTempError):
            continue
        if any(_same_ip(a, state.ip) for a in addresses):
            validated.append(name.lower().rstrip("."))
    state.validated[key] = validated
    return validated


def _same_ip(text: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


async def _p_value(state: _State, domain: str) -> str:
    """RFC 7208 §7.3 ``%{p}``: the validated name equal to, else under, ``domain``,
    else any validated name, else ``unknown``."""
    names = await _validated_names(state, "")
    for candidate in (
        [n for n in names if n == domain],
        [n for n in names if n.endswith("." + domain)],
        names,
    ):
        if candidate:
            return candidate[0]
    return "unknown"


async def _explain(state: _State, spec: str, domain: str) -> str | None:
    """RFC 7208 §6.2: the ``exp=`` text; any problem means no explanation.
    Its lookup is not counted against the limit (§4.6.4)."""
    try:
        target = await _target(state, spec, domain)
        txts = await state.lookup.txt(target)
    except (_Abort, DnsNotFound, DnsTempError):
        return None
    if len(txts) != 1:
        return None
    try:
        uses_p = any(
            isinstance(t, _Macro) and t.letter.lower() == "p"
            for t in _tokenize(txts[0], spaces=True)
        )
        validated = await _p_value(state, domain) if uses_p else "unknown"
        return expand_macros(txts[0], state.context(domain, validated), explanation=True)
    except SpfSyntaxError:
        return None
