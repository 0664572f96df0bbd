"""``ferry dns check``: the SMTPy seed's "DNS Verification" section as checks.

:func:`check_domain` asks the configured resolver about one sending domain and
returns one :class:`Check` per record: MX, SPF (evaluated with :mod:`ferry.dnscheck.spf`),
DKIM (per local key), DMARC, PTR (forward-confirmed reverse DNS) and, for
information, MTA-STS and TLS-RPT. Every failure carries a one-line fix.

The record parsers (:func:`parse_tags`, :func:`parse_dmarc`, :func:`same_dkim_key`)
are pure functions; the DNS edge is :class:`ferry.dnscheck.spf.DnsLookup`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ferry.dnscheck.spf import (
    DnsLookup,
    DnsNotFound,
    DnsTempError,
    Lookup,
    SpfSyntaxError,
    check_host,
    parse_record,
    spf_records,
)
from ferry.domains import domain_key, to_a_labels

__all__ = [
    "Check",
    "DmarcRecord",
    "check_domain",
    "failed",
    "parse_dmarc",
    "parse_tags",
    "public_key_b64",
    "same_dkim_key",
    "suggest_spf",
]

T = TypeVar("T")
Status = Literal["pass", "warn", "fail", "info"]


@dataclass
class Check:
    """One verdict: ``name`` ("MX", "SPF", "DKIM ferry._domainkey", "DMARC", "PTR",
    "MTA-STS", "TLS-RPT"), its status, what was found, and how to fix a failure.
    A ``required`` check that fails makes the whole check fail."""

    name: str
    status: Status
    detail: str
    fix: str | None = None
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


def failed(checks: Sequence[Check]) -> bool:
    """True if any required check failed (the command then exits non-zero)."""
    return any(c.required and c.status == "fail" for c in checks)


# -- pure parsers ------------------------------------------------------------------


def parse_tags(text: str) -> dict[str, str]:
    """A ``tag=value; ...`` list (RFC 6376 §3.2, RFC 7489 §6.4): tags lower-cased,
    values stripped; a later duplicate is an error, as is a part without "="."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise ValueError(f"{part.strip()!r} is not tag=value")
        if name in tags:
            raise ValueError(f"tag {name}= appears twice")  # RFC 6376 §3.2
        tags[name] = value.strip()
    return tags


@dataclass(frozen=True)
class DmarcRecord:
    """A parsed ``v=DMARC1`` record (RFC 7489 §6.3), defaults filled in."""

    policy: str  # p: none / quarantine / reject
    subdomain_policy: str  # sp, default p
    adkim: str  # "r" relaxed / "s" strict
    aspf: str
    pct: int
    rua: tuple[str, ...]
    ruf: tuple[str, ...]
    notes: tuple[str, ...] = ()  # non-fatal oddities worth reporting


_POLICIES = ("none", "quarantine", "reject")


def _first_tag_is(text: str, version: str) -> bool:
    """Is the record's first tag ``v=<version>`` (case-insensitive, spaces allowed)?"""
    name, _, value = text.split(";", 1)[0].partition("=")
    return name.strip().lower() == "v" and value.strip().lower() == version.lower()


def is_dmarc_record(text: str) -> bool:
    """RFC 7489 §6.6.3: a record counts only if its first tag is ``v=DMARC1``."""
    return _first_tag_is(text, "DMARC1")


def parse_dmarc(text: str) -> DmarcRecord:
    """Parse a DMARC record; raises ValueError for one receivers would ignore."""
    if not is_dmarc_record(text):
        raise ValueError("the record does not start with v=DMARC1")
    tags = parse_tags(text)
    notes: list[str] = []
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip())
    ruf = tuple(u.strip() for u in tags.get("ruf", "").split(",") if u.strip())
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        # RFC 7489 §6.6.3: a missing or bad p= with a valid rua= acts as p=none.
        if not rua:
            shown = f"p={tags['p']}" if "p" in tags else "no p= tag"
            raise ValueError(f"{shown}: the policy must be none, quarantine or reject")
        notes.append("p= missing or invalid: receivers apply none")
        policy = "none"
    sub = tags.get("sp", policy).lower()
    if sub not in _POLICIES:
        notes.append(f"sp={tags['sp']} is invalid: ignored")
        sub = policy
    alignment = {}
    for tag in ("adkim", "aspf"):
        value = tags.get(tag, "r").lower()
        if value not in ("r", "s"):
            notes.append(f"{tag}={tags[tag]} is invalid: relaxed applies")
            value = "r"
        alignment[tag] = value
    try:
        pct = int(tags.get("pct", "100"))
        if not 0 <= pct <= 100:
            raise ValueError
    except ValueError:
        notes.append(f"pct={tags['pct']} is invalid: 100 applies")
        pct = 100
    return DmarcRecord(
        policy, sub, alignment["adkim"], alignment["aspf"], pct, rua, ruf, tuple(notes)
    )


