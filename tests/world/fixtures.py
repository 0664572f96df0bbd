"""Pytest fixtures for the test world.

Import them into a conftest (``from tests.world.fixtures import *``) or load
this module as a plugin (``-p tests.world.fixtures``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .ca import WorldCA
from .dns import DnsServer
from .mx import MxFactory

__all__ = ["dns_server", "mx_factory", "world_ca"]


@pytest.fixture(scope="session")
def world_ca(tmp_path_factory: pytest.TempPathFactory) -> WorldCA:
    """The session's test CA; its PEM files live in a session temp dir."""
    return WorldCA(tmp_path_factory.mktemp("world-ca"))


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A running authoritative DNS server on 127.0.0.1, with an empty zone."""
    with DnsServer() as server:
        yield server


@pytest.fixture
def mx_factory(world_ca: WorldCA) -> Iterator[MxFactory]:
    """Makes scripted MX servers (``mx_factory("mx1.example.test", starttls=True)``);
    all are stopped at teardown. ``mx_factory.port`` is their common port."""
    with MxFactory(world_ca) as factory:
        yield factory
