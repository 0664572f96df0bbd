"""The SMTPy seed's functions, working as its document shows.

::

    from ferry import get_direct_smtp_service, send_email_hybrid, EmailPriority

    service = get_direct_smtp_service()
    ok = await service.send_email(message, "user@example.com", "noreply@example.org")
    results = await send_email_hybrid(message, ["user@example.com"], "noreply@example.org",
                                      priority=EmailPriority.NORMAL)

Two ways out, as in the seed:

- **Direct, without the queue** -- :class:`DirectSmtpService` (``send_email``,
  ``send_email_bulk``, :func:`send_direct`): MX lookup with caching, opportunistic
  STARTTLS, up to three attempts with 2 s / 4 s backoff (8 s would come next),
  and a per-domain limit of 10 new connections a minute. Nothing is stored: when
  the call returns ``False`` the message is not delivered and nobody will retry.
  It is a thin adapter over the delivery engine's own pieces -- the MX resolver and
  its walk order, the SMTP client with the engine's options and timeouts, the one
  reply classifier, the shaper's rate window -- not a second engine.
- **Through the queue** -- :func:`send_email_hybrid` hands the message to a
  process-wide :class:`ferry.Relay` (:func:`get_hybrid_relay`) in the configured
  delivery mode (direct, relay, hybrid or smart), then waits for the outcomes.

Both read the same configuration as ``ferry serve``: ``$FERRY_CONFIG`` (a TOML file),
the seed's ``SMTP_*`` variables and ``FERRY_*`` variables, loaded on first use (never
on import). :func:`configure` replaces it, for tests or embedders.
"""

from __future__ import annotations

import asyncio
import collections
import email
import email.message
import email.policy
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from ferry.api.relay import DeliveryResult, MessageLike, Relay, prepare_message
from ferry.config import RelayConfig
from ferry.delivery.client import RcptSpec, SmtpClient, SmtpError, mx_options
from ferry.delivery.mx import MxError, MxResolver, mx_targets
from ferry.delivery.outcomes import ReplyClass, Stage, classify_reply, transport_failure_reply
from ferry.delivery.shaping import RateWindow
from ferry.domains import address_domain
from ferry.envelope import Priority, Reply
from ferry.events import (
    ConnectFailed,
    DirectDelivery,
    DirectRateLimited,
    DkimSigned,
    DkimUnsigned,
    TlsFallback,
    emit,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RATE_LIMIT",
    "DEFAULT_RATE_WINDOW",
    "DEFAULT_RETRY_DELAYS",
    "HYBRID_TIMEOUT",
    "DirectSmtpService",
    "EmailPriority",
    "configure",
    "get_direct_smtp_service",
    "get_hybrid_relay",
    "send_direct",
    "send_email_hybrid",
    "sign_email_dkim",
]

logger = logging.getLogger("ferry.api.seed")

#: SMTPy's priorities (HIGH, NORMAL, LOW) are Ferry's one priority enum.
EmailPriority = Priority

#: Attempts per recipient domain in one ``send_email`` call (the seed's three).
DEFAULT_MAX_ATTEMPTS = 3
#: Waits between attempts: after the first failure 2 s, then 4 s, then 8 s.
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (2.0, 4.0, 8.0)
#: New connections per recipient domain per window (the seed's 10 a minute).
DEFAULT_RATE_LIMIT = 10
DEFAULT_RATE_WINDOW = 60.0
#: How long :func:`send_email_hybrid` waits for final outcomes (seconds).
HYBRID_TIMEOUT = 60.0

# Writes an EmailMessage back from signed bytes without touching its header folding.
_PARSE_POLICY = email.policy.SMTP.clone(refold_source="none")

Sleep = Callable[[float], Awaitable[Any]]


#: One recipient's result of one attempt: the verdict, the reply, the server, TLS.
_Decided = tuple[ReplyClass, Reply, str | None, str | None]


