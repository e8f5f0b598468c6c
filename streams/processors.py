"""Batch processors behind the data-plane consumers (`streams.consumer`): ingest and the stages.

Order of one batch - the proof that nothing is lost or counted twice:

1. load: for each stage partition in the batch, the states of the batch's keys and which of its
   record ids are already applied (one Redis round trip per partition, all sent at once);
2. apply the pure detectors to the records not yet applied, in offset order;
3. produce every output (alerts, verdicts, dead letters, packed records for the next stage) and
   flush, verifying each delivery;
4. save the new states and the applied ids in one atomic, generation-fenced Lua script;
5. only then return, so that the stage's consumer stores the batch's offsets for commit.

A crash before 4 replays the batch against the old state: same outputs, same alert ids (sinks
dedupe). A crash between 4 and 5 replays it against the new state: every record is already
applied, nothing changes, nothing is emitted. Ingest marks `(institution, event_id)` seen only
after 3, so a crash never drops an event; the stages' applied ids absorb its second routing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from detectors.activity import ActivityBatch
from detectors.catalog import Catalog
from detectors.event_time import DEFAULT_IDLE_SECONDS, LaneClock, TimeFrame, effective_marks
from detectors.pipeline import expected_parts, partition_of
from detectors.routing import IngestView, route
from detectors.stage import (
    Record,
    Stage,
    StageOutput,
    apply_records,
    due_lane,
    fire_due,
    lane_of,
)
from detectors.verdicts import head_record, part_record
from streams import metrics
from streams.alignment import PartitionAligner
from streams.output import OutputProducer
from streams.redis_state import (
    IngestLoaded,
    IngestStore,
    Loaded,
    PartitionLost,
    StageStore,
    merge_tops,
)
from streams.retry import is_transient
from topics import names
from topics.records import Alert, Event, InvalidEvent, join_key, parse_event

log = logging.getLogger("tracewatch.processors")

# A packed record message stays well under the broker's default 1 MB message limit, and a dead
# letter keeps at most this much of the raw message (with its length and hash).
MAX_PACKED_BYTES = 512 * 1024
MAX_DEAD_LETTER_RAW = 8 * 1024


@dataclass(slots=True, frozen=True)
class Message:
    """The part of a Kafka message a processor needs (client-independent, so tests can feed it)."""

    partition: int
    offset: int
    timestamp: float  # seconds
    value: bytes


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def dead_letter_record(
    value: bytes, source: str, partition: int, offset: int, reason: str, detail: str
) -> dict[str, Any]:
    """A dead letter that always fits a Kafka message: the raw payload is cut to
    `MAX_DEAD_LETTER_RAW`, its full length and hash kept, and the source offset to fetch it."""
    letter: dict[str, Any] = {
        "reason": reason,
        "detail": detail[:1000],
        "topic": source,
        "partition": partition,
        "offset": offset,
        "raw_bytes": len(value),
        "raw_blake2b": hashlib.blake2b(value, digest_size=16).hexdigest(),
    }
    head = value[:MAX_DEAD_LETTER_RAW]
    if len(head) < len(value):
        letter["raw_truncated"] = True
    try:
        letter["raw"] = head.decode("utf-8")
    except UnicodeDecodeError:
        letter["raw_base64"] = base64.b64encode(head).decode()
    return letter


class Emitter:
    """Collects a batch's outputs, packs stage records per destination partition, produces."""

    def __init__(self, producer: OutputProducer) -> None:
        self._producer = producer
        self._packed: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        self._tops: dict[str, bytes] = {}
        self._progress: dict[str, bytes] = {}
        self._detected_at: str | None = None  # one clock reading per batch, not per event

    def alerts(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        if self._detected_at is None:
            self._detected_at = _iso_now()
        for alert in alerts:
            alert.detected_at = self._detected_at
            self._producer.produce(names.ALERTS.name, alert.to_json(), alert.alert_id)
            if alert.status is None:
                metrics.ALERTS.labels(alert.rule).inc()
            else:
                metrics.WITHDRAWALS.labels(alert.rule).inc()

    def verdicts(self, verdicts: list[dict[str, Any]]) -> None:
        for v in verdicts:
            key = f"{v['institution']}|{v['settlement_id']}"
            self._producer.produce(names.VERDICTS.name, orjson.dumps(v), key)
            metrics.VERDICTS.labels(v["verdict"]).inc()

    def record(self, topic: names.TopicSpec, key: str, record: Record) -> None:
        self._packed[(topic.name, partition_of(key, topic.partitions))].append(orjson.dumps(record))

    def tops(self, topic: names.TopicSpec, tops: dict[int, tuple[float, float]]) -> None:
        """Send the lanes' tops to every partition of `topic`, records or not: a partition that
        gets no records must still see event time pass, or its parked checks never run."""
        self._tops[topic.name] = orjson.dumps(
            {
                str(lane): [a if a > -1e300 else None, b if b > -1e300 else None]
                for lane, (a, b) in tops.items()
            }
        )
        for p in range(topic.partitions):
            self._packed.setdefault((topic.name, p), [])

    def progress(self, topic: names.TopicSpec, routed: dict[int, int]) -> None:
        """Tell every partition of `topic` how far each input partition is routed (the latest
        input timestamp handled, ms): the code stage applies records in input order by it
        (`streams.alignment`)."""
        self._progress[topic.name] = orjson.dumps({str(p): ts for p, ts in routed.items()})
        for p in range(topic.partitions):
            self._packed.setdefault((topic.name, p), [])

    def dead_letter(self, msg: Message, source: str, reason: str, detail: str) -> None:
        letter = dead_letter_record(msg.value, source, msg.partition, msg.offset, reason, detail)
        self._producer.produce(
            names.DEAD_LETTERS.name, orjson.dumps(letter), f"{source}/{msg.partition}/{msg.offset}"
        )
        metrics.DEAD_LETTERS.labels(reason).inc()

    async def flush(self) -> None:
        for (topic, partition), records in self._packed.items():
            head = b'{"w":' + self._tops.get(topic, b"null")
            progress = self._progress.get(topic)
            chunk: list[bytes] = []
            size = 0
            for raw in records:
                if chunk and size + len(raw) > MAX_PACKED_BYTES:
                    self._send(topic, partition, head, chunk)
                    chunk, size = [], 0
                chunk.append(raw)
                size += len(raw) + 1
            # progress rides on the last message only: it vouches for every record before it
            if progress is not None:
                head += b',"g":' + progress
            self._send(topic, partition, head, chunk)
        self._packed.clear()
        self._tops.clear()
        self._progress.clear()
        await self._producer.flush()

    def _send(self, topic: str, partition: int, head: bytes, records: list[bytes]) -> None:
        value = head + b',"r":[' + b",".join(records) + b"]}"
        self._producer.produce(topic, value, partition=partition)


Refill = Callable[[dict[int, tuple[int, int]]], Awaitable[list[Message]]]


def stamp_ms(timestamp: float) -> int:
    """A Kafka message timestamp (seconds) as the integer milliseconds Kafka holds."""
    return round(timestamp * 1000)


def _latest_stamps(messages: list[Message]) -> dict[int, int]:
    """The latest input timestamp (ms) handled per input partition."""
    latest: dict[int, int] = {}
    for msg in messages:
        ts = stamp_ms(msg.timestamp)
        if ts > latest.get(msg.partition, -(2**62)):
            latest[msg.partition] = ts
    return latest


def offset_spans(messages: list[Message]) -> dict[int, tuple[int, int]]:
    """First and last offset of the batch in each partition."""
    spans: dict[int, tuple[int, int]] = {}
    for msg in messages:
        span = spans.get(msg.partition)
        if span is None:
            spans[msg.partition] = (msg.offset, msg.offset)
        else:
            spans[msg.partition] = (min(span[0], msg.offset), max(span[1], msg.offset))
    return spans


async def _with_gaps_refilled(
    stage: str,
    refill: Refill | None,
    spans: dict[int, tuple[int, int]],
    positions: dict[int, int | None],
    messages: list[Message],
    holds: dict[int, int] | None = None,
) -> list[Message] | None:
    """The batch with the messages between each partition's saved position and the batch's
    first offset read back in front - or None when nothing is missing. A gap means Redis lost
    writes whose offsets Kafka had already committed (state and position are saved together).
    `holds`: per partition, an earlier offset to read from because the records there were
    held unapplied (`streams.alignment`): expected, so neither logged nor counted."""
    gaps = {
        p: (pos, spans[p][0])
        for p, pos in positions.items()
        if pos is not None and pos < spans[p][0]
    }
    held = {p: (hold, spans[p][0]) for p, hold in (holds or {}).items() if hold < spans[p][0]}
    if (not gaps and not held) or refill is None:
        return None
    ranges = {**held}
    for p, (pos, first) in gaps.items():
        ranges[p] = (min(pos, ranges.get(p, (pos, first))[0]), first)
    if held:
        metrics.ALIGN_REREAD.labels(stage).inc(sum(end - start for start, end in held.values()))
    if not gaps:
        return [*await refill(ranges), *messages]
    for p, (pos, first) in gaps.items():
        log.warning(
            "%s partition %d: state saved up to offset %d but the batch starts at %d - Redis "
            "lost writes; reading the %d messages between back from Kafka",
            stage,
            p,
            pos,
            first,
            first - pos,
        )
    metrics.STATE_GAPS.labels(stage).inc(len(gaps))
    missing = await refill(ranges)
    return [*missing, *messages]


def _tops_of(packed: Any) -> dict[int, tuple[float, float]]:
    tops: dict[int, tuple[float, float]] = {}
    for lane, (first, second) in (packed or {}).items():
        tops[int(lane)] = (
            float(first) if first is not None else float("-inf"),
            float(second) if second is not None else float("-inf"),
        )
    return tops


class _IngestContext:
    """One input partition's part of an ingest batch: what Redis held, and what the batch adds."""

    __slots__ = ("activity", "batch", "clock", "counted", "digests", "new", "own_moved", "view")

    def __init__(self, batch: IngestLoaded, events: list[Event]) -> None:
        self.batch = batch
        self.view = IngestView(batch.index, batch.receivers)
        self.clock = LaneClock()
        for inst, ts in batch.own.items():
            self.clock.observe(inst, lane_of(inst), ts)
        for lane, named in batch.tops.items():
            self.clock.seed(lane, named)
        self.digests = dict(zip(dict.fromkeys(e.key for e in events), batch.seen, strict=True))
        self.new: dict[str, str] = {}
        self.own_moved: dict[str, float] = {}
        self.counted: Counter[str] = Counter()
        self.activity = ActivityBatch()


class IngestProcessor:
    def __init__(
        self,
        producer: OutputProducer,
        store: IngestStore,
        catalog: Callable[[], Catalog],
        refill: Refill | None = None,
        daily_quota: int = 0,
    ) -> None:
        self._producer = producer
        self._store = store
        self._catalog = catalog
        self._refill = refill  # reads input offsets back when Redis lost a batch's writes
        self._quota = daily_quota  # events accepted per institution per day; 0 = no limit
        # per input partition, the offset after the last message routed and saved (what the
        # caught-up heartbeat compares with the high-water mark); dropped when revoked
        self.routed: dict[int, int] = {}

    async def process(self, messages: list[Message], refilled: bool = False) -> None:
        by_partition: dict[int, list[tuple[Message, Event]]] = defaultdict(list)
        invalid: list[tuple[Message, InvalidEvent]] = []
        now = time.time()
        for msg in messages:
            try:
                event = parse_event(msg.value)
            except InvalidEvent as exc:
                invalid.append((msg, exc))
                continue
            by_partition[msg.partition].append((msg, event))
        spans = offset_spans(messages)
        partitions = list(spans)
        phase = _Phases("ingest")
        loaded = await asyncio.gather(
            *(
                self._store.load(
                    p,
                    list(dict.fromkeys(e.key for _, e in by_partition[p])),
                    list(
                        dict.fromkeys(k for _, e in by_partition[p] for k in IngestView.lookups(e))
                    ),
                    list(dict.fromkeys(e.institution for _, e in by_partition[p])),
                )
                for p in partitions
            )
        )
        phase("load")
        if not refilled:
            positions = {p: batch.position for p, batch in zip(partitions, loaded, strict=True)}
            whole = await _with_gaps_refilled("ingest", self._refill, spans, positions, messages)
            if whole is not None:
                return await self.process(whole, refilled=True)
        out = Emitter(self._producer)
        for msg, refused in invalid:
            out.dead_letter(msg, names.EVENTS.name, refused.reason, refused.detail)
        catalog = self._catalog()
        saves: list[tuple[int, _IngestContext, int]] = []
        all_tops: dict[int, tuple[float, float]] = {}
        accepted: Counter[str] = Counter()
        advanced = 0.0  # event time the institutions moved by in this batch
        lag = metrics.EVENT_LAG
        contexts: dict[int, _IngestContext] = {}
        for p, batch in zip(partitions, loaded, strict=True):
            contexts[p] = _IngestContext(batch, [e for _, e in by_partition[p]])
        # Events in arrival order across the batch's partitions (log-append time, then partition
        # and offset), not partition by partition: the code stage then sees one worker's batch
        # in the order it reached the input topic, as replay of the topic does.
        arrived = sorted(
            (pair for pairs in by_partition.values() for pair in pairs),
            key=lambda pair: (pair[0].timestamp, pair[0].partition, pair[0].offset),
        )
        for msg, event in arrived:
            ctx = contexts[msg.partition]
            batch, clock = ctx.batch, ctx.clock
            first = ctx.digests.get(event.key) or ctx.new.get(event.key)
            if first is not None:
                if first == event.digest:
                    metrics.RESUBMISSIONS.inc()
                else:
                    out.dead_letter(
                        msg,
                        names.EVENTS.name,
                        "conflicting_resubmission",
                        f"event {event.event_id!r} of {event.institution!r} was accepted "
                        "before with other content; the first stands",
                    )
                continue
            if self._quota and (
                batch.counts.get(event.institution, 0) + ctx.counted[event.institution]
                >= self._quota
            ):
                out.dead_letter(
                    msg,
                    names.EVENTS.name,
                    "over_quota",
                    f"{event.institution!r} already had {self._quota} events accepted "
                    "today (TRACEWATCH_INSTITUTION_DAILY_QUOTA); resend tomorrow, or ask "
                    "the operator to raise the quota",
                )
                continue
            lane = lane_of(event.institution)
            before: float | None = clock.own.get(event.institution)
            own = clock.observe(event.institution, lane, event.occurred_ts)
            stamp = (stamp_ms(msg.timestamp), msg.partition, msg.offset)
            try:
                self._route(event, catalog, ctx.view, out, own, stamp)
            except Exception as exc:
                if is_transient(exc):
                    raise  # the producer or Redis, not the event: the whole batch is redone
                # a deterministic failure: dead-lettered, never retried forever
                log.exception("event %s/%d failed to route", names.EVENTS.name, msg.offset)
                out.dead_letter(msg, names.EVENTS.name, "processing_failed", repr(exc))
                continue
            ctx.new[event.key] = event.digest
            ctx.counted[event.institution] += 1
            ctx.activity.add(event, catalog)
            accepted[event.type] += 1
            lag.observe(max(0.0, now - event.occurred_ts))
            if own != before:
                ctx.own_moved[event.institution] = own
                if before is not None:
                    advanced += own - before
        for p, ctx in contexts.items():
            saves.append((p, ctx, spans[p][1] + 1))
            for lane, pair in ctx.clock.tops().items():
                merge_tops(all_tops, lane, pair)
        for etype, count in accepted.items():
            metrics.EVENTS_IN.labels(etype).inc(count)
        if advanced:
            metrics.WATERMARK.inc(advanced)
        if all_tops:
            out.tops(names.BY_CODE, all_tops)
            out.tops(names.BY_LEDGER, all_tops)
        if messages:
            out.progress(names.BY_CODE, _latest_stamps(messages))
        phase("apply")
        await out.flush()
        phase("flush")
        await asyncio.gather(
            *(
                self._store.save(
                    p,
                    ctx.new,
                    ctx.view.added,
                    ctx.view.new_receivers,
                    ctx.own_moved,
                    ctx.clock.named_tops(),
                    position,
                    dict(ctx.counted),
                    ctx.activity,
                )
                for p, ctx, position in saves
            )
        )
        phase("save")
        self._moved(spans)
        _observe_latency("ingest", messages)

    async def skip(self, msg: Message, error: BaseException) -> None:
        """Dead-letter a message that fails alone, every time, and move past it
        (`streams.retry`)."""
        out = Emitter(self._producer)
        out.dead_letter(msg, names.EVENTS.name, "processing_failed", repr(error))
        out.progress(names.BY_CODE, _latest_stamps([msg]))
        await out.flush()
        await self._store.save(msg.partition, {}, {}, [], position=msg.offset + 1)
        self._moved({msg.partition: (msg.offset, msg.offset)})

    def _moved(self, spans: dict[int, tuple[int, int]]) -> None:
        for p, (_first, last) in spans.items():
            self.routed[p] = max(self.routed.get(p, 0), last + 1)

    async def caught_up(
        self, highwaters: dict[int, tuple[int | None, int | None]]
    ) -> dict[int, int]:
        """Of the input partitions given as (high-water mark, the time it was read in ms),
        those whose every message is routed, with the time before which nothing new can come
        (the read time; the caller takes off a margin for create-time stamps)."""
        out: dict[int, int] = {}
        for p, (highwater, read_ms) in highwaters.items():
            if highwater is None or read_ms is None:
                continue
            routed = self.routed.get(p)
            if routed is None:
                # newly owned: what Redis holds is where the previous owner got to
                routed = self.routed[p] = await self._store.position(p) or 0
            if routed >= highwater:
                out[p] = read_ms
        return out

    async def heartbeat(self, producer: OutputProducer, routed: dict[int, int]) -> None:
        """Tell the code stage that these input partitions are routed up to these times while
        no events come (their own batches tell it otherwise). Produced after every batch it
        vouches for was delivered, by a producer of its own."""
        if not routed:
            return
        out = Emitter(producer)
        out.progress(names.BY_CODE, routed)
        await out.flush()

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: another worker may route them meanwhile."""
        for p in partitions:
            self.routed.pop(p, None)

    @staticmethod
    def _route(
        event: Event,
        catalog: Catalog,
        view: IngestView,
        out: Emitter,
        own: float,
        stamp: tuple[int, int, int],
    ) -> None:
        unresolved = event.type in ("void", "settlement_cancel")
        if unresolved and IngestView.lookups(event)[0] not in view.index:
            metrics.UNRESOLVED.labels(event.type).inc()
        routed = route(event, catalog, view, own)
        out.alerts(routed.alerts)
        for record in routed.ledger:
            out.record(names.BY_LEDGER, record["k"], record)
        for record in routed.codes:
            record["s"] = stamp
            out.record(names.BY_CODE, record["k"], record)
        if routed.head is not None:
            vkey = join_key(event.institution, event.event_id)
            expect = expected_parts(
                routed,
                lambda k: partition_of(k, names.BY_LEDGER.partitions),
                lambda k: partition_of(k, names.BY_CODE.partitions),
            )
            out.record(names.VERDICT_PARTS, vkey, head_record(vkey, routed.head, expect))


class Alignment:
    """Settings of the code stage's alignment across input partitions (`streams.alignment`)."""

    __slots__ = ("sources", "wait")

    def __init__(self, sources: int, wait: float) -> None:
        self.sources = sources  # input partitions
        self.wait = wait  # seconds a record is held at most


class StageProcessor:
    """Runs one stage (ledger, code, verdict) over packed records, partition by partition."""

    def __init__(
        self,
        stage: Stage,
        store: StageStore,
        producer: OutputProducer,
        part_prefix: str | None = None,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        refill: Refill | None = None,
        alignment: Alignment | None = None,
    ) -> None:
        self.stage = stage
        self.store = store
        self._producer = producer
        self._part_prefix = part_prefix  # stages that feed verdicts name their parts by this
        self._idle = idle_seconds
        self._refill = refill  # reads input offsets back when Redis lost a batch's writes
        self._alignment = alignment
        # per owned partition, the lane tops stored there (this worker is its only writer)
        self._tops: dict[int, dict[int, tuple[float, float]]] = {}
        # per owned partition, with alignment: the records held, and the offset after the last
        # message taken in
        self._held: dict[int, PartitionAligner] = {}
        self._next: dict[int, int] = {}
        self._memory_gen: dict[int, str] = {}  # the generation they belong to

    def _forget_lost(self) -> None:
        """Drop what this worker remembers of partitions it no longer owns - or owns again
        under a new generation (another worker may have moved them on meanwhile)."""
        generations = self.store.generations
        for p in list(self._tops):
            if p not in generations:
                del self._tops[p]
        for p, gen in list(self._memory_gen.items()):
            if generations.get(p) != gen:
                del self._memory_gen[p]
                self._held.pop(p, None)
                self._next.pop(p, None)

    async def process(self, messages: list[Message], refilled: bool = False) -> None:
        # per partition, (offset, records, progress) of each message, in offset order
        unpacked: dict[int, list[tuple[int, list[Record], dict[int, int]]]] = defaultdict(list)
        offered: dict[int, dict[int, tuple[float, float]]] = defaultdict(dict)
        poisoned: list[tuple[Message, Exception]] = []
        for msg in messages:
            try:
                packed = orjson.loads(msg.value)
                records = packed["r"]
                tops_offered = _tops_of(packed["w"])
                progress = {int(k): int(v) for k, v in (packed.get("g") or {}).items()}
            except Exception as error:  # not ours or corrupt: it would fail the same way again
                poisoned.append((msg, error))
                continue
            unpacked[msg.partition].append((msg.offset, records, progress))
            for lane, pair in tops_offered.items():
                merge_tops(offered[msg.partition], lane, pair)
        spans = offset_spans(messages)
        owned = [p for p in spans if p in self.store.generations]
        for p in spans.keys() - set(owned):
            log.warning("%s%d: batch for a partition this worker does not own", self.store.tag, p)
            metrics.PARTITIONS_LOST.inc()
        self._forget_lost()
        phase = _Phases(self.stage.name)
        by_partition, late_by_partition = self._take_in(owned, unpacked)
        frames: dict[int, dict[int, tuple[float, float]]] = {}
        for p in owned:
            known = dict(self._tops.get(p, {}))
            for lane, pair in offered[p].items():
                merge_tops(known, lane, pair)
            frames[p] = known
        loaded = await asyncio.gather(
            *(
                self.store.load(
                    p,
                    list(dict.fromkeys(r["k"] for r in by_partition[p])),
                    [r["id"] for r in by_partition[p]],
                    effective_marks(frames[p], self._idle),
                )
                for p in owned
            )
        )
        phase("load")
        if not refilled:
            positions = {p: batch.position for p, batch in zip(owned, loaded, strict=True)}
            whole = await _with_gaps_refilled(
                self.stage.name,
                self._refill,
                spans,
                positions,
                messages,
                self._holds(loaded, owned, spans),
            )
            if whole is not None:
                return await self.process(whole, refilled=True)
        out = Emitter(self._producer)
        for msg, problem in poisoned:
            out.dead_letter(msg, f"{self.stage.name}-stage", "processing_failed", repr(problem))
        # partition, states, applied ids, raised lane tops, due lanes before, position, hold
        saves: list[
            tuple[
                int,
                dict[str, Any],
                list[str],
                dict[int, tuple[float, float]],
                dict[str, int],
                int,
                int | None,
            ]
        ] = []
        for p, batch in zip(owned, loaded, strict=True):
            records = by_partition[p]
            result = StageOutput()
            state = batch.state
            stored = self._tops.setdefault(p, {})
            for lane, pair in batch.tops.items():
                merge_tops(stored, lane, pair)
            raised: dict[int, tuple[float, float]] = {}
            for lane, pair in offered[p].items():
                if merge_tops(stored, lane, pair):
                    raised[lane] = stored[lane]
            frame = TimeFrame(effective_marks(stored, self._idle))
            lanes_before = {k: dl for k, s in state.items() if (dl := due_lane(s)) is not None}
            lanes_before.update(batch.due)  # where the index holds them, stale or not
            failed: list[tuple[Record, Exception]] = []
            new_ids = apply_records(
                self.stage, records, state, batch.applied, result, frame, failed
            )
            for record, failure in failed:
                out.dead_letter(
                    Message(p, -1, 0.0, orjson.dumps(record)),
                    f"{self.stage.name}-stage",
                    "processing_failed",
                    repr(failure),
                )
            late = late_by_partition.get(p)
            if late:  # redeliveries of what was applied are not late
                really = late.intersection(new_ids)
                metrics.ALIGN_LATE.inc(len(really))
                if really:
                    log.info(
                        "%s%d: %d records applied out of input order (create-time stamps "
                        "behind by more than TRACEWATCH_ALIGN_MARGIN_MS, or a wait ran out)",
                        self.store.tag,
                        p,
                        len(really),
                    )
            metrics.RECORDS.labels(self.stage.name).inc(len(new_ids))
            metrics.REDELIVERED.labels(self.stage.name).inc(len(records) - len(new_ids))
            new = set(new_ids)
            touched = {r["k"] for r in records if r["id"] in new}
            fired = fire_due(self.stage, [*batch.due, *touched], state, frame, result)
            metrics.FIRED.labels(self.stage.name).inc(len(fired))
            position = spans[p][1] + 1
            hold = self._hold(p, position, len(records))
            if not new_ids and not fired and not raised and not batch.due:
                # the position moves all the same
                saves.append((p, {}, [], {}, {}, position, hold))
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
            saves.append(
                (
                    p,
                    {k: state.get(k, {}) for k in keys},
                    new_ids,
                    raised,
                    lanes_before,
                    position,
                    hold,
                )
            )
        phase("apply")
        await out.flush()
        phase("flush")
        results = await asyncio.gather(
            *(
                self.store.save(p, s, ids, w, lanes, position, hold)
                for p, s, ids, w, lanes, position, hold in saves
            ),
            return_exceptions=True,
        )
        phase("save")
        save_error: BaseException | None = None
        for (p, *_rest), outcome in zip(saves, results, strict=True):
            if isinstance(outcome, PartitionLost):
                log.warning("%s", outcome)
                metrics.PARTITIONS_LOST.inc()
            elif isinstance(outcome, BaseException):
                save_error = save_error or outcome
            else:
                self._saved_at(p, spans[p][1] + 1, by_partition[p])
        if save_error is not None:
            raise save_error
        _observe_latency(self.stage.name, messages)

    def _take_in(
        self, owned: list[int], unpacked: dict[int, list[tuple[int, list[Record], dict[int, int]]]]
    ) -> tuple[dict[int, list[Record]], dict[int, set[str]]]:
        """The records to apply now per partition: all of them, or with alignment the held
        records every input partition has passed (`streams.alignment`), in stamp order; and
        per partition the ids among them stamped before a record already applied."""
        if self._alignment is None:
            return {p: [r for _, records, _ in unpacked[p] for r in records] for p in owned}, {}
        now = time.monotonic()
        wait = self._alignment.wait
        ready: dict[int, list[Record]] = {}
        late_ids: dict[int, set[str]] = {}
        for p in owned:
            held = self._held.get(p)
            if held is None:
                held = self._held[p] = PartitionAligner(self._alignment.sources)
                self._memory_gen[p] = self.store.generations[p]
            for offset, records, progress in unpacked[p]:
                for record in records:
                    held.offer(record, offset, now)
                held.advance(progress)
            ready[p], late, timed_out = held.ready(now, wait)
            if late:
                late_ids[p] = late
            if timed_out:
                metrics.ALIGN_TIMED_OUT.inc(timed_out)
        metrics.ALIGN_HELD.labels(self.stage.name).set(
            sum(len(h) for h in self._held.values()) - sum(map(len, ready.values()))
        )
        return ready, late_ids

    def _holds(
        self, loaded: list[Loaded], owned: list[int], spans: dict[int, tuple[int, int]]
    ) -> dict[int, int]:
        """Per partition this worker's memory does not cover (newly owned), the oldest message
        whose records the previous owner held unapplied: read back, as a restart must."""
        if self._alignment is None:
            return {}
        return {
            p: batch.hold
            for p, batch in zip(owned, loaded, strict=True)
            if p not in self._next and batch.hold is not None and batch.hold < spans[p][0]
        }

    def _hold(self, p: int, after: int, applying: int) -> int | None:
        """The hold to save: the oldest message still holding records once `applying` of them
        are applied, else `after`."""
        held = self._held.get(p)
        if held is None:
            return None
        oldest = held.oldest_offset(skip=applying)
        return after if oldest is None else oldest

    def _saved_at(self, p: int, after: int, applied: list[Record]) -> None:
        held = self._held.get(p)
        if held is None:
            return
        held.take(applied)
        self._next[p] = max(self._next.get(p, 0), after)

    async def skip(self, msg: Message, error: BaseException) -> None:
        """Dead-letter a message that fails alone, every time, and move past it
        (`streams.retry`)."""
        out = Emitter(self._producer)
        out.dead_letter(msg, f"{self.stage.name}-stage", "processing_failed", repr(error))
        await out.flush()
        if msg.partition in self.store.generations:
            held = self._held.get(msg.partition)
            hold = None
            if held is not None:
                held.drop_offset(msg.offset)
                hold = held.oldest_offset()
                hold = msg.offset + 1 if hold is None else hold
            await self.store.save(msg.partition, {}, [], position=msg.offset + 1, hold=hold)
            if held is not None:
                self._saved_at(msg.partition, msg.offset + 1, [])


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
