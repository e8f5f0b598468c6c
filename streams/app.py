"""The worker: the data plane on confluent-kafka consumers, Faust around it.

    events --ingest--+--> by-ledger --ledger--+--> verdict-parts --verdict--> verdicts
       |             +--> by-code ----code----+
       |             +--> verdict-parts (heads)     ledger, code --> alerts
       +--> alerts, dead-letters

What runs where:
- **Data plane** (`streams.consumer`): one confluent-kafka consumer per stage, each in its own
  group (`<app id>-ingest`, `-ledger`, `-code`, `-verdict`), reads a batch with one
  `consume(n, timeout)` call on a thread of its own and hands it to the stage's batch processor
  (`streams.processors`) on the event loop; the group's rebalance callbacks acquire and release
  the partitions' generations in Redis between two batches. Faust's per-message path cost ~290
  us a message (PERFORMANCE.md); this one a few.
- **Faust** owns the worker's life cycle (start, signals, orderly stop: each consumer finishes
  its batch, commits and leaves its group), the timers (the code stage's alignment heartbeat,
  the catalog refresh), the start-up task that loads the catalog, and the web server
  (`/metrics`). Its consumer reads only its own leader-election topic.
- **Redis** holds per-key state, a batch at a time (Faust Tables cap a worker at ~5,000 updates
  a second, see PERFORMANCE.md).
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
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from prometheus_client import generate_latest

from detectors.code_state import CodeStage
from detectors.ledger import LedgerStage
from detectors.pipeline import CODE_PART, LEDGER_PART
from detectors.stage import Stage
from detectors.verdicts import VerdictStage
from streams import gc_tuning, log_rate, metrics
from streams.backfill import read_range_async
from streams.codecs import CodeCodec, JsonCodec
from streams.consumer import BatchConsumer, Partitions, consumer_config
from streams.kafka_config import faust_credentials
from streams.layout import exit_on_mismatch
from streams.output import OutputProducer
from streams.processors import Alignment, IngestProcessor, Message, Refill, StageProcessor
from streams.redis_state import IngestStore, StageStore, connect, is_cluster
from streams.reference import CatalogCache
from streams.settings import Settings
from topics import names

log = logging.getLogger("tracewatch.worker")

# How long a stopping worker lets the batches in flight finish.
STOP_GRACE_SECONDS = 5.0

_original_on_join_leader = CoordinatorGroupRebalance._on_join_leader
_original_consumer_thread_stop = AIOKafkaConsumerThread.on_thread_stop


async def _consumer_thread_stop(self: Any) -> None:
    # Faust's own consumer (its leader-election topic only) stopped while the broker is gone:
    # aiokafka's fetcher re-raises the cancel of its retry sleep out of `stop()`, the thread
    # dies without saying it stopped, and mode waits 60 s for it. Nothing of ours is in it.
    try:
        await asyncio.wait_for(_original_consumer_thread_stop(self), STOP_GRACE_SECONDS)
    except (asyncio.CancelledError, Exception) as exc:
        log.warning("Faust's consumer did not stop cleanly (%r); going on", exc)


async def _on_join_leader_after_followers(self: Any, response: Any) -> Any:
    # The embedded broker marks the group synced as soon as the leader's SyncGroup (holding
    # every member's assignment) arrives, and answers a follower's later SyncGroup with
    # INVALID_REQUEST; that follower then rejoins and the group waits out a session timeout
    # before the next election. Followers send theirs at once, so the leader waits a moment.
    await asyncio.sleep(0.5)
    return await _original_on_join_leader(self, response)


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


def _initialized(client: Any) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        await client.initialize()

    return step


def _refill(bootstrap: str, topic: str) -> Refill:
    async def read(ranges: dict[int, tuple[int, int]]) -> list[Message]:
        return [Message(*raw) for raw in await read_range_async(bootstrap, topic, ranges)]

    return read


def build_app(settings: Settings) -> faust.App:
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
        # Faust's consumer reads only its leader-election topic (one idle partition; Faust
        # will not run without a subscription): the data plane reads the rest.
        topic_disable_leader=False,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=settings.session_timeout / 5,
        web_port=settings.web_port,
        web_host=settings.web_host,
        # Faust's own views read tables and routing state without authentication: off. The
        # worker serves `/` (status) and `/metrics`; data reads go through the API.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
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
        IngestStore(
            redis_client, settings.redis_prefix, settings.seen_ttl_days, settings.activity_days
        ),
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

    def consumer(
        stage: str,
        spec: names.TopicSpec,
        process: Callable[[list[Message]], Awaitable[None]],
        skip: Callable[[Message, BaseException], Awaitable[None]],
        assigned: Partitions,
        revoked: Partitions,
    ) -> BatchConsumer:
        config = consumer_config(
            bootstrap,
            names.group_of(stage),
            settings.session_timeout,
            settings.fetch_max_wait_ms,
        )
        return BatchConsumer(
            stage,
            spec.name,
            config,
            process,
            skip,
            assigned,
            revoked,
            settings.batch_size,
            settings.batch_within,
            settings.batch_linger,
        )

    def fenced(topic_name: str, owner: StageProcessor) -> tuple[Any, Any]:
        async def assigned(partitions: list[int]) -> None:
            await _until_done(
                f"take over {topic_name} partitions",
                functools.partial(owner.store.acquire, partitions),
            )

        async def revoked(partitions: list[int]) -> None:
            owner.store.release(partitions)

        return assigned, revoked

    async def ingest_assigned(partitions: list[int]) -> None:
        return None

    async def ingest_revoked(partitions: list[int]) -> None:
        ingest.forget(partitions)

    ingest_consumer = consumer(
        "ingest", names.EVENTS, ingest.process, ingest.skip, ingest_assigned, ingest_revoked
    )
    consumers = [ingest_consumer]
    for stage_name, spec, stage_processor in (
        ("ledger", names.BY_LEDGER, ledger),
        ("code", names.BY_CODE, codes),
        ("verdict", names.VERDICT_PARTS, verdicts),
    ):
        consumers.append(
            consumer(
                stage_name,
                spec,
                stage_processor.process,
                stage_processor.skip,
                *fenced(spec.name, stage_processor),
            )
        )
    running: list[asyncio.Task[None]] = []

    async def ingest_when_ready() -> None:
        # Ingest routes with the catalog: no input partition is taken before it is loaded.
        await catalog.ready.wait()
        await ingest_consumer.run()

    @app.task
    async def data_plane() -> None:
        if is_cluster(redis_client):
            # the slot map first, in one task: redis-py's cluster client connecting from many
            # tasks at once trips over its own half-open connections
            await _until_done("reach the Redis Cluster", _initialized(redis_client), "redis")
        running.append(asyncio.ensure_future(ingest_when_ready()))
        running.extend(asyncio.ensure_future(c.run()) for c in consumers[1:])
        await asyncio.gather(*running)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stop_data_plane(sender: Any, **kwargs: Any) -> None:
        for c in consumers:
            c.stop()
        if not running:
            return
        # each finishes its batch, commits and leaves its group; a batch still retrying an
        # outage after the grace is cancelled (not committed: redone by the next owner)
        _done, pending = await asyncio.wait(running, timeout=STOP_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    @app.timer(interval=settings.align_heartbeat)
    async def routed_heartbeat() -> None:
        if heartbeat_producer is None:
            return
        try:
            mine = ingest_consumer.assignment
            # only partitions routed up to their last fetch's high-water mark are asked about
            candidates = [
                p
                for p in mine
                if (high := ingest_consumer.cached_highwater(p)) is not None
                and ingest.routed.get(p, 0) >= high
            ]
            fresh = await ingest_consumer.highwaters(
                sorted({p for p in mine if p not in ingest.routed}.union(candidates))
            )
            caught_up = await ingest.caught_up(fresh)
            await ingest.heartbeat(
                heartbeat_producer,
                {p: ms - settings.align_margin_ms for p, ms in caught_up.items()},
            )
        except Exception as exc:  # Redis or the broker away: the next beat tries again
            log.debug("routed heartbeat failed: %r", exc)

    @app.task
    async def load_reference_data() -> None:
        async def load() -> None:
            # state laid out for these partition counts and buckets, or stop (streams.layout)
            await asyncio.to_thread(exit_on_mismatch, settings)
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
    log_rate.limit_aiokafka()  # its connection errors every 100 ms while a broker is gone
    AIOKafkaConsumerThread.on_thread_stop = _consumer_thread_stop  # type: ignore[method-assign]
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    # Faust's spinner sets the root logger to DEBUG when the level is WARNING: every debug line
    # is then formatted (about 10% of CPU).
    worker.spinner = None
    worker.execute_from_commandline()