class _RateLimiter:
    """At most ``limit`` new connections per domain in any ``window`` seconds; waits.

    The counting is the delivery shaper's :class:`RateWindow`; only the waiting (with
    the injected ``sleep``) is the seed's: it has no scheduler to come back later.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float], sleep: Sleep) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("rate limit needs limit >= 1 and window > 0")
        self.limit, self.window, self.clock, self.sleep = limit, window, clock, sleep
        self._windows: dict[str, RateWindow] = {}

    async def acquire(self, domain: str) -> None:
        window = self._windows.setdefault(domain, RateWindow(self.limit, self.window))
        while True:
            now = self.clock()
            wait = window.next_allowed(now) - now
            if wait <= 0:
                window.record(now)
                return
            emit(DirectRateLimited(domain, wait))
            await self.sleep(wait)


class DirectSmtpService:
    """Delivery straight to the recipients' MX hosts, without the queue (SMTPy's
    ``DirectSMTPService``).

    Per recipient domain and call: MX lookup (cached for the records' TTL, capped by
    ``dns.mx_cache_ttl``), each MX host in preference order on ``delivery.mx_port``,
    opportunistic STARTTLS (a failed handshake is retried in clear), one transaction
    for all of the domain's recipients. Replies are judged by the engine's one rule
    (:func:`ferry.delivery.outcomes.classify_reply`): temporary failures (4xx, a 552 to
    RCPT, unreachable or refusing hosts, DNS trouble) are retried up to
    ``max_attempts`` times, waiting ``retry_delays[n]`` after failed attempt ``n + 1``;
    permanent ones (5xx to MAIL, RCPT, DATA; a domain that does not exist) are not.
    ``sleep`` and ``clock`` are injectable (tests).
    """

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        rate_limit: int = DEFAULT_RATE_LIMIT,
        rate_window: float = DEFAULT_RATE_WINDOW,
        resolver: MxResolver | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not retry_delays or any(d < 0 for d in retry_delays):
            raise ValueError("retry_delays needs one or more non-negative delays")
        self.config = config if config is not None else RelayConfig.load()
        self.max_attempts = max_attempts
        self.retry_delays = tuple(retry_delays)
        dns = self.config.dns
        self.resolver = resolver or MxResolver(
            dns.nameservers, timeout=dns.timeout, max_ttl=dns.mx_cache_ttl
        )
        self._sleep = sleep
        self._limiter = _RateLimiter(rate_limit, rate_window, clock, sleep)
        self._stats: collections.Counter[str] = collections.Counter()

    # -- the seed's API

    async def send_email(self, message: MessageLike, recipient: str, mail_from: str) -> bool:
        """Deliver ``message`` to one recipient; True once its MX accepted it."""
        results = await self.deliver(message, [recipient], mail_from)
        return all(bool(r) for r in results.values())

    async def send_email_bulk(
        self, message: MessageLike, recipients: Iterable[str], mail_from: str
    ) -> dict[str, bool]:
        """Deliver ``message`` to many recipients (one transaction per domain, domains
        in parallel); ``{"user1@example.com": True, "user2@example.com": False}``."""
        results = await self.deliver(message, recipients, mail_from)
        return {rcpt: bool(result) for rcpt, result in results.items()}

    def get_stats(self) -> dict[str, int]:
        """``sent``, ``failed``, ``deferred``, ``bounced`` and the MX cache counters.

        ``sent`` and ``failed`` count recipients by final result; ``deferred`` counts
        temporary failures (also those a later attempt got through); ``bounced`` the
        permanent refusals among ``failed``.
        """
        mx = self.resolver.stats()
        return {
            "sent": self._stats["sent"],
            "failed": self._stats["failed"],
            "deferred": self._stats["deferred"],
            "bounced": self._stats["bounced"],
            "mx_lookups": mx.get("mx_lookups", 0),
            "mx_cache_hits": mx.get("mx_cache_hits", 0),
            "mx_cache_size": mx.get("mx_cache_size", 0),
        }

    # -- the details

    async def deliver(
        self, message: MessageLike, recipients: Iterable[str] | str, mail_from: str
    ) -> dict[str, DeliveryResult]:
        """Like :meth:`send_email_bulk`, with each recipient's :class:`DeliveryResult`
        (status, server, reply, TLS, attempts)."""
        data, sender, rcpts = prepare_message(
            message, recipients, mail_from, hostname=self.config.server.hostname
        )
        by_domain: dict[str, list[str]] = {}
        for rcpt in rcpts:
            by_domain.setdefault(address_domain(rcpt), []).append(rcpt)
        parts = await asyncio.gather(
            *(self._deliver_domain(d, rs, data, sender) for d, rs in by_domain.items())
        )
        merged = {k: v for part in parts for k, v in part.items()}
        return {rcpt: merged[rcpt] for rcpt in rcpts}

    async def _deliver_domain(
        self, domain: str, rcpts: list[str], data: bytes, sender: str
    ) -> dict[str, DeliveryResult]:
        results: dict[str, DeliveryResult] = {}
        pending = list(rcpts)
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                delay = self.retry_delays[min(attempt - 2, len(self.retry_delays) - 1)]
                await self._sleep(delay)
            outcomes = await self._attempt(domain, pending, data, sender)
            retry: list[str] = []
            for rcpt in pending:
                verdict, reply, relay, tls = outcomes[rcpt]
                status = verdict.status
                results[rcpt] = DeliveryResult(
                    rcpt, status, None, "direct", reply, relay, tls, attempt
                )
                emit(DirectDelivery(rcpt, status, relay, tls, reply, attempt))
                if verdict is ReplyClass.DELIVERED:
                    self._stats["sent"] += 1
                elif verdict is ReplyClass.PERMANENT:
                    self._stats["failed"] += 1
                    self._stats["bounced"] += 1
                else:
                    self._stats["deferred"] += 1
                    retry.append(rcpt)
            pending = retry
            if not pending:
                break
        self._stats["failed"] += len(pending)
        return results

    async def _attempt(
        self, domain: str, rcpts: list[str], data: bytes, sender: str
    ) -> dict[str, _Decided]:
        """One attempt for one domain: every MX address in turn until all are decided."""
        try:
            hosts = await self.resolver.resolve(domain)
        except MxError as exc:
            # As the engine: NXDOMAIN and null MX are answers (bounce), a failed
            # lookup is not (retry).
            verdict = ReplyClass.PERMANENT if exc.permanent else ReplyClass.TEMPORARY
            return {r: (verdict, exc.reply, None, None) for r in rcpts}
        decided: dict[str, _Decided] = {}
        undecided = list(rcpts)
        last: Reply | None = None
        utf8 = not sender.isascii() or not all(r.isascii() for r in rcpts)
        for name, ip in mx_targets(hosts):  # RFC 5321 §5.1
            if not undecided:
                break
            try:
                client = await self._connect(domain, ip, name)
            except SmtpError as exc:
                last = exc.reply
                emit(ConnectFailed(f"{name}[{ip}]", exc.reply))
                continue
            label = f"{name}[{ip}]:{client.port}"
            try:
                result = await client.send(
                    sender,
                    [RcptSpec(r) for r in undecided],
                    data,
                    smtputf8=utf8,
                    body_8bit=not data.isascii(),
                )
            except SmtpError as exc:  # the session failed: decided ones stay decided
                last = exc.reply
                partial = exc.partial or [None] * len(undecided)
                stages: list[Stage] = exc.partial_stages or ["rcpt"] * len(undecided)
                still: list[str] = []
                for rcpt, reply, stage in zip(undecided, partial, stages, strict=True):
                    if reply is None:
                        still.append(rcpt)
                    else:
                        verdict = classify_reply(reply, stage=stage)
                        decided[rcpt] = (verdict, reply, label, client.tls)
                undecided = still
                continue
            finally:
                await client.quit()
            for rcpt, reply, stage in zip(undecided, result.replies, result.stages, strict=True):
                decided[rcpt] = (classify_reply(reply, stage=stage), reply, label, client.tls)
            undecided = []
        # No host took the rest: the hosts failed, not the recipients (a transport
        # failure, whatever the last host said before MAIL FROM): try again later.
        if undecided and last is None:
            last = transport_failure_reply("unreachable", f"no usable MX host for {domain}")
        for rcpt in undecided:
            assert last is not None
            decided[rcpt] = (ReplyClass.TRANSPORT, last, None, None)
        return decided

    async def _connect(self, domain: str, ip: str, name: str) -> SmtpClient:
        """A session with opportunistic STARTTLS; in clear if the TLS handshake fails."""
        port = self.config.delivery.mx_port
        await self._limiter.acquire(domain)
        try:
            return await SmtpClient.connect(ip, port, mx_options(self.config, name))
        except SmtpError as exc:
            if not exc.tls_handshake_failed:
                raise
        emit(TlsFallback(f"{name}[{ip}]"))
        await self._limiter.acquire(domain)
        return await SmtpClient.connect(ip, port, mx_options(self.config, name, plain=True))


# -- the process-wide defaults ----------------------------------------------------------

_config: RelayConfig | None = None
_direct: DirectSmtpService | None = None
_hybrid: Relay | None = None
_signer: Any = None


def configure(config: RelayConfig | None = None) -> None:
    """Use ``config`` for the seed's functions from now on (None: load it again from
    ``$FERRY_CONFIG`` and the environment on next use).

    Raises RuntimeError while the hybrid relay runs: ``await get_hybrid_relay().stop()``
    first.
    """
    global _config, _direct, _hybrid, _signer
    if _hybrid is not None and _hybrid.running:
        raise RuntimeError("the hybrid relay is running: stop it first")
    _config, _direct, _hybrid, _signer = config, None, None, None


def _default_config() -> RelayConfig:
    global _config
    if _config is None:
        _config = RelayConfig.load()
    return _config


def get_direct_smtp_service() -> DirectSmtpService:
    """The process-wide :class:`DirectSmtpService` (its MX cache is shared)."""
    global _direct
    if _direct is None:
        _direct = DirectSmtpService(_default_config())
    return _direct


def get_hybrid_relay() -> Relay:
    """The process-wide :class:`ferry.Relay` behind :func:`send_email_hybrid`.

    It opens no listener, delivers in the configured mode, and is started by the first
    :func:`send_email_hybrid` on the running event loop; it stops when that loop ends
    (``asyncio.run`` returning), or with ``await get_hybrid_relay().stop()``.
    ``get_hybrid_relay().get_stats()`` gives the seed's statistics.
    """
    global _hybrid
    if _hybrid is None:
        _hybrid = Relay(_default_config(), listen=False)
    return _hybrid


async def _started_hybrid_relay() -> Relay:
    relay = get_hybrid_relay()
    loop = asyncio.get_running_loop()
    if relay.running and relay.loop is not loop:
        raise RuntimeError(
            "the hybrid relay runs on another event loop; stop it there first"
            " (await get_hybrid_relay().stop())"
        )
    if not relay.running:
        await relay.start()
        relay._attach_to_loop()
    return relay


async def send_email_hybrid(
    message: MessageLike,
    recipients: Iterable[str] | str,
    mail_from: str,
    priority: Priority | str | int = EmailPriority.NORMAL,
    *,
    timeout: float | None = HYBRID_TIMEOUT,
) -> dict[str, bool]:
    """Queue ``message`` on the hybrid relay and wait for each recipient's outcome.

    True per recipient once delivered. A recipient still pending when ``timeout``
    runs out is False here but stays queued: the relay keeps retrying it while it runs.
    """
    relay = await _started_hybrid_relay()
    results = await relay.send(message, recipients, mail_from, priority, timeout=timeout)
    return {rcpt: bool(result) for rcpt, result in results.items()}


async def send_direct(
    message: MessageLike,
    recipients: Iterable[str] | str,
    mail_from: str | None = None,
) -> dict[str, bool]:
    """Sign with DKIM (when enabled and a key exists), then deliver straight to the
    recipients' MX hosts without the queue. ``mail_from`` defaults to From:.

    A message whose domain is in ``dkim.required_domains`` and cannot be signed is not
    sent at all (every recipient False), as the queue would defer it.
    """
    config = _default_config()
    data, sender, rcpts = prepare_message(
        message, recipients, mail_from, hostname=config.server.hostname
    )
    signed, result = _sign(config, data, sender)
    if result is not None and result.required and not result.signed:
        logger.error("not sending unsigned mail for a DKIM-required domain: %s", result.domain)
        return dict.fromkeys(rcpts, False)
    return await get_direct_smtp_service().send_email_bulk(signed, rcpts, sender)


async def sign_email_dkim(message: MessageLike, mail_from: str) -> email.message.EmailMessage:
    """``message`` with DKIM-Signature fields made with the keys in ``dkim.keys_dir``.

    The signing domain is the From: domain (or a parent with keys), else the envelope
    sender's, else ``dkim.default_domain``. Without a key, with DKIM disabled or on any
    error the message comes back unsigned (the seed's "graceful fallback"); the reason
    is logged.
    """
    config = _default_config()
    data, _sender, _rcpts = prepare_message(
        message,
        [mail_from] if mail_from else ["postmaster@localhost"],
        mail_from or "",
        hostname=config.server.hostname,
    )
    signed, _result = _sign(config, data, mail_from)
    parsed = email.message_from_bytes(signed, policy=_PARSE_POLICY)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _sign(config: RelayConfig, data: bytes, mail_from: str) -> tuple[bytes, Any]:
    """``(signed bytes, SignResult)``; the bytes unchanged (and None) on any error."""
    try:
        result = _dkim_signer(config).sign(data, envelope_sender=mail_from)
    except Exception as exc:  # never lose the message over a signature
        logger.warning("DKIM signing failed, sending unsigned: %s", exc)
        emit(DkimUnsigned(f"{type(exc).__name__}: {exc}", failed=True))
        return data, None
    if result.signed:
        emit(DkimSigned(result.domain, tuple(result.selectors)))
        return result.headers + data, result
    emit(DkimUnsigned(result.unsigned_reason, domain=result.domain))
    return data, result


def _dkim_signer(config: RelayConfig) -> Any:
    """The signer ``[dkim]`` describes, as delivery uses it (made on first use)."""
    global _signer
    if _signer is None:
        from ferry.delivery.sessions import make_signer

        _signer = make_signer(config)
    return _signer
