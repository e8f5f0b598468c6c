"""The small interface every stateful detector sits behind, and the loop that applies records.

A stage (the ledger, the code lifecycle, the verdict assembly) sees records one at a time with
a plain dict of the states it may touch. Where that dict comes from is not its business: in
`replay` it is the whole state in memory; in a worker it holds the states of one batch's keys,
loaded from Redis in one round trip and written back in another. `apply_records` is the one loop
both use, so idempotency (skip records already applied) is implemented once.

Stages that wait for event time give their state a `due` (seconds) and `dl` (the lane whose time
decides it); the store indexes keys by them and calls `fire` once the lane's effective time
(`detectors.event_time.TimeFrame`) has passed `due`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable
from typing import Any, Protocol

from detectors.event_time import LANES, TimeFrame, Watermarks
from topics.records import Alert

Record = dict[str, Any]
State = dict[str, Any]

__all__ = [
    "LANES",
    "BaseStage",
    "Record",
    "Stage",
    "StageOutput",
    "State",
    "Watermarks",
    "apply_records",
    "due_lane",
    "due_of",
    "fire_due",
    "is_due",
    "lane_of",
]


@functools.lru_cache(maxsize=1 << 16)
def lane_of(institution: str) -> int:
    """The watermark lane of an institution: the input partition it lands in with librdkafka's
    default partitioner (CRC-32 of the key) and as many partitions as lanes. Cached: every
    record and every parked check asks it again."""
    return zlib.crc32(institution.encode()) % LANES


class StageOutput:
    """What applying records produced: alerts (and withdrawals), and per settlement the rules
    found per line."""

    __slots__ = ("alerts", "parts", "verdicts")

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        # verdict key -> line_no -> rules: one verdict part per settlement touched
        self.parts: dict[str, dict[int, list[str]]] = {}
        self.verdicts: list[dict[str, Any]] = []

    def line_rules(self, verdict_key: str, line_no: int, rules: Iterable[str]) -> None:
        lines = self.parts.setdefault(verdict_key, {})
        lines.setdefault(line_no, []).extend(rules)


class Stage(Protocol):
    name: str

    def apply(
        self, record: Record, state: dict[str, State], out: StageOutput, frame: TimeFrame
    ) -> None:
        """Apply one record; read and replace `state[record['k']]` (absent = never seen).
        An empty state is deleted when stored."""
        ...

    def fire(self, key: str, state: dict[str, State], out: StageOutput, frame: TimeFrame) -> None:
        """Event time may have passed `state[key]['due']`: decide what time has decided and move
        `due` on (or drop it). Stages that park nothing never get here."""
        ...


class BaseStage:
    """Defaults for stages that park nothing in event time."""

    name = "stage"

    def fire(self, key: str, state: dict[str, State], out: StageOutput, frame: TimeFrame) -> None:
        entry = state.get(key)
        if entry:
            entry.pop("due", None)
            entry.pop("dl", None)


def due_of(state: State | None) -> float | None:
    return state.get("due") if state else None


def due_lane(state: State | None) -> int | None:
    return state.get("dl") if state and "due" in state else None


def is_due(state: State | None, frame: TimeFrame) -> bool:
    due = due_of(state)
    if due is None:
        return False
    lane = due_lane(state)
    return lane is not None and due <= frame.at(lane)


def fire_due(
    stage: Stage,
    keys: Iterable[str],
    state: dict[str, State],
    frame: TimeFrame,
    out: StageOutput,
) -> list[str]:
    """Fire every key among `keys` that time has reached, oldest due first (ties by key, so
    replay and stream fire in one order); returns the keys fired."""
    ready = sorted(
        (due_of(state[key]) or 0.0, key) for key in set(keys) if is_due(state.get(key), frame)
    )
    for _due, key in ready:
        stage.fire(key, state, out, frame)
    return [key for _due, key in ready]


def apply_records(
    stage: Stage,
    records: Iterable[Record],
    state: dict[str, State],
    applied: set[str],
    out: StageOutput,
    frame: TimeFrame,
    failed: list[tuple[Record, Exception]] | None = None,
) -> list[str]:
    """Apply the records not yet applied, in order; returns the ids newly applied.

    `applied` holds the ids of records whose effects are already in `state` (it grows here), so
    a record redelivered after a crash, or re-sent by an upstream that crashed after producing,
    changes nothing and raises no alert twice.

    With `failed`, a record the detectors raise on is set aside there (with the exception) and
    counted as applied, so it is dead-lettered once instead of failing its batch on every retry;
    the detectors are pure, so it would fail the same way again. What it changed before it
    failed stays (a detector bug, reported with the record).
    """
    new_ids: list[str] = []
    for record in records:
        rid = record["id"]
        if rid in applied:
            continue
        if failed is None:
            stage.apply(record, state, out, frame)
        else:
            try:
                stage.apply(record, state, out, frame)
            except Exception as exc:
                failed.append((record, exc))
        applied.add(rid)
        new_ids.append(rid)
    return new_ids
