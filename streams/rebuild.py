"""`tracewatch rebuild`: the input topic is the record; rebuild every worker's state from it.

For a Redis that lost its data (a machine crash past AOF's last second, a Cluster failover that
dropped writes) or a new deployment. With the workers stopped:

1. read the input topic from the beginning up to its current end;
2. run the detectors over it in one process (the `replay` pipeline, same code as the workers);
3. write what the workers would hold into the empty Redis prefix, in their layout: stage states
   with their due index and watermarks, ingest's seen events, void/cancel index and receivers;
4. point the workers' consumer groups (one per stage) at the end of every topic the rebuild covered (the input
   at the offsets read; the internal topics at their ends, since their records were recomputed)
   where the broker allows it. Either way the rebuilt seen events and applied record ids make
   anything read again a no-op.
No alert or verdict is produced again: they were delivered the first time. Refuses to write
into a prefix that holds state, so it cannot double-count.

Limits (see README): one process holds the whole state while it rebuilds.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
import time
from collections import defaultdict
from typing import Any

import orjson
import redis.asyncio as aioredis

from detectors.activity import ActivityBatch
from detectors.catalog import Catalog
from detectors.pipeline import CODE_PART, LEDGER_PART, MemoryStage, Pipeline, partition_of
from detectors.stage import lane_of
from streams.codecs import CodeCodec, JsonCodec
from streams.kafka_config import client_config
from streams.redis_state import IngestStore, StageStore, connect
from topics import names
from topics.records import KEY_SEP, InvalidEvent, parse_event

CHUNK = 2000


class RebuildError(RuntimeError):
    pass


def read_input(
    bootstrap: str, topic: names.TopicSpec
) -> tuple[list[tuple[int, bytes]], dict[int, int]]:
    """Every message of the input topic up to its current end, in partition order per
    partition and interleaved by timestamp across partitions (the order they arrived)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": f"tracewatch-rebuild-{time.time_ns()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
        )
    )
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic.name, p), timeout=10)[1]
        for p in range(topic.partitions)
    }
    consumer.assign([TopicPartition(topic.name, p, 0) for p in range(topic.partitions) if ends[p]])
    per_partition: dict[int, list[tuple[int, int, bytes]]] = defaultdict(list)
    remaining = {p for p, end in ends.items() if end}
    while remaining:
        for msg in consumer.consume(5000, 1.0):
            p, offset = msg.partition(), msg.offset()
            if msg.error() is not None or p is None or offset is None:
                continue
            if offset < ends[p]:
                per_partition[p].append((msg.timestamp()[1], p, msg.value() or b""))
            if offset >= ends[p] - 1:
                remaining.discard(p)
    consumer.close()
    # each partition in offset order, partitions interleaved by timestamp
    merged = heapq.merge(*per_partition.values(), key=lambda m: m[0])
    return [(p, value) for _, p, value in merged], ends


async def write_state(
    client: aioredis.Redis,
    settings: Any,
    pipeline: Pipeline,
    partition_of_institution: dict[str, int],
    seen_by_partition: dict[int, dict[str, str]],
) -> dict[str, int]:
    counts: dict[str, int] = {}
    tops = pipeline.clock.tops()
    for tag, memory, topic in (
        (LEDGER_PART, pipeline.ledger, names.BY_LEDGER),
        (CODE_PART, pipeline.codes, names.BY_CODE),
    ):
        counts[tag] = await _write_stage(client, settings, tag, memory, topic, tops)
    ingest = IngestStore(
        client, settings.redis_prefix, settings.seen_ttl_days, settings.activity_days
    )
    activity_by_partition: dict[int, ActivityBatch] = defaultdict(ActivityBatch)
    if pipeline.activity is not None:
        for (inst, day), sums in pipeline.activity.days.items():
            p = partition_of_institution.get(inst, 0)
            activity_by_partition[p].days[(inst, day)] = sums
        for (inst, month, product), figures in pipeline.activity.prices.items():
            p = partition_of_institution.get(inst, 0)
            activity_by_partition[p].prices[(inst, month, product)] = figures
    index_by_partition: dict[int, dict[str, list[Any]]] = defaultdict(dict)
    for key, targets in pipeline.view.index.items():
        inst = key.split(KEY_SEP, 2)[1]
        index_by_partition[partition_of_institution.get(inst, 0)][key] = targets
    receivers_by_partition: dict[int, list[str]] = defaultdict(list)
    for inst in pipeline.view.receivers:
        receivers_by_partition[partition_of_institution.get(inst, 0)].append(inst)
    own_by_partition: dict[int, dict[str, float]] = defaultdict(dict)
    for inst, ts in pipeline.clock.own.items():
        own_by_partition[partition_of_institution.get(inst, 0)][inst] = ts
    named = pipeline.clock.named_tops()
    partitions = set(seen_by_partition) | set(index_by_partition) | set(receivers_by_partition)
    for p in partitions:
        seen = list(seen_by_partition.get(p, {}).items())
        index = list(index_by_partition.get(p, {}).items())
        lanes = {lane_of(inst) for inst in own_by_partition.get(p, {})}
        for start in range(0, max(len(seen), len(index), 1), CHUNK):
            first = start == 0
            await ingest.save(
                p,
                dict(seen[start : start + CHUNK]),
                dict(index[start : start + CHUNK]),
                receivers_by_partition.get(p, []) if first else [],
                own_by_partition.get(p, {}) if first else {},
                {lane: named[lane] for lane in lanes if lane in named} if first else {},
                activity=activity_by_partition.get(p) if first else None,
            )
    counts["seen"] = sum(len(v) for v in seen_by_partition.values())
    counts["index"] = len(pipeline.view.index)
    return counts


