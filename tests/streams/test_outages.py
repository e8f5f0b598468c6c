"""Outages around a worker: it waits them out and loses nothing."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from harness.services import RedisServer, Services
from tests.conftest import WorkerProcess
from tests.streams.test_pipeline_integration import read_topic

pytestmark = pytest.mark.integration


def _sale(n: int, institution: str, code: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"S{n}",
            "type": "settlement",
            "institution": institution,
            "occurred_at": f"2026-03-02T09:{n:02d}:00+08:00",
            "settlement_id": f"SID{n}",
            "lines": [{"line_no": 1, "product": "XA001", "quantity": 1, "codes": [code]}],
        }
    )


def _holds_stage_partitions(metrics: str, prefix: str) -> bool:
    """Whether the worker's metrics show partitions of the code stage's topic assigned."""
    for line in metrics.splitlines():
        if line.startswith(f'tracewatch_assigned_partitions{{topic="{prefix}-by-code"}}'):
            return float(line.split()[-1]) > 0
    return False


def test_a_worker_started_while_redis_is_down_waits_and_then_works(
    svc: Services, redis_prefix: str, catalog_file: Path
) -> None:
    """Partitions assigned during a Redis outage: the worker neither dies nor skips."""
    svc.create_topics(redis_prefix)
    redis = RedisServer().start()
    port = redis.port
    redis.stop()
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
        "TRACEWATCH_REDIS_PREFIX": redis_prefix,
        "TRACEWATCH_CATALOG": str(catalog_file),
    }
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap})
    # one institution, one partition: the verdicts do not depend on other partitions' progress
    sales = [
        ("H1", "81000010000000000077"),
        ("H1", "81000010000000000077"),
        ("H1", "81000010000000000078"),
    ]
    for n, (inst, code) in enumerate(sales):
        producer.produce(f"{redis_prefix}-events", _sale(n, inst, code), inst.encode())
    assert producer.flush(30) == 0
    worker = WorkerProcess(svc, env).start()
    try:
        deadline = time.monotonic() + 60
        while not _holds_stage_partitions(worker.metrics(), redis_prefix):
            assert time.monotonic() < deadline, "no stage partitions assigned within 60 s"
            time.sleep(0.5)
        time.sleep(2)  # assigned and retrying the take-over against the missing Redis
        assert worker.proc is not None and worker.proc.poll() is None, "the worker died"
        redis.start(port)
        verdicts = read_topic(
            svc.kafka_bootstrap,
            f"{redis_prefix}-verdicts",
            lambda v: len({x["event_id"] for x in v}) >= 3,
            timeout=120,
        )
        alerts = read_topic(
            svc.kafka_bootstrap, f"{redis_prefix}-alerts", lambda v: len(v) >= 1, timeout=30
        )
        metrics = worker.metrics()
    finally:
        worker.stop()
        redis.stop()
    by_id = {v["event_id"]: v["verdict"] for v in verdicts}
    assert by_id == {"S0": "pass", "S1": "reject", "S2": "pass"}
    assert {a["rule"] for a in alerts} == {"DUPLICATE_SALE"}
    assert 'tracewatch_batch_retries_total{stage="assign"}' in metrics
