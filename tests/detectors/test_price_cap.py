"""价格监测: PRICE_ABOVE_CAP for a settlement line priced above its product's cap (per pack,
compared in fen), the line still passing the gate; prices and caps validated at the door."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from detectors.catalog import Catalog, ReferenceDataError, product_from_dict
from detectors.pipeline import Pipeline
from streams.reference import _product_json
from topics.records import InvalidEvent, event_from_dict

CAPPED = {"product": "XA001", "prefixes": ["8100001"], "pack_size": 24, "price_cap": 12.3}
CATALOG = Catalog(
    product_from_dict(p, "test")
    for p in [CAPPED, {"product": "XA002", "prefixes": ["8100002"], "pack_size": 60}]
)
_n = iter(range(10**6))


def settlement(*lines: dict[str, Any]) -> dict[str, Any]:
    n = next(_n)
    return {
        "event_id": f"S-{n}",
        "type": "settlement",
        "institution": "P1",
        "occurred_at": "2026-11-20T09:00:00+08:00",
        "settlement_id": f"SID-{n}",
        "lines": [
            {"line_no": i + 1, "quantity": 1, "codes": [f"8100001000000{n:03d}{i:04d}"], **ln}
            for i, ln in enumerate(lines)
        ],
    }


def priced(event: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    alerts, verdicts = Pipeline(CATALOG).process(event_from_dict(event))
    return [a.to_dict() for a in alerts if a.rule == "PRICE_ABOVE_CAP"], verdicts


def test_a_line_above_the_cap_alerts_and_is_not_rejected() -> None:
    found, verdicts = priced(settlement({"product": "XA001", "price": 12.31}))
    assert len(found) == 1
    assert found[0]["severity"] == "medium" and found[0]["product"] == "XA001"
    assert found[0]["evidence"] == {
        "line_no": 1,
        "price": 12.31,
        "unit": "pack",
        "price_per_pack": 12.31,
        "price_cap": 12.3,
        "over_by": 0.01,
    }
    assert [line["status"] for line in verdicts[0]["lines"]] == ["ok"]


@pytest.mark.parametrize(
    ("line", "alerts"),
    [
        ({"product": "XA001", "price": 12.3}, 0),  # at the cap
        ({"product": "XA001", "price": 12.300000000001}, 0),  # a float's last bit is not fen
        ({"product": "XA001", "unit": "unit", "quantity": 24, "price": 0.52}, 1),  # 12.48/pack
        ({"product": "XA001", "unit": "unit", "quantity": 24, "price": 0.5}, 0),  # 12.00/pack
        ({"product": "XA002", "price": 999.0}, 0),  # no cap for this product
        ({"product": "XA001"}, 0),  # no price on the line
    ],
)
def test_what_counts_as_above(line: dict[str, Any], alerts: int) -> None:
    assert len(priced(settlement(line))[0]) == alerts


def test_the_same_line_gives_the_same_alert_id() -> None:
    event = settlement({"product": "XA001", "price": 20})
    first, _ = priced(event)
    again, _ = priced(event)
    assert first[0]["alert_id"] == again[0]["alert_id"]


@pytest.mark.parametrize("price", [-1, "12", True, float("inf")])
def test_a_bad_price_dead_letters_the_event(price: Any) -> None:
    event = settlement({"product": "XA001"})
    event["lines"][0]["price"] = price
    with pytest.raises(InvalidEvent) as raised:
        event_from_dict(event)
    assert raised.value.reason == "bad_field"


@pytest.mark.parametrize("cap", [0, -3, "12", True])
def test_a_bad_price_cap_is_refused(cap: Any) -> None:
    with pytest.raises(ReferenceDataError, match="price_cap"):
        product_from_dict({**CAPPED, "price_cap": cap}, "catalog.jsonl:3")


def test_the_cap_reaches_the_workers_through_the_published_catalog() -> None:
    published = next(p for p in CATALOG.products() if p.product == "XA001")
    again = product_from_dict(orjson.loads(_product_json(published)), "redis")
    assert again.price_cap == 12.3 and again == published
