"""The Faust app: consumer group, agents, timer and web view around the batch processors.

    events --ingest--+--> by-ledger --ledger--+--> verdict-parts --verdict--> verdicts
       |             +--> by-code ----code----+
       |             +--> verdict-parts (heads)     ledger, code --> alerts
       +--> alerts, dead-letters

Faust owns what it does well - group membership, partition assignment, agents, timers, the web
server. Per-key state is not in Faust Tables (one changelog message per write caps a worker at
~5,000 updates/s, see PERFORMANCE.md); it is in Redis, a batch at a time (`streams.processors`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from prometheus_client import generate_latest

from detectors.code_state import CodeStage
from detectors.ledger import LedgerStage
from detectors.pipeline import CODE_PART, LEDGER_PART
from detectors.stage import Stage
from detectors.verdicts import VerdictStage
from streams import gc_tuning, metrics
from streams.backfill import read_range_async
from streams.codecs import CodeCodec, JsonCodec
from streams.kafka_config import faust_credentials
from streams.output import OutputProducer
from streams.processors import Alignment, IngestProcessor, Message, Refill, StageProcessor
from streams.redis_state import IngestStore, StageStore, connect
from streams.reference import CatalogCache
from streams.retry import run_batch
from streams.settings import Settings
from topics import names

log = logging.getLogger("tracewatch.worker")

_fetch_max_wait_ms = 20
_original_create_worker_consumer = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    # Faust hard-codes fetch_max_wait_ms=1500. The embedded broker holds an empty fetch for the
    # full wait even when data arrives, which left workers idle half the time; real Kafka
    # answers as soon as data is there, so a short wait costs it only a few more empty fetches.
    consumer = _original_create_worker_consumer(self, transport)
    consumer._fetch_max_wait_ms = _fetch_max_wait_ms
    return consumer


faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]

_original_on_join_leader = CoordinatorGroupRebalance._on_join_leader


async def _on_join_leader_after_followers(self: Any, response: Any) -> Any:
    # The embedded broker marks the group synced as soon as the leader's SyncGroup (holding
    # every member's assignment) arrives, and answers a follower's later SyncGroup with
    # INVALID_REQUEST; that follower then rejoins and the group waits out a session timeout
    # before the next election. Followers send theirs at once, so the leader waits a moment.
    await asyncio.sleep(0.5)
    return await _original_on_join_leader(self, response)


_INPUTS = (names.EVENTS, names.BY_LEDGER, names.BY_CODE, names.VERDICT_PARTS)


def _messages(events: Any) -> list[Message]:
    return [
        Message(e.message.partition, e.message.offset, e.message.timestamp, e.value) for e in events
    ]


async def _until_done(
    what: str, step: Callable[[], Awaitable[None]], label: str = "assign"
) -> None:
    """Retry a step that only a Redis or broker outage can fail (with backoff, for as long as
    the outage lasts): a partition assigned while Redis is down must not kill the worker."""
    delay = 0.2
    while True:
        try:
            await step()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.BATCH_RETRIES.labels(label).inc()
            log.error("%s failed, retrying in %.1fs: %r", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _refill(bootstrap: str, topic: str) -> Refill:
    async def read(ranges: dict[int, tuple[int, int]]) -> list[Message]:
        return [Message(*raw) for raw in await read_range_async(bootstrap, topic, ranges)]

    return read


def _highwaters(app: faust.App, topic: str) -> dict[int, tuple[int | None, int | None]]:
    """Per assigned partition of `topic`: its high-water mark and when the consumer last read
    it (ms), from aiokafka's fetch responses (Faust exposes the first, not the second)."""
    try:
        consumer = app.consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
        assigned = [tp for tp in app.consumer.assignment() if tp.topic == topic]
    except Exception:  # not started, or between assignments
        return {}
    marks: dict[int, tuple[int | None, int | None]] = {}
    for tp in assigned:
        try:
            marks[tp.partition] = (consumer.highwater(tp), consumer.last_poll_timestamp(tp))
        except Exception:  # revoked meanwhile
            continue
    return marks


