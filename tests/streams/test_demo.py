"""`make run`'s path, end to end: services, worker, demo stream, alerts shown, clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streams.services import Services
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_demo_shows_alerts_and_stops(svc: Services, redis_prefix: str) -> None:
    svc.create_topics(redis_prefix)
    env = {
        **os.environ,
        "TRACEWATCH_DEMO_EXIT": "1",
        "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
        "REDIS_URL": svc.redis_url,
        "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
    }
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--events", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "Prometheus metrics at http://127.0.0.1:" in out
    assert "NO_CODE" in out and "alerts total:" in out
    total = int(out.split("alerts total:")[1].split()[0])
    assert total > 0
    assert out.rstrip().endswith("stopped")
