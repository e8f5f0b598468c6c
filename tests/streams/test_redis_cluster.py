"""The pipeline on a real Redis Cluster: three masters with a replica each on loopback
(`harness.services.RedisClusterServers`), `REDIS_URL=redis+cluster://...`.

Every stage partition's keys share a hash tag, so each script runs in one slot; the reads that
span slots (the API's check) are split per slot. A master killed mid-stream is replaced by its
replica: the state survives there, except what the replica had not received yet, which the
stages' position check finds missing and reads back from Kafka (as after any lost Redis writes,
`test_lost_writes.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from detectors.catalog import load_catalog
from harness.services import RedisClusterServers, Services
from streams.codecs import JsonCodec
from streams.layout import LayoutMismatch, check_state_now
from streams.rebuild import prefix_is_empty
from streams.redis_state import (
    READ_FIELDS,
    StageStore,
    cluster_seed,
    cluster_seeds,
    connect,
    connect_sync,
    is_cluster,
    queue_read_fields,
    state_fields,
)
from streams.reference import CatalogCache
from streams.settings import Settings
from tests.api import test_check_agrees
from tests.api.conftest import api_on
from tests.streams.test_pipeline_integration import (
    Pipe,
    _distinct,
    assert_same_verdicts,
    replay,
    standing,
    topic_order,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="no redis-cli to form a cluster"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers().start()
    try:
        yield servers
    finally:
        servers.stop()


def test_stores_catalog_and_cross_slot_reads_on_a_cluster(
    cluster: RedisClusterServers, redis_prefix: str, catalog_file: Path
) -> None:
    async def body() -> None:
        client = connect(cluster.url)
        try:
            assert is_cluster(client)
            assert not is_cluster(connect(f"redis://127.0.0.1:{cluster.nodes[0].port}/0"))
            store = StageStore(
                client, redis_prefix, "L", buckets=8, applied_days=2, codec=JsonCodec()
            )
            partitions = list(range(16))  # 16 hash tags: every master holds some
            await store.acquire(partitions)
            for p in partitions:
                await store.save(p, {f"k{p}": {"legacy": p}}, [f"r{p}"], position=p + 1)
            for p in partitions:
                loaded = await store.load(p, [f"k{p}"], [f"r{p}", "other"])
                assert loaded.state == {f"k{p}": {"legacy": p}} and loaded.applied == {f"r{p}"}
                assert loaded.position == p + 1
            # one read across every slot, as the API's check sends it
            keys = [f"k{p}" for p in partitions]
            fields = state_fields(redis_prefix, "L", 8, 16, keys, JsonCodec())
            marker = f"{redis_prefix}:api:ev:x"
            await client.set(marker, "d")
            pipe = client.pipeline(transaction=False)
            sha = await client.script_load(READ_FIELDS)
            replies, assemble = queue_read_fields(pipe, sha, fields, [marker], cluster=True)
            assert replies > 1  # split by slot
            values = assemble(await pipe.execute())
            direct = [await client.hget(h, f) for h, f in fields]
            assert values == [*direct, b"d"]
            assert sum(v is not None for v in direct) >= 1
            # the catalog: replaced and versioned in one transaction, in one slot
            cache = CatalogCache(client, redis_prefix)
            await cache.publish(load_catalog(str(catalog_file)))
            assert await cache.refresh() and len(cache.catalog) == len(
                load_catalog(str(catalog_file))
            )
            assert not await prefix_is_empty(client, redis_prefix)  # scans every master
            assert await prefix_is_empty(client, redis_prefix + "none")
        finally:
            await client.aclose()

    asyncio.run(body())


def test_the_layout_check_runs_on_a_cluster(
    cluster: RedisClusterServers, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", cluster.url)
    monkeypatch.setenv("TRACEWATCH_REDIS_PREFIX", redis_prefix)
    check_state_now(Settings(), claim=True)
    monkeypatch.setenv("TRACEWATCH_STATE_BUCKETS", "7")
    with pytest.raises(LayoutMismatch):
        check_state_now(Settings(), claim=True)


def _ingest_saved(client: redis.Redis, prefix: str) -> int:
    """Input messages whose effects ingest has saved, over every input partition."""
    keys = list(client.scan_iter(match=f"{prefix}:{{E*}}:pos", count=1000))
    return sum(int(client.get(k) or 0) for k in keys)


def _prefix_keys(node_port: int, prefix: str) -> int:
    one = redis.Redis(port=node_port)
    try:
        return sum(1 for _ in one.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        one.close()


def test_a_master_killed_mid_stream_loses_nothing(
    svc: Services, cluster: RedisClusterServers, redis_prefix: str, tmp_path: Path
) -> None:
    on_cluster = dataclasses.replace(svc, redis_url=cluster.url)
    pipe = Pipe(on_cluster, redis_prefix, tmp_path, events=1500, seed=11)
    expected, verdicts, _ = replay(pipe.data)
    lines = Path(pipe.data["events"]).read_bytes().splitlines(keepends=True)
    first, rest = tmp_path / "first.jsonl", tmp_path / "rest.jsonl"
    first.write_bytes(b"".join(lines[: 2 * len(lines) // 3]))
    rest.write_bytes(b"".join(lines[2 * len(lines) // 3 :]))
    client = connect_sync(cluster.url)
    worker = pipe.worker()
    try:
        pipe.produce(str(first))
        deadline = time.monotonic() + 120
        while _ingest_saved(client, redis_prefix) < 300:
            assert time.monotonic() < deadline, "the worker made no progress on the cluster"
            time.sleep(0.1)
        # the master holding most of the pipeline's keys goes, with whatever its replica lacks,
        # while the stages still work on the first part
        victim = max(cluster.masters(), key=lambda n: _prefix_keys(n.port, redis_prefix))
        assert _prefix_keys(victim.port, redis_prefix) > 0
        victim.kill()
        cluster.wait_healthy()
        pipe.produce(str(rest))  # all of it lands on the new masters
        got, got_verdicts = pipe.outputs(expected, len(verdicts), timeout=180)
    finally:
        worker.stop()
        client.close()
    assert standing(_distinct(got)) == standing(expected)
    _, in_topic_order, _ = replay(
        pipe.data, lines=topic_order(svc.kafka_bootstrap, pipe.topic("events"))
    )
    assert_same_verdicts(got_verdicts, in_topic_order)


def test_the_api_check_reads_across_slots_and_agrees_with_the_stream(
    svc: Services, cluster: RedisClusterServers, tmp_path: Path
) -> None:
    """The settlement check reads ingest's memory, ledger and code states of several slots in
    one pipeline (a call per slot); its verdicts equal the stream's on the cluster."""
    on_cluster = dataclasses.replace(svc, redis_url=cluster.url)
    with api_on(on_cluster, tmp_path) as api:
        test_check_agrees.test_checked_then_submitted_the_check_and_the_stream_agree(
            on_cluster, api
        )


def test_a_cluster_url_may_list_several_seeds() -> None:
    url = "rediss+cluster://user:pw@a:7000,b:7001,c/0"
    assert cluster_seed(url) == "rediss://user:pw@a:7000/0"
    assert cluster_seeds(url) == [("b", 7001), ("c", 6379)]
    assert cluster_seed("redis://a:6379/0") is None
