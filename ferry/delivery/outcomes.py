"""Classifying what happened to a delivery attempt (pure).

The SMTP client reports raw replies; :func:`classify_reply` (the one reply
classifier) turns them into a :class:`ReplyClass` -- delivered, temporary,
permanent or transport failure. The other functions build replies for failures
that never got one (refused connections, timeouts), and spot "you are on a
block list" rejections that hybrid mode answers by retrying through a smart host.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Literal

from ferry.config import DEFAULT_BLOCK_PATTERNS
from ferry.envelope import Reply, Status

Stage = Literal["connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot"]

#: Stages before MAIL FROM: a failure there is the host's, not a recipient's (RFC 5321
#: §3.1 greeting, §4.1.1.1 EHLO, RFC 3207 STARTTLS, RFC 4954 AUTH).
SESSION_STAGES: frozenset[str] = frozenset({"connect", "greeting", "ehlo", "starttls", "auth"})


class ReplyClass(enum.Enum):
    """What a reply means for the recipients it answered (see :func:`classify_reply`).

    Not to be confused with the recorder's ``Outcome`` (a recipient's recorded result):
    this is the verdict on one reply, from which the recorder's status follows.
    """

    DELIVERED = "delivered"  # accepted: the reply to the final "."
    TEMPORARY = "temporary"  # this recipient or message: retry later (see retry.py)
    PERMANENT = "permanent"  # this recipient or message: bounce now
    TRANSPORT = "transport"  # the host or session failed, not the recipient: retry

    @property
    def status(self) -> Status:
        """The recipient's status after such a reply: a transport failure defers it."""
        if self is ReplyClass.DELIVERED:
            return Status.DELIVERED
        return Status.FAILED if self is ReplyClass.PERMANENT else Status.DEFERRED


def classify_reply(reply: Reply | None, *, stage: Stage) -> ReplyClass:
    """Classify the reply that ended an attempt at ``stage``: the one rule used by the
    engine, the smart hosts' circuit breakers, the Python API and the seed functions.

    The contract: call this with the reply that *decides* a recipient's fate,
    which is either a failure reply (4xx/5xx) at any stage, or the reply to
    the final "." at stage ``"dot"``, or None when the attempt got no SMTP reply
    at all (refused, unreachable, timed out, connection lost, TLS handshake
    failed, protocol error: the cases :func:`transport_failure_reply` makes up a
    reply for; pass None, not that synthetic 451). Plain SMTP has no
    per-recipient answer after DATA, so the reply to "." decides for every
    accepted recipient (RFC 5321 §4.1.1.4). A positive reply at any other
    stage is not an outcome (the transaction goes on) and raises ValueError;
    an unexpected positive reply (say 250 to DATA) is a protocol error.

    In this order:

    - no reply → TRANSPORT.
    - 2xx at "dot" → DELIVERED. A 3xx there is not a valid answer to "."
      (RFC 5321 §4.3.2 allows only 250 or a failure), so the message was not
      accepted: TEMPORARY, to try again rather than lose it.
    - 421 at any stage → TRANSPORT: RFC 5321 §3.8 "service not available,
      closing transmission channel" is the server ending the session,
      whatever command it answered.
    - any failure before MAIL FROM (connect, greeting, EHLO, STARTTLS, AUTH)
      → TRANSPORT: it judges the host, not a recipient, and RFC 5321 §5.1 has
      the client try the next address of the host list.
    - 4xx → TEMPORARY (RFC 5321 §4.2.1: transient negative completion).
    - 552 at RCPT → TEMPORARY: RFC 821 gave "too many recipients" the code
      552, so RFC 5321 §4.5.3.1.10 says clients should treat a 552 there as
      temporary (452); the rest are retried in a later transaction. This holds
      whatever the enhanced code says (even 5.3.4): a retry loses nothing, a
      wrong bounce loses the mail.
    - 5xx → PERMANENT (RFC 5321 §4.2.1: permanent negative completion),
      including 552 at MAIL, DATA or "." (RFC 1870 §6.1: message too big).
    """
    if reply is None:
        return ReplyClass.TRANSPORT
    if not 200 <= reply.code < 600:
        raise ValueError(f"not an SMTP reply code: {reply.code}")
    if reply.is_success:
        if stage != "dot":
            raise ValueError(f"{reply.code} at stage {stage!r} is not an outcome")
        return ReplyClass.DELIVERED if reply.code < 300 else ReplyClass.TEMPORARY
    if reply.code == 421 or stage in SESSION_STAGES:  # RFC 5321 §3.8, §5.1
        return ReplyClass.TRANSPORT
    if reply.is_transient:  # RFC 5321 §4.2.1
        return ReplyClass.TEMPORARY
    if reply.code == 552 and stage == "rcpt":  # RFC 5321 §4.5.3.1.10
        return ReplyClass.TEMPORARY
    return ReplyClass.PERMANENT


TransportFailure = Literal[
    "refused", "unreachable", "connect_timeout", "dns", "timeout", "lost", "tls", "protocol"
]

