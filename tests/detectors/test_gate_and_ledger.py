"""Settlement gate and NO_CODE through the in-process pipeline (the code replay runs)."""

from __future__ import annotations

from typing import Any

import pytest

from detectors.catalog import Catalog, product_from_dict
from detectors.pipeline import Pipeline
from topics.records import event_from_dict

CATALOG = Catalog(
    product_from_dict(p, "test")
    for p in [
        {"product": "XA001", "prefixes": ["8100001"], "gtins": ["06912345678902"], "pack_size": 24},
        {"product": "XA002", "prefixes": ["8100002"], "pack_size": 60},
        {"product": "TCM01", "pack_size": 1, "code_required": False},
    ]
)
A1 = "81000010000000000001"
A2 = "81000010000000000002"
B1 = "81000020000000000001"
UNKNOWN = "89999990000000000001"
_counter = iter(range(10**6))


def settlement(*lines: dict[str, Any], inst: str = "H1", eid: str | None = None) -> dict[str, Any]:
    n = next(_counter)
    return {
        "event_id": eid or f"S-{n}",
        "type": "settlement",
        "institution": inst,
        "occurred_at": "2026-03-02T09:00:00+08:00",
        "settlement_id": f"SID-{n}",
        "lines": [{"line_no": i + 1, **ln} for i, ln in enumerate(lines)],
    }


def line(
    product: str = "XA001", quantity: float = 1, codes: list[str] | None = None, **kw: Any
) -> dict[str, Any]:
    return {
        "product": product,
        "quantity": quantity,
        "codes": codes if codes is not None else [],
        **kw,
    }


def run(*events: dict[str, Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    pipeline = Pipeline(CATALOG)
    alerts, verdicts = [], []
    for ev in events:
        a, v = pipeline.process(event_from_dict(ev))
        alerts += a
        verdicts += v
    return alerts, verdicts


def rules(alerts: list[Any]) -> list[str]:
    return sorted(a.rule for a in alerts)


@pytest.mark.parametrize(
    ("ln", "expected"),
    [
        (line(codes=[A1]), []),
        (line(quantity=2, codes=[A1, A2]), []),
        (line(codes=[]), ["NO_CODE"]),
        (line(product="TCM01", codes=[]), []),  # exempt product
        (line(product="XA999", codes=[]), ["NO_CODE"]),  # unknown product: scanning required
        (line(quantity=2, codes=[A1]), ["CODE_COUNT_MISMATCH"]),
        (line(quantity=1, codes=[A1, A1]), []),  # the same box scanned twice is one code
        (line(quantity=1, codes=[A1, A2]), ["CODE_COUNT_MISMATCH"]),
        (line(codes=["6912345678902"]), ["CODE_COUNT_MISMATCH", "WRONG_BARCODE"]),
        (line(codes=["8100001000"]), ["CODE_COUNT_MISMATCH", "INVALID_CODE"]),
        (line(codes=[UNKNOWN]), ["UNKNOWN_CODE"]),  # well-formed: still counts as a code
        (line(codes=[B1]), ["PRODUCT_MISMATCH"]),
        (line(codes=["(01)06912345678902(21)S1"]), []),  # GS1 code of the billed product
        (line(quantity=5, unit="unit", split=True, codes=[A1]), []),  # split: one code suffices
        (line(quantity=5, unit="unit", split=True, codes=[]), ["NO_CODE"]),
    ],
)
def test_gate_rules(ln: dict[str, Any], expected: list[str]) -> None:
    alerts, verdicts = run(settlement(ln))
    assert rules(alerts) == expected
    (verdict,) = verdicts
    rejecting = sorted(set(expected) - {"UNKNOWN_CODE"})
    assert verdict["lines"] == [
        {"line_no": 1, "status": "rejected" if rejecting else "ok", "rules": rejecting}
    ]
    assert verdict["verdict"] == ("reject" if rejecting else "pass")


def test_one_alert_per_bad_scan_and_line() -> None:
    ev = settlement(line(quantity=3, codes=["6912345678902", "garbage", B1]), line(codes=[A1]))
    alerts, (verdict,) = run(ev)
    assert rules(alerts) == [
        "CODE_COUNT_MISMATCH",
        "INVALID_CODE",
        "PRODUCT_MISMATCH",
        "WRONG_BARCODE",
    ]
    assert [ln["status"] for ln in verdict["lines"]] == ["rejected", "ok"]
    assert all(a.event_ids == [ev["event_id"]] for a in alerts)
    assert len({a.alert_id for a in alerts}) == 4
    assert next(a for a in alerts if a.rule == "INVALID_CODE").evidence["raw"] == "garbage"


def legacy(
    quantity: float, product: str = "XA001", inst: str = "H1", unit: str = "pack"
) -> dict[str, Any]:
    return {
        "event_id": f"L-{next(_counter)}",
        "type": "legacy_stock",
        "institution": inst,
        "occurred_at": "2026-03-01T09:00:00+08:00",
        "product": product,
        "quantity": quantity,
        "unit": unit,
    }


def test_legacy_stock_covers_uncoded_lines_until_it_runs_out() -> None:
    alerts, verdicts = run(
        legacy(2),
        settlement(line(codes=[])),
        settlement(line(quantity=12, unit="unit", split=True, codes=[])),  # half a box
        settlement(line(codes=[])),  # 0.5 box left: not covered
        settlement(line(quantity=12, unit="unit", split=True, codes=[])),  # last half box
        settlement(line(quantity=1, unit="unit", split=True, codes=[])),
    )
    assert [v["verdict"] for v in verdicts] == ["pass", "pass", "reject", "pass", "reject"]
    assert rules(alerts) == ["NO_CODE", "NO_CODE"]
    assert alerts[0].evidence["legacy_stock_units"] == 12


def test_legacy_stock_is_per_institution_and_product() -> None:
    alerts, _ = run(
        legacy(5, inst="H2"), legacy(5, product="XA002"), settlement(line(codes=[]), inst="H1")
    )
    assert rules(alerts) == ["NO_CODE"]


def test_resubmission_has_no_further_effect() -> None:
    ev = settlement(line(codes=[]))
    alerts, verdicts = run(legacy(1), ev, ev, settlement(line(codes=[])))
    assert len(verdicts) == 2  # the retry is dropped, not a second dispense
    assert rules(alerts) == ["NO_CODE"]  # the third event, after the stock ran out


def test_alert_ids_are_deterministic() -> None:
    ev = settlement(line(codes=["garbage"]), eid="fixed")
    first, _ = run(ev)
    second, _ = run(ev)
    assert [a.alert_id for a in first] == [a.alert_id for a in second]
