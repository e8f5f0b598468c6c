"""The short chaos run of CI: the idempotent producer driven into its fatal state three times
while workers drain a backlog, and Redis SIGKILLed mid-stream, each compared with replay
(`make chaos` runs every scenario on a longer stream)."""

from __future__ import annotations

import pytest

from harness.services import Services
from loadtest.chaos import SCENARIOS, run_scenario

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["produce-fatal", "redis-sigkill"])
def test_chaos_scenario_loses_nothing_and_invents_nothing(svc: Services, name: str) -> None:
    scenario = SCENARIOS[name]
    if scenario.broker_faults and svc.broker is None:
        pytest.skip("broker faults need the embedded broker")
    report = run_scenario(scenario, svc, events=1200, seed=3, feed_seconds=10, timeout=180)
    assert report.faults, "the fault happened"
    assert report.clean, report.line()
    if name == "produce-fatal":
        assert report.producers_replaced >= 1, report.line()
