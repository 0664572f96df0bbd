"""``POST /v1/messages`` bodies to envelopes: pure functions, no I/O.

Two forms (RFC 5322 messages either way):

* raw: ``{"mail_from", "rcpt_to": [...], "data": base64 of the whole message}``;
* structured: ``from``, ``to``/``cc``/``bcc``, ``subject``, ``text``, ``html``,
  ``headers``, ``attachments`` (``filename``, ``content_type``, base64 ``content``), built
  into a MIME message by the standard library's ``email`` package.

Both take ``priority``, ``notify``, ``envid``, ``route`` and ``metadata``. Every address
is checked by the same function as SMTP's MAIL and RCPT (``check_mailbox``).
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from ferry.envelope import EnvelopeIn, Priority, RecipientIn
from ferry.intake.commands import check_mailbox

#: Header fields the structured form writes itself.
_RESERVED = frozenset({"from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version"})
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_PRIORITIES = {p.name.lower(): p for p in Priority}
MAX_RECIPIENTS = 1000
MAX_METADATA = 32


class RequestError(ValueError):
    """A request body that cannot become a message: ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(slots=True)
class Submission:
    """What a request asks for, checked: the envelope plus what travels beside it."""

    envelope: EnvelopeIn
    metadata: dict[str, str] = field(default_factory=dict)
    route: str | None = None


