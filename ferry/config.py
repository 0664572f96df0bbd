"""One validated configuration model: ``ferry.toml`` + ``FERRY_*`` + the seed's ``SMTP_*``.

Precedence, lowest to highest: built-in defaults, the TOML file, the SMTPy seed's
``SMTP_*`` variables, then ``FERRY_<SECTION>__<KEY>`` variables. The environment is
passed in as a mapping (default ``os.environ``) so tests never have to patch it.

We merge the sources ourselves and validate once with pydantic: that keeps error
messages precise ("server.listen.0.port: ...") and lets the seed's flat variables map
onto nested keys without a custom settings source.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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
    tls_cert: str = ""
    tls_key: str = ""
    users_file: str = "./ferry-data/users"
    local_domains: list[str] = Field(default_factory=list)
    relay_domains: list[str] = Field(default_factory=list)
    relay_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_message_size: int = Field(35_000_000, ge=1024)
    max_recipients: int = Field(1000, ge=1)
    max_line_length: int = Field(4096, ge=1000)
    bare_lf: Literal["reject", "normalize"] = "reject"
    max_connections: int = Field(1000, ge=1)
    max_connections_per_ip: int = Field(50, ge=1)
    command_timeout: float = Field(300.0, gt=0)
    data_timeout: float = Field(600.0, gt=0)
    max_errors: int = Field(20, ge=1)

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
        return [d.strip().lower().rstrip(".") for d in v if d.strip()]


class QueueConfig(_Model):
    """The durable queue."""

    path: str = "./ferry-data"
    backend: Literal["sqlite"] = "sqlite"
    lease_seconds: float = Field(300.0, gt=0)
    commit_batch: int = Field(256, ge=1)


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
    retry_schedule: list[str] = Field(
        default_factory=lambda: ["1m", "2m", "4m", "8m", "16m", "32m", "1h", "2h", "4h"]
    )
    max_retries: int = Field(10, ge=0)
    message_lifetime: str = "4d"
    delay_warning_after: str = "4h"
    connect_timeout: float = Field(30.0, gt=0)
    command_timeout: float = Field(300.0, gt=0)
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
    smart_cooldown: str = "30m"
    # A smart host failing at the transport level rests this long (doubling, to 10 m).
    smart_host_cooldown: str = "30s"


class DnsConfig(_Model):
    """Resolver used for MX lookups."""

    nameservers: list[str] = Field(default_factory=list)
    timeout: float = Field(10.0, gt=0)
    mx_cache_ttl: float = Field(3600.0, ge=0)


class DkimConfig(_Model):
    """DKIM signing (SMTP_ENABLE_DKIM)."""

    enabled: bool = True
    keys_dir: str = "./ferry-data/dkim"
    selector: str = "ferry"
    # Signs mail whose From: and envelope domains have no key of their own (empty: none).
    default_domain: str = ""
    # Domains whose mail is deferred rather than sent unsigned when signing fails.
    required_domains: list[str] = Field(default_factory=list)
    # Keys kept outside keys_dir: domain -> PEM paths (selector = file name stem).
    keys: dict[str, list[str]] = Field(default_factory=dict)


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
    password_file: str = ""
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    require_tls: bool = True
    verify_certificate: bool = True
    ca_file: str = ""  # extra CA certificate(s) to trust, PEM (a private relay's CA)
    auth: Literal["auto", "plain", "login", "xoauth2"] = "auto"
    oauth_token_file: str = ""  # XOAUTH2: a file holding the current access token
    oauth_token_command: str = ""  # XOAUTH2: a command printing the current token
    priority: int = 10
    weight: int = Field(100, ge=1)
    max_connections: int = Field(10, ge=1)
    max_messages_per_connection: int = Field(100, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in " ,:*") or v == "direct":
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


class RelayConfig(_Model):
    """The whole of Ferry's configuration (the model behind ``ferry.toml``)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    aliases: dict[str, str | list[str]] = Field(default_factory=dict)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    dkim: DkimConfig = Field(default_factory=DkimConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    smart_hosts: list[SmartHost] = Field(default_factory=list)
    routes: dict[str, str | list[str]] = Field(default_factory=dict)
    shaping: dict[str, DestinationLimits] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        names = [h.name for h in self.smart_hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"smart_hosts: duplicate name(s) {', '.join(dupes)}")
        if self.delivery.mode == "relay" and not self.smart_hosts:
            raise ValueError(
                "delivery.mode: 'relay' needs at least one [[smart_hosts]] (or SMTP_HOST)"
            )
        for domain, target in self.routes.items():
            for item in [target] if isinstance(target, str) else target:
                if item == "direct" or item.startswith("mx:"):
                    if item.startswith("mx:") and not item[3:].split(":")[0]:
                        raise ValueError(f"routes.{domain}: 'mx:' needs a host")
                    continue
                if item not in names:
                    raise ValueError(
                        f"routes.{domain}: {item!r} is not 'direct', 'mx:host[:port]'"
                        " or the name of a smart host"
                    )
        return self

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> RelayConfig:
        """Read ``path`` (or ``$FERRY_CONFIG``; none = defaults) and apply the environment."""
        env = os.environ if env is None else env
        if path is None:
            path = env.get("FERRY_CONFIG") or None
        data: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such file") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _apply_seed_env(data, env)
        _apply_ferry_env(data, env)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, source=str(path or "environment"))
            ) from None

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


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Turn pydantic's error list into lines of ``key: problem`` (no traceback)."""
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not key:  # a whole-model check: its message starts with the key itself
            lines.append(f"  {msg}")
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


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
        host: dict[str, Any] = {
            "name": "default",
            "host": env["SMTP_HOST"],
            "port": int(env.get("SMTP_PORT") or (465 if use_ssl else 587)),
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


def _apply_ferry_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """``FERRY_<SECTION>__<KEY>=value``; JSON values allowed for lists and tables."""
    for name, raw in env.items():
        if not name.startswith("FERRY_") or name == "FERRY_CONFIG":
            continue
        path = [p.lower() for p in name[len("FERRY_") :].split("__")]
        # Top-level tables and lists take JSON: FERRY_ROUTES='{"gmail.com": "gmail"}',
        # FERRY_SMART_HOSTS='[{"name": "sg", "host": "smtp.sendgrid.net"}]'.
        top_level = len(path) == 1 and path[0] in _TOP_LEVEL_JSON
        if (len(path) < 2 and not top_level) or not all(path):
            continue
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
