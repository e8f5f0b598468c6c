"""How the data plane gathers a batch, on the real broker: a batch starts with the first message
and takes what the consumer already fetched, never more than the batch size, and an idle
consumer hands back nothing once `within` has passed."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from harness.services import Services
from streams.consumer import BatchConsumer, consumer_config

pytestmark = pytest.mark.integration


async def _nothing(*_args: Any) -> None:
    return None


def _consumer(svc: Services, batch_size: int, within: float) -> tuple[BatchConsumer, Consumer]:
    group = f"twgather{uuid.uuid4().hex[:8]}"
    config = consumer_config(svc.kafka_bootstrap, group, 10, 20)
    topic = f"{group}-events"  # the pipeline's input topic under a fresh prefix
    batches = BatchConsumer(
        "ingest", topic, config, _nothing, _nothing, _nothing, _nothing, batch_size, within, 0.0
    )
    svc.create_topics(group)
    consumer = Consumer(config)
    consumer.subscribe([topic])
    return batches, consumer


def test_a_batch_is_what_was_fetched_up_to_the_batch_size(svc: Services) -> None:
    batches, consumer = _consumer(svc, batch_size=7, within=0.5)
    try:
        producer = Producer({"bootstrap.servers": svc.kafka_bootstrap})
        for n in range(20):
            producer.produce(batches.topic, b"%d" % n, key=b"same institution")
        assert producer.flush(30) == 0
        got: list[list[bytes]] = []
        deadline = time.monotonic() + 60
        while sum(map(len, got)) < 20:
            assert time.monotonic() < deadline, f"only {sum(map(len, got))} of 20 within 60 s"
            batch = [m.value() or b"" for m in batches._gather(consumer) if m.error() is None]
            if batch:
                got.append(batch)
        assert all(len(batch) <= 7 for batch in got)
        # once fetched, the rest comes in full batches rather than one message at a time
        assert max(map(len, got)) == 7
        assert [int(v) for batch in got for v in batch] == list(range(20))
        started = time.monotonic()
        assert [m for m in batches._gather(consumer) if m.error() is None] == []
        assert time.monotonic() - started >= 0.4  # idle: it waited `within` for a first one
    finally:
        consumer.close()


def test_a_short_batch_goes_as_soon_as_its_first_message_is_there(svc: Services) -> None:
    """Three messages and room for seven: the batch does not wait out `within` (5 s) for four
    more that are not coming - an idle stage answers in milliseconds, not a window."""
    batches, consumer = _consumer(svc, batch_size=7, within=5.0)
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap})
    try:
        producer.produce(batches.topic, b"warm", key=b"i")
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 60
        while not [m for m in batches._gather(consumer) if m.error() is None]:
            assert time.monotonic() < deadline, "the consumer got nothing within 60 s"
        for n in range(3):
            producer.produce(batches.topic, b"%d" % n, key=b"i")
        assert producer.flush(30) == 0
        started = time.monotonic()
        got: list[bytes] = []
        while len(got) < 3:
            got += [m.value() or b"" for m in batches._gather(consumer) if m.error() is None]
        assert got == [b"0", b"1", b"2"]
        assert time.monotonic() - started < 2.5
    finally:
        consumer.close()
