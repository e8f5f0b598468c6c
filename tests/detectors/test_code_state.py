"""The per-code lifecycle: every transition, every legitimate repeat, voids, event time."""

from __future__ import annotations

from typing import Any

import pytest

from detectors.catalog import Catalog, product_from_dict
from detectors.code_state import CodeStage
from detectors.event_time import TimeFrame
from detectors.pipeline import Pipeline
from detectors.stage import StageOutput
from tests.detectors.arrival_orders import lane_mate
from topics.records import event_from_dict

CATALOG = Catalog(
    product_from_dict(p, "test")
    for p in [
        {"product": "XA001", "prefixes": ["8100001"], "pack_size": 24},
        {"product": "XA002", "prefixes": ["8100002"], "pack_size": 60},
    ]
)
A1 = "81000010000000000001"
A2 = "81000010000000000002"
HOUR = 3600


class Run:
    """Feeds contract events to one replay pipeline and keeps what came out."""

    def __init__(self, grace_hours: float = 72) -> None:
        self.pipeline = Pipeline(CATALOG, grace_seconds=grace_hours * HOUR)
        self.alerts: list[Any] = []
        self.verdicts: list[dict[str, Any]] = []
        self._n = 0

    def send(self, etype: str, inst: str = "P1", hour: float = 0, **fields: Any) -> str:
        self._n += 1
        eid: str = fields.pop("event_id", f"E{self._n}")
        event = {
            "event_id": eid,
            "type": etype,
            "institution": inst,
            "occurred_at": "2026-03-02T00:00:00+00:00",
            **fields,
        }
        parsed = event_from_dict(event)
        parsed = type(parsed)(
            **{**_fields(parsed), "occurred_ts": parsed.occurred_ts + hour * HOUR}
        )
        alerts, verdicts = self.pipeline.process(parsed)
        self.alerts += alerts
        self.verdicts += verdicts
        return eid

    def lines(
        self,
        etype: str,
        codes: list[str],
        inst: str = "P1",
        hour: float = 0,
        split: bool = False,
        quantity: float | None = None,
        unit: str = "pack",
        product: str = "XA001",
        **kw: Any,
    ) -> str:
        qty = quantity if quantity is not None else len(codes)
        line = {
            "line_no": 1,
            "product": product,
            "quantity": qty,
            "unit": unit,
            "split": split,
            "codes": codes,
        }
        return self.send(etype, inst, hour, lines=[line], **kw)

    def buy(self, *codes: str, inst: str = "P1", hour: float = 0) -> str:
        return self.lines("purchase", list(codes), inst, hour)

    def settle(
        self, *codes: str, inst: str = "P1", hour: float = 0, sid: str | None = None, **kw: Any
    ) -> str:
        self._n += 1
        return self.lines(
            "settlement", list(codes), inst, hour, settlement_id=sid or f"SID{self._n}", **kw
        )

    def transfer(self, code: str, inst: str, hour: float, direction: str) -> str:
        """A stock change moving one box of XA001 out of or into `inst`."""
        quantity = 1 if direction == "in" else -1
        return self.send(
            "stock_change",
            inst=inst,
            hour=hour,
            product="XA001",
            quantity=quantity,
            reason=f"transfer_{direction}",
            codes=[code],
        )

    def tick(self, inst: str, hour: float) -> None:
        """Event time at `inst`'s lane passes `hour`: it and a lane mate send a no-op."""
        for who in (inst, lane_mate(inst)):
            self.send("stock_count", who, hour, product="NONE", quantity=0)

    def rules(self) -> list[str]:
        """The code rules raised (these scenarios sell boxes no ledger holds: OVERSOLD is the
        ledger's business, tested in test_ledger.py)."""
        last = {a.alert_id: a for a in self.alerts}
        return sorted(
            a.rule
            for a in last.values()
            if a.status is None and a.rule not in ("OVERSOLD", "STOCK_COUNT_MISMATCH")
        )


def _fields(event: Any) -> dict[str, Any]:
    return {name: getattr(event, name) for name in event.__slots__}


def test_one_sale_of_a_received_box_is_quiet() -> None:
    run = Run()
    run.buy(A1)
    run.settle(A1, hour=1)
    assert run.rules() == []
    assert run.verdicts[-1]["verdict"] == "pass"


