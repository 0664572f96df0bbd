"""A real authoritative DNS server on loopback (dnslib), with a zone tests edit live.

It answers over UDP and TCP on the same port, so resolvers that fall back to
TCP on truncation behave as on the Internet. Faults (SERVFAIL, silence, slow
answers) are per name and optionally per query type, and every query is
logged so tests can count what a resolver really sent.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from typing import Any

import dns.name
from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

#: Query type name, or None for "every type".
QType = str | None


def canonical(name: str) -> str:
    """Lower-case A-label form without the final dot: the zone's key for a name."""
    name = name.strip().rstrip(".")
    if not name:
        return ""
    # dnspython's IDNA codec, so the zone and the resolver under test agree.
    return dns.name.from_text(name).to_text(omit_final_dot=True).lower()


def _apex(name: str) -> str:
    """The zone a name belongs to, for the SOA in negative answers (last two labels)."""
    return ".".join(name.split(".")[-2:])


class _Handler(DNSHandler):
    """dnslib's handler, except that a ``None`` reply means "send nothing"."""

    def get_reply(self, data: bytes) -> bytes:
        reply = self.server.resolver.resolve(DNSRecord.parse(data), self)
        if reply is None:
            # DNSHandler.handle() swallows DNSError: the query goes unanswered.
            raise DNSError("dropped on purpose")
        return reply.pack()


class _Zone:
    """The resolver dnslib calls from its handler threads; all state under one lock."""

    def __init__(self, stopping: threading.Event) -> None:
        self.lock = threading.Lock()
        self.stopping = stopping
        self.records: dict[str, list[RR]] = {}
        self.nxdomain: set[str] = set()
        self.faults: dict[tuple[str, QType], str] = {}  # "servfail" | "timeout"
        self.delays: dict[tuple[str, QType], float] = {}
        self.queries: list[tuple[str, str]] = []
        self.soa_minimum = 300

    def _lookup(self, table: dict[tuple[str, QType], Any], name: str, qtype: str) -> Any:
        return table.get((name, qtype), table.get((name, None)))

    def _exists(self, name: str) -> bool:
        # A name with no records of its own still exists if a name below it
        # does (an "empty non-terminal", RFC 8020): NODATA, not NXDOMAIN.
        return name in self.records or any(n.endswith("." + name) for n in self.records)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord | None:
        name = canonical(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, qtype))
            fault = self._lookup(self.faults, name, qtype)
            delay = self._lookup(self.delays, name, qtype)
            missing = name in self.nxdomain or not self._exists(name)
            records = [] if missing else self.records.get(name, [])
            answers = [rr for rr in records if rr.rtype == request.q.qtype]
            minimum = self.soa_minimum
        if delay:
            # Simulated slowness; cut short when the server stops.
            self.stopping.wait(delay)
        if fault == "timeout":
            return None
        reply = request.reply()
        if fault == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if answers:
            for rr in answers:
                reply.add_answer(rr)
            return reply
        if missing:
            reply.header.rcode = RCODE.NXDOMAIN
        # RFC 2308: negative answers carry the zone's SOA; its minimum is the
        # negative-caching TTL.
        apex = _apex(name)
        soa = SOA(f"ns.{apex}", f"hostmaster.{apex}", (1, 3600, 600, 86400, minimum))
        reply.add_auth(RR(apex, QTYPE.SOA, ttl=minimum, rdata=soa))
        return reply


