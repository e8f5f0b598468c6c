"""Event time: per-institution clocks, per-lane watermarks and the idle bound.

Checks that wait for late data (NO_PROVENANCE, OVERSOLD, STOCK_COUNT_MISMATCH) are due at
`occurred_at + grace`. Whose clock says that time has come?

- An institution's **own** time is the latest `occurred_at` among its events. Its events travel
  in one input partition in its own order, so anything decided by its own time alone is the
  same in every interleaving (the ledger finalises its figures by it).
- A **lane** is an input partition's share of institutions (CRC-32 of the institution, as
  librdkafka's default partitioner), so a partition that lags (a consumer catching up a backlog)
  is never judged by the others' progress. A lane's watermark is the latest own time of its
  institutions, but never more than `CLOCK_SKEW` past the second latest of them: one device
  clock 100 h fast moves no other institution's checks in its lane. A lane needs two clocks:
  one institution alone in its lane moves nothing (its lane follows the idle bound) - were it
  its own clock until a second institution turned up, the lane's time would fall back then, and
  a check decided in between would stand in one arrival order and not in another.
- **Idle bound** (Flink's idle sources, in event time so that replay gives what the live run
  gave): a lane whose institutions all fall silent would hold its checks for ever, so a lane is
  taken to be at most `idle` behind the latest lane that has two clocks.
- Every one of these only moves forward as events arrive, whatever their order (the lane times
  and the bound are maxima and minima of own times, which only rise), and ends at a value set by
  the events alone. So a check decided at some point is decided at the end too, and the final
  alerts are the same in every interleaving. A check fired that data arriving later explains
  away is withdrawn (detectors decide alerts as a function of the data they hold,
  `detectors.code_state`, `detectors.ledger`).

No wall clock is read anywhere here: replaying last month's data today gives the live answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from topics.names import INPUT_PARTITIONS

CLOCK_SKEW = 3600.0
DEFAULT_GRACE_SECONDS = 72 * 3600
DEFAULT_IDLE_SECONDS = 24 * 3600
NEVER = float("-inf")
# one lane per input partition: an institution's lane is the partition its events land in
LANES = INPUT_PARTITIONS

Watermarks = Mapping[int, float]


Tops = Mapping[int, tuple[float, float]]


def effective_marks(tops: Tops, idle: float = DEFAULT_IDLE_SECONDS) -> dict[int, float]:
    """Each lane's effective time from the two latest own times among its institutions.

    A lane's time is its latest institution's, capped at `CLOCK_SKEW` past the second latest of
    the lane (a device clock 100 h fast moves no other institution's checks in its lane); a lane
    with one institution has only the bound. No lane is taken to be more than `idle` behind the
    latest lane with two clocks (every institution of it silent). Monotone as events arrive,
    whatever their order: a lane's second institution turning up raises it from the bound."""
    robust = {
        lane: min(first, second + CLOCK_SKEW)
        for lane, (first, second) in tops.items()
        if second > NEVER
    }
    floor = max(robust.values(), default=NEVER) - idle
    return {lane: max(robust.get(lane, NEVER), floor) for lane in tops}


class EffectiveMarks:
    """`effective_marks` kept current one lane at a time: replay moves one lane's tops per event,
    and rebuilding every lane's mark for each event was a tenth of its time. Same values
    (a test holds it to `effective_marks`); `marks` is updated in place and `update` says which
    lanes moved, so the stores look only at those lanes' parked checks."""

    __slots__ = ("_best", "_floor", "_robust", "idle", "marks")

    def __init__(self, idle: float = DEFAULT_IDLE_SECONDS) -> None:
        self.idle = idle
        self.marks: dict[int, float] = {}
        self._robust: dict[int, float] = {}
        self._best = NEVER  # the highest robust lane time
        self._floor = NEVER

    def update(self, lane: int, pair: tuple[float, float]) -> list[int]:
        """Lane `lane`'s two latest own times are now `pair`; the lanes whose mark changed."""
        first, second = pair
        robust = self._robust
        if second > NEVER:
            value = min(first, second + CLOCK_SKEW)
            old = robust.get(lane, NEVER)
            if value != old:
                robust[lane] = value
                if value > self._best:
                    self._best = value
                elif old == self._best:  # never happens while tops only rise; kept exact
                    self._best = max(robust.values())
        floor = self._best - self.idle
        marks = self.marks
        if floor != self._floor:
            self._floor = floor
            changed = []
            for each in [*marks, *(() if lane in marks else (lane,))]:
                mark = max(robust.get(each, NEVER), floor)
                if marks.get(each) != mark:
                    marks[each] = mark
                    changed.append(each)
            return changed
        mark = max(robust.get(lane, NEVER), floor)
        if marks.get(lane) != mark:
            marks[lane] = mark
            return [lane]
        return []


class TimeFrame:
    """Effective time per lane (from `effective_marks`), as one batch sees it."""

    __slots__ = ("marks",)

    def __init__(self, marks: Watermarks) -> None:
        self.marks = marks

    def at(self, lane: int) -> float:
        return self.marks.get(lane, NEVER)


class LaneClock:
    """Own time per institution and the two latest own times per lane, kept where the input is
    read (ingest per input partition; replay for all). Only ever moves forward."""

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

    def seed(self, lane: int, top: Iterable[tuple[float, str]]) -> None:
        """Start from a lane's stored two latest (own time, institution)."""
        for ts, inst in top:
            self.observe(inst, lane, ts)

    def named_tops(self) -> dict[int, list[tuple[float, str]]]:
        return {lane: list(top) for lane, top in self._top.items()}

    def top(self, lane: int) -> tuple[float, float]:
        pair = self._top.get(lane, ())
        return (
            pair[0][0] if pair else NEVER,
            pair[1][0] if len(pair) > 1 else NEVER,
        )

    def tops(self) -> dict[int, tuple[float, float]]:
        return {lane: self.top(lane) for lane in self._top}
