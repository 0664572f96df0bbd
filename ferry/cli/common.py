"""What every command shares: loading the configuration, naming the queue it reads.

``ferry serve``, ``ferry config check`` and every other command load the configuration
through :func:`load_config`, so a configuration one refuses, all refuse, in the same
words and with exit status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:  # imported when used: `ferry --help` must not load pydantic
    from ferry.config import RelayConfig

F = TypeVar("F", bound=Callable[..., Any])


def load_config(path: str | None) -> RelayConfig:
    """The configuration from ``path`` (else ``$FERRY_CONFIG``, else defaults) or exit 1.

    The error names the key or variable and the problem, on stderr, without a traceback.
    """
    from ferry.config import ConfigError, RelayConfig

    try:
        config = RelayConfig.load(path)
        _check_stages(config, path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    return config


def _check_stages(config: RelayConfig, path: str | None) -> None:
    """Settings only a stage can judge, judged by the stage's own code (config is a leaf).

    The alias table is built by intake's :class:`AliasTable`, as ``ferry serve`` builds it.
    """
    if not config.aliases:
        return
    from ferry.config import ConfigError
    from ferry.intake.aliases import AliasTable

    try:
        AliasTable(config.aliases, config.server.local_domains)
    except ValueError as exc:
        source = path or os.environ.get("FERRY_CONFIG") or "environment"
        raise ConfigError(f"invalid configuration ({source}):\n  aliases: {exc}") from None


def config_path(ctx: click.Context) -> str | None:
    """The ``--config`` given to ``ferry`` or to the command itself (the latter wins)."""
    obj = ctx.find_root().obj
    return obj.get("config") if isinstance(obj, dict) else None


def _remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        root = ctx.find_root()
        root.ensure_object(dict)
        root.obj["config"] = value
    return value


def config_option(fn: F) -> F:
    """``--config FILE`` on a command: ``ferry serve --config F`` = ``ferry --config F serve``."""
    return click.option(
        "-c",
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        expose_value=False,
        is_eager=True,
        callback=_remember,
        help="Path to ferry.toml (same as `ferry --config FILE ...`).",
    )(fn)


def queue_location(config: RelayConfig) -> str:
    """The queue this configuration reads: its data directory as an absolute path, or
    the PostgreSQL database (``postgresql://user@host:port/db``, never a password)."""
    if config.queue.backend == "postgres":
        from ferry.queue.postgres import describe_dsn

        return describe_dsn(config.queue.dsn.get_secret_value())
    return str(Path(config.queue.path).resolve())


def queue_header(config: RelayConfig) -> None:
    """The first line of a command's human output: which queue it is reading."""
    click.echo(f"queue: {queue_location(config)}")
