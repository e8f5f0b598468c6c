"""Aligning the code stage across input partitions: records are applied in input order.

The code stage holds records of one code from every input partition (a box sold in one
institution and resold in another). Ingest routes each input partition at its own speed - a
worker restarting, or draining a backlog, is minutes behind its peers - so a resale could reach
the code stage before the first sale it repeats, and its settlement would pass. A verdict must
depend only on what had reached the input topic before its settlement did, live, after a crash
and in replay of the topic alike.

So ingest stamps every code record with its input message's (timestamp, partition, offset), and
tells each code partition how far it has routed every input partition: with each batch (the
latest timestamp it handled there) and, while an input partition is caught up, from a timer (the
time its consumer last saw the partition's high-water mark, less `margin`). The code stage holds
records here and releases them in stamp order once every other input partition has passed their
timestamp - Kafka Streams' alignment of stream time across a task's partitions - or once they
have waited `wait` seconds (an input partition nobody routes: its worker died and the group has
not yet moved it). Records are held in memory only: the stage's saved position stays at the
oldest message still held, so a restarted worker reads them back from the by-code topic, and
the stage's applied ids absorb what was applied already.

A record whose stamp is below one already released (a producer clock behind the others with
create-time stamps, a timed-out wait) is released at once and counted as late: the only way the
live order can differ from the topic's. Give the input topic `message.timestamp.type=
LogAppendTime` (`tracewatch topics` does) so that stamps are the broker's.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from typing import Any

Stamp = tuple[int, int, int]  # input timestamp (ms), input partition, input offset

_NEVER = -(2**62)
_UNSTAMPED: Stamp = (_NEVER, 0, 0)
_NEVER_STAMP: Stamp = (_NEVER - 1, 0, 0)
_EVER = 2**62


def stamp_of(record: dict[str, Any]) -> Stamp | None:
    raw = record.get("s")
    if not raw:
        return None
    return (int(raw[0]), int(raw[1]), int(raw[2]))


class PartitionAligner:
    """One code partition's held records and the progress of every input partition."""

    __slots__ = (
        "_arrivals",
        "_held",
        "_ids",
        "_offsets",
        "_released",
        "_seq",
        "progress",
        "sources",
    )

    def __init__(self, sources: int) -> None:
        self.sources = sources  # input partitions
        self.progress: dict[int, int] = {}  # input partition -> latest timestamp routed (ms)
        # (stamp, arrival number, stage-topic offset, record), kept sorted: tuples compare in C
        self._held: list[tuple[Stamp, int, int, dict[str, Any]]] = []
        self._arrivals: deque[tuple[float, Stamp, str]] = deque()  # in arrival order
        self._ids: set[str] = set()
        self._offsets: Counter[int] = Counter()
        self._released: Stamp = _UNSTAMPED  # highest stamp released
        self._seq = 0

    def __len__(self) -> int:
        return len(self._held)

    def advance(self, progress: dict[int, int]) -> None:
        for source, ts in progress.items():
            if ts > self.progress.get(source, _NEVER):
                self.progress[source] = ts

    def offer(self, record: dict[str, Any], offset: int, now: float) -> bool:
        """Hold a record; False when it is held already (a redelivery of the same record)."""
        rid = record["id"]
        if rid in self._ids:
            return False
        stamp = stamp_of(record) or _UNSTAMPED
        self._ids.add(rid)
        self._offsets[offset] += 1
        self._seq += 1
        bisect.insort(self._held, (stamp, self._seq, offset, record))
        self._arrivals.append((now, stamp, rid))
        return True

    def ready(self, now: float, wait: float) -> tuple[list[dict[str, Any]], set[str], int]:
        """The held records that may be applied now, in stamp order, without taking them
        (`take` does, once their effects are saved); with the ids of those stamped before one
        already released (late - or redelivered, which the stage's applied ids tell) and how
        many go because a record waited too long."""
        if not self._held:
            return [], set(), 0
        # a record that waited too long goes, and everything stamped before it
        cutoff = _NEVER_STAMP
        for arrived, stamp, rid in self._arrivals:
            if now - arrived < wait:
                break
            if rid in self._ids and stamp > cutoff:
                cutoff = stamp
        lowest = sorted(
            (self.progress.get(source, _NEVER), source) for source in range(self.sources)
        )[:2]
        out: list[dict[str, Any]] = []
        late: set[str] = set()
        timed_out = 0
        for stamp, _seq, _offset, record in self._held:
            if stamp < self._released:
                late.add(record["id"])
            else:
                # every other input partition must have routed past this timestamp
                if lowest[0][1] != stamp[1]:
                    bound = lowest[0][0]
                else:
                    bound = lowest[1][0] if len(lowest) > 1 else _EVER
                if stamp[0] >= bound:
                    if stamp > cutoff:
                        break
                    timed_out += 1
            out.append(record)
        return out, late, timed_out

    def take(self, records: list[dict[str, Any]]) -> None:
        """Drop the records `ready` gave (their effects are saved): a prefix of the held."""
        if not records:
            return
        n = len(records)
        prefix = self._held[:n]
        if [entry[3]["id"] for entry in prefix] != [r["id"] for r in records]:
            gone = {r["id"] for r in records}
            prefix = [entry for entry in self._held if entry[3]["id"] in gone]
            self._held = [entry for entry in self._held if entry[3]["id"] not in gone]
        else:
            del self._held[:n]
        for stamp, _seq, offset, record in prefix:
            self._offsets[offset] -= 1
            if not self._offsets[offset]:
                del self._offsets[offset]
            self._ids.discard(record["id"])
            if stamp > self._released:
                self._released = stamp
        arrivals = self._arrivals
        while arrivals and arrivals[0][2] not in self._ids:
            arrivals.popleft()

    def drop_offset(self, offset: int) -> None:
        """Forget the records of one stage-topic message (dead-lettered and skipped)."""
        self.take([entry[3] for entry in self._held if entry[2] == offset])

    def oldest_offset(self, skip: int = 0) -> int | None:
        """The stage-topic offset of the oldest message whose records are still held (leaving
        out the first `skip` in stamp order, about to be taken): where a restarted worker must
        read from."""
        if not skip:
            return min(self._offsets) if self._offsets else None
        return min((entry[2] for entry in self._held[skip:]), default=None)
