"""The institution profile and the monthly supervision report on a generated month whose
counts are known: events counted by ingest's own aggregation and save script (real Redis),
cases through the sink's own function and the workflow (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from cases.store import CaseStore, Deadlines
from detectors.activity import ActivityBatch
from detectors.catalog import Catalog, Institution, product_from_dict
from detectors.pipeline import partition_of
from harness.services import Services
from streams.redis_state import ActivityReader, IngestStore, connect
from streams.reference import InstitutionRegistry
from supervision.figures import Period
from supervision.profile import institution_profile
from supervision.report import report_csv, supervision_report
from tests.cases.conftest import alert, record
from topics import names
from topics.records import Event, event_from_dict

pytestmark = pytest.mark.integration

CATALOG = Catalog(
    product_from_dict(p, "test")
    for p in [
        {"product": "XA001", "prefixes": ["8100001"], "pack_size": 10},
        {"product": "TCM01", "pack_size": 1, "code_required": False},
    ]
)
INSTITUTIONS = [
    Institution("P1", "Pharmacy one", "pharmacy", "330102"),
    Institution("P2", "Pharmacy two", "pharmacy", "330102"),
    Institution("P3", "Pharmacy three", "pharmacy", "330105"),
    Institution("H1", "Hospital", "hospital", "330105"),
    Institution("C1", "Clinic (no uploads)", "clinic", "330106"),
    Institution("X1", "Elsewhere", "pharmacy", "330200"),
]
ACTIVE = ["P1", "P2", "P3", "H1", "X1"]
DEADLINES = Deadlines(14, (("330105", 100_000),))  # P3's district never runs late


@dataclass
class Truth:
    """What the generator made, counted as it made it (not by the code under test)."""

    events: Counter[str] = field(default_factory=Counter)
    settlements: Counter[str] = field(default_factory=Counter)
    required: Counter[str] = field(default_factory=Counter)
    scanned: Counter[str] = field(default_factory=Counter)
    packs: Counter[str] = field(default_factory=Counter)
    scans: Counter[str] = field(default_factory=Counter)
    prices: dict[str, list[int]] = field(default_factory=dict)  # fen per pack, P1's XA001


def generate(seed: int = 11) -> tuple[list[Event], Truth]:
    rng = random.Random(seed)
    truth = Truth()
    events: list[Event] = []
    serial = iter(range(10**6))
    for inst in ACTIVE:
        for day in range(0, 32):  # 31 Oct .. 1 Dec: the edges are outside November
            month, dom = (10, 31) if day == 0 else (12, 1) if day == 31 else (11, day)
            at = f"2026-{month:02d}-{dom:02d}T{rng.randint(8, 21):02d}:15:00+08:00"
            inside = month == 11
            for _ in range(rng.randint(0, 3)):
                n = next(serial)
                lines: list[dict[str, Any]] = []
                for ln in range(rng.randint(1, 2)):
                    qty = rng.randint(1, 2)
                    codes = [f"8100001{next(serial):013d}" for _ in range(qty)]
                    scanned = rng.random() < 0.8
                    line: dict[str, Any] = {
                        "line_no": ln + 1,
                        "product": "XA001",
                        "quantity": qty,
                        "codes": codes if scanned else [],
                    }
                    if inst == "P1":
                        line["price"] = rng.randint(1000, 1500) / 100
                    lines.append(line)
                    if inside:
                        truth.required[inst] += 1
                        truth.scanned[inst] += scanned
                        truth.packs[inst] += qty
                        truth.scans[inst] += len(line["codes"])
                        if inst == "P1":
                            truth.prices.setdefault("XA001", []).append(round(line["price"] * 100))
                lines.append({"line_no": 9, "product": "TCM01", "quantity": 3})
                events.append(
                    event_from_dict(
                        {
                            "event_id": f"S{n}",
                            "type": "settlement",
                            "institution": inst,
                            "occurred_at": at,
                            "settlement_id": f"SID{n}",
                            "lines": lines,
                        }
                    )
                )
                if inside:
                    truth.events[inst] += 1
                    truth.settlements[inst] += 1
            n = next(serial)
            events.append(
                event_from_dict(
                    {
                        "event_id": f"C{n}",
                        "type": "stock_count",
                        "institution": inst,
                        "occurred_at": at,
                        "product": "XA001",
                        "quantity": 5,
                    }
                )
            )
            truth.events[inst] += inside
    return events, truth


async def store_activity(client: Any, prefix: str, events: list[Event]) -> None:
    """As ingest does: one batch per input partition, in several saves (batches)."""
    ingest = IngestStore(client, prefix, days=7)
    for chunk in range(0, len(events), 97):
        batches: dict[int, ActivityBatch] = {}
        for e in events[chunk : chunk + 97]:
            p = partition_of(e.institution, names.EVENTS.partitions)
            batches.setdefault(p, ActivityBatch()).add(e, CATALOG)
        for p, batch in batches.items():
            await ingest.save(p, {}, {}, [], activity=batch)


def cases_of_the_month(url: str) -> None:
    nov = "2026-11-{:02d}T10:00:00+08:00"
    p1 = [
        alert(
            i, "DUPLICATE_SALE", "P1", occurred_at=nov.format(3 + i), detected_at=nov.format(3 + i)
        )
        for i in range(4)
    ]
    p1_october = alert(
        10,
        "DUPLICATE_SALE",
        "P1",
        occurred_at="2026-10-20T10:00:00+08:00",
        detected_at="2026-10-20T10:05:00+08:00",
    )
    p2 = [
        alert(20, "NO_CODE", "P2", occurred_at=nov.format(5), detected_at=nov.format(5)),
        alert(21, "NO_CODE", "P2", occurred_at=nov.format(6), detected_at=nov.format(6)),
    ]
    p3 = [
        alert(30 + i, "INVALID_CODE", "P3", occurred_at=nov.format(7), detected_at=nov.format(7))
        for i in range(3)
    ]
    oversold = alert(
        40,
        "OVERSOLD",
        "H1",
        occurred_at=nov.format(8),
        detected_at=nov.format(8),
        evidence={"units_dispensed": 30, "expected_stock_before": 10, "expected_stock_after": -20},
    )
    x1 = [
        alert(50 + i, "DUPLICATE_SALE", "X1", occurred_at=nov.format(9), detected_at=nov.format(9))
        for i in range(2)
    ]
    record(url, *p1, p1_october, region="330102")
    record(url, *p2, region="330102")
    record(
        url, {**p2[1], "status": "withdrawn", "evidence": {"explained_by": ["e9"]}}, region="330102"
    )
    record(url, *p3, oversold, region="330105")
    record(url, *x1, region="330200")

    async def work(store: CaseStore) -> None:
        for a in p1[:2]:
            await store.move(
                str(a["alert_id"]), "closed", "insp", "resold box", closure="confirmed_fraud"
            )
        await store.move(
            str(p3[0]["alert_id"]), "closed", "insp", "scanner", closure="scanner_fault"
        )
        await store.move(str(p1[2]["alert_id"]), "investigating", "insp", None)

    async def main() -> None:
        async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
            await work(CaseStore(pool))

    asyncio.run(main())
    with psycopg.connect(url) as conn:  # one confirmed closure was made in November
        conn.execute(
            "UPDATE cases SET closed_at = '2026-11-28T12:00:00+08:00' WHERE alert_id = %s",
            [p1[0]["alert_id"]],
        )


@pytest.fixture
def month(svc: Services, redis_prefix: str, database: str) -> tuple[Truth, str]:
    events, truth = generate()

    async def main() -> None:
        client = connect(svc.redis_url)
        try:
            await InstitutionRegistry(client, redis_prefix).publish(INSTITUTIONS)
            await store_activity(client, redis_prefix, events)
        finally:
            await client.aclose()

    asyncio.run(main())
    cases_of_the_month(database)
    return truth, database


def run(svc: Services, prefix: str, url: str, body: Any) -> Any:
    async def main() -> Any:
        client = connect(svc.redis_url)
        try:
            async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
                return await body(
                    ActivityReader(client, prefix, names.EVENTS.partitions),
                    InstitutionRegistry(client, prefix),
                    CaseStore(pool),
                )
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_the_monthly_report_counts_what_the_month_held(
    svc: Services, redis_prefix: str, month: tuple[Truth, str]
) -> None:
    truth, url = month
    report = run(
        svc,
        redis_prefix,
        url,
        lambda r, g, s: supervision_report("330100", "2026-11", r, g, s, DEADLINES, True),
    )
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert set(kinds) == {"pharmacy", "hospital", "clinic"}  # X1 (330200) is not in Hangzhou
    pharmacies = ["P1", "P2", "P3"]
    ph = kinds["pharmacy"]
    assert ph["institutions"] == 3 and ph["active"] == 3
    assert ph["events"] == sum(truth.events[i] for i in pharmacies)
    assert ph["settlements"] == sum(truth.settlements[i] for i in pharmacies)
    assert ph["scan_rate"] == round(
        sum(truth.scanned[i] for i in pharmacies) / sum(truth.required[i] for i in pharmacies), 4
    )
    assert ph["with_alerts"] == 3  # P2's second alert was withdrawn; its first stands
    assert ph["with_confirmed"] == 1
    assert ph["alerts"] == 4 + 1 + 3
    assert ph["cases_opened"] == 4 + 2 + 3  # the withdrawn one was opened too
    assert ph["cases_closed"] == 1  # P1's closure dated in November; the others are December's
    assert ph["still_open"] == 2 + 1 + 2  # P1: 2 left (one investigating), P2: 1, P3: 2
    # open past 14 days: P1's two of early November and its October one, P2's NO_CODE; P3's
    # district deadline is 100,000 days
    assert ph["overdue"] == 4
    assert kinds["hospital"]["alerts"] == 1 and kinds["hospital"]["active"] == 1
    assert kinds["clinic"] == {**kinds["clinic"], "institutions": 1, "active": 0, "events": 0}
    assert report["total"]["events"] == sum(truth.events[i] for i in ["P1", "P2", "P3", "H1"])
    rules = {r["rule"]: r for r in report["rules"]}
    assert rules["DUPLICATE_SALE"] == {
        "rule": "DUPLICATE_SALE",
        "alerts": 4,
        "confirmed": 2,
        "opened": 4,
        "closed": 1,
        "still_open": 2,
    }
    assert rules["NO_CODE"]["alerts"] == 1 and rules["NO_CODE"]["opened"] == 2
    assert [r["institution"] for r in report["overdue"]] == ["P1", "P1", "P2", "P1"]
    assert report["top_risk"][0]["institution"] == "P1"
    assert "X1" not in {r["institution"] for r in report["top_risk"]}
    prices = {p["product"]: p for p in report["prices"]}
    fen = truth.prices["XA001"]
    assert prices["XA001"]["institutions"] == 1
    assert prices["XA001"]["lines"] == len(fen)
    assert prices["XA001"]["lowest_price"] == min(fen) / 100
    assert prices["XA001"]["highest_price"] == max(fen) / 100
    regions = {r["region"]: r for r in report["regions"]}
    assert set(regions) == {"330102", "330105", "330106"}
    assert regions["330105"]["alerts"] == 3 + 1
    table = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert [row["region"] for row in table] == ["330102", "330105", "330106", "total"]
    assert table[-1]["events"] == str(report["total"]["events"])


def test_the_profile_of_an_institution_and_its_rank(
    svc: Services, redis_prefix: str, month: tuple[Truth, str]
) -> None:
    truth, url = month
    period = Period.days("2026-11-01", "2026-11-30", Period.month("2026-11").since)
    profile = run(
        svc,
        redis_prefix,
        url,
        lambda r, g, s: institution_profile("P1", period, r, g, s, DEADLINES),
    )
    activity = profile["activity"]
    assert activity["events"] == truth.events["P1"]
    assert activity["required_lines"] == truth.required["P1"]
    assert activity["scanned_lines"] == truth.scanned["P1"]
    assert activity["scans"] == truth.scans["P1"]
    assert activity["scan_rate"] == round(truth.scanned["P1"] / truth.required["P1"], 4)
    assert sum(d["events"] for d in profile["daily"]) == truth.events["P1"]
    assert profile["alerts"]["total"] == 4
    assert profile["alerts"]["per_10k_scans"] == round(4 * 10_000 / truth.scans["P1"], 4)
    assert profile["confirmed_cases"] == 2
    assert profile["open_cases"]["total"] == 3  # two of November, one of October
    assert profile["open_cases"]["overdue"] == 3
    assert sum(profile["open_cases"]["by_age"].values()) == 3
    factors = {f["factor"]: f for f in profile["risk"]["factors"]}
    assert factors["confirmed_cases"]["points"] == 20
    assert factors["overdue_leads"]["points"] == 6
    assert factors["repeated_rules"]["value"] == ["DUPLICATE_SALE"]
    # P1 against P2 (330102): P2's rate is lower, so the median is between them
    assert factors["alert_rate"]["points"] > 0
    assert profile["risk"]["score"] == round(sum(f["points"] for f in factors.values()), 2)
    assert profile["risk"]["rank_in_region"] == 1
    assert profile["risk"]["institutions_in_region"] == 2
    [price] = profile["prices"]
    fen = truth.prices["XA001"]
    assert price["mean_price"] == round(sum(fen) / len(fen) / 100, 2)
    h1 = run(
        svc,
        redis_prefix,
        url,
        lambda r, g, s: institution_profile("H1", period, r, g, s, DEADLINES),
    )
    assert h1["oversold_units"] == 20


def test_the_report_command_prints_csv(
    svc: Services, redis_prefix: str, month: tuple[Truth, str]
) -> None:
    truth, url = month
    env = {
        **os.environ,
        "REDIS_URL": svc.redis_url,
        "TRACEWATCH_REDIS_PREFIX": redis_prefix,
        "DATABASE_URL": url,
        "TRACEWATCH_LEAD_DEADLINES": "330105=100000",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "report",
            "--region",
            "330100",
            "--month",
            "2026-11",
            "--csv",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {r["kind"]: r for r in csv.DictReader(io.StringIO(done.stdout))}
    assert rows["pharmacy"]["events"] == str(sum(truth.events[i] for i in ["P1", "P2", "P3"]))
    assert rows["pharmacy"]["overdue"] == "4"
    bad = subprocess.run(
        [sys.executable, "-m", "cli", "report", "--region", "3301", "--month", "2026-11"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "6-digit region" in bad.stderr