def test_second_whole_sale_at_same_institution_is_duplicate_and_rejects_the_line() -> None:
    run = Run()
    run.buy(A1)
    first = run.settle(A1, hour=1)
    second = run.settle(A1, hour=2)
    assert run.rules() == ["DUPLICATE_SALE"]
    alert = run.alerts[0]
    assert alert.code == A1 and alert.event_ids == [first, second]
    assert alert.evidence["earlier_sales"][0]["event_id"] == first
    assert run.verdicts[-1]["verdict"] == "reject"
    assert run.verdicts[-1]["lines"][0]["rules"] == ["DUPLICATE_SALE"]


def test_sale_at_another_institution_is_cross_institution_and_names_the_first_sale() -> None:
    run = Run()
    run.buy(A1, inst="P1")
    first = run.settle(A1, inst="P1", hour=1)
    run.settle(A1, inst="P2", hour=5)
    assert run.rules() == ["CROSS_INSTITUTION_SALE"]
    alert = run.alerts[0]
    assert alert.institution == "P2"
    assert alert.evidence["earlier_sales"][0]["institution"] == "P1"
    assert first in alert.event_ids
    assert run.verdicts[-1]["lines"][0]["rules"] == ["CROSS_INSTITUTION_SALE"]


def test_sale_and_its_settlement_are_one_dispense_in_either_order() -> None:
    for order in (("sale", "settlement"), ("settlement", "sale")):
        run = Run()
        run.buy(A1)
        for etype in order:
            run.lines(etype, [A1], hour=1, settlement_id="SID-9")
        assert run.rules() == [], order


def test_exact_resubmission_is_dropped() -> None:
    run = Run()
    run.buy(A1)
    run.settle(A1, hour=1, event_id="X", sid="S")
    run.settle(A1, hour=1, event_id="X", sid="S")
    assert run.rules() == []
    assert len(run.verdicts) == 1


@pytest.mark.parametrize("undo", ["sale_return", "settlement_cancel", "void"])
def test_resale_after_return_cancel_or_void_at_same_institution_is_quiet(undo: str) -> None:
    run = Run()
    run.buy(A1)
    eid = run.settle(A1, hour=1, sid="S1")
    if undo == "sale_return":
        run.lines("sale_return", [A1], hour=2, original_event_id=eid)
    elif undo == "settlement_cancel":
        run.send("settlement_cancel", hour=2, settlement_id="S1")
    else:
        run.send("void", hour=2, voided_event_id=eid)
    run.settle(A1, hour=3)
    assert run.rules() == []


def test_return_elsewhere_or_of_unsold_code_is_return_without_sale() -> None:
    run = Run()
    run.buy(A1, A2)
    run.settle(A1, hour=1)
    run.lines("sale_return", [A1], inst="P2", hour=2)  # another institution
    run.lines("sale_return", [A2], hour=2)  # never sold
    assert run.rules() == ["RETURN_WITHOUT_SALE", "RETURN_WITHOUT_SALE"]


def test_cancel_of_unknown_settlement_is_return_without_sale() -> None:
    run = Run()
    run.send("settlement_cancel", settlement_id="NOPE")
    assert run.rules() == ["RETURN_WITHOUT_SALE"]
    assert run.alerts[0].settlement_id == "NOPE"


def test_split_within_pack_size_is_quiet_and_beyond_it_overflows() -> None:
    run = Run()
    run.buy(A1)  # XA001: 24 units a pack
    for hour in (1, 2, 3):
        run.settle(A1, hour=hour, split=True, quantity=8, unit="unit")
    assert run.rules() == []
    run.settle(A1, hour=4, split=True, quantity=1, unit="unit")
    assert run.rules() == ["SPLIT_OVERFLOW"]
    assert run.alerts[0].evidence["units_before"] == 24


def test_split_at_another_institution_is_cross_institution() -> None:
    run = Run()
    run.buy(A1)
    run.settle(A1, hour=1, split=True, quantity=4, unit="unit")
    run.settle(A1, inst="P2", hour=2, split=True, quantity=4, unit="unit")
    assert run.rules() == ["CROSS_INSTITUTION_SALE"]


