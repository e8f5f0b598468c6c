"""The monthly supervision report (Jinan's 月度监管报表): `tracewatch report --region R --month M`,
`GET /v1/reports/supervision`.

For the institutions of a region (its registered ones, by kind): how many there are, how many
were active, had alerts, had confirmed problems; the cases opened, closed and still open, by
rule; the leads past the region's deadline; the institutions ranked by risk score; the price
spread per product. `by_region` adds one row per region code under the scope (a province's
cities and districts).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable
from typing import Any

from cases.store import CaseStore, Deadlines
from detectors.catalog import INSTITUTION_KINDS, region_scope
from streams.redis_state import ActivityReader
from streams.reference import InstitutionRegistry
from supervision.figures import Figures, Period, price_spread, ranked, rate, region_figures

TOP = 10
COLUMNS = (
    "institutions",
    "active",
    "with_alerts",
    "with_confirmed",
    "events",
    "settlements",
    "scan_rate",
    "code_collection_rate",
    "alerts",
    "confirmed_cases",
    "cases_opened",
    "cases_closed",
    "still_open",
    "overdue",
)


def _row(figures: Iterable[Figures]) -> dict[str, Any]:
    group = list(figures)
    required = sum(f.counts["required_lines"] for f in group)
    packs = sum(f.counts["packs"] for f in group)
    return {
        "institutions": sum(1 for f in group if f.entry is not None),
        "active": sum(1 for f in group if f.active),
        "with_alerts": sum(1 for f in group if f.totals["alerts"]),
        "with_confirmed": sum(1 for f in group if f.totals["confirmed"]),
        "events": sum(f.counts["events"] for f in group),
        "settlements": sum(f.counts["settlements"] for f in group),
        "scan_rate": rate(sum(f.counts["scanned_lines"] for f in group) / required)
        if required
        else None,
        "code_collection_rate": rate(sum(f.counts["codes"] for f in group) / packs)
        if packs
        else None,
        "alerts": int(sum(f.totals["alerts"] for f in group)),
        "confirmed_cases": int(sum(f.totals["confirmed"] for f in group)),
        "cases_opened": int(sum(f.totals["opened"] for f in group)),
        "cases_closed": int(sum(f.totals["closed"] for f in group)),
        "still_open": int(sum(f.totals["still_open"] for f in group)),
        "overdue": int(sum(f.totals["overdue"] for f in group)),
    }


async def supervision_report(
    region: str,
    month: str,
    reader: ActivityReader,
    registry: InstitutionRegistry,
    store: CaseStore,
    deadlines: Deadlines,
    by_region: bool = False,
) -> dict[str, Any]:
    period = Period.month(month)
    scope = region_scope(region)
    registered = await registry.within(scope)
    figures = await region_figures(reader, store, period, deadlines, scope, registered)
    kinds = []
    for kind in sorted(INSTITUTION_KINDS):
        kinds.append(
            {"kind": kind, **_row(f for f in figures.values() if f.entry and f.entry.kind == kind)}
        )
    unregistered = [f for f in figures.values() if f.entry is None]
    if unregistered:
        kinds.append({"kind": "unregistered", **_row(unregistered)})
    rules: dict[str, dict[str, int]] = {}
    for f in figures.values():
        for rule, v in f.by_rule.items():
            held = rules.setdefault(
                rule, dict.fromkeys(("alerts", "confirmed", "opened", "closed", "still_open"), 0)
            )
            for name in held:
                held[name] += int(v[name])
    report: dict[str, Any] = {
        "region": region,
        "scope": scope,
        "month": month,
        "period": period.to_dict(),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "deadline_days": deadlines.of(region),
        "kinds": kinds,
        "total": {"kind": "total", **_row(figures.values())},
        "rules": [{"rule": r, **v} for r, v in sorted(rules.items())],
        "overdue": [
            {**row, "detected_at": row["detected_at"].isoformat()}
            for row in await store.overdue(deadlines, scope)
        ],
        "top_risk": [f.summary() for f in ranked(figures)[:TOP] if f.score > 0],
        "prices": price_spread(await reader.prices(list(figures), period.months), figures),
    }
    if by_region:
        regions: dict[str, list[Figures]] = {}
        for f in figures.values():
            regions.setdefault(f.entry.region if f.entry else "unregistered", []).append(f)
        report["regions"] = [{"region": r, **_row(regions[r])} for r in sorted(regions)]
    return report


def report_csv(report: dict[str, Any]) -> str:
    """The report's main table: a row per kind (per region with `by_region`) and the total."""
    key = "regions" if "regions" in report else "kinds"
    first = "region" if key == "regions" else "kind"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([first, *COLUMNS])
    for row in [*report[key], {first: "total", **report["total"]}]:
        writer.writerow([row[first], *("" if row[c] is None else row[c] for c in COLUMNS)])
    return out.getvalue()
