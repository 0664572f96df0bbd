"""The HTTP API, served by aiohttp inside ``ferry serve``'s event loop.

No second process and no signal handling of its own: ``Service`` starts and stops it
beside the SMTP listeners. Every route is declared once in :data:`ROUTES` (method, path,
scope, summary); the router and the OpenAPI document are both built from that table, so
they cannot drift apart.

Errors always have one shape: ``{"error": {"code": "...", "message": "..."}}``.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ferry.config import RelayConfig
from ferry.delivery.routing import parse_route_target
from ferry.events import HttpAuthFailed, HttpListening, emit
from ferry.http.limits import RateLimiter
from ferry.http.requests import RequestError, Submission, parse_submission
from ferry.http.tokens import Scope, Token, TokenStore, allows
from ferry.idempotency import fingerprint, parse_idempotency_key
from ferry.queue.base import IdempotencyRecord, IdempotencyReplay, new_queue_id
from ferry.queue.outbox import EVENT_TYPES

if TYPE_CHECKING:
    from ferry.service import Service

logger = logging.getLogger("ferry.http")

Handler = Callable[["Api", web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine code, a human message."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers or None
    )


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: Scope | None  # None: no token needed
    summary: str
    status: int = 200


def tokens_path(config: RelayConfig) -> Path:
    return Path(config.http.tokens_file) if config.http.tokens_file else config.data_dir / "tokens"


def max_request_size(config: RelayConfig) -> int:
    if config.http.max_request_size:
        return config.http.max_request_size
    # base64 is 4/3 of the message, plus room for the JSON around it.
    return config.server.max_message_size * 4 // 3 + 65536


class Api:
    """The application and its listeners."""

    def __init__(
        self, config: RelayConfig, service: Service, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.service = service
        self.clock = clock
        self.tokens = TokenStore(tokens_path(config))
        self.limiter = RateLimiter(config.http.rate_limit, config.http.rate_burst)
        self.metrics_networks = [
            ipaddress.ip_network(n, strict=False) for n in config.http.metrics_networks
        ]
        self.idempotency_ttl = config.http.idempotency_ttl  # seconds, parsed at load
        self._in_flight: set[str] = set()
        self.auth_failures = 0
        self._runner: web.AppRunner | None = None
        self.addresses: list[tuple[str, int]] = []

    # -- life --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=max_request_size(self.config), middlewares=[self._middleware]
        )
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._bind(route))
        return app

    def _bind(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            self._authorise(request, route)
            return await route.handler(self, request)

        return handle

    async def start(self) -> None:
        http = self.config.http
        context: ssl.SSLContext | None = None
        if http.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(http.tls_cert, http.tls_key)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        for listener in http.listen:
            site = web.TCPSite(self._runner, listener.address, listener.port, ssl_context=context)
            await site.start()
            server = site._server  # the bound port, also when 0 was asked for
            if server is not None:
                for sock in server.sockets:  # type: ignore[attr-defined]
                    self.addresses.append(sock.getsockname()[:2])
        emit(HttpListening(",".join(f"{h}:{p}" for h, p in self.addresses)))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- every request -----------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, **exc.headers)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, "too_large", f"request body larger than {max_request_size(self.config)} bytes"
            )
        except web.HTTPMethodNotAllowed as exc:
            return error_response(
                405, "method_not_allowed", f"use {', '.join(exc.allowed_methods)}"
            )
        except web.HTTPNotFound:
            return error_response(404, "not_found", f"no such endpoint: {request.path}")
        except web.HTTPException as exc:
            return error_response(exc.status, "http_error", exc.reason)
        except Exception:
            logger.exception("HTTP handler failed: %s %s", request.method, request.path)
            return error_response(500, "internal", "internal error (see the server log)")

    def _authorise(self, request: web.Request, route: Route) -> None:
        if route.scope is None:
            return
        peer = request.remote or ""
        if route.path == "/metrics" and self._metrics_open_to(peer):
            return
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        token = self.tokens.check(presented.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            self.auth_failures += 1
            # Never the presented value: a token must not reach a log.
            reason = "no token" if not header else "unknown token"
            emit(HttpAuthFailed(peer, request.path, reason))
            raise ApiError(
                401,
                "unauthorized",
                "a valid API token is required",
                **{"WWW-Authenticate": 'Bearer realm="ferry"'},
            )
        if not allows(token.scope, route.scope):
            self.auth_failures += 1
            reason = f"scope {token.scope} lacks {route.scope}"
            emit(HttpAuthFailed(peer, request.path, reason, token.name))
            raise ApiError(403, "forbidden", f"token {token.name!r} lacks the {route.scope} scope")
        wait = self.limiter.check(token.name, self.clock())
        if wait:
            raise ApiError(
                429,
                "rate_limited",
                "too many requests for this token",
                **{"Retry-After": str(max(1, round(wait)))},
            )
        request["ferry_token"] = token

    def _metrics_open_to(self, peer: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in net for net in self.metrics_networks)

    # -- injection ---------------------------------------------------------------

    async def inject(self, request: web.Request) -> web.StreamResponse:
        token: Token = request["ferry_token"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the request body is not JSON") from None
        key_header = request.headers.get("Idempotency-Key")
        key: str | None = None
        if key_header is not None:
            parsed = parse_idempotency_key(key_header)
            if parsed is None:
                raise ApiError(
                    400,
                    "bad_idempotency_key",
                    "Idempotency-Key must be a quoted string or a token, 1-255 chars",
                )
            key = f"token:{token.name}:{parsed}"
        now = self.clock()
        try:
            submission = parse_submission(body, hostname=self.config.server.hostname, now=now)
            self._check_policy(submission)
        except RequestError as exc:
            raise ApiError(422, "invalid_message", str(exc)) from None
        if key is None:
            qid = await self._submit(submission, token, None)
            return web.json_response(self._accepted(qid, submission), status=202)
        print_ = fingerprint(body)
        # One process holds the key while its request is being committed; the queue's
        # transaction makes it race-free across processes and restarts.
        if key in self._in_flight:
            raise ApiError(409, "in_progress", "a request with this Idempotency-Key is in progress")
        self._in_flight.add(key)
        try:
            existing = await self._queue().idempotency(key, now=now)
            if existing is None:
                qid = new_queue_id(now)
                answer = self._accepted(qid, submission)
                record = IdempotencyRecord(
                    key, print_, qid, json.dumps(answer), now + self.idempotency_ttl
                )
                try:
                    await self._submit(submission, token, record)
                    return web.json_response(answer, status=202)
                except IdempotencyReplay as replay:
                    existing = replay.record
            if existing.fingerprint != print_:
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request",
                )
            return web.json_response(
                json.loads(existing.response), status=202, headers={"Idempotent-Replayed": "true"}
            )
        finally:
            self._in_flight.discard(key)

    def _queue(self) -> Any:
        if self.service.queue is None:
            raise ApiError(503, "unavailable", "the relay is not running")
        return self.service.queue

    def _check_policy(self, submission: Submission) -> None:
        size = len(submission.envelope.data)
        if size > self.config.server.max_message_size:
            # RFC 1870's limit applies to HTTP too (SMTP answers 552 5.3.4).
            raise RequestError(
                "data",
                f"message size {size} exceeds the limit of "
                f"{self.config.server.max_message_size} bytes",
            )
        if submission.route is not None:
            # The engine's own route parser: what it accepts, delivery can follow.
            names = {h.name for h in self.config.smart_hosts}
            try:
                parse_route_target(submission.route, names, domain="route.invalid", mx_port=25)
            except ValueError as exc:
                raise RequestError("route", str(exc)) from None

    async def _submit(
        self, submission: Submission, token: Token, record: IdempotencyRecord | None
    ) -> str:
        envelope = submission.envelope
        envelope.auth_user = f"token:{token.name}"
        envelope.client_address = None
        if submission.route:
            envelope.extra["route"] = submission.route
        if submission.metadata:
            envelope.extra["metadata"] = json.dumps(submission.metadata, sort_keys=True)
        queue_id = record.queue_id if record else None
        return await self.service.submit(
            envelope, queue_id=queue_id, idempotency=record, client="http"
        )

    @staticmethod
    def _accepted(qid: str, submission: Submission) -> dict[str, Any]:
        return {
            "id": qid,
            "recipients": [
                {"address": r.address, "status": "queued"} for r in submission.envelope.recipients
            ],
        }

    # -- reading -----------------------------------------------------------------

    async def message(self, request: web.Request) -> web.StreamResponse:
        from ferry.delivery.retry import fill_give_up, policy_for
        from ferry.operations import message_json

        info = await self._queue().get(request.match_info["id"])
        if info is None:
            raise ApiError(404, "not_found", f"no message {request.match_info['id']}")
        # The shape of `ferry queue show --json`, from the same function.
        fill_give_up(policy_for(self.config), info)
        return web.json_response(message_json(info, history=True))

    # -- queue control: the same functions as `ferry queue ...` (ferry.operations) ----------

    def _selection(self, params: Any, *, ids: tuple[str, ...] = ()) -> Any:
        from ferry.operations import selection

        def text(key: str) -> str | None:
            value = params.get(key)
            if value is not None and not isinstance(value, str):
                raise ApiError(400, "bad_filter", f"{key} must be a string")
            return value

        everything = params.get("all") in (True, "1", "true", "yes")
        try:
            return selection(
                status=text("status"),
                domain=text("domain"),
                sender=text("sender"),
                recipient=text("recipient"),
                older_than=text("older_than"),
                newer_than=text("newer_than"),
                reply=text("reply"),
                ids=ids,
                everything=everything,
            )
        except ValueError as exc:
            raise ApiError(400, "bad_filter", str(exc).replace("--", "")) from None

    async def list_messages(self, request: web.Request) -> web.StreamResponse:
        """``ferry queue list``: waiting mail (``all=1`` for everything), newest first."""
        from ferry.delivery.retry import policy_for
        from ferry.operations import listed_json

        sel = self._selection(request.query)
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            raise ApiError(400, "bad_query", "limit is an integer") from None
        now = self.clock()
        page = await self._queue().list_page(
            sel, now=now, limit=limit, after=request.query.get("after")
        )
        policy = policy_for(self.config)
        return web.json_response(
            {
                "messages": [listed_json(m, now, policy) for m in page.messages],
                "next_page_after": page.after,
            }
        )

    async def bulk(self, request: web.Request) -> web.StreamResponse:
        """``ferry queue retry|hold|release|cancel|remove``: IDs and/or a filter."""
        from ferry import operations

        action = request.match_info["action"]
        if action not in ("retry", "hold", "release", "cancel", "remove"):
            raise ApiError(404, "not_found", f"no bulk action {action!r}")
        try:
            body = await request.json() if request.can_read_body else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        ids = body.get("ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ApiError(400, "bad_filter", "ids must be a list of queue IDs")
        filters = body.get("filter", {})
        if not isinstance(filters, dict):
            raise ApiError(400, "bad_filter", "filter must be an object")
        if not ids and not filters and body.get("all_matching") is not True:
            # As the CLI's --yes: touching the whole queue must be asked for in words.
            raise ApiError(
                400, "no_selection", "give ids, a filter, or all_matching: true for everything"
            )
        sel = self._selection(filters, ids=tuple(ids))
        token: Token = request["ferry_token"]
        result = await operations.bulk(
            self._queue(),
            self.config,
            action,  # type: ignore[arg-type]
            sel,
            dsn=body.get("dsn") is True,
            by=f"token:{token.name}",
            now=self.clock(),
        )
        return web.json_response(
            {
                "action": result.action,
                "messages": result.messages,
                "recipients": result.recipients,
                "dsns": result.dsns,
            }
        )

    async def suspensions(self, request: web.Request) -> web.StreamResponse:
        found = await self._queue().suspensions(now=self.clock())
        return web.json_response([_plain(s) for s in found])

    async def suspend(self, request: web.Request) -> web.StreamResponse:
        """``ferry queue suspend``: pause delivery to a domain (``*``: all)."""
        from ferry import operations

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the request body is not JSON") from None
        domain = body.get("domain") if isinstance(body, dict) else None
        if not isinstance(domain, str) or not domain:
            raise ApiError(422, "invalid_suspension", "domain: a destination domain, or '*'")
        duration = body.get("for")
        reason = body.get("reason", "")
        if duration is not None and not isinstance(duration, str | int | float):
            raise ApiError(422, "invalid_suspension", "for: a duration such as '2h'")
        token: Token = request["ferry_token"]
        try:
            found = await operations.suspend(
                self._queue(),
                domain,
                duration=str(duration) if duration is not None else None,
                reason=str(reason),
                by=f"token:{token.name}",
                now=self.clock(),
            )
        except ValueError as exc:
            raise ApiError(422, "invalid_suspension", str(exc)) from None
        return web.json_response(_plain(found), status=201)

    async def resume(self, request: web.Request) -> web.StreamResponse:
        from ferry import operations

        token: Token = request["ferry_token"]
        domain = request.match_info["domain"]
        if not await operations.resume(self._queue(), domain, by=f"token:{token.name}"):
            raise ApiError(404, "not_found", f"{domain} is not suspended")
        return web.json_response({"resumed": domain})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        stats = await self._queue().statistics(now=self.clock())
        return web.json_response(stats.as_dict())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The event log in order, from a cursor (the last ``id`` the caller has)."""
        q = request.query
        try:
            after = int(q.get("after", "0"))
            limit = min(1000, max(1, int(q.get("limit", "100"))))
        except ValueError:
            raise ApiError(400, "bad_query", "after and limit are integers") from None
        types = [t for t in q.get("types", "").split(",") if t]
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise ApiError(400, "bad_query", f"unknown event types: {', '.join(unknown)}")
        if not self._queue().event_log:
            raise ApiError(503, "unavailable", "the event log is off")
        found = await self._queue().events(after=after, types=types, limit=limit)
        body = [e.as_json() for e in found]
        cursor = found[-1].id if found else after
        return web.json_response({"events": body, "next": cursor})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        from ferry.http.openapi import document

        return web.json_response(document(ROUTES))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        from ferry.http.metrics import render

        body, content_type = await render(self)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})