def build_app(settings: Settings) -> faust.App:
    global _fetch_max_wait_ms
    _fetch_max_wait_ms = settings.fetch_max_wait_ms
    if settings.embedded_broker:
        CoordinatorGroupRebalance._on_join_leader = _on_join_leader_after_followers
    bootstrap = settings.require_kafka()
    app = faust.App(
        names.APP_ID,
        broker=f"kafka://{bootstrap}",
        broker_credentials=faust_credentials(),
        store="memory://",
        # The embedded broker has no topic admin API: every topic is created beforehand
        # (`tracewatch topics` or the broker host), on real Kafka too, from `topics.names`.
        topic_allow_declare=False,
        topic_disable_leader=False,
        consumer_auto_offset_reset="earliest",
        web_port=settings.web_port,
        web_host=settings.web_host,
        # Faust's own views read tables and routing state without authentication: off. The
        # worker serves `/` (status) and `/metrics`; data reads go through the API.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        producer_linger_ms=5,
        producer_compression_type="lz4",
        stream_buffer_maxsize=65536,
        broker_max_poll_records=settings.batch_size * 2,
        consumer_max_fetch_size=8 * 1024 * 1024,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=settings.session_timeout / 5,
        value_serializer="raw",
        key_serializer="raw",
        # No Faust tables are used; a private datadir keeps two workers on one host apart.
        datadir=tempfile.mkdtemp(prefix="tracewatch-faust-"),
    )
    redis_client = connect(settings.redis_url)
    catalog = CatalogCache(redis_client, settings.redis_prefix)
    # A producer per stage: one stage's flush, delivery errors and replacement after a fatal
    # error never touch another stage's batch in flight.
    ingest = IngestProcessor(
        OutputProducer(bootstrap),
        IngestStore(redis_client, settings.redis_prefix, settings.seen_ttl_days),
        catalog.current,
        refill=_refill(bootstrap, names.EVENTS.name),
        daily_quota=settings.institution_daily_quota,
    )

    def processor(
        stage: Stage,
        tag: str,
        source: names.TopicSpec,
        part_prefix: str | None = None,
        alignment: Alignment | None = None,
    ) -> StageProcessor:
        store = StageStore(
            redis_client,
            settings.redis_prefix,
            tag,
            settings.state_buckets,
            settings.applied_ttl_days,
            codec=CodeCodec() if isinstance(stage, CodeStage) else JsonCodec(),
            field_ttl_days=settings.code_state_ttl_days if isinstance(stage, CodeStage) else 0,
        )
        return StageProcessor(
            stage,
            store,
            OutputProducer(bootstrap),
            part_prefix=part_prefix,
            idle_seconds=idle,
            refill=_refill(bootstrap, source.name),
            alignment=alignment,
        )

    grace = settings.grace_hours * 3600
    idle = settings.idle_hours * 3600
    ledger = processor(LedgerStage(grace), LEDGER_PART, names.BY_LEDGER, part_prefix=LEDGER_PART)
    aligned = settings.align_wait > 0
    codes = processor(
        CodeStage(grace),
        CODE_PART,
        names.BY_CODE,
        part_prefix=CODE_PART,
        alignment=Alignment(names.EVENTS.partitions, settings.align_wait) if aligned else None,
    )
    heartbeat_producer = OutputProducer(bootstrap) if aligned else None
    verdicts = processor(VerdictStage(), "V", names.VERDICT_PARTS)
    stage_topics = {
        names.BY_LEDGER.name: ledger,
        names.BY_CODE.name: codes,
        names.VERDICT_PARTS.name: verdicts,
    }

    def topic(spec: names.TopicSpec) -> Any:
        return app.topic(spec.name, partitions=spec.partitions, value_serializer="raw")

    @app.agent(topic(names.EVENTS), name="ingest")
    async def ingest_agent(stream: Any) -> None:
        await catalog.ready.wait()
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within):
            await run_batch("ingest", ingest.process, _messages(events), ingest.skip)

    @app.agent(topic(names.BY_LEDGER), name="ledger")
    async def ledger_agent(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within):
            await run_batch("ledger", ledger.process, _messages(events), ledger.skip)

    @app.agent(topic(names.BY_CODE), name="code")
    async def code_agent(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within):
            await run_batch("code", codes.process, _messages(events), codes.skip)

    @app.agent(topic(names.VERDICT_PARTS), name="verdict")
    async def verdict_agent(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within):
            await run_batch("verdict", verdicts.process, _messages(events), verdicts.skip)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
        for spec in _INPUTS:
            metrics.ASSIGNED.labels(spec.name).set(sum(tp.topic == spec.name for tp in assigned))
        for topic_name, processor in stage_topics.items():
            mine = {tp.partition for tp in assigned if tp.topic == topic_name}
            held = set(processor.store.generations)
            processor.store.release(held - mine)
            await _until_done(
                f"take over {topic_name} partitions",
                functools.partial(processor.store.acquire, sorted(mine - held)),
            )

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        for spec in _INPUTS:
            gone = sum(1 for tp in revoked if tp.topic == spec.name)
            metrics.ASSIGNED.labels(spec.name).dec(gone)
        for topic_name, processor in stage_topics.items():
            processor.store.release(tp.partition for tp in revoked if tp.topic == topic_name)
        ingest.forget(tp.partition for tp in revoked if tp.topic == names.EVENTS.name)

    @app.timer(interval=settings.align_heartbeat)
    async def routed_heartbeat() -> None:
        if heartbeat_producer is None:
            return
        try:
            caught_up = await ingest.caught_up(_highwaters(app, names.EVENTS.name))
            await ingest.heartbeat(
                heartbeat_producer,
                {p: ms - settings.align_margin_ms for p, ms in caught_up.items()},
            )
        except Exception as exc:  # Redis or the broker away: the next beat tries again
            log.debug("routed heartbeat failed: %r", exc)

    @app.task
    async def load_reference_data() -> None:
        async def load() -> None:
            if settings.catalog_path:
                await catalog.publish_file(settings.catalog_path)
            await catalog.refresh()

        # Redis may be down as the worker starts: ingest waits for the catalog meanwhile.
        await _until_done("loading the catalog", load, label="catalog")

    @app.timer(interval=5.0)
    async def refresh_reference_data() -> None:
        try:
            await catalog.refresh()
        except Exception as exc:  # Redis briefly away: keep the catalog we have
            log.warning("catalog refresh failed: %r", exc)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; the exposition format is ASCII anyway.
        return web.bytes(generate_latest(), content_type="text/plain; version=0.0.4")

    return app


def run_worker(settings: Settings) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # optional speed-up
        pass
    app = build_app(settings)
    gc_tuning.tune()
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    # Faust's spinner sets the root logger to DEBUG when the level is WARNING: every debug line
    # is then formatted (about 10% of CPU).
    worker.spinner = None
    worker.execute_from_commandline()
