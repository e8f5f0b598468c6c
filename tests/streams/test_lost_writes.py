"""A Redis that loses its last writes after Kafka committed the offsets of the batches behind
them (`appendfsync everysec` loses up to a second; a failover loses what the replica had not
got). State and position are saved together, so the next batch finds the gap and reads it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.services import Services
from tests.streams.test_pipeline_integration import (
    Pipe,
    _distinct,
    assert_same_verdicts,
    replay,
    standing,
    topic_order,
)

pytestmark = pytest.mark.integration


def _keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}:*", count=1000))


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, tuple[int, bytes]]:
    """Every key of the pipeline, as RESTORE takes it back."""
    out: dict[bytes, tuple[int, bytes]] = {}
    for key in _keys(client, prefix):
        value = client.dump(key)
        if value is not None:
            out[key] = (max(0, int(client.pttl(key))), bytes(value))
    return out


def restore(client: redis.Redis, prefix: str, saved: dict[bytes, tuple[int, bytes]]) -> None:
    """Redis as it was at the snapshot: every write since is lost."""
    for key in _keys(client, prefix):
        client.delete(key)
    for key, (ttl, value) in saved.items():
        client.restore(key, ttl, value, replace=True)


def wait_settled(client: redis.Redis, prefix: str, messages: int, timeout: float = 120) -> None:
    """Until ingest's saved positions cover `messages` input messages, the code stage holds
    no record (its position moves on with ingest's heartbeats) and no other stage's position
    has moved for 4 s (every stage saved what the batches brought)."""
    deadline = time.monotonic() + timeout
    last: dict[bytes, Any] = {}
    since = time.monotonic()
    while time.monotonic() < deadline:
        keys = [k for k in _keys(client, prefix) if k.endswith((b":pos", b":hold"))]
        found = dict(zip(keys, client.mget(keys), strict=True)) if keys else {}
        code = {k: v for k, v in found.items() if b":{C" in k}
        holding = any(
            code.get(k[: -len(b"pos")] + b"hold") != v
            for k, v in code.items()
            if k.endswith(b":pos")
        )
        now: dict[bytes, Any] = {k: v for k, v in found.items() if k not in code}
        now[b"code holds"] = holding
        ingest = sum(
            int(v) for k, v in now.items() if b":{E" in k and v is not None and k.endswith(b":pos")
        )
        if now != last:
            last, since = now, time.monotonic()
        elif ingest >= messages and not holding and time.monotonic() - since > 4:
            return
        time.sleep(0.5)
    raise AssertionError(f"the pipeline did not settle on {messages} input messages")


def test_lost_redis_writes_are_read_back_from_kafka(
    svc: Services, redis_prefix: str, tmp_path: Path
) -> None:
    pipe = Pipe(svc, redis_prefix, tmp_path, events=1500, seed=7)
    expected, verdicts, _ = replay(pipe.data)
    lines = Path(pipe.data["events"]).read_bytes().splitlines(keepends=True)
    cut1, cut2 = len(lines) // 3, 2 * len(lines) // 3
    parts = []
    for i, chunk in enumerate((lines[:cut1], lines[cut1:cut2], lines[cut2:])):
        path = tmp_path / f"part{i}.jsonl"
        path.write_bytes(b"".join(chunk))
        parts.append(path)
    client = redis.Redis.from_url(svc.redis_url)

    worker = pipe.worker()
    try:
        pipe.produce(str(parts[0]))
        wait_settled(client, redis_prefix, cut1)
        saved = snapshot(client, redis_prefix)
        pipe.produce(str(parts[1]))
        wait_settled(client, redis_prefix, cut2)
    finally:
        worker.stop()  # a clean stop commits every offset the worker processed
    # Redis forgets the second part; Kafka's committed offsets are past it.
    restore(client, redis_prefix, saved)
    worker = pipe.worker()
    try:
        pipe.produce(str(parts[2]))
        got, got_verdicts = pipe.outputs(expected, len(verdicts), timeout=120)
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert standing(_distinct(got)) == standing(expected)
    _, in_topic_order, _ = replay(
        pipe.data, lines=topic_order(svc.kafka_bootstrap, pipe.topic("events"))
    )
    assert_same_verdicts(got_verdicts, in_topic_order)
    gaps = [
        line
        for line in metrics.splitlines()
        if line.startswith("tracewatch_state_gaps_total{") and not line.endswith(" 0.0")
    ]
    assert any('stage="ingest"' in line for line in gaps), gaps