@pytest.mark.parametrize("first_split", [True, False])
def test_split_mixed_with_whole_pack_overflows(first_split: bool) -> None:
    run = Run()
    run.buy(A1)
    run.settle(
        A1,
        hour=1,
        split=first_split,
        quantity=4 if first_split else 1,
        unit="unit" if first_split else "pack",
    )
    run.settle(
        A1,
        hour=2,
        split=not first_split,
        quantity=1 if first_split else 4,
        unit="pack" if first_split else "unit",
    )
    assert run.rules() == ["SPLIT_OVERFLOW"]


def test_replayed_split_sale_does_not_count_twice() -> None:
    run = Run()
    run.buy(A1)
    run.settle(A1, hour=1, split=True, quantity=20, unit="unit", event_id="X", sid="S")
    run.settle(A1, hour=1, split=True, quantity=20, unit="unit", event_id="X", sid="S")
    assert run.rules() == []


def test_no_provenance_waits_for_the_grace_period_and_a_late_receipt_cancels_it() -> None:
    run = Run(grace_hours=72)
    run.buy("81000020000000000009", inst="P1")  # P1 records codes on receipt
    sale = run.settle(A1, hour=0)  # never received
    run.settle(A2, hour=0)
    run.buy(A2, hour=50)  # late purchase upload, within grace
    assert run.rules() == []
    run.buy("81000020000000000010", hour=71)
    run.tick("P1", 71)
    assert run.rules() == []  # grace not over yet
    run.tick("P1", 73)
    assert run.rules() == ["NO_PROVENANCE"]
    alert = next(a for a in run.alerts if a.rule == "NO_PROVENANCE")
    assert alert.code == A1 and alert.institution == "P1"
    assert alert.event_ids == [sale]
    assert [d["event_id"] for d in alert.evidence["dispenses_until_checked"]] == [sale]


def test_no_provenance_only_for_institutions_that_record_receipts() -> None:
    run = Run(grace_hours=1)
    run.settle(A1, inst="P9", hour=0)  # P9 never sent a coded receipt
    run.buy(A2, inst="P1", hour=5)
    assert run.rules() == []


def test_recycled_box_is_cross_institution_then_no_provenance() -> None:
    run = Run(grace_hours=1)
    run.buy(A1, inst="P1")
    run.buy(A2, inst="P2")  # P2 records receipts too
    run.settle(A1, inst="P1", hour=1)
    run.settle(A1, inst="P2", hour=2)
    run.tick("P2", 4)
    assert run.rules() == ["CROSS_INSTITUTION_SALE", "NO_PROVENANCE"]


def test_transfer_between_institutions_is_a_receipt() -> None:
    run = Run(grace_hours=1)
    run.buy(A1, inst="P1")
    run.transfer(A1, "P1", 1, "out")
    run.transfer(A1, "P2", 2, "in")
    run.settle(A1, inst="P2", hour=3)
    run.buy(A2, inst="P1", hour=9)
    assert run.rules() == []


def test_void_of_a_purchase_retracts_the_receipt() -> None:
    run = Run(grace_hours=1)
    run.buy(A2)
    purchase = run.buy(A1, hour=0)
    run.send("void", hour=0.5, voided_event_id=purchase)
    run.settle(A1, hour=1)
    run.tick("P1", 5)
    assert run.rules() == ["NO_PROVENANCE"]


def test_alert_ids_are_deterministic() -> None:
    def once() -> list[str]:
        run = Run()
        run.buy(A1)
        run.settle(A1, hour=1)
        run.settle(A1, inst="P2", hour=2)
        return [a.alert_id for a in run.alerts]

    assert once() == once()


def test_fire_without_pending_check_just_clears_due() -> None:
    stage = CodeStage()
    state: dict[str, Any] = {A1: {"h": [["P1", 0, 1]], "due": 5.0, "dl": 0}}
    out = StageOutput()
    stage.fire(A1, state, out, TimeFrame({0: 10.0}))
    assert out.alerts == [] and state[A1] == {"h": [["P1", 0, 1]]}


def test_each_institution_without_a_receipt_gets_its_own_check() -> None:
    """The first seller's late purchase must not clear the second seller's check."""
    run = Run(grace_hours=1)
    run.buy(A2, inst="P2")  # P2 records receipts
    run.settle(A1, inst="P1", hour=0)
    run.buy(A2, inst="P1", hour=0.1)  # P1 records receipts too (from now on)
    run.settle(A1, inst="P2", hour=0.5)
    run.buy(A1, inst="P1", hour=0.6)  # P1's late purchase of the box
    run.tick("P1", 3)
    assert run.rules() == ["CROSS_INSTITUTION_SALE"]  # P2's lane's time has not moved
    run.tick("P2", 3)
    assert run.rules() == ["CROSS_INSTITUTION_SALE", "NO_PROVENANCE"]
    assert next(a for a in run.alerts if a.rule == "NO_PROVENANCE").institution == "P2"


