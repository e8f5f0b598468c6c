"""The institution profile (信用画像): `GET /v1/institutions/{id}`, `tracewatch institution ID`.

Read from the stream's counters and the case store, never from raw events: one pipelined Redis
round trip for the region's counters and prices, three queries of the case store.
"""

from __future__ import annotations

from typing import Any

from cases.store import CaseStore, Deadlines
from detectors.activity import FIELDS
from streams.redis_state import ActivityReader
from streams.reference import InstitutionRegistry
from supervision.figures import Period, price_spread, ranked, rate, region_figures
from supervision.risk import alert_rate, grade


async def institution_profile(
    institution: str,
    period: Period,
    reader: ActivityReader,
    registry: InstitutionRegistry,
    store: CaseStore,
    deadlines: Deadlines,
) -> dict[str, Any]:
    entry = await registry.get(institution)
    region = entry.region if entry else None
    registered = await registry.within(region) if region else []
    figures = await region_figures(
        reader, store, period, deadlines, region, registered, only=[institution]
    )
    mine = figures[institution]
    order = ranked(figures)
    prices = await reader.prices(list(figures), period.months)
    spread = {row["product"]: row for row in price_spread(prices, figures)}
    own_prices = []
    for product, f in sorted(prices.get(institution, {}).items()):
        own_prices.append(
            {
                "product": product,
                "lines": f.lines,
                "mean_price": round(f.total / f.lines / 100, 2),
                "lowest_price": f.low / 100,
                "highest_price": f.high / 100,
                "region": spread.get(product),
            }
        )
    days = (await reader.days([institution], period.months)).get(institution, {})
    daily = [
        {"day": f"{d[:4]}-{d[4:6]}-{d[6:]}", **dict(zip(FIELDS, counts, strict=True))}
        for d, counts in sorted(days.items())
        if period.contains(d)
    ]
    scans = mine.counts["scans"]
    return {
        "institution": institution,
        "name": entry.name if entry else None,
        "kind": entry.kind if entry else None,
        "region": region,
        "registered": entry is not None,
        "period": period.to_dict(),
        "activity": {
            **mine.counts,
            "scan_rate": rate(mine.scan_rate),
            "code_collection_rate": rate(mine.collection_rate),
        },
        "alerts": {
            "total": int(mine.totals["alerts"]),
            "per_10k_scans": rate(mine.alerts_per_10k),
            "by_rule": {
                r: {
                    "alerts": int(v["alerts"]),
                    "per_10k_scans": rate(alert_rate(int(v["alerts"]), scans)),
                }
                for r, v in sorted(mine.by_rule.items())
                if v["alerts"]
            },
        },
        "confirmed_cases": int(mine.totals["confirmed"]),
        "oversold_units": mine.totals["oversold_units"],
        "open_cases": {
            "total": int(mine.totals["open_now"]),
            "by_age": await store.open_by_age(institution),
            "overdue": int(mine.totals["overdue"]),
            "deadline_days": deadlines.of(region),
        },
        "resolution": {
            "resolved": int(mine.totals["resolved"]),
            "mean_hours_to_resolve": round(
                mine.totals["hours_to_resolve"] / mine.totals["resolved"], 1
            )
            if mine.totals["resolved"]
            else None,
        },
        "risk": {
            "score": mine.score,
            "grade": grade(mine.score),
            "factors": mine.factors,
            "rank_in_region": next(
                i for i, f in enumerate(order, 1) if f.institution == institution
            ),
            "institutions_in_region": len(order),
            "formula": "supervision/risk.py; README, 'Institution profile and supervision report'",
        },
        "prices": own_prices,
        "daily": daily,
    }
