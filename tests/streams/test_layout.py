"""Partition counts are configuration, the watermark lanes follow the input topic's, and a
process configured for other counts than its topics or its state were made with refuses to
start, saying what to set."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.services import Services, free_port
from streams.layout import LayoutMismatch, check_state
from streams.settings import Settings
from tests.conftest import ROOT


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
    )


def test_partition_counts_come_from_the_environment_and_lanes_follow_the_input() -> None:
    code = (
        "from topics import names; from detectors.event_time import LANES; "
        "print(names.EVENTS.partitions, names.BY_CODE.partitions, names.VERDICT_PARTS.partitions,"
        " LANES)"
    )
    assert _python(code).stdout.split() == ["16", "16", "16", "16"]
    found = _python(code, TRACEWATCH_INPUT_PARTITIONS="64", TRACEWATCH_STAGE_PARTITIONS="32")
    assert found.stdout.split() == ["64", "32", "32", "64"], found.stderr
    bad = _python(code, TRACEWATCH_INPUT_PARTITIONS="zero")
    assert bad.returncode != 0 and "TRACEWATCH_INPUT_PARTITIONS='zero'" in bad.stderr


def _worker(
    svc: Services, prefix: str, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """`tracewatch worker` run to its end (these workers are expected to refuse and exit)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PATH": "/usr/bin:/bin",
            "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
            "REDIS_URL": svc.redis_url,
            "TRACEWATCH_TOPIC_PREFIX": prefix,
            "TRACEWATCH_REDIS_PREFIX": prefix,
            **env,
        },
    )


@pytest.mark.integration
def test_a_worker_refuses_topics_with_other_partition_counts(
    svc: Services, redis_prefix: str
) -> None:
    svc.create_topics(redis_prefix)  # 16 partitions each
    started = time.monotonic()
    result = _worker(svc, redis_prefix, 60, TRACEWATCH_STAGE_PARTITIONS="8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert f"{redis_prefix}-by-code has 16, not 8" in result.stderr
    assert "TRACEWATCH_STAGE_PARTITIONS" in result.stderr


@pytest.mark.integration
def test_state_laid_out_otherwise_is_refused(
    svc: Services, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", svc.redis_url)
    monkeypatch.setenv("TRACEWATCH_REDIS_PREFIX", redis_prefix)
    monkeypatch.setenv("TRACEWATCH_STATE_BUCKETS", "64")
    check_state(Settings(), claim=False)  # nothing recorded, nothing claimed: passes
    check_state(Settings(), claim=True)  # the first worker records its layout
    check_state(Settings(), claim=True)  # the same layout again: passes
    monkeypatch.setenv("TRACEWATCH_STATE_BUCKETS", "128")
    with pytest.raises(LayoutMismatch) as caught:
        check_state(Settings(), claim=False)
    assert "state_buckets=64" in str(caught.value) and "state_buckets=128" in str(caught.value)
    check_state(Settings(), claim=True, overwrite=True)  # rebuild lays it out anew
    check_state(Settings(), claim=False)


@pytest.mark.integration
def test_a_worker_stops_on_state_laid_out_otherwise(
    svc: Services, redis_prefix: str, catalog_file: Path
) -> None:
    import redis

    svc.create_topics(redis_prefix)
    client = redis.Redis.from_url(svc.redis_url)
    try:
        client.set(
            f"{redis_prefix}:layout", "input_partitions=16 stage_partitions=16 state_buckets=7"
        )
    finally:
        client.close()
    result = _worker(
        svc,
        redis_prefix,
        90,
        TRACEWATCH_CATALOG=str(catalog_file),
        TRACEWATCH_WEB_PORT=str(free_port()),
        TRACEWATCH_EMBEDDED_BROKER="1" if svc.kafka_embedded else "",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds state laid out as" in result.stderr and "state_buckets=7" in result.stderr