#: kind → (enhanced code, what happened). All are temporary (class 4): none
#: of them says anything about the recipient, so they are retried.
TRANSPORT_FAILURES: dict[str, tuple[str, str]] = {
    # RFC 3463 X.4.1 "No answer from host": the connection was never made.
    "refused": ("4.4.1", "connection refused"),
    "unreachable": ("4.4.1", "host unreachable"),
    "connect_timeout": ("4.4.1", "connection timed out"),
    # RFC 3463 X.4.3 "Directory server failure": DNS could not name a host.
    "dns": ("4.4.3", "DNS lookup failed"),
    # RFC 3463 X.4.2 "Bad connection": connected, but the transaction could
    # not complete "because of time-out, or inadequate connection quality".
    "timeout": ("4.4.2", "timed out waiting for the server"),
    "lost": ("4.4.2", "connection lost"),
    # RFC 3463 X.7.5 "Cryptographic failure": the TLS handshake failed or the
    # certificate did not verify. Postfix reports TLS failures the same way.
    "tls": ("4.7.5", "TLS negotiation failed"),
    # RFC 3463 X.5.0 "Other or undefined protocol status": a reply that made
    # no sense at that point in the dialogue.
    "protocol": ("4.5.0", "protocol error"),
}


def transport_failure_reply(kind: TransportFailure | str, detail: str) -> Reply:
    """A synthetic reply for a failure that produced no SMTP reply.

    The code is 451 (RFC 5321 §4.2.3 "local error in processing"), so the
    rest of the pipeline treats it like any temporary failure; ``kind``
    (see TRANSPORT_FAILURES) picks the enhanced code and ``detail`` (e.g.
    "mx1.example.com[192.0.2.1]:25: [Errno 111]") is appended to the text.
    """
    try:
        enhanced, what = TRANSPORT_FAILURES[kind]
    except KeyError:
        raise ValueError(f"unknown transport failure kind {kind!r}") from None
    text = f"{what}: {detail}" if detail else what
    # A reply's text is one wire line per "\n"; a detail from an exception
    # must not invent extra lines.
    return Reply(451, enhanced, " ".join(text.split()))


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


def is_blocked_reply(reply: Reply, patterns: Sequence[str] = DEFAULT_BLOCK_PATTERNS) -> bool:
    """True when a permanent rejection blames our sending IP or domain's standing.

    Only policy rejections qualify: an enhanced code of class 5, subject 7
    (RFC 3463 X.7.x "security or policy status", e.g. 5.7.1 or Microsoft's
    5.7.606), or, from servers that send no enhanced code, 550/554. The text
    must then match one of ``patterns`` (case-insensitive regexes). An
    enhanced code of any other subject (550 5.1.1 user unknown) is never a
    block, whatever the text says. Temporary rejections are not blocks: they
    are retried anyway.
    """
    if not reply.is_permanent:
        return False
    if reply.enhanced is not None:
        if not reply.enhanced.startswith("5.7."):
            return False
    elif reply.code not in (550, 554):
        return False
    return any(re.search(p, reply.text, re.IGNORECASE) for p in patterns)


def enhanced_from_reply(reply: Reply) -> str:
    """The reply's enhanced status code, or one derived from its basic code.

    RFC 3463 §3.1: without a more specific code, X.0.0 of the matching class
    (2.0.0, 4.0.0, 5.0.0; a 3xx intermediate reply counts as success). An
    enhanced code whose class contradicts the basic code is ignored in the
    same way: the two must agree (RFC 2034 §4), and the basic code is the one
    SMTP acts on.
    """
    klass = {2: "2", 3: "2", 4: "4", 5: "5"}.get(reply.code // 100)
    if klass is None:
        raise ValueError(f"not an SMTP reply code: {reply.code}")
    enhanced = reply.enhanced
    if enhanced and _ENHANCED.fullmatch(enhanced) and enhanced[0] == klass:
        return enhanced
    return f"{klass}.0.0"


def parse_reply_text(code: int, lines: list[str]) -> Reply:
    """Build a Reply from a code and the text of each reply line (code stripped).

    A leading enhanced status code ("5.1.1 ") is split off when its class
    digit matches the first digit of ``code`` (RFC 2034 §4; syntax RFC 3463 §2);
    otherwise it is left as text. RFC 2034 puts the code on every line of a
    multi-line reply, so the same code is stripped from later lines too. The
    lines are joined with "\\n" (see Reply.lines).
    """
    enhanced: str | None = None
    if lines:
        match = _ENHANCED.match(lines[0])
        rest = lines[0][match.end() :] if match else ""
        if match and str(code)[0] == match.group(1) and rest[:1] in ("", " "):
            enhanced = match.group(0)
    if enhanced is None:
        return Reply(code, None, "\n".join(lines))
    prefix = enhanced + " "
    texts = ["" if line == enhanced else line.removeprefix(prefix) for line in lines]
    return Reply(code, enhanced, "\n".join(texts))
