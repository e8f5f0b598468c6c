"""The whole topology in one process, in file order: what `tracewatch replay` and tests run.

The same functions run in the workers: `route` at ingest, then each stage through
`apply_records` and `fire_due`; only where state lives and how records travel differ. Here every
stage has one "partition", so a settlement expects at most one part per stage.

Event time (`detectors.event_time`): every event moves its institution's own time and its lane's
watermark; a check parked for an institution waits for its lane's effective time. No wall clock
is read: the same input gives the same output today and next year.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Callable
from typing import Any

from detectors.activity import ActivityBatch
from detectors.catalog import Catalog
from detectors.code_state import CodeStage
from detectors.event_time import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_IDLE_SECONDS,
    EffectiveMarks,
    LaneClock,
    TimeFrame,
)
from detectors.ledger import LedgerStage
from detectors.routing import IngestView, Routed, route
from detectors.stage import (
    Record,
    Stage,
    StageOutput,
    State,
    apply_records,
    due_lane,
    due_of,
    fire_due,
    lane_of,
)
from detectors.verdicts import VerdictStage, head_record, part_record
from topics.records import Alert, Event, join_key

LEDGER_PART = "L"
CODE_PART = "C"


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and Python versions (unlike hash()), cheap, and well spread;
    the same CRC-32 librdkafka's default partitioner uses for keyed messages."""
    return zlib.crc32(key.encode()) % partitions


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
    """A stage with its state, applied ids and parked checks in memory: replay's store.

    `marks`: the lanes' effective times, shared with the pipeline, which updates them in place
    and names the lanes that moved on each `apply`."""

    def __init__(
        self, stage: Stage, track_applied: bool = False, marks: dict[int, float] | None = None
    ) -> None:
        self.stage = stage
        self.state: dict[str, State] = {}
        self.applied: set[str] = set()
        # key -> ids applied to it, kept only for `tracewatch rebuild` (it writes them out)
        self.applied_by_key: dict[str, list[str]] | None = {} if track_applied else None
        self.frame = TimeFrame({} if marks is None else marks)
        # per watermark lane, a heap of (due, key); stale entries are skipped when popped
        self._due: dict[int, list[tuple[float, str]]] = {}
        # key -> the (due, lane) it is in a heap for: a key touched again with the same due is
        # not pushed again (most records leave it as it was)
        self._parked: dict[str, tuple[float, int]] = {}
        # lanes to look at on the next apply: their heap got an entry, or their time moved
        self._dirty: set[int] = set()

    def _park(self, key: str) -> None:
        state = self.state.get(key)
        due = due_of(state)
        lane = due_lane(state)
        if due is None or lane is None:
            self._parked.pop(key, None)
            return
        if self._parked.get(key) == (due, lane):
            return
        self._parked[key] = (due, lane)
        heapq.heappush(self._due.setdefault(lane, []), (due, key))
        self._dirty.add(lane)

    def apply(
        self, records: list[Record], out: StageOutput, moved: list[int] | None = None
    ) -> None:
        """`moved`: the lanes whose effective time changed since the last call."""
        if moved:
            self._dirty.update(moved)
        elif not records and not self._dirty:
            return
        touched: set[str] = set()
        if records:
            new_ids = apply_records(self.stage, records, self.state, self.applied, out, self.frame)
            if self.applied_by_key is not None and new_ids:
                fresh = set(new_ids)
                for record in records:
                    if record["id"] in fresh:
                        self.applied_by_key.setdefault(record["k"], []).append(record["id"])
            touched = {r["k"] for r in records}
            for key in touched:
                self._park(key)
        ready: list[str] = []
        frame = self.frame
        dirty, self._dirty = self._dirty, set()
        for lane in sorted(dirty):
            heap = self._due.get(lane)
            if not heap:
                continue
            mark = frame.at(lane)
            while heap and heap[0][0] <= mark:
                due, key = heapq.heappop(heap)
                if self._parked.get(key) == (due, lane):
                    del self._parked[key]  # fired below; parked again if it stays due
                    ready.append(key)
        if ready:
            fire_due(self.stage, ready, self.state, frame, out)
            for key in ready:
                self._park(key)
            touched.update(ready)
        for key in touched:
            if not self.state.get(key, True):
                del self.state[key]


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        track_applied: bool = False,
        track_activity: bool = False,
    ) -> None:
        self.catalog = catalog
        # what the accepted events add to their institutions' days (`tracewatch rebuild` writes
        # it as ingest would have); None: not counted (replay)
        self.activity = ActivityBatch() if track_activity else None
        # (institution, event_id) -> content digest: a resubmission with other content is a
        # conflict (the first stands), not a retry
        self.seen: dict[str, str] = {}
        self.conflicts: list[Event] = []
        self.view = IngestView()
        self.clock = LaneClock()
        self.idle = idle_seconds
        self.marks = EffectiveMarks(idle_seconds)
        self.ledger = MemoryStage(LedgerStage(grace_seconds), track_applied, self.marks.marks)
        self.codes = MemoryStage(CodeStage(grace_seconds), track_applied, self.marks.marks)
        self.verdicts = MemoryStage(VerdictStage())

    def process(self, event: Event) -> tuple[list[Alert], list[dict[str, Any]]]:
        """Alerts and verdicts caused by one event; nothing for an exact resubmission."""
        first = self.seen.get(event.key)
        if first is not None:
            if first != event.digest:
                self.conflicts.append(event)
            return [], []
        self.seen[event.key] = event.digest
        if self.activity is not None:
            self.activity.add(event, self.catalog)
        lane = lane_of(event.institution)
        own = self.clock.observe(event.institution, lane, event.occurred_ts)
        routed = route(event, self.catalog, self.view, own)
        moved = self.marks.update(lane, self.clock.top(lane))
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
            vkey = join_key(event.institution, event.event_id)
            expect = expected_parts(routed, lambda _k: 0, lambda _k: 0)
            records.insert(0, head_record(vkey, routed.head, expect))
        if records:
            self.verdicts.apply(records, out)
        return alerts, out.verdicts
