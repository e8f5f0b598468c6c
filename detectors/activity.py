"""What an institution did, counted per day: the denominators of its profile (scan rate, code
collection rate, alerts per 10,000 scans) and the prices it charged (价格监测's spread).

Counted once per accepted event (ingest counts after the resubmission filter, in the same Redis
script that marks the event seen, so a redelivered batch counts nothing twice), by the
institution's own calendar day: the date of `occurred_at` in the offset the institution wrote.
Pure: no clocks, no storage; `streams.processors` adds a batch's events up and
`streams.redis_state.IngestStore` stores the sums.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from detectors.catalog import Catalog
from detectors.codes import classify
from topics.records import Event

# The counters, in their stored order (a stored day is these numbers joined by commas).
FIELDS: tuple[str, ...] = (
    "events",  # accepted events of every type
    "settlements",  # settlement events
    "required_lines",  # settlement lines of a product that must be scanned (or not in the catalog)
    "scanned_lines",  # ... of which carried at least one scan
    "packs",  # whole packs on whole-pack required lines (rounded up)
    "codes",  # distinct well-formed codes on those lines, at most one per pack
    "scans",  # scanned strings on every line of every event (stock changes too)
)
WIDTH = len(FIELDS)

_DAY = 86400


def local_day(event: Event) -> str:
    """`YYYYMMDD` of `occurred_at` in the institution's own offset."""
    return _day_text((event.occurred_ts + event.offset_minutes * 60) // _DAY)


@functools.lru_cache(maxsize=4096)
def _day_text(day: float) -> str:
    """Days since the epoch as `YYYYMMDD`: formatting a date was a fifth of counting an event,
    and a batch's events fall on a handful of days."""
    return datetime.fromtimestamp(day * _DAY, UTC).strftime("%Y%m%d")


@dataclass(slots=True)
class PriceFigures:
    """Prices per pack, in fen, of the settlement lines that gave one: how many, lowest,
    highest, sum (the mean is sum / lines)."""

    lines: int
    low: int
    high: int
    total: int

    def merge(self, other: PriceFigures) -> None:
        self.lines += other.lines
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        self.total += other.total

    def text(self) -> str:
        return f"{self.lines},{self.low},{self.high},{self.total}"

    @classmethod
    def parse(cls, text: bytes | str) -> PriceFigures:
        raw = text.decode() if isinstance(text, bytes) else text
        lines, low, high, total = (int(x) for x in raw.split(","))
        return cls(lines, low, high, total)


def counts_of(event: Event, catalog: Catalog) -> list[int]:
    """The event's contribution to its institution's day, in `FIELDS` order."""
    out = [1, 0, 0, 0, 0, 0, len(event.codes)]
    settlement = event.type == "settlement"
    if settlement:
        out[1] = 1
    for line in event.lines:
        out[6] += len(line.codes)
        if not settlement:
            continue
        product = catalog.get(line.product)
        if product is not None and not product.code_required:
            continue
        out[2] += 1
        if not line.codes:
            continue
        out[3] += 1
        if line.split:
            continue
        packs = (
            line.quantity / product.pack_size if product and line.unit == "unit" else line.quantity
        )
        whole = math.ceil(packs - 1e-9)
        distinct = {s.key for s in map(classify, line.codes) if s.key is not None}
        out[4] += whole
        out[5] += min(len(distinct), whole)
    return out


def prices_of(event: Event, catalog: Catalog) -> dict[str, PriceFigures]:
    """Per product, the prices per pack of the event's settlement lines that carry a price."""
    if event.type != "settlement":
        return {}
    out: dict[str, PriceFigures] = {}
    for line in event.lines:
        if line.price is None:
            continue
        product = catalog.get(line.product)
        per_pack = line.price * (product.pack_size if product and line.unit == "unit" else 1)
        fen = round(per_pack * 100)
        seen = out.get(line.product)
        if seen is None:
            out[line.product] = PriceFigures(1, fen, fen, fen)
        else:
            seen.merge(PriceFigures(1, fen, fen, fen))
    return out


class ActivityBatch:
    """One batch's sums per (institution, day) and prices per (institution, month, product),
    for one save."""

    __slots__ = ("days", "prices")

    def __init__(self) -> None:
        self.days: dict[tuple[str, str], list[int]] = {}
        self.prices: dict[tuple[str, str, str], PriceFigures] = {}

    def add(self, event: Event, catalog: Catalog) -> None:
        day = local_day(event)
        counts = counts_of(event, catalog)
        key = (event.institution, day)
        held = self.days.get(key)
        if held is None:
            self.days[key] = counts
        else:
            for i, n in enumerate(counts):
                held[i] += n
        for product, figures in prices_of(event, catalog).items():
            pkey = (event.institution, day[:6], product)
            seen = self.prices.get(pkey)
            if seen is None:
                self.prices[pkey] = figures
            else:
                seen.merge(figures)

    def __bool__(self) -> bool:
        return bool(self.days or self.prices)
