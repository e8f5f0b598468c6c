"""No input stalls a partition: every kind of bad event seen in the wild, each followed in the same
partition (same institution) by a good settlement whose verdict must still come.

Each bad event is either dead-lettered with a reason (what the parser refuses) or processed like
any other; the worker never retries it forever.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from harness.services import Services
from loadtest.poison import poison, settlement
from tests.conftest import WorkerProcess
from tests.streams.test_pipeline_integration import read_topic
from topics.records import InvalidEvent, parse_event

pytestmark = pytest.mark.integration


def _env(prefix: str, catalog: Path, **extra: str) -> dict[str, str]:
    """A worker on its own topics and keys."""
    return {
        "TRACEWATCH_TOPIC_PREFIX": prefix,
        "TRACEWATCH_REDIS_PREFIX": prefix,
        "TRACEWATCH_CATALOG": str(catalog),
        **extra,
    }


def test_every_bad_event_is_dead_lettered_or_processed_and_the_next_verdict_comes(
    svc: Services, redis_prefix: str, catalog_file: Path
) -> None:
    svc.create_topics(redis_prefix)
    bad = poison()
    refused = 0
    for raw in bad:
        try:
            parse_event(raw)
        except InvalidEvent:
            refused += 1
    assert refused >= len(bad) - 4, "the parser refuses nearly all of these"
    env = _env(redis_prefix, catalog_file, TRACEWATCH_BATCH_SIZE="5")
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap, "message.max.bytes": 2_000_000})
    good = []
    for n, raw in enumerate(bad):
        producer.produce(f"{redis_prefix}-events", raw, b"H1")
        event = orjson.dumps(settlement(n))
        producer.produce(f"{redis_prefix}-events", event, b"H1")
        good.append(f"S{n}")
    assert producer.flush(30) == 0
    worker = WorkerProcess(svc, env).start()
    try:
        verdicts = read_topic(
            svc.kafka_bootstrap,
            f"{redis_prefix}-verdicts",
            lambda v: {x["event_id"] for x in v} >= set(good),
            timeout=120,
        )
        letters = read_topic(
            svc.kafka_bootstrap,
            f"{redis_prefix}-dead-letters",
            lambda v: len(v) >= refused,
            timeout=30,
        )
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert {v["event_id"] for v in verdicts} >= set(good), "a bad event stalled the partition"
    assert all(v["verdict"] == "pass" for v in verdicts if v["event_id"] in good)
    assert len(letters) >= refused
    assert all(letter["reason"] and letter["detail"] for letter in letters)
    assert all(len(orjson.dumps(letter)) < 64 * 1024 for letter in letters), "dead letters fit"
    assert "tracewatch_dead_letters_total" in metrics
    retries = [
        line
        for line in metrics.splitlines()
        if line.startswith("tracewatch_batch_retries_total{") and not line.endswith(" 0.0")
    ]
    assert not retries, f"no bad event is retried: {retries}"


def test_an_institution_past_its_daily_quota_is_dead_lettered(
    svc: Services, redis_prefix: str, catalog_file: Path
) -> None:
    svc.create_topics(redis_prefix)
    env = _env(
        redis_prefix,
        catalog_file,
        TRACEWATCH_INSTITUTION_DAILY_QUOTA="3",
        TRACEWATCH_BATCH_SIZE="2",
    )
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap})
    for n in range(5):
        producer.produce(f"{redis_prefix}-events", orjson.dumps(settlement(n)), b"H1")
    producer.produce(f"{redis_prefix}-events", orjson.dumps(settlement(0)), b"H1")  # a retry
    other = settlement(9, institution="H2")
    producer.produce(f"{redis_prefix}-events", orjson.dumps(other), b"H2")
    assert producer.flush(30) == 0
    worker = WorkerProcess(svc, env).start()
    try:
        verdicts = read_topic(
            svc.kafka_bootstrap,
            f"{redis_prefix}-verdicts",
            lambda v: len({x["event_id"] for x in v}) >= 4,
            timeout=60,
        )
        letters = read_topic(
            svc.kafka_bootstrap, f"{redis_prefix}-dead-letters", lambda v: len(v) >= 2, 30
        )
    finally:
        worker.stop()
    assert {(v["institution"], v["event_id"]) for v in verdicts} == {
        ("H1", "S0"),
        ("H1", "S1"),
        ("H1", "S2"),
        ("H2", "S9"),
    }
    assert [letter["reason"] for letter in letters] == ["over_quota", "over_quota"]
    assert "TRACEWATCH_INSTITUTION_DAILY_QUOTA" in letters[0]["detail"]


def test_a_resubmission_with_other_content_is_a_conflict_and_the_first_stands(
    svc: Services, redis_prefix: str, catalog_file: Path
) -> None:
    """An event sent first under another's id must not make the real one vanish unseen."""
    svc.create_topics(redis_prefix)
    env = _env(redis_prefix, catalog_file)
    first = settlement(1)
    forged = {**settlement(1), "lines": [{**first["lines"][0], "codes": []}]}
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap})
    for event in (first, first, forged):  # a retry (identical) and a conflict
        producer.produce(f"{redis_prefix}-events", orjson.dumps(event), b"H1")
    assert producer.flush(30) == 0
    worker = WorkerProcess(svc, env).start()
    try:
        letters = read_topic(
            svc.kafka_bootstrap, f"{redis_prefix}-dead-letters", lambda v: len(v) >= 1, 60
        )
        verdicts = read_topic(
            svc.kafka_bootstrap, f"{redis_prefix}-verdicts", lambda v: len(v) >= 1, 30
        )
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert [letter["reason"] for letter in letters] == ["conflicting_resubmission"]
    assert "the first stands" in letters[0]["detail"]
    assert [v["verdict"] for v in verdicts] == ["pass"]  # the first, with its code
    assert "tracewatch_resubmissions_total 1.0" in metrics