def public_key_b64(public: Any) -> str:
    """The ``p=`` value for a public key: base64 DER SubjectPublicKeyInfo for RSA
    (RFC 6376 §3.6.1), the raw 32 bytes for Ed25519 (RFC 8463 §4.2)."""
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def _rsa_numbers(raw: bytes) -> tuple[int, int] | None:
    """(n, e) of an RSA key in SubjectPublicKeyInfo or bare RSAPublicKey DER."""
    for load in (
        serialization.load_der_public_key,
        lambda data: serialization.load_der_public_key(_wrap_pkcs1(data)),
    ):
        try:
            key = load(raw)
        except (ValueError, TypeError):
            continue
        if isinstance(key, rsa.RSAPublicKey):
            numbers = key.public_numbers()
            return numbers.n, numbers.e
    return None


def _wrap_pkcs1(raw: bytes) -> bytes:
    """Wrap a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (rsaEncryption, NULL)."""

    def der(tag: int, body: bytes) -> bytes:
        n = len(body)
        if n < 0x80:
            return bytes([tag, n]) + body
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag, 0x80 | len(size)]) + size + body

    algorithm = bytes.fromhex("300d06092a864886f70d0101010500")
    return der(0x30, algorithm + der(0x03, b"\x00" + raw))


def same_dkim_key(published: str, expected: str, kind: str = "rsa") -> bool:
    """Do two ``p=`` values hold the same public key? Whitespace is ignored
    (RFC 6376 §3.6.1 allows FWS in p=); RSA keys compare by (n, e), so a record
    publishing the bare RSAPublicKey instead of SubjectPublicKeyInfo still matches."""
    a, b = "".join(published.split()), "".join(expected.split())
    if a == b:
        return True
    try:
        raw_a, raw_b = base64.b64decode(a, validate=True), base64.b64decode(b, validate=True)
    except (binascii.Error, ValueError):
        return False
    if raw_a == raw_b:
        return True
    if kind != "rsa":
        return False
    numbers_a = _rsa_numbers(raw_a)
    return numbers_a is not None and numbers_a == _rsa_numbers(raw_b)


def suggest_spf(record: str | None, ip: str | None, hostname: str) -> str:
    """An SPF record that authorises ``ip`` (or ``hostname``'s addresses when no IP
    is known): the term goes before ``all`` / ``redirect=`` of an existing record."""
    term = f"a:{hostname}" if ip is None else f"ip{ipaddress.ip_address(ip).version}:{ip}"
    if not record:
        return f"v=spf1 {term} ~all"
    terms = record.split()
    for i, t in enumerate(terms[1:], start=1):
        if t.lstrip("+-~?").lower() == "all" or t.lower().startswith("redirect="):
            return " ".join([*terms[:i], term, *terms[i:]])
    return " ".join([*terms, term])


# -- the checks ---------------------------------------------------------------------


async def _ask(query: Awaitable[list[T]]) -> tuple[list[T], str | None]:
    """Records and None, or [] and why the lookup failed; NXDOMAIN is just []."""
    try:
        return await query, None
    except DnsNotFound:
        return [], None
    except DnsTempError as exc:
        return [], str(exc)


def _temp(name: str, error: str, required: bool) -> Check:
    return Check(
        name,
        "fail" if required else "warn",
        f"DNS lookup failed: {error}",
        "retry; if it persists, check dns.nameservers and the domain's authoritative servers",
        required,
    )


def _same_host(a: str, b: str) -> bool:
    return domain_key(a) == domain_key(b)


