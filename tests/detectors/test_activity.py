"""The per-day counters behind an institution's profile: what each event adds, by the
institution's own calendar day, and the prices per pack it charged."""

from __future__ import annotations

from typing import Any

from detectors.activity import FIELDS, ActivityBatch, PriceFigures, counts_of, local_day
from detectors.catalog import Catalog, product_from_dict
from detectors.pipeline import Pipeline
from topics.records import event_from_dict

CATALOG = Catalog(
    product_from_dict(p, "test")
    for p in [
        {"product": "XA001", "prefixes": ["8100001"], "pack_size": 24},
        {"product": "TCM01", "pack_size": 1, "code_required": False},
    ]
)
CODE = "81000010000000000{:03d}"


def event(etype: str = "settlement", at: str = "2026-11-20T09:00:00+08:00", **extra: Any) -> Any:
    body: dict[str, Any] = {
        "event_id": extra.pop("event_id", "E1"),
        "type": etype,
        "institution": "P1",
        "occurred_at": at,
        **extra,
    }
    if etype == "settlement":
        body.setdefault("settlement_id", "S1")
    return event_from_dict(body)


def counted(ev: Any) -> dict[str, int]:
    return dict(zip(FIELDS, counts_of(ev, CATALOG), strict=True))


def test_a_settlement_counts_its_required_lines_scans_and_codes() -> None:
    ev = event(
        lines=[
            # 3 packs, 2 distinct well-formed codes (one scanned twice) and a commodity barcode
            {
                "line_no": 1,
                "product": "XA001",
                "quantity": 3,
                "codes": [CODE.format(1), CODE.format(2), CODE.format(2), "6901234567892"],
            },
            {"line_no": 2, "product": "XA001", "quantity": 1},  # required, not scanned
            {"line_no": 3, "product": "TCM01", "quantity": 5},  # exempt: not a required line
            {"line_no": 4, "product": "NEW01", "quantity": 1, "codes": [CODE.format(3)]},
            # split line: scanned, but no whole packs to collect codes for
            {
                "line_no": 5,
                "product": "XA001",
                "quantity": 6,
                "unit": "unit",
                "split": True,
                "codes": [CODE.format(4)],
            },
        ]
    )
    assert counted(ev) == {
        "events": 1,
        "settlements": 1,
        "required_lines": 4,
        "scanned_lines": 3,
        "packs": 4,
        "codes": 3,
        "scans": 6,
    }


def test_codes_never_exceed_packs_and_units_count_as_packs() -> None:
    ev = event(
        lines=[
            {
                "line_no": 1,
                "product": "XA001",
                "quantity": 1,
                "codes": [CODE.format(1), CODE.format(2)],
            },
            {
                "line_no": 2,
                "product": "XA001",
                "quantity": 48,
                "unit": "unit",
                "codes": [CODE.format(3)],
            },
        ]
    )
    got = counted(ev)
    assert got["packs"] == 3 and got["codes"] == 2


def test_other_events_count_as_events_and_scans_only() -> None:
    ev = event(
        "purchase",
        lines=[
            {
                "line_no": 1,
                "product": "XA001",
                "quantity": 2,
                "codes": [CODE.format(1), CODE.format(2)],
            }
        ],
    )
    assert counted(ev) == dict.fromkeys(FIELDS, 0) | {"events": 1, "scans": 2}


def test_the_day_is_the_institutions_own_date() -> None:
    # 23:30 in Beijing on the 20th is 15:30 UTC: the 20th; 00:30 on the 21st is the 21st
    def day(at: str) -> str:
        return local_day(event("stock_count", at=at, product="XA001", quantity=1))

    assert day("2026-11-20T23:30:00+08:00") == "20261120"
    assert day("2026-11-21T00:30:00+08:00") == "20261121"
    assert day("2026-11-20T23:30:00-05:00") == "20261120"


def test_prices_per_pack_in_fen_and_the_batch_sums() -> None:
    batch = ActivityBatch()
    for i, (price, unit) in enumerate([(12.5, "pack"), (0.5, "unit"), (11.0, "pack")]):
        batch.add(
            event(
                event_id=f"E{i}",
                settlement_id=f"S{i}",
                lines=[
                    {
                        "line_no": 1,
                        "product": "XA001",
                        "quantity": 1,
                        "unit": unit,
                        "price": price,
                        "codes": [CODE.format(i)],
                    }
                ],
            ),
            CATALOG,
        )
    batch.add(
        event(
            "stock_count",
            event_id="C1",
            at="2026-11-21T09:00:00+08:00",
            product="XA001",
            quantity=3,
        ),
        CATALOG,
    )
    assert batch.prices == {("P1", "202611", "XA001"): PriceFigures(3, 1100, 1250, 3550)}
    assert batch.days[("P1", "20261120")][:2] == [3, 3]
    assert batch.days[("P1", "20261121")][:2] == [1, 0]
    assert PriceFigures.parse(batch.prices[("P1", "202611", "XA001")].text()) == PriceFigures(
        3, 1100, 1250, 3550
    )


def test_replay_counts_only_when_asked_and_never_a_resubmission() -> None:
    ev = event(lines=[{"line_no": 1, "product": "XA001", "quantity": 1, "codes": [CODE.format(1)]}])
    assert Pipeline(CATALOG).activity is None
    pipeline = Pipeline(CATALOG, track_activity=True)
    pipeline.process(ev)
    pipeline.process(ev)  # a retry of the same upload
    assert pipeline.activity is not None
    assert pipeline.activity.days[("P1", "20261120")][:2] == [1, 1]
