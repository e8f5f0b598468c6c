"""The output producer against a broker that drives it into the idempotent producer's fatal
state (an out-of-order sequence): the batch fails once, the producer is replaced, the batch
redone is delivered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from harness.embedded_broker import MockCluster
from streams.output import OutputError, OutputProducer

OUT_OF_ORDER_SEQUENCE_NUMBER = 45
PRODUCE = 0


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    mc = MockCluster(topics=[])
    mc.create_topic("out", 1)
    yield mc
    mc.close()


def _values(bootstrap: str) -> list[bytes]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "t", "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition("out", 0, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                break  # end of the partition
            values.append(msg.value() or b"")
    finally:
        consumer.close()
    return values


async def _batch(producer: OutputProducer, values: list[bytes]) -> None:
    for v in values:
        producer.produce("out", v, b"k")
    await producer.flush(timeout=15)


def test_a_fatal_producer_error_replaces_the_producer_and_the_batch_is_redone(
    cluster: MockCluster,
) -> None:
    producer = OutputProducer(cluster.bootstrap)
    asyncio.run(_batch(producer, [b"first"]))
    cluster.push_errors(PRODUCE, [OUT_OF_ORDER_SEQUENCE_NUMBER] * 3)
    batch = [b"a", b"b", b"c"]
    attempts = 0
    while True:  # what the worker's batch retry does
        attempts += 1
        assert attempts <= 5, "the batch never got through"
        try:
            asyncio.run(_batch(producer, batch))
            break
        except OutputError:
            continue
    assert producer.recreated >= 1
    assert attempts >= 2
    delivered = _values(cluster.bootstrap)
    assert delivered[0] == b"first"
    assert set(batch) <= set(delivered[1:])
