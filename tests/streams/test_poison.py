"""No input stalls a partition: every kind of bad event seen in the wild, each followed in the same
partition (same institution) by a good settlement whose verdict must still come.

Each bad event is either dead-lettered with a reason (what the parser refuses) or processed like
any other; the worker never retries it forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from streams.services import Services
from tests.conftest import WorkerProcess
from tests.streams.test_pipeline_integration import read_topic
from topics.records import InvalidEvent, parse_event

pytestmark = pytest.mark.integration

WHEN = "2026-03-02T09:00:00+08:00"


def _settlement(n: int, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"S{n}",
        "type": "settlement",
        "institution": "H1",
        "occurred_at": WHEN,
        "settlement_id": f"SID{n}",
        "lines": [
            {
                "line_no": 1,
                "product": "XA001",
                "quantity": 1,
                "codes": [f"810000100000{n:08d}"],
            }
        ],
    }
    event.update(changes)
    return event


def _line(**changes: Any) -> dict[str, Any]:
    return {"line_no": 1, "product": "XA001", "quantity": 1, **changes}


def poison() -> list[bytes]:
    """One of each class: wrong types, separators and markers in ids, dates at the edge of the
    calendar, numbers at the edge of floats, and sizes past what a broker or Redis holds."""
    bad: list[Any] = [
        _settlement(1001, type=["settlement"]),
        _settlement(1002, type={"a": 1}),
        _settlement(1003, lines=[_line(unit=["pack"])]),
        _settlement(1004, lines=[_line(unit={"u": 1})]),
        {**_settlement(1005, type="stock_change"), "reason": ["loss"], "lines": [_line()]},
        _settlement(1006, event_id="a\x1eb"),
        _settlement(1007, event_id="a\x1fb"),
        _settlement(1008, settlement_id="s\x1ft"),
        _settlement(1009, institution="H1\x1f"),
        _settlement(1010, event_id="?x"),
        _settlement(1011, settlement_id="?s"),
        _settlement(1012, occurred_at="0001-01-01T00:30:00+01:00"),
        _settlement(1013, occurred_at="9999-12-31T23:59:59-12:00"),
        _settlement(1014, lines=[_line(quantity=1e308, unit="unit")]),
        _settlement(1015, lines=[_line(quantity=float("inf"))]),
        _settlement(1016, event_id="x" * 900_000),
        _settlement(1017, type="y" * 900_000),
        _settlement(1018, lines=[_line(line_no=i) for i in range(1, 10_001)]),
        _settlement(1019, lines=[_line(codes=["8100001" + "0" * 13] * 5000)]),
    ]
    raw = [orjson.dumps(b, option=orjson.OPT_NON_STR_KEYS) for b in bad if not isinstance(b, bytes)]
    raw += [
        b"\xff\xfe" * 400_000,  # 0.8 MB of invalid UTF-8
        b"{" * 10_000,
        b"",
        b'{"event_id": "S1020", "type": "settlement", "institution": "H1"',
    ]
    return raw


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
    env = {
        "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
        "TRACEWATCH_REDIS_PREFIX": redis_prefix,
        "TRACEWATCH_CATALOG": str(catalog_file),
        "TRACEWATCH_BATCH_SIZE": "5",
    }
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap, "message.max.bytes": 2_000_000})
    good = []
    for n, raw in enumerate(bad):
        producer.produce(f"{redis_prefix}-events", raw, b"H1")
        event = orjson.dumps(_settlement(n))
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
