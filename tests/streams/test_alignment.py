"""The code stage's alignment across input partitions: records go in stamp order, once every
other input partition has been routed past them, or once they waited too long."""

from __future__ import annotations

import random
from typing import Any

from streams.alignment import PartitionAligner


def rec(rid: str, ts: int, source: int, offset: int = 0) -> dict[str, Any]:
    return {"id": rid, "s": [ts, source, offset]}


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in records]


def test_a_record_waits_for_every_other_partition_to_pass_its_time() -> None:
    held = PartitionAligner(sources=3)
    held.offer(rec("resale", 200, 1), offset=10, now=0.0)
    held.advance({1: 200})
    assert held.ready(0.1, wait=60)[0] == []  # partitions 0 and 2 have told nothing
    held.advance({0: 250})
    assert held.ready(0.1, wait=60)[0] == []
    held.advance({2: 200})  # routed up to 200 only: a message stamped 200 may still come
    assert held.ready(0.1, wait=60)[0] == []
    # the first sale, routed late by partition 2, arrives; then partition 2 moves on
    held.offer(rec("first sale", 150, 2), offset=11, now=0.2)
    held.advance({2: 201})
    ready, late, timed_out = held.ready(0.3, wait=60)
    assert ids(ready) == ["first sale", "resale"] and not late and timed_out == 0
    assert held.oldest_offset() == 10
    held.take(ready)
    assert len(held) == 0 and held.oldest_offset() is None


def test_ready_takes_nothing_until_take_and_a_redelivery_is_held_once() -> None:
    held = PartitionAligner(sources=2)
    assert held.offer(rec("a", 5, 0), 1, 0.0)
    assert not held.offer(rec("a", 5, 0), 2, 0.0)
    held.advance({0: 9, 1: 9})
    first = held.ready(0.0, wait=60)[0]
    assert ids(first) == ids(held.ready(0.0, wait=60)[0]) == ["a"]
    assert held.oldest_offset(skip=1) is None and held.oldest_offset() == 1
    held.take(first)
    assert held.ready(0.0, wait=60)[0] == []


def test_a_partition_nobody_routes_holds_records_only_for_the_wait() -> None:
    held = PartitionAligner(sources=2)
    held.offer(rec("a", 5, 0), 1, now=0.0)
    held.offer(rec("b", 7, 0), 2, now=5.0)
    held.advance({0: 7})
    assert held.ready(9.9, wait=10)[0] == []
    ready, late, timed_out = held.ready(10.0, wait=10)
    assert ids(ready) == ["a"] and timed_out == 1 and not late
    held.take(ready)
    # partition 1 comes back; a record stamped before one already applied is late
    held.offer(rec("c", 3, 1), 3, now=11.0)
    held.advance({1: 8})
    ready, late, _ = held.ready(11.0, wait=10)
    assert ids(ready) == ["c", "b"] and late == {"c"}


def test_one_input_partition_needs_no_other() -> None:
    held = PartitionAligner(sources=1)
    held.offer(rec("a", 5, 0), 1, now=0.0)
    assert ids(held.ready(0.0, wait=60)[0]) == ["a"]


def test_any_arrival_order_gives_stamp_order() -> None:
    stamps = [
        (ts, source, off) for source in range(4) for off, ts in enumerate(range(source, 80, 7))
    ]
    want = [f"{ts}/{source}/{off}" for ts, source, off in sorted(stamps)]
    for seed in range(20):
        rng = random.Random(seed)
        # each source's own order kept, sources interleaved at random, progress as they go
        queues = {s: sorted(x for x in stamps if x[1] == s) for s in range(4)}
        held = PartitionAligner(sources=4)
        out: list[str] = []
        offset = 0
        while any(queues.values()):
            source = rng.choice([s for s, q in queues.items() if q])
            ts, _, off = queues[source].pop(0)
            offset += 1
            held.offer(rec(f"{ts}/{source}/{off}", ts, source, off), offset, now=0.0)
            held.advance({source: ts})
            if not queues[source]:
                held.advance({source: 10**6})  # caught up: the heartbeat
            ready, late, timed_out = held.ready(0.0, wait=60)
            assert not late and timed_out == 0
            held.take(ready)
            out += ids(ready)
        assert out == want, seed
