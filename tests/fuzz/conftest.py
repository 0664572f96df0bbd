"""Hypothesis profiles for the property tests in this folder.

The default run is short and deterministic (it is part of every ``./dev test``);
``HYPOTHESIS_PROFILE=long ./dev test tests/fuzz`` runs many more random examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=40,
    derandomize=True,  # the same examples every run: CI never flakes on a new one
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=3000,
    deadline=None,
    database=None,
    print_blob=True,  # a failure prints the @reproduce_failure line
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