def test_cross_institution_alert_does_not_depend_on_arrival_order() -> None:
    """Two institutions' events travel in different partitions: the resale may come first."""

    def alerts(order: list[str]) -> list[dict[str, Any]]:
        run = Run()
        run.buy(A1, inst="P1")
        run.buy(A2, inst="P2")
        steps = {
            "first": lambda: run.settle(A1, inst="P1", hour=1, event_id="FIRST", sid="S1"),
            "resale": lambda: run.settle(A1, inst="P2", hour=30, event_id="RESALE", sid="S2"),
        }
        for name in order:
            steps[name]()
        return [a.to_dict() for a in run.alerts if a.rule == "CROSS_INSTITUTION_SALE"]

    in_order = alerts(["first", "resale"])
    assert len(in_order) == 1
    assert in_order[0]["institution"] == "P2" and in_order[0]["event_ids"] == ["FIRST", "RESALE"]
    assert alerts(["resale", "first"]) == in_order


def test_a_lagging_institution_is_not_judged_by_the_others_event_time() -> None:
    """Each lane of institutions has its own watermark: P1's backlog (its purchase still to
    come) is not cut short by P2's events running days ahead."""
    run = Run(grace_hours=1)
    run.buy(A2, inst="P1")
    run.settle(A1, inst="P1", hour=0)
    run.buy("81000010000000000066", inst="P2", hour=100)  # another lane, far ahead
    run.buy(A1, inst="P1", hour=0.5)  # P1's late purchase arrives after that
    run.buy("81000010000000000067", inst="P1", hour=5)
    assert run.rules() == []


def test_transferred_box_waits_for_a_late_return_before_cross_institution() -> None:
    """Sold at P1, returned there (uploaded a day late), transferred to P2, sold at P2."""
    run = Run(grace_hours=24)
    run.buy(A1, inst="P1")
    run.settle(A1, inst="P1", hour=1)
    run.transfer(A1, "P1", 3, "out")
    run.transfer(A1, "P2", 4, "in")
    run.settle(A1, inst="P2", hour=5)
    # what the data proves now: the box is still with P1's patient
    assert run.rules() == ["CROSS_INSTITUTION_SALE"]
    returned = run.lines("sale_return", [A1], inst="P1", hour=2)  # P1's daily batch
    assert run.rules() == []
    withdrawn = run.alerts[-1]
    assert withdrawn.status == "withdrawn" and withdrawn.evidence["explained_by"] == [returned]
    for inst in ("P1", "P2"):
        run.buy("81000010000000000090", inst=inst, hour=40)
    assert run.rules() == []


def test_transferred_box_never_returned_is_cross_institution_after_grace() -> None:
    run = Run(grace_hours=24)
    run.buy(A1, inst="P1")
    first = run.settle(A1, inst="P1", hour=1)
    run.transfer(A1, "P2", 4, "in")
    resale = run.settle(A1, inst="P2", hour=5)
    assert run.rules() == ["CROSS_INSTITUTION_SALE"]  # raised in the batch that proves it
    run.buy("81000010000000000091", inst="P2", hour=40)
    run.buy("81000010000000000092", inst="P1", hour=40)
    assert run.rules() == ["CROSS_INSTITUTION_SALE"]
    assert run.alerts[-1].event_ids == [first, resale]


def test_a_code_received_everywhere_keeps_a_bounded_state() -> None:
    """Forged transfers of one box to thousands of institutions: the state stays small and each
    event costs the same (it was quadratic, 220 KB of state)."""
    from detectors.code_state import MAX_HOLDINGS
    from streams.codecs import CodeCodec

    run = Run()
    code = "81000010000000000042"
    for n in range(3000):
        run.buy(code, inst=f"R{n:05d}", hour=n / 100)
    state = run.pipeline.codes.state[code]
    assert len(state["h"]) == MAX_HOLDINGS
    assert len(CodeCodec.pack(state)) < 4096
