"""Operator tool test fixtures (the delivery world for suspend/hold tests)."""

from tests.delivery.relay_world import world  # noqa: F401
