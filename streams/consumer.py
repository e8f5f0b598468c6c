"""The data plane: one confluent-kafka consumer per stage, a batch at a time.

Faust's per-message path cost ~290 us a consumed message here (`../shared/PERFORMANCE.md`),
more than the detectors themselves; `Consumer.consume(n, timeout)` hands over up to `n`
messages in one call for a few microseconds each. Each stage (ingest, ledger, code, verdict)
gets its own consumer in its own group (`<app id>-<stage>`), so one stage's rebalance never
stops another's, and a loop that is strictly sequential:

    gather(n, within, linger)  ->  processor.process(batch)  ->  store the batch's next offsets

A batch starts with the first message to arrive (waiting at most `within` for it, then looping)
and takes what else comes within `linger` after it, up to `n`: an idle stage answers in about
`linger` instead of a whole window, and under load the batches grow by themselves (what arrives
while one batch is processed is the next batch).

`consume` blocks, so it runs in a thread of the consumer's own; the processors run on the event
loop. Offsets are stored only after the batch's outputs were delivered and its state saved, and
committed by librdkafka in the background, on a rebalance and on close: what a crash leaves
uncommitted is read again and absorbed by the state's saved position and applied ids, as before.

Fencing: the group's rebalance callbacks run inside `consume`, on the consumer's thread, between
two batches - never while a batch of this stage is in flight. They hand the partitions to the
event loop (`assigned` acquires them in Redis, bumping their generation; `revoked` releases
them) and wait for it, so a batch only ever runs on partitions whose generation this worker
holds. A batch that outlives its generation anyway (the group moved on after a stall) is
refused by the generation check of its save (`streams.redis_state`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Executor, Future
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka import Message as KafkaMessage
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from streams import metrics
from streams.kafka_config import client_config
from streams.processors import Message, offset_spans
from streams.retry import run_batch

log = logging.getLogger("tracewatch.consumer")

# How long a closing consumer may take to commit and leave its group before the worker exits
# without it (a broker that went first: the group then drops it after the session timeout).
CLOSE_TIMEOUT = 5.0

_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]

Partitions = Callable[[list[int]], Coroutine[Any, Any, None]]


def consumer_config(
    bootstrap: str,
    group: str,
    session_timeout: float,
    fetch_max_wait_ms: int,
    **overrides: Any,
) -> dict[str, Any]:
    """librdkafka settings of a data-plane consumer."""
    return client_config(
        bootstrap,
        **{
            "group.id": group,
            "client.id": group,
            "auto.offset.reset": "earliest",
            # stored by the loop after the batch is saved, committed in the background
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "session.timeout.ms": int(session_timeout * 1000),
            "heartbeat.interval.ms": max(100, int(session_timeout * 200)),
            # the embedded broker holds an empty fetch this long even when data arrives
            "fetch.wait.max.ms": fetch_max_wait_ms,
            "fetch.min.bytes": 1,
            # what librdkafka prefetches per consumer; four consumers share a worker
            "queued.max.messages.kbytes": 16384,
            "enable.partition.eof": False,
            **overrides,
        },
    )


class _DaemonThread(Executor):
    """One thread running what is submitted, in order - a daemon, unlike ThreadPoolExecutor's
    threads, which the interpreter joins at exit: a `consume` or `close` stuck on a broker
    that is gone must not keep a stopping worker alive."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, functools.partial(fn, **kwargs), args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)


