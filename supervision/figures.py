"""Per institution, over a period: what the stream counted (`detectors.activity`, read from
Redis) beside what the case store holds (`cases.store.CaseStore.tallies`). Shared by the
institution profile and the supervision report, so the two never disagree.

Periods are calendar days. The counters are by the institution's own date of `occurred_at`;
cases are selected in China Standard Time (UTC+8): by `occurred_at` for the alert figures
(the same basis as the scans they are divided by), by `detected_at` / `closed_at` for the
workflow figures. Prices are kept per month, so a period's prices are those of the months it
touches.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from cases.store import CaseStore, Deadlines
from detectors.activity import FIELDS, PriceFigures
from detectors.catalog import Institution
from streams.redis_state import ActivityReader
from supervision.risk import RiskInputs, alert_rate, grade, region_median, risk_score

CST = dt.timezone(dt.timedelta(hours=8))


class PeriodError(ValueError):
    """A period the caller gave that cannot be read: the message says what to send."""


@dataclass(frozen=True)
class Period:
    since: dt.date
    until: dt.date  # exclusive

    @classmethod
    def month(cls, text: str) -> Period:
        try:
            first = dt.date.fromisoformat(text + "-01")
        except ValueError:
            raise PeriodError(f"month {text!r} is not YYYY-MM (e.g. 2026-11)") from None
        nxt = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        return cls(first, nxt)

    @classmethod
    def days(cls, since: str | None, until: str | None, today: dt.date) -> Period:
        """`since` and `until` inclusive dates (YYYY-MM-DD); by default the last 30 days."""
        try:
            end = dt.date.fromisoformat(until) if until else today
            start = dt.date.fromisoformat(since) if since else end - dt.timedelta(days=29)
        except ValueError:
            raise PeriodError("since and until are dates: YYYY-MM-DD") from None
        if start > end:
            raise PeriodError(f"since {start} is after until {end}")
        if (end - start).days > 366:
            raise PeriodError("a period is at most 367 days; ask for a shorter one")
        return cls(start, end + dt.timedelta(days=1))

    @property
    def months(self) -> list[str]:
        out, at = [], self.since.replace(day=1)
        while at < self.until:
            out.append(at.strftime("%Y%m"))
            at = (at.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        return out

    @property
    def whole_months(self) -> bool:
        return self.since.day == 1 and self.until.day == 1

    def bounds(self) -> tuple[dt.datetime, dt.datetime]:
        return (
            dt.datetime.combine(self.since, dt.time(), CST),
            dt.datetime.combine(self.until, dt.time(), CST),
        )

    def contains(self, day: str) -> bool:
        """`day` as `YYYYMMDD`."""
        return self.since.strftime("%Y%m%d") <= day < self.until.strftime("%Y%m%d")

    def to_dict(self) -> dict[str, str]:
        return {
            "since": self.since.isoformat(),
            "until": (self.until - dt.timedelta(days=1)).isoformat(),
        }


_TALLIED = (
    "alerts",
    "confirmed",
    "oversold_units",
    "opened",
    "closed",
    "still_open",
    "open_now",
    "overdue",
    "resolved",
    "hours_to_resolve",
)


@dataclass
class Figures:
    """One institution's period."""

    institution: str
    entry: Institution | None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))
    by_rule: dict[str, dict[str, float]] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_TALLIED, 0))
    score: float = 0.0
    factors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def scan_rate(self) -> float | None:
        lines = self.counts["required_lines"]
        return None if not lines else self.counts["scanned_lines"] / lines

    @property
    def collection_rate(self) -> float | None:
        packs = self.counts["packs"]
        return None if not packs else self.counts["codes"] / packs

    @property
    def alerts_per_10k(self) -> float | None:
        return alert_rate(int(self.totals["alerts"]), self.counts["scans"])

    @property
    def active(self) -> bool:
        return self.counts["events"] > 0

    def summary(self) -> dict[str, Any]:
        e = self.entry
        return {
            "institution": self.institution,
            "name": e.name if e else None,
            "kind": e.kind if e else None,
            "region": e.region if e else None,
            "risk_score": self.score,
            "grade": grade(self.score),
            "alerts": int(self.totals["alerts"]),
            "confirmed_cases": int(self.totals["confirmed"]),
            "open_cases": int(self.totals["open_now"]),
        }


