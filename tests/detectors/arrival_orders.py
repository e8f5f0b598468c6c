"""Arrival orders that real uploads produce, each keeping every institution's own order.

The input topic is keyed by institution, so only an institution's own order is given; across
institutions anything may happen. These orders are what the determinism harness feeds replay
(`test_arrival_order.py`) and the stream (`tests/streams/test_stream_determinism.py`).
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import TypeVar

import orjson

from detectors.catalog import Catalog
from detectors.pipeline import Pipeline
from detectors.stage import lane_of
from topics.records import InvalidEvent, normalise_id, parse_event


def lane_mate(institution: str) -> str:
    """Another institution in the same watermark lane: a lane's time needs two clocks
    (`detectors.event_time`), so tests that move time tick one of these as well."""
    lane = lane_of(institution)
    return next(
        name
        for name in (f"CLOCK{n}" for n in itertools.count())
        if lane_of(name) == lane and name != institution
    )


def institution_of(raw: bytes) -> str:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    inst = normalise_id(obj.get("institution")) if isinstance(obj, dict) else None
    return inst or ""


def _streams(events: list[bytes]) -> dict[str, list[bytes]]:
    by_inst: dict[str, list[bytes]] = defaultdict(list)
    for raw in events:
        by_inst[institution_of(raw)].append(raw)
    return by_inst


T = TypeVar("T")


def interleave(streams: list[list[T]], rng: random.Random) -> list[T]:
    """A random merge that keeps each stream's order (each next item drawn in proportion to
    what is left of each stream)."""
    queues = [list(reversed(s)) for s in streams if s]
    out: list[T] = []
    while queues:
        weights = [len(q) for q in queues]
        i = rng.choices(range(len(queues)), weights)[0]
        out.append(queues[i].pop())
        if not queues[i]:
            queues.pop(i)
    return out


def arrival_orders(events: list[bytes], count: int, seed: int = 1) -> Iterator[list[bytes]]:
    """`count` orders: random interleavings, one lane's partition lagging behind all the others,
    whole institutions arriving first or last, and nightly-style bursts (an institution's events
    held back and released in chunks)."""
    rng = random.Random(seed)
    by_inst = _streams(events)
    insts = sorted(by_inst)
    yield list(events)
    for n in range(1, count):
        kind = n % 4
        if kind == 0:
            yield interleave([by_inst[i] for i in insts], rng)
        elif kind == 1:  # one input partition lags: its institutions arrive after the rest
            lane = rng.choice(sorted({lane_of(i) for i in insts}))
            lagging = [i for i in insts if lane_of(i) == lane]
            rest = [i for i in insts if lane_of(i) != lane]
            yield interleave([by_inst[i] for i in rest], rng) + interleave(
                [by_inst[i] for i in lagging], rng
            )
        elif kind == 2:  # institutions one after another, in a shuffled order
            order = insts[:]
            rng.shuffle(order)
            yield [raw for inst in order for raw in by_inst[inst]]
        else:  # bursts: each institution's stream cut in a few chunks, chunks interleaved
            chunked: list[list[list[bytes]]] = []
            for inst in insts:
                stream = by_inst[inst]
                cuts = sorted(rng.sample(range(1, len(stream)), min(3, len(stream) - 1)))
                bounds = [0, *cuts, len(stream)]
                chunked.append([stream[a:b] for a, b in itertools.pairwise(bounds)])
            yield [raw for chunk in interleave(chunked, rng) for raw in chunk]


def replay_standing(events: list[bytes], catalog: Catalog) -> tuple[set[str], int, int]:
    """Standing alert ids (raised and not withdrawn) after replaying `events` in this order,
    with how many alert messages were raises and how many withdrawals."""
    pipeline = Pipeline(catalog)
    status: dict[str, str | None] = {}
    raised = withdrawn = 0
    for raw in events:
        try:
            event = parse_event(raw)
        except InvalidEvent:
            continue
        alerts, _ = pipeline.process(event)
        for alert in alerts:
            status[alert.alert_id] = alert.status
            if alert.status is None:
                raised += 1
            else:
                withdrawn += 1
    return {aid for aid, st in status.items() if st is None}, raised, withdrawn