async def _write_stage(
    client: aioredis.Redis,
    settings: Any,
    tag: str,
    memory: MemoryStage,
    topic: names.TopicSpec,
    tops: dict[int, tuple[float, float]],
) -> int:
    store = StageStore(
        client,
        settings.redis_prefix,
        tag,
        settings.state_buckets,
        settings.applied_ttl_days,
        codec=CodeCodec() if tag == CODE_PART else JsonCodec(),
    )
    by_partition: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, state in memory.state.items():
        if state:
            by_partition[partition_of(key, topic.partitions)][key] = state
    # the ids of every record applied, so records still in flight on the internal topics
    # (or read again) change nothing
    ids_by_partition: dict[int, list[str]] = defaultdict(list)
    for key, ids in (memory.applied_by_key or {}).items():
        ids_by_partition[partition_of(key, topic.partitions)].extend(ids)
    await store.acquire(range(topic.partitions))
    for p in range(topic.partitions):
        items = list(by_partition.get(p, {}).items())
        ids = ids_by_partition.get(p, [])
        for start in range(0, max(len(items), len(ids), 1), CHUNK):
            chunk = dict(items[start : start + CHUNK])
            await store.save(p, chunk, ids[start : start + CHUNK], tops if start == 0 else None)
    store.release(range(topic.partitions))
    return sum(len(v) for v in by_partition.values())


def commit_group_offsets(bootstrap: str, input_ends: dict[int, int]) -> None:
    """Each stage's consumer group (`topics.names.group_of`) to the end of what the rebuild
    covered: ingest to the input offsets read, the stages to their topics' ends."""
    from confluent_kafka import Consumer, TopicPartition

    stages = {
        "ledger": names.BY_LEDGER,
        "code": names.BY_CODE,
        "verdict": names.VERDICT_PARTS,
    }
    for stage in names.STAGES:
        consumer = Consumer(
            client_config(
                bootstrap, **{"group.id": names.group_of(stage), "enable.auto.commit": False}
            )
        )
        try:
            spec = stages.get(stage)
            if spec is None:
                offsets = [
                    TopicPartition(names.EVENTS.name, p, end) for p, end in input_ends.items()
                ]
            else:
                offsets = [
                    TopicPartition(
                        spec.name,
                        p,
                        consumer.get_watermark_offsets(TopicPartition(spec.name, p), timeout=10)[1],
                    )
                    for p in range(spec.partitions)
                ]
            consumer.commit(offsets=offsets, asynchronous=False)
        finally:
            consumer.close()


async def prefix_is_empty(client: aioredis.Redis, prefix: str) -> bool:
    async for key in client.scan_iter(match=f"{prefix}:{{*", count=1000):
        if not key.endswith(b":gen"):
            return False
    return True


def rebuild(settings: Any, catalog: Catalog) -> dict[str, int]:
    bootstrap = settings.require_kafka()

    async def check_empty() -> bool:
        client = connect(settings.redis_url)
        try:
            return await prefix_is_empty(client, settings.redis_prefix)
        finally:
            await client.aclose()

    if not asyncio.run(check_empty()):
        raise RebuildError(
            f"Redis prefix {settings.redis_prefix!r} already holds state: rebuilding on top of it "
            "would count events twice. Point TRACEWATCH_REDIS_PREFIX at an empty prefix (or "
            "delete its keys) and run again, with the workers stopped."
        )
    from streams.layout import check_state, check_topics

    check_topics(bootstrap)
    print(f"reading {names.EVENTS.name} ...", file=sys.stderr)
    messages, ends = read_input(bootstrap, names.EVENTS)
    pipeline = Pipeline(
        catalog,
        grace_seconds=settings.grace_hours * 3600,
        idle_seconds=settings.idle_hours * 3600,
        track_applied=True,
        track_activity=True,
    )
    partition_of_institution: dict[str, int] = {}
    seen_by_partition: dict[int, dict[str, str]] = defaultdict(dict)
    for p, value in messages:
        try:
            event = parse_event(value)
        except InvalidEvent:
            continue
        partition_of_institution.setdefault(event.institution, p)
        if event.key not in pipeline.seen:
            seen_by_partition[p][event.key] = event.digest
        pipeline.process(event)
    print(f"replayed {len(messages)} messages; writing state ...", file=sys.stderr)

    async def write() -> dict[str, int]:
        client = connect(settings.redis_url)
        try:
            return await write_state(
                client, settings, pipeline, partition_of_institution, seen_by_partition
            )
        finally:
            await client.aclose()

    counts = asyncio.run(write())
    check_state(settings, claim=True, overwrite=True)  # laid out as this process laid it out
    try:
        commit_group_offsets(bootstrap, ends)
    except Exception as exc:  # a group the broker still thinks has members
        print(
            f"warning: could not move the consumer groups {names.group_of('*')} offsets "
            f"({exc}); the "
            "workers will re-read what they had not committed, and the rebuilt seen events and "
            "applied ids make that a no-op",
            file=sys.stderr,
        )
    counts["messages"] = len(messages)
    return counts


def dumps(counts: dict[str, int]) -> bytes:
    return orjson.dumps(counts)
