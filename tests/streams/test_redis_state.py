"""Redis adapters against a real Redis: batch load/save, applied ids, generation fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from detectors.stage import lane_of
from harness.services import Services
from streams.codecs import CodeCodec, JsonCodec
from streams.redis_state import IngestStore, PartitionLost, StageStore, connect

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
        store = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2, codec=JsonCodec())
        await store.acquire([3])
        batch = await store.load(3, ["a", "b"], ["r1", "r2"])
        assert batch.state == {} and batch.applied == set() and batch.tops == {}
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
        old = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2, codec=JsonCodec())
        new = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2, codec=JsonCodec())
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


def test_a_generation_redis_lost_is_restored_by_its_owner(svc: Services, redis_prefix: str) -> None:
    """A failover to a lagging replica (or an AOF tail) can lose the last INCR of `gen`: the
    owner's save finds an older or no generation, writes and puts its own back; a newer one
    still refuses it."""

    async def body(client: aioredis.Redis) -> None:
        store = StageStore(client, redis_prefix, "L", buckets=8, applied_days=2, codec=JsonCodec())
        await store.acquire([5])
        gen_key = f"{redis_prefix}:{{L5}}:gen"
        mine = store.generations[5]
        await client.delete(gen_key)
        await store.save(5, {"k": {"legacy": 1}}, ["r1"])
        assert await client.get(gen_key) == mine.encode()
        await client.set(gen_key, int(mine) - 1)
        await store.save(5, {"k": {"legacy": 2}}, ["r2"])
        assert await client.get(gen_key) == mine.encode()
        assert (await store.load(5, ["k"], [])).state == {"k": {"legacy": 2}}
        await client.set(gen_key, int(mine) + 1)  # a newer owner
        with pytest.raises(PartitionLost):
            await store.save(5, {"k": {"legacy": 3}}, ["r3"])

    with_redis(svc, body)


def test_lane_tops_and_due_index(svc: Services, redis_prefix: str) -> None:
    """Parked states come back once their lane's effective time passes them, with binary-packed
    code keys; lane tops only ever rise, part by part."""
    codes = [f"8100001000000000{n:04d}" for n in range(200)]  # some pack to bytes with 0x00/'|'

    async def body(client: aioredis.Redis) -> None:
        store = StageStore(client, redis_prefix, "C", buckets=4, applied_days=2, codec=CodeCodec())
        await store.acquire([2])
        lane = lane_of("P2")
        parked = {
            code: {
                "h": [["P1", 1772400000, 1]],
                "d": [["P2", "e:E1", "E1", 1772400000, 0, 0, 1, 1, "", 480, ""]],
                "due": 1772409600 + i,
                "dl": lane,
            }
            for i, code in enumerate(codes)
        }
        await store.save(2, parked, ["r1"], tops={3: (1772409000.0, float("-inf"))})
        # another lane far ahead finds nothing: the checks wait on P2's lane
        assert (await store.load(2, [], [], marks={lane_of("P9"): 1.9e9})).due == {}
        batch = await store.load(2, [], [], marks={lane: 1772409600.0 + 49})
        assert batch.tops == {3: (1772409000.0, float("-inf"))}
        assert sorted(batch.due) == sorted(codes[:50])
        assert all(batch.state[c] == parked[c] for c in codes[:50])
        # a state without `due` leaves the index; tops merge part by part
        await store.save(
            2,
            {c: {"h": [["P1", 1772400000, 1]]} for c in codes[:50]},
            [],
            tops={3: (1.0, 1772400001.0)},
            previous_lanes=batch.due,
        )
        batch = await store.load(2, [], [], marks={lane: 1772409600.0 + 1000})
        assert batch.tops == {3: (1772409000.0, 1772400001.0)}
        assert sorted(batch.due) == sorted(codes[50:])

    with_redis(svc, body)


def test_ingest_store(svc: Services, redis_prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        store = IngestStore(client, redis_prefix, days=7)
        got = await store.load(1, ["H1|e1", "H1|e2"], ["e|H1|e0"], ["H1"])
        assert got.seen == [None, None] and got.index == {} and got.receivers == set()
        assert got.own == {} and got.tops == {}
        await store.save(
            1,
            {"H1|e1": "d1"},
            {"e|H1|e0": [["c", "8100", "d", "e:e0"]]},
            ["H1"],
            {"H1": 1772409600.0},
            {1: [(1772409600.0, "H1")]},
        )
        got = await store.load(1, ["H1|e1", "H1|e2"], ["e|H1|e0"], ["H1", "H2"])
        assert got.seen == ["d1", None]
        assert got.index == {"e|H1|e0": [["c", "8100", "d", "e:e0"]]}
        assert got.receivers == {"H1"}
        assert got.own == {"H1": 1772409600.0}
        assert got.tops == {1: [(1772409600.0, "H1")]}
        await store.save(1, {}, {}, [], {"H1": 1.0})  # own time never moves back
        assert (await store.load(1, [], [], ["H1"])).own == {"H1": 1772409600.0}
        assert (await store.load(2, ["H1|e1"], [], [])).seen == [None]  # per input partition
        ttl = await client.ttl(store._day_keys(1, "seen")[0])
        assert 6 * 86400 < ttl <= 7 * 86400

    with_redis(svc, body)


def test_positions_rise_only_and_states_expire_where_redis_can(
    svc: Services, redis_prefix: str
) -> None:
    async def body(client: aioredis.Redis) -> None:
        store = StageStore(
            client,
            redis_prefix,
            "C",
            buckets=4,
            applied_days=2,
            codec=CodeCodec(),
            field_ttl_days=1,
        )
        await store.acquire([0])
        assert (await store.load(0, [], [])).position is None
        await store.save(0, {"81000010000000000001": {"p": "XA001"}}, ["r1"], position=10)
        await store.save(0, {}, [], position=7)  # a new owner redoing committed batches
        loaded = await store.load(0, ["81000010000000000001"], [])
        assert loaded.position == 10
        assert loaded.state == {"81000010000000000001": {"p": "XA001"}}
        version = (await client.info("server"))["redis_version"]
        if tuple(int(x) for x in str(version).split(".")[:2]) >= (7, 4):
            bucket = f"{redis_prefix}:{{C0}}:s:{store._bucket_no('81000010000000000001')}"
            ttl = await client.execute_command(  # type: ignore[no-untyped-call]
                "HTTL", bucket, "FIELDS", 1, CodeCodec.field("81000010000000000001")
            )
            assert 0 < ttl[0] <= 86400

    with_redis(svc, body)


def test_activity_adds_up_per_day_and_month_and_reads_back(
    svc: Services, redis_prefix: str
) -> None:
    from detectors.activity import ActivityBatch, PriceFigures
    from detectors.pipeline import partition_of
    from streams.redis_state import ActivityReader

    def batch(days: dict[tuple[str, str], list[int]], prices: dict[Any, PriceFigures]) -> Any:
        b = ActivityBatch()
        b.days.update(days)
        b.prices.update(prices)
        return b

    async def body(client: aioredis.Redis) -> None:
        store = IngestStore(client, redis_prefix, days=7, activity_days=30)
        p = partition_of("H1", 16)
        await store.save(
            p,
            {},
            {},
            [],
            activity=batch(
                {("H1", "20261101"): [2, 1, 1, 1, 3, 2, 4], ("H1", "20261102"): [1] * 7},
                {("H1", "202611", "XA001"): PriceFigures(2, 1000, 1200, 2200)},
            ),
        )
        await store.save(
            p,
            {},
            {},
            [],
            activity=batch(
                {("H1", "20261101"): [1, 0, 0, 0, 0, 0, 5], ("H1", "20261201"): [1] * 7},
                {("H1", "202611", "XA001"): PriceFigures(1, 900, 900, 900)},
            ),
        )
        reader = ActivityReader(client, redis_prefix, 16)
        assert await reader.days(["H1", "H2"], ["202611"]) == {
            "H1": {"20261101": [3, 1, 1, 1, 3, 2, 9], "20261102": [1] * 7}
        }
        months = await reader.months(["H1", "H2"], ["202611", "202612"])
        assert months == {"H1": [5, 3, 3, 3, 5, 4, 11]}
        assert await reader.prices(["H1", "H2"], ["202611"]) == {
            "H1": {"XA001": PriceFigures(3, 900, 1200, 3100)}
        }
        key = f"{redis_prefix}:{{E{p}}}:act:202611:H1"
        assert 29 * 86400 < await client.ttl(key) <= 30 * 86400

    with_redis(svc, body)
