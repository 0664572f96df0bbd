"""One validated configuration model: ``ferry.toml`` + ``FERRY_*`` + the seed's ``SMTP_*``.

Precedence, lowest to highest: built-in defaults, the TOML file, the SMTPy seed's
``SMTP_*`` variables, then ``FERRY_<SECTION>__<KEY>`` variables. The environment is
passed in as a mapping (default ``os.environ``) so tests never have to patch it.

We merge the sources ourselves and validate once with pydantic: that keeps error
messages precise ("server.listen.0.port: ...") and lets the seed's flat variables map
onto nested keys without a custom settings source.

This model is the only validator: every value the engine would otherwise parse at run
time (durations, route targets, listener modes, files that must exist, TLS key pairs,
DKIM keys, nameservers, patterns) is parsed here, when the configuration loads, by the
same function the engine uses. ``ferry config check`` and ``ferry serve`` both call
:meth:`RelayConfig.load`, so a configuration one accepts the other runs.

Paths: a relative path written in a config file is relative to that file's directory;
one from the environment is relative to the current directory. Every path is absolute
after :meth:`RelayConfig.load`. The data directory (``queue.path``) defaults to
``$FERRY_DATA``, else ``ferry-data`` beside the config file, else ``./ferry-data``;
``server.users_file`` and ``dkim.keys_dir`` default to ``users`` and ``dkim`` inside it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ferry.domains import a_label_keys, to_a_labels
from ferry.durations import format_duration, parse_duration
from ferry.envelope import Address
from ferry.routes import validate_routes

ListenMode = Literal["mta", "submission", "smtps"]
DeliveryMode = Literal["direct", "relay", "hybrid", "smart"]


#: Phrases that, in a policy rejection, mean "your IP or domain is on a list".
#: Word boundaries keep "greylisted"/"whitelisted" and "not listed in
#: directory" (an unknown user) out.
DEFAULT_BLOCK_PATTERNS: tuple[str, ...] = (
    r"block\s?list",
    r"black\s?list",
    r"deny\s?list",
    r"blocked using",
    r"spamhaus",
    r"spamcop",
    r"barracuda",
    r"reputation",
    r"(?<!not )\blisted\b",
    r"\brbl\b",
    r"\bdnsbl\b",
    r"\bbanned\b",
)


class ConfigError(Exception):
    """An invalid configuration: the message names the key and the problem."""


def _seconds(value: object) -> float:
    # The one duration parser (ferry.durations) reads config values too.
    if not isinstance(value, str | int | float):
        raise ValueError(f"not a duration: {value!r}")
    return parse_duration(value)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0 seconds")
    return value


_AS_TEXT = PlainSerializer(format_duration, return_type=str, when_used="json")

#: A duration in seconds: ``"90s"``, ``"5m"``, ``"1h30m"``, ``"4d"``, ``"1w"`` or a number
#: of seconds. Shown as text (``"4d"``) in ``ferry config check``.
Duration = Annotated[float, BeforeValidator(_seconds), _AS_TEXT]
#: A duration that must be more than zero (timeouts, lifetimes, retry delays).
PositiveDuration = Annotated[float, BeforeValidator(_seconds), AfterValidator(_positive), _AS_TEXT]


def _existing_file(value: str) -> str:
    """A path that must name a readable file when it is set (empty = not used)."""
    # Worded as the run-time errors are ("<path>: <reason>"), so both read alike.
    if value and not Path(value).is_file():
        raise ValueError(f"{value}: no such file")
    if value and not os.access(value, os.R_OK):
        raise ValueError(f"{value}: permission denied")
    return value


#: A file that must exist when set (checked when the configuration loads, not at first use).
ExistingFile = Annotated[str, AfterValidator(_existing_file)]


class _Model(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Listener(_Model):
    """One listening socket."""

    address: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    mode: ListenMode = "mta"

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        ipaddress.ip_address(v)  # raises ValueError with a clear message
        return v


class ServerConfig(_Model):
    """Inbound SMTP (intake)."""

    hostname: str = Field(default_factory=socket.getfqdn)
    listen: list[Listener] = Field(default_factory=lambda: [Listener()])
    tls_cert: ExistingFile = ""
    tls_key: ExistingFile = ""
    users_file: str = ""  # empty: <queue.path>/users
    local_domains: list[str] = Field(default_factory=list)
    relay_domains: list[str] = Field(default_factory=list)
    relay_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_message_size: int = Field(35_000_000, ge=1024)
    max_recipients: int = Field(1000, ge=1)
    max_line_length: int = Field(4096, ge=1000)
    bare_lf: Literal["reject", "normalize"] = "reject"
    max_connections: int = Field(1000, ge=1)
    max_connections_per_ip: int = Field(50, ge=1)
    command_timeout: PositiveDuration = 300.0
    data_timeout: PositiveDuration = 600.0
    # DATA deadline = max(data_timeout, size / data_min_rate) octets/s (see intake/server.py)
    data_min_rate: int = Field(10_000, ge=1)
    # RFC 5321 §4.1.4: MAIL/RCPT/DATA before HELO/EHLO get 503 (false: tolerated)
    require_helo: bool = True
    max_errors: int = Field(20, ge=1)
    # Processes that run the SMTP sessions (ferry/intake/process.py): `ferry serve`
    # accepts each connection (and applies the connection limits) and hands it to the
    # least busy one, so intake uses more than the one core of the process that writes
    # the queue. 0: sessions run in `ferry serve` itself (always with a before_queue hook).
    workers: int = Field(1, ge=0, le=16)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        # It goes into the banner, EHLO and Received: (RFC 5321 §4.1.1.1: a domain).
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError(f"{v!r} is not a host name")
        return v.strip()

    @field_validator("relay_networks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a network: {exc}") from None
        return v

    @field_validator("local_domains", "relay_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        # One form for every domain table: IDNA A-labels, lower case (ferry.domains).
        return [to_a_labels(d) for d in v if d.strip()]

    @field_validator("listen")
    @classmethod
    def _distinct(cls, v: list[Listener]) -> list[Listener]:
        seen = set()
        for item in v:
            where = (ipaddress.ip_address(item.address), item.port)
            if item.port and where in seen:  # port 0: the system picks a free one
                raise ValueError(f"{item.address} port {item.port} is listed twice")
            seen.add(where)
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise ValueError(f"server.{missing}: needed too when one of tls_cert/tls_key is set")
        if self.tls_cert:
            from ferry.tls import server_context  # the loader `ferry serve` uses

            try:
                server_context(self.tls_cert, self.tls_key)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"server.tls_cert: cannot load {self.tls_cert} with {self.tls_key}: {exc}"
                ) from None
        return self


class QueueConfig(_Model):
    """The durable queue."""

    path: str = "./ferry-data"  # the data directory; see the module docstring
    backend: Literal["sqlite", "postgres"] = "sqlite"
    # backend = "postgres": libpq's connection string or URI; what it leaves out comes
    # from the standard PG* variables. A password is better in password_file (its first
    # line) or PGPASSWORD / PGPASSFILE than in the DSN; the DSN is never logged.
    dsn: SecretStr = SecretStr("")
    password_file: ExistingFile = ""
    lease_seconds: PositiveDuration = 300.0
    commit_batch: int = Field(256, ge=1)
    # Finished messages' history (envelope, recipients, attempts) is kept this long.
    history_retention: PositiveDuration = 7 * 86400.0
    # SQLite: bodies of this many bytes or more are files in <path>/spool, smaller ones
    # rows in the database (ferry/queue/spool.py; measured in bench/body_storage.py).
    # 0: every body a file; above server.max_message_size: every body a row.
    # (The same default as ferry.queue.sqlite.SPOOL_THRESHOLD; a test holds them equal.)
    spool_threshold: int = Field(16384, ge=0)


class DeliveryConfig(_Model):
    """Outbound delivery."""

    mode: DeliveryMode = "direct"
    hold: bool = False
    workers: int = Field(1, ge=0, le=16)
    mx_port: int = Field(25, ge=1, le=65535)
    source_address: str = ""
    max_concurrent_deliveries: int = Field(20, ge=1)
    connections_per_destination: int = Field(5, ge=1)
    connections_per_minute: int = Field(10, ge=1)
    messages_per_connection: int = Field(100, ge=1)
    retry_schedule: list[PositiveDuration] = Field(
        default_factory=lambda: [60.0 * 2**i for i in range(6)] + [3600.0, 7200.0, 14400.0],
        min_length=1,
    )
    # Unset: the lifetime alone governs (issue 11.1); set: whichever limit comes first.
    max_retries: int | None = Field(None, ge=0)
    message_lifetime: PositiveDuration = 4 * 86400.0
    delay_warning_after: Duration = 4 * 3600.0
    connect_timeout: PositiveDuration = 30.0
    command_timeout: PositiveDuration = 300.0
    bounces: bool = True
    bounce_sender: str = ""
    # Where undeliverable DSNs (double bounces) are reported; "" = postmaster@<hostname>.
    postmaster: str = ""
    messages_per_minute: int = Field(0, ge=0)  # per destination; 0 = no limit
    messages_per_hour: int = Field(0, ge=0)
    # Hybrid and smart modes: 5xx replies that blame our reputation go to the relay.
    block_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCK_PATTERNS))
    smart_window: int = Field(20, ge=2)
    smart_min_samples: int = Field(5, ge=1)
    smart_threshold: float = Field(0.5, gt=0, le=1)
    smart_cooldown: Duration = 30 * 60.0
    # A smart host failing at the transport level rests this long (doubling, to 10 m).
    smart_host_cooldown: Duration = 30.0

    @field_validator("bounce_sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        if v:
            Address.parse(v)  # the envelope's own address split
        return v

    @field_validator("source_address")
    @classmethod
    def _source(cls, v: str) -> str:
        if v:
            ipaddress.ip_address(v)
        return v

    @field_validator("block_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {i} ({pattern!r}) is not a regular expression: {exc}"
                ) from None
        return v


class DnsConfig(_Model):
    """Resolver used for MX lookups."""

    nameservers: list[str] = Field(default_factory=list)
    timeout: PositiveDuration = 10.0
    mx_cache_ttl: Duration = 3600.0

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, v: list[str]) -> list[str]:
        from ferry.resolver import parse_nameserver  # the resolver's own parser

        for item in v:
            parse_nameserver(item)
        return v


class DkimConfig(_Model):
    """DKIM signing (SMTP_ENABLE_DKIM)."""

    enabled: bool = True
    keys_dir: str = ""  # empty: <queue.path>/dkim
    selector: str = "ferry"
    # Signs mail whose From: and envelope domains have no key of their own (empty: none).
    default_domain: str = ""
    # Domains whose mail is deferred rather than sent unsigned when signing fails.
    required_domains: list[str] = Field(default_factory=list)
    # Keys kept outside keys_dir: domain -> PEM paths (selector = file name stem).
    keys: dict[str, list[ExistingFile]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> DkimConfig:
        if self.selector == "ferry" and not self.default_domain and not self.required_domains:
            return self  # the defaults: valid without loading the DKIM code
        from ferry.dkim.keys import normalize_domain, normalize_selector  # signing's rules

        for key, check, values in (
            ("selector", normalize_selector, [self.selector]),
            (
                "default_domain",
                normalize_domain,
                [self.default_domain] if self.default_domain else [],
            ),
            ("required_domains", normalize_domain, self.required_domains),
        ):
            for value in values:
                try:
                    check(value)
                except ValueError as exc:
                    raise ValueError(f"dkim.{key}: {exc}") from None
        return self

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if v:
            from ferry.dkim.keys import load_key  # the loader signing uses

            for domain, paths in v.items():
                for path in paths:
                    load_key(path, domain)  # ValueError names the file and the problem
        return v


class LogConfig(_Model):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class SmartHost(_Model):
    """An upstream relay (Zetian's SmartHostConfiguration)."""

    name: str
    host: str
    port: int = Field(587, ge=1, le=65535)
    username: str = ""
    password: SecretStr | None = None
    password_file: ExistingFile = ""
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    require_tls: bool = True
    verify_certificate: bool = True
    ca_file: ExistingFile = ""  # extra CA certificate(s) to trust, PEM (a private relay's CA)
    auth: Literal["auto", "plain", "login", "xoauth2"] = "auto"
    oauth_token_file: ExistingFile = ""  # XOAUTH2: a file holding the current access token
    oauth_token_command: str = ""  # XOAUTH2: a command printing the current token
    priority: int = 10
    weight: int = Field(100, ge=1)
    max_connections: int = Field(10, ge=1)
    max_messages_per_connection: int = Field(100, ge=1)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v.strip("[]"))
            return v
        except ValueError:
            return to_a_labels(v) if v.strip() else v  # an IDN host name: A-labels

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # "direct" in any case is the route keyword (ferry.routes), so no host may be called so.
        if not v or any(c in v for c in " ,:*") or v.lower() == "direct":
            raise ValueError(
                "a smart host name has no spaces, commas, colons or '*' and is not 'direct'"
            )
        return v


