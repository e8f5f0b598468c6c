"""`tracewatch sink` between a real broker and a real PostgreSQL: every alerts-topic message in
the case store once, across a SIGKILL mid-stream and a restart whose group has lost Kafka's
committed offsets (the database's own offsets decide), withdrawals and re-raised alerts
applied in order, and messages that are not alerts kept aside with a reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import orjson
import psycopg
import pytest
from confluent_kafka import Producer

from harness.services import Services, free_port
from tests.cases.conftest import alert
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, messages: list[bytes | dict[str, object]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for m in messages:
        value = m if isinstance(m, bytes) else orjson.dumps(m)
        key = m["alert_id"] if isinstance(m, dict) else b"junk"
        producer.produce(topic, value, key)  # type: ignore[arg-type]
    assert producer.flush(30) == 0


def _stored(url: str) -> int:
    with psycopg.connect(url) as conn:
        try:
            row = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM sink_offsets").fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def _sink(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cli", "sink"], env=env, cwd=ROOT)


def _wait_stored(url: str, count: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _stored(url) < count:
        assert proc.poll() is None, f"the sink exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{_stored(url)} of {count} messages stored"
        time.sleep(0.2)


def test_every_message_once_across_a_crash_and_lost_kafka_offsets(
    svc: Services, database: str
) -> None:
    prefix = f"twsink{uuid.uuid4().hex[:8]}"
    svc.create_topics(prefix)
    topic = f"{prefix}-alerts"
    first = [alert(n, institution=f"P{n % 5}") for n in range(1, 201)]
    withdrawn = [
        {**alert(n), "status": "withdrawn", "evidence": {"why": "returned"}} for n in range(1, 41)
    ]
    raised = [alert(n) for n in range(1, 11)]  # 1-10 raised again after their withdrawal
    junk: list[bytes | dict[str, object]] = [b"not json", {"alert_id": "z" * 24, "rule": "X"}]
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
        "TRACEWATCH_TOPIC_PREFIX": prefix,
        "TRACEWATCH_REDIS_PREFIX": prefix,
        "REDIS_URL": svc.redis_url,
        "DATABASE_URL": database,
        "TRACEWATCH_APP_ID": f"{prefix}-a",
        "TRACEWATCH_BATCH_SIZE": "20",  # the kill lands between batches of a 200-message topic
    }
    _produce(svc.kafka_bootstrap, topic, [*first])
    slow = svc.broker is not None  # the embedded broker can delay its answers
    if slow:
        svc.broker.fault("RTT", 60)  # a batch's fetch and commit take a while
    sink = _sink(env)
    try:
        _wait_stored(database, 1, sink)
        sink.kill()  # mid-stream: some batches in the store, Kafka's commit maybe behind
        sink.wait()
        assert not slow or _stored(database) < len(first), "the kill came after the last batch"
        if slow:
            svc.broker.fault("RTT", 0)
        sink = _sink(env)
        _wait_stored(database, len(first), sink)
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=30) == 0
        # a new group: Kafka knows no offsets of it, the store's own decide where to start
        env["TRACEWATCH_APP_ID"] = f"{prefix}-b"
        _produce(svc.kafka_bootstrap, topic, [*withdrawn, *raised, *junk])
        port = free_port()
        sink = _sink({**env, "TRACEWATCH_SINK_METRICS_PORT": str(port)})
        _wait_stored(database, len(first) + len(withdrawn) + len(raised) + len(junk), sink)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        if slow:
            svc.broker.fault("RTT", 0)
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    with psycopg.connect(database) as conn:
        status: dict[str, str] = dict(
            conn.execute(
                "SELECT alert_id, status || '/' || coalesce(closure_reason, '') FROM cases"
            ).fetchall()
        )
        opened = conn.execute(
            "SELECT alert_id, count(*) FROM case_audit WHERE action = 'opened' GROUP BY alert_id"
        ).fetchall()
        moves: dict[str, int] = dict(
            conn.execute(
                "SELECT alert_id, count(*) FROM case_audit WHERE action = 'transition' GROUP BY alert_id"
            ).fetchall()
        )
        rejected = [r for (r,) in conn.execute("SELECT reason FROM sink_rejected ORDER BY reason")]
    assert len(status) == 200 and all(n == 1 for _, n in opened) and len(opened) == 200
    for n in range(1, 201):
        want = "new/" if n <= 10 or n > 40 else "closed/withdrawn"
        assert status[f"{n:024x}"] == want, n
    assert all(moves[f"{n:024x}"] == 2 for n in range(1, 11))  # closed once, reopened once
    assert all(moves[f"{n:024x}"] == 1 for n in range(11, 41))
    assert len(rejected) == 2 and "not a JSON object" in rejected
    assert 'tracewatch_sink_messages_total{result="rejected"} 2.0' in metrics