class BatchConsumer:
    """Drives one batch processor from one topic (see the module docstring)."""

    def __init__(
        self,
        stage: str,
        topic: str,
        config: dict[str, Any],
        process: Callable[[list[Message]], Awaitable[None]],
        skip: Callable[[Message, BaseException], Awaitable[None]],
        assigned: Partitions,
        revoked: Partitions,
        batch_size: int,
        within: float,
        linger: float = 0.0,
    ) -> None:
        self.stage = stage
        self.topic = topic
        self._config = config
        self._process = process
        self._skip = skip
        self._assigned = assigned
        self._revoked = revoked
        self._batch_size = batch_size
        self._within = within
        self._linger = linger
        # replaced, never mutated: read from the event loop while the consumer thread assigns
        self.assignment: frozenset[int] = frozenset()
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._lag: dict[int, int] = {}  # per partition, as of its last batch
        self._lag_seconds: dict[int, float] = {}
        # for `highwaters`: the consumer's bootstrap and security, nothing of its group
        self._admin_config = {
            k: v
            for k, v in config.items()
            if k in ("bootstrap.servers", "logger") or k.startswith(("security.", "sasl.", "ssl."))
        }
        self._admin: AdminClient | None = None
        self._thread = _DaemonThread(f"tracewatch-{stage}")
        self._queries = _DaemonThread(f"tracewatch-{stage}-marks")

    async def run(self) -> None:
        """Consume until `stop()`, then commit what was stored and leave the group."""
        loop = self._loop = asyncio.get_running_loop()
        consumer = self._consumer = Consumer(self._config)  # librdkafka logs: client_config
        consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        try:
            while not self._stopping:
                raw = await loop.run_in_executor(self._thread, self._gather, consumer)
                batch = self._messages(raw)
                if not batch:
                    continue
                await run_batch(self.stage, self._process, batch, self._skip)
                self._store(consumer, batch)
        finally:
            # after a cancel too: what was stored is committed, the group told at once
            closing = loop.run_in_executor(self._thread, self._close, consumer)
            try:
                await asyncio.wait_for(closing, CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("%s consumer did not close within %.0f s", self.stage, CLOSE_TIMEOUT)

    def _gather(self, consumer: Consumer) -> list[KafkaMessage]:
        """On the consumer's thread: the first message (or nothing within `within`), then what
        else arrives within `linger`. Rebalance callbacks run inside either call, as before:
        between two batches."""
        first = consumer.consume(1, self._within)
        if not first or self._batch_size == 1:
            return first
        return first + consumer.consume(self._batch_size - 1, self._linger)

    def stop(self) -> None:
        """End `run()` after the batch in flight (at most one `within` of waiting for the next
        one). A batch retrying through an outage does not end by itself: cancel `run()` then -
        its offsets are not stored, so the next owner does it again."""
        self._stopping = True

    def _messages(self, raw: list[KafkaMessage]) -> list[Message]:
        batch: list[Message] = []
        for m in raw:
            err = m.error()
            if err is not None:
                # consumer-level news (a broker away, a partition moved): librdkafka recovers
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s consumer: %s", self.stage, err)
                    metrics.CONSUMER_ERRORS.labels(self.stage).inc()
                continue
            _kind, ts_ms = m.timestamp()
            batch.append(
                Message(
                    m.partition() or 0,
                    m.offset() or 0,
                    ts_ms / 1000 if ts_ms > 0 else time.time(),
                    m.value() or b"",
                )
            )
        return batch

    def _store(self, consumer: Consumer, batch: list[Message]) -> None:
        mine = self.assignment
        offsets = [
            TopicPartition(self.topic, p, last + 1)
            for p, (_first, last) in offset_spans(batch).items()
            if p in mine
        ]
        if not offsets:
            return
        try:
            consumer.store_offsets(offsets=offsets)
        except Exception as exc:  # revoked meanwhile: the next owner's saved position rules
            log.info("%s: offsets not stored (%r)", self.stage, exc)
        stamps = {m.partition: m.timestamp for m in batch}  # each partition's last, in log order
        now = time.time()
        for tp in offsets:
            high = self.cached_highwater(tp.partition)
            if high is not None:
                self._lag[tp.partition] = behind = max(0, high - tp.offset)
                # messages wait behind this one: the log's head is at least this far ahead
                self._lag_seconds[tp.partition] = (
                    max(0.0, now - stamps[tp.partition]) if behind else 0.0
                )
        self._publish_lag()

    def _publish_lag(self) -> None:
        metrics.CONSUMER_LAG.labels(self.topic).set(sum(self._lag.values()))
        metrics.CONSUMER_LAG_SECONDS.labels(self.topic).set(
            max(self._lag_seconds.values(), default=0.0)
        )

    def _hand_over(self, fn: Partitions, partitions: list[int], what: str) -> None:
        """Run `fn` on the event loop and wait for it, from the consumer's thread."""
        if self._loop is None or not partitions:
            return
        future = asyncio.run_coroutine_threadsafe(fn(partitions), self._loop)
        try:
            future.result()
        except Exception:
            log.exception("%s: %s partitions %s failed", self.stage, what, partitions)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        mine = sorted(tp.partition for tp in partitions)
        self.assignment = frozenset(mine)
        metrics.ASSIGNED.labels(self.topic).set(len(mine))
        self._hand_over(self._assigned, mine, "taking over")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = sorted(tp.partition for tp in partitions)
        self.assignment = self.assignment.difference(gone)
        for p in gone:
            self._lag.pop(p, None)
            self._lag_seconds.pop(p, None)
        self._publish_lag()
        metrics.ASSIGNED.labels(self.topic).set(len(self.assignment))
        self._hand_over(self._revoked, gone, "releasing")

    def _close(self, consumer: Consumer) -> None:
        try:
            consumer.close()  # commits the stored offsets, leaves the group (revoke runs)
        except Exception as exc:
            log.warning("%s consumer did not close cleanly: %r", self.stage, exc)
        self.assignment = frozenset()

    async def highwaters(
        self, partitions: Iterable[int], timeout: float = 1.0
    ) -> dict[int, tuple[int | None, int | None]]:
        """Per partition: its high-water mark asked of the broker now, and the time (ms) just
        before the question - every message appended later has a later log-append time.
        Asked in one request of an admin client: the consumer's own connection may be holding
        a fetch for `fetch.wait.max.ms`, and a question queued behind it per partition took
        0.3 s for eight on the embedded broker."""
        loop = self._loop
        wanted = list(partitions)
        if loop is None or not wanted:
            return {}
        if self._admin is None:
            self._admin = AdminClient(self._admin_config)
        admin = self._admin

        def query() -> dict[int, tuple[int | None, int | None]]:
            asked = int(time.time() * 1000)
            futures = admin.list_offsets(
                {TopicPartition(self.topic, p): _LATEST for p in wanted},
                request_timeout=timeout,
            )
            marks: dict[int, tuple[int | None, int | None]] = {}
            for tp, future in futures.items():
                try:
                    marks[tp.partition] = (future.result().offset, asked)
                except Exception:  # the broker away: no claim for this partition
                    continue
            return marks

        return await loop.run_in_executor(self._queries, query)

    def cached_highwater(self, partition: int) -> int | None:
        """The high-water mark of the last fetch, without a round trip (None if unknown)."""
        consumer = self._consumer
        if consumer is None:
            return None
        try:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), cached=True
            )
        except Exception:
            return None
        return high if high is not None and high >= 0 else None
