"""Reading a range of a partition back from Kafka: the messages a batch's state lost.

A stage or ingest partition's state and position are saved together in Redis
(`streams.redis_state`); if Redis loses its last writes, a later batch starts past the saved
position while its offsets were already committed in Kafka. The processors then read the gap
back from here - as Kafka Streams restores state and position from one checkpoint - instead of
going on without the lost batches' effects.
"""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

from streams.kafka_config import client_config

# (partition, offset, timestamp in seconds, value)
Raw = tuple[int, int, float, bytes]


class BackfillError(RuntimeError):
    """The range could not be read in time: the batch fails and is retried (an outage)."""


def read_range(
    bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]], timeout: float = 60.0
) -> list[Raw]:
    """Messages of `topic` at offsets `start <= offset < end` per partition, in offset order.
    Offsets the log no longer holds (retention) are skipped: the read starts at the earliest."""
    consumer = Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": "tracewatch-backfill",  # assign() only: never joins, never commits
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
            },
        )
    )
    pending = {p: end for p, (start, end) in ranges.items() if end > start}
    try:
        consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in pending])
        found: list[Raw] = []
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise BackfillError(f"{topic}: offsets {ranges} not read within {timeout:.0f} s")
            for msg in consumer.consume(1000, 0.2):
                p, offset = msg.partition() or 0, msg.offset() or 0
                end = pending.get(p)
                if end is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.pop(p, None)  # the log ends before `end`: nothing more to read
                    continue
                if offset < end:
                    found.append((p, offset, msg.timestamp()[1] / 1000.0, msg.value() or b""))
                if offset >= end - 1:
                    pending.pop(p, None)
        found.sort(key=lambda raw: (raw[0], raw[1]))
        return found
    finally:
        consumer.close()


async def read_range_async(
    bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]]
) -> list[Raw]:
    return await asyncio.to_thread(read_range, bootstrap, topic, ranges)


def read_in_input_order(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Raw]:
    """Every message of `topic` in the order the code stage applies the input: by timestamp
    (ms), then partition and offset (`streams.alignment`) - the order a replay of the input
    topic follows to give the stream's verdicts."""
    consumer = Consumer(client_config(bootstrap, **{"group.id": "tracewatch-backfill"}))
    try:
        partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        ranges = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            for p in partitions
        }
    finally:
        consumer.close()
    raws = read_range(bootstrap, topic, ranges, timeout)
    raws.sort(key=lambda raw: (round(raw[2] * 1000), raw[0], raw[1]))
    return raws