def _str(body: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(key, "is required")
        return None
    if not isinstance(value, str):
        raise RequestError(key, "must be a string")
    return value


def _address(value: Any, where: str, *, utf8: bool = True, allow_null: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(where, "must be an address string")
    if allow_null and value == "":
        return ""
    problem = check_mailbox(value, utf8=utf8)
    if problem:
        raise RequestError(where, problem)
    return value


def _address_list(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RequestError(key, "must be a list of addresses")
    return [_display_address(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _display_address(value: Any, where: str) -> str:
    """An address as written in a header ("Name <a@b>" or "a@b"), checked."""
    if not isinstance(value, str):
        raise RequestError(where, "must be an address string")
    _, addr = email.utils.parseaddr(value)
    _address(addr, where)
    return value


def _bare(display: str) -> str:
    return email.utils.parseaddr(display)[1]


def _common(body: Mapping[str, Any], envelope: EnvelopeIn) -> Submission:
    priority = body.get("priority", "normal")
    if not isinstance(priority, str) or priority.lower() not in _PRIORITIES:
        raise RequestError("priority", f"one of {', '.join(_PRIORITIES)}")
    envelope.priority = _PRIORITIES[priority.lower()]
    notify = body.get("notify")
    if notify is not None:
        if isinstance(notify, str):
            notify = [notify]
        items = [str(n).upper() for n in notify] if isinstance(notify, list) else None
        # RFC 3461 §4.1: NEVER alone, or any of SUCCESS, FAILURE, DELAY.
        if not items or not (items == ["NEVER"] or set(items) <= _NOTIFY):
            raise RequestError("notify", "NEVER, or a list of SUCCESS, FAILURE, DELAY")
        for r in envelope.recipients:
            r.notify = ",".join(items)
    envid = _str(body, "envid")
    if envid is not None:
        # RFC 3461 §4.4: printable US-ASCII, at most 100 characters.
        if not envid or len(envid) > 100 or not all(33 <= ord(c) <= 126 for c in envid):
            raise RequestError("envid", "1-100 printable ASCII characters")
        envelope.envid = envid
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise RequestError("metadata", "must be an object of string values")
    if len(metadata) > MAX_METADATA:
        raise RequestError("metadata", f"at most {MAX_METADATA} keys")
    route = _str(body, "route")
    return Submission(envelope, dict(metadata), route)


def _recipients(addresses: list[str], where: str) -> list[RecipientIn]:
    if not addresses:
        raise RequestError(where, "at least one recipient is required")
    if len(addresses) > MAX_RECIPIENTS:
        raise RequestError(where, f"at most {MAX_RECIPIENTS} recipients")
    seen: dict[str, RecipientIn] = {}
    for a in addresses:
        seen.setdefault(a.lower(), RecipientIn(a))
    return list(seen.values())


def parse_raw(body: Mapping[str, Any]) -> Submission:
    sender = _address(body.get("mail_from"), "mail_from", allow_null=True)
    rcpts = body.get("rcpt_to")
    if not isinstance(rcpts, list):
        raise RequestError("rcpt_to", "must be a list of addresses")
    addresses = [_address(r, f"rcpt_to[{i}]") for i, r in enumerate(rcpts)]
    data_b64 = _str(body, "data", required=True)
    assert data_b64 is not None
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("data", "must be base64") from None
    if not data:
        raise RequestError("data", "is empty")
    envelope = EnvelopeIn(sender=sender, recipients=_recipients(addresses, "rcpt_to"), data=data)
    envelope.smtputf8 = not (sender.isascii() and all(a.isascii() for a in addresses))
    envelope.body_8bit = not data.isascii()
    return _common(body, envelope)


def build_message(body: Mapping[str, Any], *, hostname: str, now: float) -> bytes:
    """The structured form as an RFC 5322 / MIME message (CRLF line ends)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    sender = _display_address(body.get("from"), "from")
    msg["From"] = sender
    for key, name in (("to", "To"), ("cc", "Cc")):
        values = _address_list(body, key)
        if values:
            msg[name] = ", ".join(values)
    subject = _str(body, "subject")
    if subject is not None:
        msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(now, localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    headers = body.get("headers", {})
    if not isinstance(headers, dict):
        raise RequestError("headers", "must be an object")
    for name, value in headers.items():
        if not isinstance(value, str) or not name or not name.isascii():
            raise RequestError(f"headers.{name}", "must be a string value with an ASCII name")
        if name.lower() in _RESERVED:
            raise RequestError(f"headers.{name}", "is set from the request's own fields")
        if any(c in name for c in ": \t\r\n") or "\r" in value or "\n" in value:
            raise RequestError(f"headers.{name}", "a header name or value may not break lines")
        msg[name] = value
    text, html = _str(body, "text"), _str(body, "html")
    if text is None and html is None:
        raise RequestError("text", "text or html is required")
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    attachments = body.get("attachments", [])
    if not isinstance(attachments, list):
        raise RequestError("attachments", "must be a list")
    for i, att in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(att, dict):
            raise RequestError(where, "must be an object")
        filename = _str(att, "filename", required=True)
        ctype = _str(att, "content_type") or "application/octet-stream"
        if ctype.count("/") != 1:
            raise RequestError(f"{where}.content_type", "must be type/subtype")
        try:
            content = base64.b64decode(_str(att, "content", required=True) or "", validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}.content", "must be base64") from None
        maintype, subtype = ctype.split("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def parse_structured(body: Mapping[str, Any], *, hostname: str, now: float) -> Submission:
    data = build_message(body, hostname=hostname, now=now)
    sender_display = body.get("from")
    sender = _bare(sender_display) if isinstance(sender_display, str) else ""
    addresses = [_bare(a) for k in ("to", "cc", "bcc") for a in _address_list(body, k)]
    envelope = EnvelopeIn(sender=sender, recipients=_recipients(addresses, "to"), data=data)
    envelope.smtputf8 = not (sender.isascii() and all(a.isascii() for a in addresses))
    envelope.body_8bit = not data.isascii()
    return _common(body, envelope)


def parse_submission(body: Any, *, hostname: str, now: float) -> Submission:
    """Either form, by its keys: ``data`` means raw."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    if "data" in body:
        return parse_raw(body)
    if "from" in body:
        return parse_structured(body, hostname=hostname, now=now)
    raise RequestError("body", "give mail_from/rcpt_to/data (raw) or from/to/... (structured)")


__all__ = [
    "RequestError",
    "Submission",
    "build_message",
    "parse_raw",
    "parse_structured",
    "parse_submission",
]
