"""Redis adapters against a real Redis: batch load/save, applied ids, generation fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from streams.redis_state import PartitionLost, SeenFilter, StageStore
from streams.services import Services

T = TypeVar("T")
pytestmark = pytest.mark.integration


def with_redis(svc: Services, body: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aioredis.Redis.from_url(svc.redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_state_round_trip_and_applied_ids(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        store = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2)
        await store.acquire([3])
        state, applied = await store.load(3, ["a", "b"], ["r1", "r2"])
        assert state == {} and applied == set()
        await store.save(3, {"a": {"legacy": 5}, "b": {"legacy": 1}}, ["r1"])
        state, applied = await store.load(3, ["a", "b", "c"], ["r1", "r2"])
        assert state == {"a": {"legacy": 5}, "b": {"legacy": 1}}
        assert applied == {"r1"}
        await store.save(3, {"b": {}}, [])  # empty state = deleted
        state, _ = await store.load(3, ["a", "b"], [])
        assert state == {"a": {"legacy": 5}}
        # other partitions do not see it
        other, _ = await store.load(4, ["a"], ["r1"])
        assert other == {}

    with_redis(svc, body)


def test_a_worker_that_lost_the_partition_cannot_write(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        old = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2)
        new = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2)
        await old.acquire([0])
        await old.save(0, {"k": {"legacy": 1}}, ["r1"])
        await new.acquire([0])  # a rebalance moved partition 0
        with pytest.raises(PartitionLost):
            await old.save(0, {"k": {"legacy": 99}}, ["r2"])
        assert 0 not in old.generations
        state, applied = await new.load(0, ["k"], ["r1", "r2"])
        assert state == {"k": {"legacy": 1}} and applied == {"r1"}
        await new.save(0, {"k": {"legacy": 2}}, ["r2"])
        with pytest.raises(PartitionLost):
            await old.save(0, {"k": {"legacy": 3}}, [])  # not owned at all any more

    with_redis(svc, body)


def test_seen_filter(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        seen = SeenFilter(client, redis_prefix, days=7)
        assert await seen.seen(1, ["H1|e1", "H1|e2"]) == [False, False]
        await seen.mark(1, ["H1|e1"])
        assert await seen.seen(1, ["H1|e1", "H1|e2"]) == [True, False]
        ttl = await client.ttl(seen._window.day_keys(f"{redis_prefix}:{{E1}}:seen")[0])
        assert 6 * 86400 < ttl <= 7 * 86400

    with_redis(svc, body)