async def _check_mx(lookup: Lookup, domain: str, hostname: str) -> Check:
    """MX: informational for a sending-only domain; pass when it names this relay."""
    records, error = await _ask(lookup.mx(domain))
    if error:
        return _temp("MX", error, False)
    hosts = [host for _, host in sorted(records)]
    if not hosts:
        return Check(
            "MX",
            "warn",
            f"{domain} has no MX record: mail to it (replies, bounces) cannot be delivered",
            f"add MX 10 {hostname}. if {domain} should receive mail",
        )
    if all(h in ("", ".") for h in hosts):  # RFC 7505
        return Check("MX", "info", f"{domain} has a null MX (RFC 7505): it accepts no mail")
    shown = ", ".join(f"{p} {h}" for p, h in sorted(records))
    if not any(_same_host(h, hostname) for h in hosts):
        return Check(
            "MX",
            "info",
            f"MX {shown}: not this relay ({hostname}); sending-only domains need no MX "
            "pointing here",
        )
    v4, v6 = await asyncio.gather(_ask(lookup.a(hostname)), _ask(lookup.aaaa(hostname)))
    if not v4[0] and not v6[0]:
        return Check(
            "MX",
            "warn",
            f"MX {shown} names this relay, but {hostname} has no A/AAAA record",
            f"add an A record for {hostname}",
        )
    return Check("MX", "pass", f"MX {shown}: this relay ({hostname})")


async def _check_spf(lookup: Lookup, domain: str, ip: str | None, hostname: str) -> Check:
    """SPF: one record that parses and authorises the sending IP (RFC 7208)."""
    txts, error = await _ask(lookup.txt(domain))
    if error:
        return _temp("SPF", error, True)
    records = spf_records(txts)
    if not records:
        return Check(
            "SPF",
            "fail",
            f"no SPF record at {domain}",
            f'publish TXT at {domain}: "{suggest_spf(None, ip, hostname)}"',
            True,
        )
    if len(records) > 1:
        return Check(
            "SPF",
            "fail",
            f"{len(records)} SPF records at {domain}: receivers treat that as permerror "
            "(RFC 7208 §4.5)",
            "merge them into one v=spf1 record and delete the others",
            True,
        )
    record = records[0]
    try:
        parse_record(record)
    except SpfSyntaxError as exc:
        return Check(
            "SPF",
            "fail",
            f'"{record}" does not parse: {exc} (permerror)',
            "correct the record's syntax (RFC 7208 §4.6, §5)",
            True,
        )
    sender = f"postmaster@{domain}"
    if ip is not None:
        return await _spf_verdict(lookup, domain, record, ip, hostname, sender, guessed=False)
    # No --ip: try the relay hostname's own addresses; a guess, so at worst a warning.
    v4, v6 = await asyncio.gather(_ask(lookup.a(hostname)), _ask(lookup.aaaa(hostname)))
    addresses = v4[0] + v6[0]
    if not addresses:
        return Check(
            "SPF",
            "warn",
            f'"{record}" parses; the sending IP was not checked ({hostname} has no address)',
            "run again with --ip SENDING_IP",
            True,
        )
    verdicts = [
        await _spf_verdict(lookup, domain, record, a, hostname, sender, guessed=True)
        for a in addresses
    ]
    worst = next((v for v in verdicts if v.status != "pass"), verdicts[0])
    if worst.status == "pass":
        worst.detail += f" (the address of {hostname}; use --ip to check another)"
    return worst


async def _spf_verdict(
    lookup: Lookup,
    domain: str,
    record: str,
    ip: str,
    hostname: str,
    sender: str,
    *,
    guessed: bool,
) -> Check:
    result = await check_host(ip, domain, sender, lookup, helo=hostname)
    fix = f'authorise {ip}: "{suggest_spf(record, ip, hostname)}"'
    used = f"{result.lookups}/10 DNS lookups"
    if result.result == "pass":
        return Check(
            "SPF", "pass", f"{ip} is authorised by {result.mechanism} ({used})", None, True
        )
    if result.result in ("softfail", "neutral"):
        matched = result.mechanism or "no mechanism (default neutral)"
        return Check(
            "SPF",
            "warn",
            f"{ip} is not authorised: {result.result} via {matched}; receivers may "
            "treat the mail as suspect",
            fix,
            True,
        )
    if result.result == "fail":
        detail = f"{ip} is not authorised: fail via {result.mechanism}"
        if guessed:
            detail += f" ({ip} is {hostname}'s address; if you send from another IP, use --ip)"
        return Check("SPF", "warn" if guessed else "fail", detail, fix, True)
    if result.result == "temperror":
        return _temp("SPF", result.error or "temporary error", True)
    # permerror (limits, includes without records...) or none (record vanished)
    why = result.error or result.result
    return Check(
        "SPF",
        "fail",
        f"SPF {result.result}: {why}",
        "flatten includes / remove lookups so evaluation needs at most 10 DNS lookups"
        if "lookups" in why
        else "fix the record or the domains it includes / redirects to",
        True,
    )


