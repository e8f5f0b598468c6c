"""Redis adapters against a real Redis: batch load/save, applied ids, generation fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from detectors.code_state import CodeStage
from detectors.ledger import LedgerStage
from detectors.stage import lane_of
from streams.redis_state import IngestStore, PartitionLost, StageStore, connect
from streams.services import Services

T = TypeVar("T")
pytestmark = pytest.mark.integration


def with_redis(svc: Services, body: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = connect(svc.redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_state_round_trip_and_applied_ids(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        store = StageStore(
            client, redis_prefix, "L", buckets=8, applied_days=2, codec=LedgerStage()
        )
        await store.acquire([3])
        batch = await store.load(3, ["a", "b"], ["r1", "r2"])
        assert batch.state == {} and batch.applied == set() and batch.watermarks == {}
        await store.save(3, {"a": {"legacy": 5}, "b": {"legacy": 1}}, ["r1"])
        batch = await store.load(3, ["a", "b", "c"], ["r1", "r2"])
        assert batch.state == {"a": {"legacy": 5}, "b": {"legacy": 1}}
        assert batch.applied == {"r1"}
        await store.save(3, {"b": {}}, [])  # empty state = deleted
        assert (await store.load(3, ["a", "b"], [])).state == {"a": {"legacy": 5}}
        # other partitions do not see it
        assert (await store.load(4, ["a"], ["r1"])).state == {}

    with_redis(svc, body)


def test_a_worker_that_lost_the_partition_cannot_write(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        old = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2, codec=LedgerStage())
        new = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2, codec=LedgerStage())
        await old.acquire([0])
        await old.save(0, {"k": {"legacy": 1}}, ["r1"])
        await new.acquire([0])  # a rebalance moved partition 0
        with pytest.raises(PartitionLost):
            await old.save(0, {"k": {"legacy": 99}}, ["r2"])
        assert 0 not in old.generations
        batch = await new.load(0, ["k"], ["r1", "r2"])
        assert batch.state == {"k": {"legacy": 1}} and batch.applied == {"r1"}
        await new.save(0, {"k": {"legacy": 2}}, ["r2"])
        with pytest.raises(PartitionLost):
            await old.save(0, {"k": {"legacy": 3}}, [])  # not owned at all any more

    with_redis(svc, body)


def test_watermark_and_due_index(svc: Services, redis_prefix: str) -> None:
    """Parked states come back once the watermark passes them, with binary-packed code keys."""
    codes = [f"8100001000000000{n:04d}" for n in range(200)]  # some pack to bytes with 0x00/'|'

    async def body(client: aioredis.Redis) -> None:
        store = StageStore(client, redis_prefix, "C", buckets=4, applied_days=2, codec=CodeStage())
        await store.acquire([2])
        grace = 72 * 3600  # CodeStage's default: `due` is the parked sale's time + grace
        parked = {
            code: {
                "r": ["P1"],
                "np": [["P2", f"E{i}", 1772409600.0 + i - grace]],
                "due": 1772409600.0 + i,
                "dl": lane_of("P2"),
            }
            for i, code in enumerate(codes)
        }
        await store.save(2, parked, ["r1"], watermarks={3: 1772409000.0, 5: 1772400000.0})
        # another lane far ahead finds nothing: the checks wait on P2's lane
        assert (await store.load(2, [], [], offered={lane_of("P9"): 1.9e9})).due == {}
        batch = await store.load(2, [], [], offered={lane_of("P2"): 1772409000.0 + 600 + 49})
        assert batch.watermarks == {3: 1772409000.0, 5: 1772400000.0}
        assert sorted(batch.due) == sorted(codes[:50])
        assert all(batch.state[c] == parked[c] for c in codes[:50])
        # a lane's watermark only rises, and a state without `due` leaves the index
        await store.save(
            2,
            {c: {"r": ["P1"]} for c in codes[:50]},
            [],
            watermarks={3: 1.0, 5: 1772400001.0},
            previous_lanes=batch.due,
        )
        batch = await store.load(2, [], [], offered={lane_of("P2"): 1772409600.0 + 1000})
        assert batch.watermarks == {3: 1772409000.0, 5: 1772400001.0}
        assert sorted(batch.due) == sorted(codes[50:])

    with_redis(svc, body)


def test_ingest_store(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        store = IngestStore(client, redis_prefix, days=7)
        seen, index, receivers = await store.load(1, ["H1|e1", "H1|e2"], ["e|H1|e0"], ["H1"])
        assert seen == [False, False] and index == {} and receivers == set()
        await store.save(1, ["H1|e1"], {"e|H1|e0": [["c", "8100", "d", "e:e0"]]}, ["H1"])
        seen, index, receivers = await store.load(1, ["H1|e1", "H1|e2"], ["e|H1|e0"], ["H1", "H2"])
        assert seen == [True, False]
        assert index == {"e|H1|e0": [["c", "8100", "d", "e:e0"]]}
        assert receivers == {"H1"}
        assert (await store.load(2, ["H1|e1"], [], []))[0] == [False]  # per input partition
        ttl = await client.ttl(store._day_keys(1, "seen")[0])
        assert 6 * 86400 < ttl <= 7 * 86400

    with_redis(svc, body)
