"""The risk score's formula (supervision/risk.py) and the periods the figures are read over."""

from __future__ import annotations

import datetime as dt

import pytest

from supervision.figures import Period, PeriodError
from supervision.risk import RiskInputs, grade, region_median, risk_score


def inputs(**kw: object) -> RiskInputs:
    base: dict[str, object] = {
        "confirmed": 0,
        "alerts_per_10k": 0.0,
        "region_median_per_10k": 2.0,
        "alerts_by_rule": {},
        "overdue": 0,
        "scan_rate": 1.0,
    }
    return RiskInputs(**{**base, **kw})  # type: ignore[arg-type]


def points(x: RiskInputs) -> dict[str, float]:
    _score, factors = risk_score(x)
    return {f["factor"]: f["points"] for f in factors}


def test_a_clean_institution_scores_zero() -> None:
    assert risk_score(inputs())[0] == 0 and grade(0) == "low"


def test_each_factor_is_capped() -> None:
    worst = inputs(
        confirmed=9,
        alerts_per_10k=100.0,
        alerts_by_rule={r: 5 for r in ("A", "B", "C", "D")},
        overdue=40,
        scan_rate=0.0,
    )
    assert points(worst) == {
        "confirmed_cases": 40,
        "alert_rate": 25,
        "repeated_rules": 15,
        "overdue_leads": 10,
        "scan_gap": 10,
    }
    assert risk_score(worst)[0] == 100 and grade(100) == "high"


def test_the_alert_rate_counts_only_above_the_regions_median() -> None:
    assert points(inputs(alerts_per_10k=2.0))["alert_rate"] == 0  # at the median
    assert points(inputs(alerts_per_10k=5.0))["alert_rate"] == pytest.approx(12.5)  # 2.5x
    # a quiet region (median 0) is compared with 1 per 10,000 scans
    assert points(inputs(alerts_per_10k=1.0, region_median_per_10k=0.0))["alert_rate"] == 0
    assert points(inputs(alerts_per_10k=None))["alert_rate"] == 0


def test_repeats_need_three_alerts_and_a_missing_scan_rate_costs_nothing() -> None:
    got = points(inputs(alerts_by_rule={"NO_CODE": 3, "INVALID_CODE": 2}, scan_rate=None))
    assert got["repeated_rules"] == 5 and got["scan_gap"] == 0
    assert points(inputs(scan_rate=0.75))["scan_gap"] == 2.5


def test_grades_and_medians() -> None:
    assert [grade(s) for s in (19.99, 20, 49.99, 50)] == ["low", "medium", "medium", "high"]
    assert region_median([None, 1.0, 3.0, 10.0]) == 3.0 and region_median([None]) is None


def test_periods() -> None:
    nov = Period.month("2026-11")
    assert (nov.since, nov.until) == (dt.date(2026, 11, 1), dt.date(2026, 12, 1))
    assert nov.months == ["202611"] and nov.whole_months
    dec = Period.month("2026-12")
    assert dec.until == dt.date(2027, 1, 1)
    span = Period.days("2026-10-15", "2026-11-14", dt.date(2026, 12, 5))
    assert span.months == ["202610", "202611"] and not span.whole_months
    assert span.contains("20261015") and span.contains("20261114")
    assert not span.contains("20261115")
    assert Period.days(None, None, dt.date(2026, 12, 5)).to_dict() == {
        "since": "2026-11-06",
        "until": "2026-12-05",
    }
    with pytest.raises(PeriodError):
        Period.month("2026-13")
    with pytest.raises(PeriodError):
        Period.days("2026-12-02", "2026-12-01", dt.date(2026, 12, 5))
    with pytest.raises(PeriodError):
        Period.days("2024-01-01", "2026-01-01", dt.date(2026, 12, 5))