async def _check_dkim(
    lookup: Lookup, domain: str, selector: str, kind: str, expected: str
) -> Check:
    """DKIM: the published key at ``selector._domainkey.domain`` equals the local one."""
    name = f"{selector}._domainkey.{domain}"
    label = f"DKIM {selector}._domainkey"
    publish = f'publish TXT at {name}: "v=DKIM1; k={kind}; p={expected}"'
    txts, error = await _ask(lookup.txt(name))
    if error:
        return _temp(label, error, True)
    if not txts:
        return Check(label, "fail", f"no DKIM record at {name}", publish, True)
    problems: list[str] = []
    for text in txts:
        try:
            tags = parse_tags(text)
        except ValueError as exc:
            problems.append(f"does not parse: {exc}")
            continue
        if "v" in tags and tags["v"] != "DKIM1":  # RFC 6376 §3.6.1
            problems.append(f"v={tags['v']} is not DKIM1")
            continue
        if "p" not in tags:
            problems.append("has no p= tag")
            continue
        published = "".join(tags["p"].split())
        if not published:  # RFC 6376 §3.6.1: an empty p= means revoked
            problems.append("the key is revoked (empty p=)")
            continue
        key_type = tags.get("k", "rsa").lower()
        if key_type != kind:
            problems.append(f"k={key_type}, but the local key is {kind}")
            continue
        if not same_dkim_key(published, expected, kind):
            problems.append("published key does not match the local key")
            continue
        note = " (t=y: testing mode)" if "y" in tags.get("t", "").split(":") else ""
        extra = f"; {len(txts)} TXT records there" if len(txts) > 1 else ""
        return Check(
            label, "pass", f"{kind} key published at {name} matches{note}{extra}", None, True
        )
    detail = f"{name}: " + "; ".join(dict.fromkeys(problems))
    fix = f'replace the record: "v=DKIM1; k={kind}; p={expected}"'
    return Check(label, "fail", detail, fix, True)


async def _check_dmarc(lookup: Lookup, domain: str) -> Check:
    """DMARC: one ``v=DMARC1`` record at ``_dmarc.domain``; policy and alignment."""
    name = f"_dmarc.{domain}"
    suggested = f'publish TXT at {name}: "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"'
    txts, error = await _ask(lookup.txt(name))
    if error:
        return _temp("DMARC", error, True)
    records = [t for t in txts if is_dmarc_record(t)]
    where = name
    # RFC 7489 §6.6.3: without a record, the organizational domain's applies. We
    # approximate it as the last two labels (no public suffix list here).
    org = ".".join(domain.split(".")[-2:])
    if not records and org != domain:
        org_txts, org_error = await _ask(lookup.txt(f"_dmarc.{org}"))
        records = [t for t in org_txts if is_dmarc_record(t)] if not org_error else []
        where = f"_dmarc.{org} (organizational domain)"
    if not records:
        return Check("DMARC", "fail", f"no DMARC record at {name}", suggested, True)
    if len(records) > 1:
        return Check(
            "DMARC",
            "fail",
            f"{len(records)} DMARC records at {where}: receivers then apply none (RFC 7489 §6.6.3)",
            "keep exactly one v=DMARC1 record",
            True,
        )
    try:
        dmarc = parse_dmarc(records[0])
    except ValueError as exc:
        return Check("DMARC", "fail", f'"{records[0]}" at {where}: {exc}', suggested, True)
    word = {"r": "relaxed", "s": "strict"}
    inherited = where != name
    policy = dmarc.subdomain_policy if inherited else dmarc.policy
    parts = [
        f"policy {policy}",
        f"alignment {word[dmarc.adkim]}/{word[dmarc.aspf]} (DKIM/SPF)",
        f"reports to {', '.join(dmarc.rua)}" if dmarc.rua else "no aggregate reports (rua=)",
    ]
    if not inherited and dmarc.subdomain_policy != dmarc.policy:
        parts.insert(1, f"subdomains {dmarc.subdomain_policy}")
    if dmarc.pct != 100:
        parts.append(f"applied to {dmarc.pct}% of mail")
    if inherited:
        parts.append(f"from {where}")
    parts.extend(dmarc.notes)
    detail = ", ".join(parts)
    if policy == "none":
        return Check(
            "DMARC",
            "warn",
            detail + "; p=none only monitors",
            "once reports show your mail aligned, move to p=quarantine",
            True,
        )
    return Check("DMARC", "pass", detail, None, True)


