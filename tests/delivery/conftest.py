"""Delivery test fixtures."""

from tests.delivery.relay_world import world  # noqa: F401
