"""Event time: per-institution clocks, per-lane watermarks and the idle bound.

Checks that wait for late data (NO_PROVENANCE, OVERSOLD, STOCK_COUNT_MISMATCH) are due at
`occurred_at + grace`. Whose clock says that time has come?

- An institution's **own** time is the latest `occurred_at` among its events. Its events travel
  in one input partition in its own order, so anything decided by its own time alone is the
  same in every interleaving (the ledger finalises its figures by it).
- A **lane** is an input partition's share of institutions (CRC-32 of the institution, as
  librdkafka's default partitioner), so a partition that lags (a consumer catching up a backlog)
  is never judged by the others' progress. A lane's watermark is the latest own time of its
  institutions, but never more than `CLOCK_SKEW` past the second latest: one device clock 100 h
  fast moves only its own institution, not the others in its lane.
- **Idle bound** (Flink's idle sources, in event time so that replay gives what the live run
  gave): a lane whose institutions all fall silent would hold its checks for ever, so a lane is
  taken to be at least `idle` behind the overall watermark (the same robust maximum, over lanes).
  A check fired that way that data arriving later explains away is withdrawn (detectors decide
  alerts as a function of the data they hold, `detectors.code_state`, `detectors.ledger`).

No wall clock is read anywhere here: replaying last month's data today gives the live answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CLOCK_SKEW = 3600.0
DEFAULT_GRACE_SECONDS = 72 * 3600
DEFAULT_IDLE_SECONDS = 24 * 3600
NEVER = float("-inf")
LANES = 16

Watermarks = Mapping[int, float]


def robust_max(values: Iterable[float]) -> float:
    """The largest value, but at most `CLOCK_SKEW` past the second largest."""
    first = second = NEVER
    for value in values:
        if value > first:
            first, second = value, first
        elif value > second:
            second = value
    if second == NEVER:
        return first
    return min(first, second + CLOCK_SKEW)


class TimeFrame:
    """Effective time per lane for one set of lane watermarks (built once per batch)."""

    __slots__ = ("floor", "marks")

    def __init__(self, marks: Watermarks, idle: float = DEFAULT_IDLE_SECONDS) -> None:
        self.marks = marks
        self.floor = robust_max(marks.values()) - idle if marks else NEVER

    def at(self, lane: int) -> float:
        return max(self.marks.get(lane, NEVER), self.floor)

    def all(self) -> dict[int, float]:
        return {lane: max(mark, self.floor) for lane, mark in self.marks.items()}


class LaneClock:
    """Own time per institution and the lanes' watermarks, kept where the input is read
    (ingest per input partition; replay for all). Only ever moves forward."""

    __slots__ = ("_top", "own")

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        # per lane, the two latest (own time, institution) of distinct institutions
        self._top: dict[int, list[tuple[float, str]]] = {}

    def observe(self, institution: str, lane: int, ts: float) -> float:
        """Record an event's time; returns the institution's own time after it."""
        before = self.own.get(institution, NEVER)
        if ts <= before:
            return before
        self.own[institution] = ts
        top = [t for t in self._top.get(lane, ()) if t[1] != institution]
        top.append((ts, institution))
        top.sort(reverse=True)
        self._top[lane] = top[:2]
        return ts

    def mark(self, lane: int) -> float:
        return robust_max(t for t, _ in self._top.get(lane, ()))

    def marks(self) -> dict[int, float]:
        return {lane: self.mark(lane) for lane in self._top}

    def restore(self, lane: int, top: Iterable[tuple[float, str]]) -> None:
        """Seed a lane from stored state (a worker taking over an input partition)."""
        merged = {inst: ts for ts, inst in self._top.get(lane, ())}
        for ts, inst in top:
            merged[inst] = max(ts, merged.get(inst, NEVER))
        self._top[lane] = sorted(((ts, inst) for inst, ts in merged.items()), reverse=True)[:2]

    def top(self, lane: int) -> list[tuple[float, str]]:
        return list(self._top.get(lane, ()))
