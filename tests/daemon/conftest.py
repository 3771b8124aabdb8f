"""Fixtures for the daemon's tests: test-only stages registered through REELFLOW_EXTRA_STAGES."""

from __future__ import annotations

import pytest

from tests.stages_for_tests import EXTRA_STAGES


@pytest.fixture(autouse=True)
def extra_stages(monkeypatch):
    """Make `Test/Echo` and `Test/Spin` known to the registry in this process."""
    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", EXTRA_STAGES)