async def _check_ptr(lookup: Lookup, ip: str, hostname: str) -> Check:
    """PTR: ``ip`` → name → ``ip`` (forward-confirmed reverse DNS), ideally ``hostname``."""
    fix_ptr = f"ask your hosting provider to set reverse DNS: {ip} → {hostname}"
    names, error = await _ask(lookup.ptr(ip))
    if error:
        return _temp("PTR", error, True)
    if not names:
        return Check("PTR", "fail", f"{ip} has no PTR record (reverse DNS)", fix_ptr, True)
    version = ipaddress.ip_address(ip).version
    address = ipaddress.ip_address(ip)
    confirmed: list[str] = []
    seen: dict[str, list[str]] = {}
    for name in names[:10]:
        query = lookup.a(name) if version == 4 else lookup.aaaa(name)
        found, _ = await _ask(query)
        seen[name] = found
        if any(_ip_eq(f, address) for f in found):
            confirmed.append(name)
    shown = ", ".join(names)
    if not confirmed:
        back = "; ".join(f"{n} → {', '.join(a) or 'nothing'}" for n, a in seen.items())
        return Check(
            "PTR",
            "fail",
            f"{ip} → {shown}, but {back}: not forward-confirmed",
            f"add {'A' if version == 4 else 'AAAA'} {names[0]} → {ip}, or have your hosting "
            f"provider point the reverse DNS of {ip} at {hostname}",
            True,
        )
    if any(_same_host(n, hostname) for n in confirmed):
        return Check("PTR", "pass", f"{ip} → {hostname} → {ip} (forward-confirmed)", None, True)
    return Check(
        "PTR",
        "warn",
        f"{ip} → {confirmed[0]} → {ip} (forward-confirmed), but this relay's hostname "
        f"is {hostname}",
        f"set server.hostname = {confirmed[0]!r}, or change the PTR to {hostname}",
        True,
    )


def _ip_eq(text: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


async def _check_info(lookup: Lookup, label: str, name: str, version: str, rfc: str) -> Check:
    """MTA-STS / TLS-RPT: only reported."""
    txts, error = await _ask(lookup.txt(name))
    if error:
        return Check(label, "info", f"lookup of {name} failed: {error}")
    records = [t for t in txts if _first_tag_is(t, version)]
    if not records:
        return Check(label, "info", f"no {version} record at {name} (optional, {rfc})")
    if len(records) > 1:
        return Check(label, "info", f"{len(records)} {version} records at {name}: ignored ({rfc})")
    return Check(label, "info", f"{name}: {records[0]}")


async def check_domain(
    domain: str,
    *,
    ip: str | None,
    hostname: str,
    nameservers: list[str],
    dkim_keys: list[tuple[str, str, str]],
    timeout: float = 5.0,
    lookup: Lookup | None = None,
) -> list[Check]:
    """Check ``domain``'s DNS for sending through this relay.

    ``ip``: the relay's sending address (SPF and PTR are checked against it);
    ``hostname``: the relay's name (MX, PTR); ``dkim_keys``: ``(selector, kind,
    p=value)`` of each local key. ``lookup`` replaces the resolver built from
    ``nameservers`` / ``timeout``. Raises ValueError for a bad domain or IP.
    """
    domain = to_a_labels(domain)
    if ip is not None:
        ip = str(ipaddress.ip_address(ip))
    hostname = domain_key(hostname)
    dns = lookup if lookup is not None else DnsLookup(nameservers, timeout)
    jobs: list[Awaitable[Check]] = [
        _check_mx(dns, domain, hostname),
        _check_spf(dns, domain, ip, hostname),
    ]
    jobs += [_check_dkim(dns, domain, sel, kind, p) for sel, kind, p in dkim_keys]
    jobs.append(_check_dmarc(dns, domain))
    if ip is not None:
        jobs.append(_check_ptr(dns, ip, hostname))
    jobs.append(_check_info(dns, "MTA-STS", f"_mta-sts.{domain}", "STSv1", "RFC 8461"))
    jobs.append(_check_info(dns, "TLS-RPT", f"_smtp._tls.{domain}", "TLSRPTv1", "RFC 8460"))
    checks = list(await asyncio.gather(*jobs))
    if not dkim_keys:
        checks.insert(
            2,
            Check(
                "DKIM",
                "warn",
                f"no local DKIM key for {domain}: mail goes out unsigned",
                f"run: ferry dkim keygen {domain}",
            ),
        )
    return checks
