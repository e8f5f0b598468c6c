"""The institution risk score (信用画像 / 分级分类): 0-100, the sum of five capped factors, so an
inspector can read why an institution ranks where it does. Pure: figures in, score out.

| factor | points | cap |
|---|---|---|
| confirmed cases (closed `confirmed_fraud`) among the period's alerts | 10 each | 40 |
| alert rate (standing alerts per 10,000 scans) against the region's median | 25 x (ratio - 1) / 3: 0 at or below the median, the cap at 4x | 25 |
| repeated rules: rules with 3 or more standing alerts in the period | 5 each | 15 |
| overdue leads: cases open longer than the region's deadline, now | 2 each | 10 |
| scan gap: 1 - scan rate of the settlement lines that must carry codes | 10 x gap | 10 |

Grades: `high` from 50, `medium` from 20, `low` below. A region whose median rate is 0 is
compared with 1 alert per 10,000 scans, so one alert at a quiet region's only active
institution does not make it the worst.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any

CONFIRMED_POINTS, CONFIRMED_CAP = 10.0, 40.0
RATE_CAP = 25.0
RATE_CAP_AT = 4.0  # times the region's median
REPEAT_MIN, REPEAT_POINTS, REPEAT_CAP = 3, 5.0, 15.0
OVERDUE_POINTS, OVERDUE_CAP = 2.0, 10.0
SCAN_GAP_CAP = 10.0
HIGH, MEDIUM = 50.0, 20.0
MEDIAN_FLOOR = 1.0  # alerts per 10,000 scans


@dataclass(frozen=True)
class RiskInputs:
    confirmed: int
    alerts_per_10k: float | None  # None: no scans in the period
    region_median_per_10k: float | None
    alerts_by_rule: dict[str, int]
    overdue: int
    scan_rate: float | None  # None: no line that had to be scanned


def alert_rate(alerts: int, scans: int) -> float | None:
    return None if scans <= 0 else alerts * 10_000 / scans


def region_median(rates: list[float | None]) -> float | None:
    known = [r for r in rates if r is not None]
    return median(known) if known else None


def grade(score: float) -> str:
    return "high" if score >= HIGH else "medium" if score >= MEDIUM else "low"


def risk_score(x: RiskInputs) -> tuple[float, list[dict[str, Any]]]:
    factors: list[dict[str, Any]] = []

    def factor(name: str, value: Any, points: float, cap: float, why: str) -> None:
        factors.append(
            {
                "factor": name,
                "value": value,
                "points": round(min(points, cap), 2),
                "max": cap,
                "explanation": why,
            }
        )

    factor(
        "confirmed_cases",
        x.confirmed,
        CONFIRMED_POINTS * x.confirmed,
        CONFIRMED_CAP,
        f"{CONFIRMED_POINTS:g} points per case closed as confirmed fraud",
    )
    ratio: float | None = None
    if x.alerts_per_10k is not None:
        ratio = x.alerts_per_10k / max(x.region_median_per_10k or 0.0, MEDIAN_FLOOR)
    factor(
        "alert_rate",
        {
            "alerts_per_10k_scans": None
            if x.alerts_per_10k is None
            else round(x.alerts_per_10k, 2),
            "region_median": None
            if x.region_median_per_10k is None
            else round(x.region_median_per_10k, 2),
            "ratio": None if ratio is None else round(ratio, 2),
        },
        0.0 if ratio is None else RATE_CAP * max(0.0, ratio - 1) / (RATE_CAP_AT - 1),
        RATE_CAP,
        f"0 at or below the region's median rate, {RATE_CAP:g} at {RATE_CAP_AT:g}x it",
    )
    repeated = sorted(r for r, n in x.alerts_by_rule.items() if n >= REPEAT_MIN)
    factor(
        "repeated_rules",
        repeated,
        REPEAT_POINTS * len(repeated),
        REPEAT_CAP,
        f"{REPEAT_POINTS:g} points per rule with {REPEAT_MIN} or more standing alerts",
    )
    factor(
        "overdue_leads",
        x.overdue,
        OVERDUE_POINTS * x.overdue,
        OVERDUE_CAP,
        f"{OVERDUE_POINTS:g} points per case open past the region's deadline",
    )
    gap = None if x.scan_rate is None else max(0.0, 1.0 - x.scan_rate)
    factor(
        "scan_gap",
        None if gap is None else round(gap, 4),
        0.0 if gap is None else SCAN_GAP_CAP * gap,
        SCAN_GAP_CAP,
        f"the share of must-scan settlement lines that carried no code, times {SCAN_GAP_CAP:g}",
    )
    return round(sum(f["points"] for f in factors), 2), factors