class DestinationLimits(_Model):
    """Traffic shaping for one destination (a recipient domain or an MX group)."""

    connections: int | None = Field(None, ge=1)
    connections_per_minute: int | None = Field(None, ge=1)
    messages_per_minute: int | None = Field(None, ge=1)
    messages_per_hour: int | None = Field(None, ge=1)


class HttpListener(_Model):
    """One HTTP listening socket (the API, metrics and webhooks' replay)."""

    address: str = "127.0.0.1"
    port: int = Field(8025, ge=0, le=65535)

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        ipaddress.ip_address(v)
        return v


class HttpConfig(_Model):
    """The HTTP API (``/v1/...``) and ``/metrics``; off while ``listen`` is empty."""

    listen: list[HttpListener] = Field(default_factory=list)
    tls_cert: str = ""
    tls_key: str = ""
    #: API tokens (``ferry token create``), hashed; default: ``<queue.path>/tokens``.
    tokens_file: str = ""
    #: Clients from these networks may read ``/metrics`` without a token.
    metrics_networks: list[str] = Field(default_factory=list)
    #: Largest request body in bytes; 0 = room for a ``server.max_message_size``
    #: message in base64 (4/3 of it) plus 64 KiB of JSON around it.
    max_request_size: int = Field(0, ge=0)
    #: Requests per second each token may make (a token bucket), and its burst.
    rate_limit: float = Field(200.0, gt=0)
    rate_burst: int = Field(400, ge=1)
    #: How long an ``Idempotency-Key`` is remembered.
    idempotency_ttl: PositiveDuration = 86400.0

    @field_validator("metrics_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @model_validator(mode="after")
    def _pair(self) -> HttpConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("http.tls_cert and http.tls_key go together")
        return self


#: What webhooks can subscribe to (the event log's types).
WebhookEvent = Literal[
    "received", "delivered", "deferred", "failed", "expired", "bounced", "delayed", "operator"
]


class Webhook(_Model):
    """One ``[[webhooks]]`` endpoint: events POSTed as JSON, signed as Standard Webhooks do."""

    name: str = ""  # default: the URL's host and path
    url: str
    #: The signing secret (``whsec_...`` base64, or any text); two lines = rotation, both sign.
    secret_file: str
    events: list[WebhookEvent] = Field(
        default_factory=lambda: cast(
            "list[WebhookEvent]", ["delivered", "deferred", "failed", "expired", "bounced"]
        )
    )
    #: Events per request: 1 sends one JSON object, more sends a JSON array.
    batch: int = Field(1, ge=1, le=100)
    #: How long an event is retried (exponential backoff) before it is recorded as failed.
    retry_for: Duration = 86400.0
    timeout: PositiveDuration = 10.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("secret_file")
    @classmethod
    def _secret(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"{v}: no such file")
        return v

    @model_validator(mode="after")
    def _named(self) -> Webhook:
        if not self.name:
            rest = self.url.split("://", 1)[1]
            self.name = rest.split("?", 1)[0].rstrip("/")
        return self


class RelayConfig(_Model):
    """The whole of Ferry's configuration (the model behind ``ferry.toml``)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    aliases: dict[str, str | list[str]] = Field(default_factory=dict)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    dkim: DkimConfig = Field(default_factory=DkimConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    webhooks: list[Webhook] = Field(default_factory=list)
    smart_hosts: list[SmartHost] = Field(default_factory=list)
    routes: dict[str, str | list[str]] = Field(default_factory=dict)
    shaping: dict[str, DestinationLimits] = Field(default_factory=dict)

    @field_validator("shaping")
    @classmethod
    def _shaping_keys(cls, v: dict[str, DestinationLimits]) -> dict[str, DestinationLimits]:
        return a_label_keys(v, "shaping")  # compared with A-label recipient domains

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        hooks = [w.name for w in self.webhooks]
        if len(set(hooks)) != len(hooks):
            raise ValueError("webhooks: two endpoints with one name (set name = ...)")
        names = [h.name for h in self.smart_hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"smart_hosts: duplicate name(s) {', '.join(dupes)}")
        if self.delivery.mode == "relay" and not self.smart_hosts:
            raise ValueError(
                "delivery.mode: 'relay' needs at least one [[smart_hosts]] (or SMTP_HOST)"
            )
        # The engine's own route parser: what passes here is what delivery can plan.
        validate_routes(self.routes, set(names), mx_port=self.delivery.mx_port)
        # Files kept in the data directory unless placed elsewhere.
        data = Path(self.queue.path)
        if not self.server.users_file:
            self.server.users_file = str(data / "users")
        if not self.dkim.keys_dir:
            self.dkim.keys_dir = str(data / "dkim")
        return self

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> RelayConfig:
        """Read ``path`` (or ``$FERRY_CONFIG``; none = defaults) and apply the environment.

        The one load path: ``ferry serve``, ``ferry config check``, every other command
        and the Python API call this, so they accept and refuse the same configurations
        with the same words. Raises :class:`ConfigError` naming the key (or variable).
        """
        env = os.environ if env is None else env
        if path is None:
            path = env.get("FERRY_CONFIG") or None
        source = str(path or "environment")
        data: dict[str, Any] = {}
        base = Path.cwd()
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such file") from None
            except IsADirectoryError:
                raise ConfigError(f"{path}: is a directory, not a config file") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from None
            except OSError as exc:  # permission denied, ...
                raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
            # Relative paths in a file mean "next to this file", wherever ferry runs from.
            base = Path(os.path.abspath(path)).parent
            _resolve_paths(data, base)
        try:
            _apply_seed_env(data, env)
            origins = _apply_ferry_env(data, env)
        except ConfigError as exc:
            raise ConfigError(f"invalid configuration ({source}):\n  {exc}") from None
        _resolve_paths(data, Path.cwd())  # paths from the environment: the current directory
        _default_data_dir(data, env, base)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source, origins)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RelayConfig:
        """Load a TOML file, with environment overrides."""
        return cls.load(path)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RelayConfig:
        """Defaults plus the environment (``FERRY_CONFIG`` is honoured)."""
        return cls.load(None, env)

    @property
    def data_dir(self) -> Path:
        return Path(self.queue.path)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data with every secret masked."""
        out = self.model_dump(mode="json")
        for host in out.get("smart_hosts", []):
            if host.get("password"):
                host["password"] = "********"
        return out


def format_validation_error(
    exc: ValidationError, source: str, origins: Mapping[str, str] | None = None
) -> str:
    """Turn pydantic's error list into lines of ``key: problem`` (no traceback).

    ``origins`` maps dotted keys set from ``FERRY_*`` variables to the variable's name,
    so an error in one says where it came from.
    """
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not key or msg.startswith(key + "."):
            # A whole-model check: its message starts with the key itself.
            lines.append(f"  {msg}")
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        for set_key, variable in (origins or {}).items():
            if key == set_key or key.startswith(set_key + "."):
                msg += f" (from {variable})"
                break
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _path_slots(data: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every (table, key) in raw config data whose value is a file system path.

    (``dkim.keys`` holds lists of paths: :func:`_resolve_paths` walks it itself.)
    """
    slots: list[tuple[dict[str, Any], str]] = []

    def table(name: str) -> dict[str, Any]:
        value = data.get(name)
        return value if isinstance(value, dict) else {}

    for section, key in (
        ("server", "tls_cert"),
        ("server", "tls_key"),
        ("server", "users_file"),
        ("queue", "path"),
        ("queue", "password_file"),
        ("dkim", "keys_dir"),
    ):
        slots.append((table(section), key))
    hosts = data.get("smart_hosts")
    for host in hosts if isinstance(hosts, list) else []:
        if isinstance(host, dict):
            slots += [(host, k) for k in ("password_file", "ca_file", "oauth_token_file")]
    return slots


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(base / os.path.expanduser(value))
    return value


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make every relative path in ``data`` absolute, relative to ``base``."""
    for holder, key in _path_slots(data):
        if key in holder:
            holder[key] = _absolute(holder[key], base)
    keys = data.get("dkim", {}).get("keys") if isinstance(data.get("dkim"), dict) else None
    if isinstance(keys, dict):
        for domain, paths in keys.items():
            if isinstance(paths, list):
                keys[domain] = [_absolute(p, base) for p in paths]


def _default_data_dir(data: dict[str, Any], env: Mapping[str, str], base: Path) -> None:
    """``queue.path`` when unset: ``$FERRY_DATA``, else ``ferry-data`` in ``base``."""
    queue = data.setdefault("queue", {})
    if not isinstance(queue, dict) or queue.get("path"):
        return
    from_env = env.get("FERRY_DATA", "").strip()
    queue["path"] = _absolute(from_env, Path.cwd()) if from_env else str(base / "ferry-data")


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _apply_seed_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """The SMTPy seed's variables (SMTP_HOSTNAME, SMTP_DELIVERY_MODE, ...)."""
    if env.get("SMTP_HOSTNAME"):
        data.setdefault("server", {})["hostname"] = env["SMTP_HOSTNAME"]
    if env.get("SMTP_DELIVERY_MODE"):
        data.setdefault("delivery", {})["mode"] = env["SMTP_DELIVERY_MODE"].strip().lower()
    if env.get("SMTP_ENABLE_DKIM"):
        data.setdefault("dkim", {})["enabled"] = _truthy(env["SMTP_ENABLE_DKIM"])
    if env.get("SMTP_HOST"):
        use_ssl = _truthy(env.get("SMTP_USE_SSL", "false"))
        use_tls = _truthy(env.get("SMTP_USE_TLS", "true"))
        port = (env.get("SMTP_PORT") or "").strip()
        if port and not port.isdigit():
            raise ConfigError(f"SMTP_PORT: not a port number: {port!r}")
        host: dict[str, Any] = {
            "name": "default",
            "host": env["SMTP_HOST"],
            "port": int(port or (465 if use_ssl else 587)),
            "tls": "implicit" if use_ssl else ("starttls" if use_tls else "none"),
            "require_tls": use_ssl or use_tls,
        }
        if env.get("SMTP_USER"):
            host["username"] = env["SMTP_USER"]
        if env.get("SMTP_PASSWORD"):
            host["password"] = env["SMTP_PASSWORD"]
        hosts = [h for h in data.get("smart_hosts", []) if h.get("name") != "default"]
        data["smart_hosts"] = [host, *hosts]


_TOP_LEVEL_JSON = frozenset({"aliases", "smart_hosts", "routes", "shaping"})

#: ``FERRY_*`` variables that are not settings: the config file's path, the default
#: data directory, the event loop choice (ferry.runtime), the dev script's virtualenv.
#: Every other ``FERRY_*`` variable must name a setting, or loading fails: a misspelt
#: ``FERRY_DELIVERY_HOLD`` (one underscore) must not be silently ignored.
NOT_SETTINGS: frozenset[str] = frozenset(
    {"FERRY_CONFIG", "FERRY_DATA", "FERRY_EVENT_LOOP", "FERRY_VENV", "FERRY_TEST_PG_DSN"}
)
#: Prefixes of variables for tools around Ferry (the benchmarks), not for Ferry itself.
NOT_SETTINGS_PREFIXES: tuple[str, ...] = ("FERRY_BENCH_",)


def _suggest(name: str) -> str:
    """``FERRY_DELIVERY__HOLD`` for ``FERRY_DELIVERY_HOLD``, when that names a section."""
    rest = name[len("FERRY_") :].lower()
    for section in sorted(RelayConfig.model_fields, key=len, reverse=True):
        if rest.startswith(section + "_") and rest[len(section) + 1 :].strip("_"):
            key = rest[len(section) + 1 :].lstrip("_")
            return f"; did you mean FERRY_{section.upper()}__{key.upper()}?"
    return ""


def _apply_ferry_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """``FERRY_<SECTION>__<KEY>=value``; JSON values allowed for lists and tables.

    Returns which dotted key each variable set (for error messages). Raises ConfigError
    for a ``FERRY_*`` variable that cannot name a setting.
    """
    origins: dict[str, str] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith("FERRY_") or name in NOT_SETTINGS:
            continue
        if name.startswith(NOT_SETTINGS_PREFIXES):
            continue
        path = [p.lower() for p in name[len("FERRY_") :].split("__")]
        # Top-level tables and lists take JSON: FERRY_ROUTES='{"gmail.com": "gmail"}',
        # FERRY_SMART_HOSTS='[{"name": "sg", "host": "smtp.sendgrid.net"}]'.
        top_level = len(path) == 1 and path[0] in _TOP_LEVEL_JSON
        if (len(path) < 2 and not top_level) or not all(path):
            raise ConfigError(
                f"{name}: not a setting (write FERRY_<SECTION>__<KEY>, with two underscores"
                f" between section and key{_suggest(name)})"
            )
        try:
            value: Any = json.loads(raw)
            if not isinstance(value, (list, dict)):
                value = raw  # scalars stay strings; pydantic coerces them
        except ValueError:
            value = raw
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a table")
        node[path[-1]] = value
        origins[".".join(path)] = name
    return origins


def config_payload(config: RelayConfig) -> str:
    """The configuration as JSON with secrets revealed (for a child process only)."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reveal(v) for v in value]
        return value

    return json.dumps(reveal(config.model_dump(mode="python")), default=str)