class DnsServer:
    """An authoritative DNS server on ``host`` (a loopback address), UDP + TCP.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Names with no
    records answer NXDOMAIN; a name without the asked type answers NODATA.
    Faults (:meth:`nxdomain`, :meth:`servfail`, :meth:`timeout`) win over records
    until :meth:`remove` or :meth:`clear`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._stopping = threading.Event()
        self._zone = _Zone(self._stopping)
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> DnsServer:
        """Bind UDP and TCP on one port (ephemeral unless given) and serve."""
        logger = DNSLogger(log="-request,-reply,-truncated,-error")
        for _ in range(50):
            udp = DNSServer(self._zone, self.host, self.port, logger=logger, handler=_Handler)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    self._zone, self.host, port, tcp=True, logger=logger, handler=_Handler
                )
            except OSError:
                udp.server.server_close()
                if self.port:
                    raise
                continue  # the TCP side of that ephemeral port was taken: try another
            break
        else:  # pragma: no cover - 50 collisions in a row
            raise OSError("no port free for both UDP and TCP")
        self.port = port
        for server in (udp, tcp):
            # Non-daemon handler threads are joined by server_close(): stop()
            # then leaves nothing running.
            server.server.daemon_threads = False
            thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.02},  # how fast shutdown() is noticed
                name=f"dns-{server.server.socket_type.name}-{port}",
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving, release delayed handlers, close sockets, join threads."""
        self._stopping.set()
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``"host:port"``, the form Ferry's ``dns_servers`` setting takes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- zone editing ------------------------------------------------------

    def _add(self, name: str, qtype: str, rdata: Any, ttl: int) -> None:
        name = canonical(name)
        with self._zone.lock:
            rr = RR(name, getattr(QTYPE, qtype), ttl=ttl, rdata=rdata)
            self._zone.records.setdefault(name, []).append(rr)

    def add_mx(self, domain: str, hosts: Iterable[tuple[int, str]], ttl: int = 300) -> None:
        """Add MX records ``(preference, host)`` to ``domain``."""
        for preference, host in hosts:
            self._add(domain, "MX", MX(canonical(host) or ".", preference), ttl)

    def null_mx(self, domain: str, ttl: int = 300) -> None:
        """Make ``domain`` a null MX domain (RFC 7505: the only MX is ``0 .``)."""
        name = canonical(domain)
        with self._zone.lock:
            rrs = self._zone.records.get(name, [])
            self._zone.records[name] = [rr for rr in rrs if rr.rtype != QTYPE.MX]
        self._add(domain, "MX", MX(".", 0), ttl)

    def add_a(self, name: str, ip: str, ttl: int = 300) -> None:
        """Add an A record."""
        self._add(name, "A", A(str(ipaddress.IPv4Address(ip))), ttl)

    def add_aaaa(self, name: str, ip: str, ttl: int = 300) -> None:
        """Add an AAAA record."""
        self._add(name, "AAAA", AAAA(str(ipaddress.IPv6Address(ip))), ttl)

    def add_txt(self, name: str, text: str | bytes | Iterable[str | bytes], ttl: int = 300) -> None:
        """Add one TXT record. A single value is split into 255-byte strings
        (RFC 7208 §3.3 style, as DKIM keys need); a list gives the strings as is."""
        if isinstance(text, str | bytes):
            raw = text.encode() if isinstance(text, str) else text
            strings = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        else:
            strings = [s.encode() if isinstance(s, str) else s for s in text]
        self._add(name, "TXT", TXT(strings), ttl)

    def add_ptr(self, ip: str, name: str, ttl: int = 300) -> None:
        """Add a PTR record for ``ip`` (IPv4 or IPv6) pointing at ``name``."""
        self._add(ipaddress.ip_address(ip).reverse_pointer, "PTR", PTR(canonical(name)), ttl)

    def nxdomain(self, name: str) -> None:
        """Answer NXDOMAIN for ``name`` even if it has records."""
        with self._zone.lock:
            self._zone.nxdomain.add(canonical(name))

    def servfail(self, name: str, qtype: QType = None) -> None:
        """Answer SERVFAIL for ``name`` (only for ``qtype`` if given)."""
        with self._zone.lock:
            self._zone.faults[canonical(name), qtype] = "servfail"

    def timeout(self, name: str, qtype: QType = None) -> None:
        """Never answer queries for ``name`` (only for ``qtype`` if given)."""
        with self._zone.lock:
            self._zone.faults[canonical(name), qtype] = "timeout"

    def delay(self, name: str, seconds: float, qtype: QType = None) -> None:
        """Answer queries for ``name`` only after ``seconds``."""
        with self._zone.lock:
            self._zone.delays[canonical(name), qtype] = seconds

    def remove(self, name: str) -> None:
        """Forget ``name``: its records, faults and delays."""
        name = canonical(name)
        with self._zone.lock:
            self._zone.records.pop(name, None)
            self._zone.nxdomain.discard(name)
            for table in (self._zone.faults, self._zone.delays):
                for key in [k for k in table if k[0] == name]:
                    del table[key]

    def clear(self) -> None:
        """Empty the zone (records, faults, delays); the query log is kept."""
        with self._zone.lock:
            self._zone.records.clear()
            self._zone.nxdomain.clear()
            self._zone.faults.clear()
            self._zone.delays.clear()

    @property
    def negative_ttl(self) -> int:
        """SOA minimum (and SOA TTL) sent with negative answers; default 300."""
        return self._zone.soa_minimum

    @negative_ttl.setter
    def negative_ttl(self, seconds: int) -> None:
        with self._zone.lock:
            self._zone.soa_minimum = seconds

    # -- query log ---------------------------------------------------------

    @property
    def queries(self) -> list[tuple[str, str]]:
        """A copy of the log: ``(qname, qtype)`` per query received, in order."""
        with self._zone.lock:
            return list(self._zone.queries)

    def count(self, qname: str, qtype: QType = None) -> int:
        """How many queries for ``qname`` (of ``qtype`` if given) were received."""
        name = canonical(qname)
        with self._zone.lock:
            return sum(1 for n, t in self._zone.queries if n == name and qtype in (None, t))

    def reset_log(self) -> None:
        """Empty the query log."""
        with self._zone.lock:
            self._zone.queries.clear()
