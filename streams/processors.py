"""Batch processors behind the Faust agents: ingest and the stateful stages.

Order of one batch - the proof that nothing is lost or counted twice:

1. load: for each stage partition in the batch, the states of the batch's keys and which of its
   record ids are already applied (one Redis round trip per partition, all sent at once);
2. apply the pure detectors to the records not yet applied, in offset order;
3. produce every output (alerts, verdicts, dead letters, packed records for the next stage) and
   flush, verifying each delivery;
4. save the new states and the applied ids in one atomic, generation-fenced Lua script;
5. only then return, so that Faust acknowledges the batch and commits its offsets.

A crash before 4 replays the batch against the old state: same outputs, same alert ids (sinks
dedupe). A crash between 4 and 5 replays it against the new state: every record is already
applied, nothing changes, nothing is emitted. Ingest marks `(institution, event_id)` seen only
after 3, so a crash never drops an event; the stages' applied ids absorb its second routing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from detectors.catalog import Catalog
from detectors.pipeline import event_watermark, expected_parts, partition_of
from detectors.routing import IngestView, route
from detectors.stage import (
    Record,
    Stage,
    StageOutput,
    apply_records,
    due_lane,
    fire_due,
    lane_of,
    raise_watermarks,
)
from detectors.verdicts import head_record, part_record
from streams import metrics
from streams.output import OutputProducer
from streams.redis_state import IngestStore, PartitionLost, StageStore
from topics import names
from topics.records import Alert, Event, InvalidEvent, parse_event

log = logging.getLogger("tracewatch.processors")


@dataclass(slots=True, frozen=True)
class Message:
    """The part of a Kafka message a processor needs (Faust-independent, so tests can feed it)."""

    partition: int
    offset: int
    timestamp: float  # seconds
    value: bytes


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


class Emitter:
    """Collects a batch's outputs, packs stage records per destination partition, produces."""

    def __init__(self, producer: OutputProducer) -> None:
        self._producer = producer
        self._packed: dict[tuple[str, int], list[Record]] = defaultdict(list)
        self._watermarks: dict[str, dict[int, float]] = {}
        self._detected_at: str | None = None  # one clock reading per batch, not per event

    def alerts(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        if self._detected_at is None:
            self._detected_at = _iso_now()
        for alert in alerts:
            alert.detected_at = self._detected_at
            self._producer.produce(names.ALERTS.name, alert.to_json(), alert.alert_id)
            metrics.ALERTS.labels(alert.rule).inc()

    def verdicts(self, verdicts: list[dict[str, Any]]) -> None:
        for v in verdicts:
            key = f"{v['institution']}|{v['settlement_id']}"
            self._producer.produce(names.VERDICTS.name, orjson.dumps(v), key)
            metrics.VERDICTS.labels(v["verdict"]).inc()

    def record(self, topic: names.TopicSpec, key: str, record: Record) -> None:
        self._packed[(topic.name, partition_of(key, topic.partitions))].append(record)

    def watermarks(self, topic: names.TopicSpec, watermarks: dict[int, float]) -> None:
        """Send the lanes' watermarks to every partition of `topic`, records or not: a
        partition that gets no records must still see event time pass, or its parked checks
        never run."""
        self._watermarks[topic.name] = watermarks
        for p in range(topic.partitions):
            self._packed.setdefault((topic.name, p), [])

    def dead_letter(self, msg: Message, source: str, reason: str, detail: str) -> None:
        letter: dict[str, Any] = {
            "reason": reason,
            "detail": detail,
            "topic": source,
            "partition": msg.partition,
            "offset": msg.offset,
        }
        try:
            letter["raw"] = msg.value.decode("utf-8")
        except UnicodeDecodeError:
            letter["raw_base64"] = base64.b64encode(msg.value).decode()
        self._producer.produce(
            names.DEAD_LETTERS.name, orjson.dumps(letter), f"{source}/{msg.partition}/{msg.offset}"
        )
        metrics.DEAD_LETTERS.labels(reason).inc()

    async def flush(self) -> None:
        for (topic, partition), records in self._packed.items():
            packed = {"w": self._watermarks.get(topic), "r": records}
            self._producer.produce(
                topic, orjson.dumps(packed, option=orjson.OPT_NON_STR_KEYS), partition=partition
            )
        self._packed.clear()
        self._watermarks.clear()
        await self._producer.flush()


class IngestProcessor:
    def __init__(
        self, producer: OutputProducer, store: IngestStore, catalog: Callable[[], Catalog]
    ) -> None:
        self._producer = producer
        self._store = store
        self._catalog = catalog
        self._watermarks: dict[int, float] = {}  # per lane, newest event time routed

    async def process(self, messages: list[Message]) -> None:
        out = Emitter(self._producer)
        by_partition: dict[int, list[Event]] = defaultdict(list)
        now = time.time()
        for msg in messages:
            try:
                event = parse_event(msg.value)
            except InvalidEvent as exc:
                out.dead_letter(msg, names.EVENTS.name, exc.reason, exc.detail)
                continue
            by_partition[msg.partition].append(event)
        partitions = list(by_partition)
        phase = _Phases("ingest")
        loaded = await asyncio.gather(
            *(
                self._store.load(
                    p,
                    [e.key for e in by_partition[p]],
                    list(dict.fromkeys(k for e in by_partition[p] for k in IngestView.lookups(e))),
                    list(dict.fromkeys(e.institution for e in by_partition[p])),
                )
                for p in partitions
            )
        )
        phase("load")
        catalog = self._catalog()
        saves: list[tuple[int, list[str], IngestView]] = []
        lanes = self._watermarks
        accepted: Counter[str] = Counter()
        advanced = 0.0  # event time the lanes moved by in this batch
        lag = metrics.EVENT_LAG
        for p, (seen_flags, index, receivers) in zip(partitions, loaded, strict=True):
            view = IngestView(index, receivers)
            batch_keys: set[str] = set()
            for event, seen in zip(by_partition[p], seen_flags, strict=True):
                if seen or event.key in batch_keys:
                    metrics.RESUBMISSIONS.inc()
                    continue
                batch_keys.add(event.key)
                accepted[event.type] += 1
                lag.observe(max(0.0, now - event.occurred_ts))
                lane = lane_of(event.institution)
                mark = event_watermark(event.occurred_ts, now)
                before = lanes.get(lane)
                if before is None or mark > before:  # lanes never move back
                    lanes[lane] = mark
                    if before is not None:
                        advanced += mark - before
                self._route(event, catalog, view, out)
            saves.append((p, list(batch_keys), view))
        for etype, count in accepted.items():
            metrics.EVENTS_IN.labels(etype).inc(count)
        if advanced:
            metrics.WATERMARK.inc(advanced)
        if lanes:
            out.watermarks(names.BY_CODE, dict(lanes))
            out.watermarks(names.BY_LEDGER, dict(lanes))
        phase("apply")
        await out.flush()
        phase("flush")
        await asyncio.gather(
            *(self._store.save(p, keys, view.added, view.new_receivers) for p, keys, view in saves)
        )
        phase("save")
        _observe_latency("ingest", messages)

    @staticmethod
    def _route(event: Event, catalog: Catalog, view: IngestView, out: Emitter) -> None:
        unresolved = event.type in ("void", "settlement_cancel")
        if unresolved and IngestView.lookups(event)[0] not in view.index:
            metrics.UNRESOLVED.labels(event.type).inc()
        routed = route(event, catalog, view)
        out.alerts(routed.alerts)
        for record in routed.ledger:
            out.record(names.BY_LEDGER, record["k"], record)
        for record in routed.codes:
            out.record(names.BY_CODE, record["k"], record)
        if routed.head is not None:
            vkey = f"{event.institution}|{event.event_id}"
            expect = expected_parts(
                routed,
                lambda k: partition_of(k, names.BY_LEDGER.partitions),
                lambda k: partition_of(k, names.BY_CODE.partitions),
            )
            out.record(names.VERDICT_PARTS, vkey, head_record(vkey, routed.head, expect))


class StageProcessor:
    """Runs one stage (ledger, verdict) over packed records, partition by partition."""

    def __init__(
        self,
        stage: Stage,
        store: StageStore,
        producer: OutputProducer,
        part_prefix: str | None = None,
    ) -> None:
        self.stage = stage
        self.store = store
        self._producer = producer
        self._part_prefix = part_prefix  # stages that feed verdicts name their parts by this

    async def process(self, messages: list[Message]) -> None:
        by_partition: dict[int, list[Record]] = defaultdict(list)
        offered: dict[int, dict[int, float]] = defaultdict(dict)  # partition -> lane -> time
        for msg in messages:
            packed = orjson.loads(msg.value)
            by_partition[msg.partition].extend(packed["r"])
            lanes = {int(lane): ts for lane, ts in (packed["w"] or {}).items()}
            raise_watermarks(offered[msg.partition], lanes)
        owned = [p for p in by_partition if p in self.store.generations]
        for p in by_partition.keys() - set(owned):
            log.warning("%s%d: batch for a partition this worker does not own", self.store.tag, p)
            metrics.PARTITIONS_LOST.inc()
        phase = _Phases(self.stage.name)
        loaded = await asyncio.gather(
            *(
                self.store.load(
                    p,
                    list(dict.fromkeys(r["k"] for r in by_partition[p])),
                    [r["id"] for r in by_partition[p]],
                    offered[p],
                )
                for p in owned
            )
        )
        phase("load")
        out = Emitter(self._producer)
        saves: list[tuple[int, dict[str, Any], list[str], dict[int, float], dict[str, int]]] = []
        for p, batch in zip(owned, loaded, strict=True):
            records = by_partition[p]
            result = StageOutput()
            state = batch.state
            lanes_before = {k: lane for k, s in state.items() if (lane := due_lane(s)) is not None}
            lanes_before.update(batch.due)  # where the index holds them, stale or not
            new_ids = apply_records(self.stage, records, state, batch.applied, result)
            metrics.RECORDS.labels(self.stage.name).inc(len(new_ids))
            metrics.REDELIVERED.labels(self.stage.name).inc(len(records) - len(new_ids))
            new = set(new_ids)
            touched = {r["k"] for r in records if r["id"] in new}
            watermarks = dict(batch.watermarks)
            raised = raise_watermarks(watermarks, offered[p])
            fired = fire_due(self.stage, [*batch.due, *touched], state, watermarks, result)
            metrics.FIRED.labels(self.stage.name).inc(len(fired))
            if not new_ids and not fired and not raised and not batch.due:
                continue
            out.alerts(result.alerts)
            out.verdicts(result.verdicts)
            if self._part_prefix is not None:
                part_id = f"{self._part_prefix}{p}"
                for vkey, lines in result.parts.items():
                    out.record(names.VERDICT_PARTS, vkey, part_record(vkey, part_id, lines))
            # due keys that were not fired are saved too: their index entry is rewritten from
            # their state (a receipt may have cleared the check, a void removed the state)
            keys = touched.union(fired, batch.due)
            saves.append((p, {k: state.get(k, {}) for k in keys}, new_ids, raised, lanes_before))
        phase("apply")
        await out.flush()
        phase("flush")
        results = await asyncio.gather(
            *(self.store.save(p, s, ids, w, lanes) for p, s, ids, w, lanes in saves),
            return_exceptions=True,
        )
        phase("save")
        for outcome in results:
            if isinstance(outcome, PartitionLost):
                log.warning("%s", outcome)
                metrics.PARTITIONS_LOST.inc()
            elif isinstance(outcome, BaseException):
                raise outcome
        _observe_latency(self.stage.name, messages)


class _Phases:
    """Times the phases of one batch into `tracewatch_batch_phase_seconds`: which of Redis,
    the detectors or Kafka a slow stage waits on."""

    __slots__ = ("_last", "_stage")

    def __init__(self, stage: str) -> None:
        self._stage = stage
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        metrics.PHASE_SECONDS.labels(self._stage, phase).observe(now - self._last)
        self._last = now


def _observe_latency(stage: str, messages: list[Message]) -> None:
    now = time.time()
    hist = metrics.PROCESSING_LATENCY.labels(stage)
    for msg in messages:
        hist.observe(max(0.0, now - msg.timestamp))