async def region_figures(
    reader: ActivityReader,
    store: CaseStore,
    period: Period,
    deadlines: Deadlines,
    scope: str | None,
    registered: list[Institution],
    only: list[str] | None = None,
) -> dict[str, Figures]:
    """Figures for every institution of the region `scope` (a region prefix): the registered
    ones, and any other with a case whose region is in the scope; each scored against the
    median alert rate of its own region code. No scope: the institutions `only` names."""
    figures = {i.institution: Figures(i.institution, i) for i in registered}
    for inst in only or ():
        figures.setdefault(inst, Figures(inst, None))
    since, until = period.bounds()
    tallies = await store.tallies(
        since, until, deadlines, region_scope_=scope, institutions=None if scope else only
    )
    for row in tallies:
        f = figures.setdefault(row["institution"], Figures(row["institution"], None))
        rule = f.by_rule.setdefault(row["rule"], {})
        for name in _TALLIED:
            value = float(row[name] or 0)
            rule[name] = value
            f.totals[name] += value
    names = list(figures)
    if period.whole_months:
        for inst, counts in (await reader.months(names, period.months)).items():
            figures[inst].counts = dict(zip(FIELDS, counts, strict=True))
    else:
        for inst, days in (await reader.days(names, period.months)).items():
            sums = [0] * len(FIELDS)
            for day, counts in days.items():
                if period.contains(day):
                    sums = [a + b for a, b in zip(sums, counts, strict=True)]
            figures[inst].counts = dict(zip(FIELDS, sums, strict=True))
    score(figures)
    return figures


def score(figures: dict[str, Figures]) -> None:
    by_region: dict[str | None, list[float | None]] = {}
    for f in figures.values():
        by_region.setdefault(f.entry.region if f.entry else None, []).append(f.alerts_per_10k)
    medians = {region: region_median(rates) for region, rates in by_region.items()}
    for f in figures.values():
        f.score, f.factors = risk_score(
            RiskInputs(
                confirmed=int(f.totals["confirmed"]),
                alerts_per_10k=f.alerts_per_10k,
                region_median_per_10k=medians[f.entry.region if f.entry else None],
                alerts_by_rule={r: int(v["alerts"]) for r, v in f.by_rule.items()},
                overdue=int(f.totals["overdue"]),
                scan_rate=f.scan_rate,
            )
        )


def ranked(figures: dict[str, Figures]) -> list[Figures]:
    """Highest risk first; ties by more alerts, then by code (a stable order)."""
    return sorted(figures.values(), key=lambda f: (-f.score, -f.totals["alerts"], f.institution))


def price_spread(
    prices: dict[str, dict[str, PriceFigures]], institutions: dict[str, Figures]
) -> list[dict[str, Any]]:
    """Per product: the institutions that charged for it, and the spread of their mean prices
    per pack (yuan): lowest, median, highest, and highest / lowest."""
    per_product: dict[str, list[tuple[str, PriceFigures]]] = {}
    for inst, products in prices.items():
        if inst not in institutions:
            continue
        for product, figures in products.items():
            per_product.setdefault(product, []).append((inst, figures))
    out = []
    for product, entries in per_product.items():
        means = sorted(f.total / f.lines / 100 for _, f in entries)
        low, high = means[0], means[-1]
        out.append(
            {
                "product": product,
                "institutions": len(entries),
                "lines": sum(f.lines for _, f in entries),
                "lowest_price": round(min(f.low for _, f in entries) / 100, 2),
                "highest_price": round(max(f.high for _, f in entries) / 100, 2),
                "mean_low": round(low, 2),
                "mean_median": round(median(means), 2),
                "mean_high": round(high, 2),
                "spread": None if low <= 0 else round(high / low, 3),
            }
        )
    return sorted(out, key=lambda r: (-(r["spread"] or 0), r["product"]))


def rate(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
