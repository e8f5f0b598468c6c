"""The whole topology in one process, in file order: what `tracewatch replay` and tests run.

The same functions run in the workers: `route` at ingest, then each stage through
`apply_records` and `fire_due`; only where state lives and how records travel differ. Here every
stage has one "partition", so a settlement expects at most one part per stage.

Event time runs per watermark lane: institutions are hashed into `LANES` lanes, and a lane's
watermark is the latest event time of its institutions' events, but never more than
`MAX_CLOCK_SKEW` ahead of the processing clock (one device with a wrong clock cannot fire every
parked check). A check parked for an institution (NO_PROVENANCE, OVERSOLD, a stock count) waits
for its own lane: an institution's late uploads travel in its own input partition, and a
partition that lags behind the others (a consumer catching up) must not see its checks fired by
the others' progress. Ingest computes the lanes' watermarks per batch and sends them to every
stage partition; replay does the same per event.
"""

from __future__ import annotations

import heapq
import time
import zlib
from collections.abc import Callable
from typing import Any

from detectors.catalog import Catalog
from detectors.code_state import DEFAULT_GRACE_SECONDS, CodeStage
from detectors.ledger import LedgerStage
from detectors.routing import IngestView, Routed, route
from detectors.stage import (
    Record,
    Stage,
    StageOutput,
    State,
    Watermarks,
    apply_records,
    due_lane,
    due_of,
    fire_due,
    is_due,
    lane_of,
    raise_watermarks,
)
from detectors.verdicts import VerdictStage, head_record, part_record
from topics.records import Alert, Event

LEDGER_PART = "L"
CODE_PART = "C"
MAX_CLOCK_SKEW = 3600.0


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and Python versions (unlike hash()), cheap, and well spread;
    the same CRC-32 librdkafka's default partitioner uses for keyed messages."""
    return zlib.crc32(key.encode()) % partitions


def event_watermark(occurred_ts: float, now: float) -> float:
    """How far one event may move the watermark."""
    return min(occurred_ts, now + MAX_CLOCK_SKEW)


def expected_parts(
    routed: Routed,
    ledger_partition: Callable[[str], int],
    code_partition: Callable[[str], int],
) -> list[str]:
    """The parts a settlement's verdict waits for: one per stage partition holding its lines."""
    parts = {f"{LEDGER_PART}{ledger_partition(r['k'])}" for r in routed.ledger if "vk" in r}
    parts |= {f"{CODE_PART}{code_partition(r['k'])}" for r in routed.codes if "vk" in r}
    return sorted(parts)


class MemoryStage:
    """A stage with its state, applied ids and parked checks in memory: replay's store."""

    def __init__(self, stage: Stage, track_applied: bool = False) -> None:
        self.stage = stage
        self.state: dict[str, State] = {}
        self.applied: set[str] = set()
        # key -> ids applied to it, kept only for `tracewatch rebuild` (it writes them out)
        self.applied_by_key: dict[str, list[str]] | None = {} if track_applied else None
        self.watermarks: dict[int, float] = {}
        # per watermark lane, a heap of (due, key); stale entries are skipped when popped
        self._due: dict[int | None, list[tuple[float, str]]] = {}
        # lanes holding a key its own lane has passed but that waits for other lanes too (a
        # cross-institution check): looked at again whenever any lane moves
        self._stalled: set[int | None] = set()

    def _park(self, key: str, dirty: set[int | None]) -> None:
        state = self.state.get(key)
        due = due_of(state)
        if due is not None:
            lane = due_lane(state)
            heapq.heappush(self._due.setdefault(lane, []), (due, key))
            dirty.add(lane)

    def apply(
        self, records: list[Record], out: StageOutput, watermarks: Watermarks | None = None
    ) -> None:
        """`watermarks`: the lanes that moved (or all of them; lanes never move back). Only the
        heaps of moved lanes and of lanes something was parked in are looked at."""
        dirty: set[int | None] = set()
        if records:
            new_ids = apply_records(self.stage, records, self.state, self.applied, out)
            if self.applied_by_key is not None and new_ids:
                fresh = set(new_ids)
                for record in records:
                    if record["id"] in fresh:
                        self.applied_by_key.setdefault(record["k"], []).append(record["id"])
            touched = {r["k"] for r in records}
            for key in touched:
                self._park(key, dirty)
        else:
            touched = set()
        if watermarks and raise_watermarks(self.watermarks, watermarks):
            dirty.update(watermarks)
            dirty.add(None)
            dirty |= self._stalled
            self._stalled.clear()
        ready: list[str] = []
        for lane in dirty:
            heap = self._due.get(lane)
            if not heap:
                continue
            if lane is None:
                mark = max(self.watermarks.values(), default=float("-inf"))
            else:
                mark = self.watermarks.get(lane, float("-inf"))
            while heap and heap[0][0] <= mark:
                due, key = heapq.heappop(heap)
                state = self.state.get(key)
                if due_of(state) == due and due_lane(state) == lane:
                    ready.append(key)
        if ready:
            for key in fire_due(self.stage, ready, self.state, self.watermarks, out):
                self._park(key, dirty)
                if is_due(self.state.get(key), self.watermarks):
                    self._stalled.add(due_lane(self.state.get(key)))
            touched.update(ready)
        for key in touched:
            if not self.state.get(key, True):
                del self.state[key]


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
        track_applied: bool = False,
    ) -> None:
        self.catalog = catalog
        self.seen: set[str] = set()
        self.view = IngestView()
        self.ledger = MemoryStage(LedgerStage(grace_seconds), track_applied)
        self.codes = MemoryStage(CodeStage(grace_seconds), track_applied)
        self.verdicts = MemoryStage(VerdictStage())
        self.watermarks: dict[int, float] = {}
        self._clock = clock

    def process(self, event: Event) -> tuple[list[Alert], list[dict[str, Any]]]:
        """Alerts and verdicts caused by one event; nothing for an exact resubmission."""
        if event.key in self.seen:
            return [], []
        self.seen.add(event.key)
        routed = route(event, self.catalog, self.view)
        lane = lane_of(event.institution)
        moved = raise_watermarks(
            self.watermarks, {lane: event_watermark(event.occurred_ts, self._clock())}
        )
        alerts = list(routed.alerts)
        records: list[Record] = []
        for stage, stage_records, part in (
            (self.ledger, routed.ledger, LEDGER_PART),
            (self.codes, routed.codes, CODE_PART),
        ):
            out = StageOutput()
            stage.apply(stage_records, out, moved)
            alerts.extend(out.alerts)
            records += [part_record(key, f"{part}0", lines) for key, lines in out.parts.items()]
        out = StageOutput()
        if routed.head is not None:
            vkey = f"{event.institution}|{event.event_id}"
            expect = expected_parts(routed, lambda _k: 0, lambda _k: 0)
            records.insert(0, head_record(vkey, routed.head, expect))
        if records:
            self.verdicts.apply(records, out)
        return alerts, out.verdicts
