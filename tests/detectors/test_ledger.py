"""The 进销存 ledger: arithmetic in smallest units, voids, late purchases, OVERSOLD once per
crossing, STOCK_COUNT_MISMATCH with the count as the new baseline."""

from __future__ import annotations

from typing import Any

from detectors.catalog import Catalog, product_from_dict
from detectors.ledger import describe
from detectors.pipeline import Pipeline
from tests.detectors.arrival_orders import lane_mate
from topics.records import event_from_dict, join_key

CATALOG = Catalog(
    [product_from_dict({"product": "XA001", "prefixes": ["8100001"], "pack_size": 10}, "test")]
)
HOUR = 3600
KEY = join_key("P1", "XA001")


class Ledger:
    def __init__(self, grace_hours: float = 72) -> None:
        self.pipeline = Pipeline(CATALOG, grace_seconds=grace_hours * HOUR)
        self.alerts: list[Any] = []
        self._n = 0

    def send(self, etype: str, hour: float, **fields: Any) -> str:
        self._n += 1
        eid: str = fields.pop("event_id", f"E{self._n}")
        # whole hours after 2026-03-02T00:00Z
        stamp = f"2026-03-{2 + int(hour) // 24:02d}T{int(hour) % 24:02d}:{int(hour * 60) % 60:02d}:00+00:00"
        event = {
            "event_id": eid,
            "type": etype,
            "institution": "P1",
            "occurred_at": stamp,
            **fields,
        }
        alerts, _ = self.pipeline.process(event_from_dict(event))
        self.alerts += alerts
        return eid

    def lines(self, etype: str, hour: float, qty: float, unit: str = "pack", **kw: Any) -> str:
        line = {"line_no": 1, "product": "XA001", "quantity": qty, "unit": unit, "codes": []}
        return self.send(etype, hour, lines=[line], **kw)

    def buy(self, hour: float, packs: float) -> str:
        return self.lines("purchase", hour, packs)

    def sell(self, hour: float, qty: float, unit: str = "pack", **kw: Any) -> str:
        return self.lines("sale", hour, qty, unit, **kw)

    def count(self, hour: float, units: float) -> str:
        return self.send("stock_count", hour, product="XA001", quantity=units, unit="unit")

    def tick(self, hour: float) -> None:
        """A count of another product at P1 and at a lane mate: moves P1's lane only."""
        stamp = f"2026-03-{2 + int(hour) // 24:02d}T{int(hour) % 24:02d}:00:00+00:00"
        for inst in ("P1", lane_mate("P1")):
            self._n += 1
            alerts, _ = self.pipeline.process(
                event_from_dict(
                    {
                        "event_id": f"T{self._n}",
                        "type": "stock_count",
                        "institution": inst,
                        "occurred_at": stamp,
                        "product": "X",
                        "quantity": 0,
                    }
                )
            )
            self.alerts += alerts

    def state(self) -> dict[str, Any]:
        return describe(KEY, self.pipeline.ledger.state.get(KEY, {}))

    def rules(self) -> list[str]:
        """The rules of the alerts standing (raised and not withdrawn)."""
        last = {a.alert_id: a for a in self.alerts}
        return sorted(a.rule for a in last.values() if a.status is None)


def test_arithmetic_in_smallest_units_with_every_kind_of_record() -> None:
    led = Ledger()
    led.buy(0, 5)  # +50
    led.lines("purchase_return", 1, 1)  # -10
    led.sell(2, 2)  # -20
    led.sell(3, 3, unit="unit")  # -3
    led.lines("sale_return", 4, 1)  # +10
    led.send("stock_change", 5, product="XA001", quantity=-4, unit="unit", reason="damage")
    led.send("legacy_stock", 6, product="XA001", quantity=1, unit="pack")  # +10
    state = led.state()
    assert state["expected_units"] == 50 - 10 - 20 - 3 + 10 - 4 + 10
    assert state["since_last_count"] == {
        "received": 50,
        "returned_to_supplier": 10,
        "dispensed": 23,
        "returned_by_patients": 10,
        "other_changes": -4,
        "legacy_registered": 10,
    }
    assert led.rules() == []


def test_a_sale_and_its_settlement_count_once_and_a_void_retracts() -> None:
    led = Ledger()
    led.buy(0, 5)
    led.sell(1, 1, settlement_id="S1")
    led.lines("settlement", 1, 1, settlement_id="S1")
    assert led.state()["expected_units"] == 40
    cash = led.sell(2, 2)
    led.send("void", 3, voided_event_id=cash)
    assert led.state()["expected_units"] == 40
    led.send("settlement_cancel", 4, settlement_id="S1")
    assert led.state()["expected_units"] == 50


def test_late_purchase_within_grace_raises_no_oversold() -> None:
    led = Ledger()
    led.sell(10, 2)  # sold before the purchase record arrives: -20
    assert led.state()["expected_units"] == -20
    led.buy(8, 5)  # the daily batch: purchased at 08:00, uploaded later
    led.tick(100)
    assert led.rules() == []
    assert led.state()["expected_units"] == 30


def test_oversold_once_per_crossing_and_rearmed_by_replenishment() -> None:
    led = Ledger()
    led.buy(0, 1)  # 10 units
    led.sell(1, 1)  # 0
    first = led.sell(2, 1)  # -10: crosses
    led.sell(3, 1)  # -20: still below, no new alert
    led.tick(80)
    assert led.rules() == ["OVERSOLD"]
    assert led.alerts[0].event_ids == [first]
    assert led.alerts[0].evidence["expected_stock_before"] == 0
    led.buy(81, 4)  # back to +20: re-armed
    led.sell(82, 2)  # 0
    second = led.sell(83, 1)  # crosses again
    led.tick(200)
    assert led.rules() == ["OVERSOLD", "OVERSOLD"]
    assert led.alerts[1].event_ids == [second]


def test_purchase_after_the_sale_in_event_time_does_not_hide_the_oversell() -> None:
    led = Ledger()
    led.sell(1, 1)  # nothing bought before: -10
    led.buy(5, 3)  # bought four hours after it was sold
    led.tick(80)
    assert led.rules() == ["OVERSOLD"]


def test_stock_count_mismatch_uses_stock_at_count_time_and_rebases() -> None:
    led = Ledger()
    led.buy(0, 5)  # 50
    led.sell(1, 1)  # 40
    count = led.count(2, 55)  # 15 more than the ledger
    led.sell(3, 1)  # after the count
    led.buy(1.5, 1)  # late purchase from before the count: expected at 02:00 becomes 50
    led.tick(80)
    assert led.rules() == ["STOCK_COUNT_MISMATCH"]
    alert = led.alerts[0]
    assert alert.event_ids == [count]
    assert alert.evidence["expected_units"] == 50 and alert.evidence["counted_units"] == 55
    assert alert.evidence["since_last_count"]["received"] == 60
    state = led.state()
    assert state["expected_units"] == 55 - 10  # the count is the baseline, then the later sale
    assert state["last_count"]["units"] == 55


def test_matching_count_is_quiet() -> None:
    led = Ledger()
    led.buy(0, 5)
    led.sell(1, 2)
    led.count(2, 30)
    led.tick(80)
    assert led.rules() == []


def test_units_dispensed_without_purchase_for_the_inspector() -> None:
    led = Ledger()
    led.buy(0, 1)
    led.sell(1, 3)
    assert led.state()["units_dispensed_without_purchase"] == 20