def _plain(value: Any) -> Any:
    """Dataclasses, enums and bytes as JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.name.lower() if isinstance(value.value, int) else value.value
    return value


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/messages", Api.inject, "inject", "Queue a message (raw or structured)", 202),
    Route("GET", "/v1/messages", Api.list_messages, "read", "Waiting mail (filters as the CLI)"),
    Route("GET", "/v1/messages/{id}", Api.message, "read", "A queued message and its recipients"),
    Route(
        "POST", "/v1/messages/{action}", Api.bulk, "admin", "Bulk retry|hold|release|cancel|remove"
    ),
    Route("GET", "/v1/suspensions", Api.suspensions, "read", "Suspended destinations"),
    Route("POST", "/v1/suspensions", Api.suspend, "admin", "Suspend a destination", 201),
    Route("DELETE", "/v1/suspensions/{domain}", Api.resume, "admin", "Resume a destination"),
    Route("GET", "/v1/stats", Api.stats, "read", "Queue statistics"),
    Route("GET", "/v1/events", Api.events, "read", "The event log from a cursor (replay)"),
    Route("GET", "/v1/openapi.json", Api.openapi, None, "This API's OpenAPI document"),
    Route("GET", "/v1/health", Api.health, None, "Liveness"),
    Route("GET", "/metrics", Api.metrics, "read", "Prometheus metrics (or from metrics_networks)"),
)

__all__ = ["ROUTES", "Api", "ApiError", "Route"]
