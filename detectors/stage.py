"""The small interface every stateful detector sits behind, and the loop that applies records.

A stage (the ledger, the code lifecycle, the verdict assembly) sees records one at a time with
a plain dict of the states it may touch. Where that dict comes from is not its business: in
`replay` it is the whole state in memory; in a worker it holds the states of one batch's keys,
loaded from Redis in one round trip and written back in another. `apply_records` is the one loop
both use, so idempotency (skip records already applied) is implemented once.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import orjson

from topics.records import Alert

Record = dict[str, Any]
State = dict[str, Any]
# Event time per watermark lane (`lane_of`): each lane's time advances with its own
# institutions' events only, so a lagging input partition never fires another's checks.
Watermarks = Mapping[int, float]
LANES = 16


def lane_of(institution: str) -> int:
    """The watermark lane of an institution: the input partition it lands in with librdkafka's
    default partitioner (CRC-32 of the key) and as many partitions as lanes."""
    return zlib.crc32(institution.encode()) % LANES


class StageOutput:
    """What applying records produced: alerts, and per settlement the rules found per line."""

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

    def apply(self, record: Record, state: dict[str, State], out: StageOutput) -> None:
        """Apply one record; read and replace `state[record['k']]` (absent = never seen)."""
        ...

    def fire(
        self, key: str, state: dict[str, State], watermarks: Watermarks, out: StageOutput
    ) -> None:
        """Event time may have passed `state[key]['due']`: run the parked checks whose lane's
        watermark passed them and replace the state (`due` moved to the next check, or gone).
        Stages that park nothing never get here."""
        ...

    def pack(self, state: State) -> bytes:
        """State at rest (Redis) as compact bytes; `unpack` reverses it."""
        ...

    def unpack(self, raw: bytes) -> State: ...

    def field(self, key: str) -> bytes:
        """A state key as stored (Redis hash field); `unfield` reverses it."""
        ...

    def unfield(self, raw: bytes) -> str: ...


class BaseStage:
    """Defaults for stages: JSON state at rest, nothing parked in event time."""

    name = "stage"

    def pack(self, state: State) -> bytes:
        return orjson.dumps(state)

    def unpack(self, raw: bytes) -> State:
        state: State = orjson.loads(raw)
        return state

    @staticmethod
    def field(key: str) -> bytes:
        """The key as stored in Redis."""
        return key.encode()

    @staticmethod
    def unfield(raw: bytes) -> str:
        return raw.decode()

    def fire(
        self, key: str, state: dict[str, State], watermarks: Watermarks, out: StageOutput
    ) -> None:
        entry = dict(state.get(key) or {})
        entry.pop("due", None)
        entry.pop("dl", None)
        state[key] = entry


def raise_watermarks(current: dict[int, float], offered: Watermarks) -> dict[int, float]:
    """Move `current` forward to `offered` lane by lane (never back); returns the lanes moved."""
    raised = {lane: ts for lane, ts in offered.items() if ts > current.get(lane, float("-inf"))}
    current.update(raised)
    return raised


def due_of(state: State | None) -> float | None:
    """A state that waits for event time to pass carries `due` (seconds since the epoch) and
    `dl`, the watermark lane that must pass it."""
    return state.get("due") if state else None


def due_lane(state: State | None) -> int | None:
    return state.get("dl") if state and "due" in state else None


def is_due(state: State | None, watermarks: Watermarks) -> bool:
    due = due_of(state)
    if due is None:
        return False
    lane = due_lane(state)
    mark = (
        watermarks.get(lane, float("-inf"))
        if lane is not None
        else max(watermarks.values(), default=float("-inf"))
    )
    return due <= mark


def fire_due(
    stage: Stage,
    keys: Iterable[str],
    state: dict[str, State],
    watermarks: Watermarks,
    out: StageOutput,
) -> list[str]:
    """Fire every key among `keys` whose `due` its lane's watermark has passed, oldest due first
    (ties by key, so replay and stream fire in one order); returns the keys fired."""
    ready = sorted(
        (due_of(state[key]) or 0.0, key) for key in set(keys) if is_due(state.get(key), watermarks)
    )
    for _due, key in ready:
        stage.fire(key, state, watermarks, out)
    return [key for _due, key in ready]


def apply_records(
    stage: Stage,
    records: Iterable[Record],
    state: dict[str, State],
    applied: set[str],
    out: StageOutput,
) -> list[str]:
    """Apply the records not yet applied, in order; returns the ids newly applied.

    `applied` holds the ids of records whose effects are already in `state` (it grows here), so
    a record redelivered after a crash, or re-sent by an upstream that crashed after producing,
    changes nothing and raises no alert twice.
    """
    new_ids: list[str] = []
    for record in records:
        rid = record["id"]
        if rid in applied:
            continue
        stage.apply(record, state, out)
        applied.add(rid)
        new_ids.append(rid)
    return new_ids
