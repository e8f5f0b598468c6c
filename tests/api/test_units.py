"""The API's pure parts: NHSA mapping, scopes, rate limits, the code history summary."""

from __future__ import annotations

import pytest

from api.auth import INSPECTOR, INSTITUTION, Grant, RateLimiter
from api.nhsa import to_contract
from api.reads import code_history
from detectors.catalog import region_scope
from topics.records import InvalidEvent, event_from_dict


def test_an_nhsa_settlement_maps_to_a_contract_settlement() -> None:
    event = event_from_dict(
        to_contract(
            {
                "infno": "2207",
                "fixmedins_code": "H1",
                "fixmedins_bchno": "B1",
                "setl_id": "S1",
                "psn_no": "PX",
                "med_list_codg": "XA001",
                "drug_trac_codg": "81000010000000000077,81000010000000000078",
                "trdn_flag": 1,
                "cnt": 2,
                "setl_time": "2026-11-20 14:02:00",
            }
        )
    )
    assert (event.type, event.institution, event.event_id) == ("settlement", "H1", "B1")
    assert event.settlement_id == "S1" and event.occurred_at.endswith("+08:00")
    [line] = event.lines
    assert line.split and line.quantity == 2
    assert line.codes == ("81000010000000000077", "81000010000000000078")


def test_an_nhsa_stock_change_takes_its_reason_from_the_change_type() -> None:
    mapped = to_contract(
        {
            "infno": "3502",
            "fixmedins_code": "P1",
            "fixmedins_bchno": "B2",
            "med_list_codg": "XA001",
            "inv_chg_type": "101",
            "cnt": "3",
            "inv_chg_time": "2026-11-20T10:00:00+08:00",
        }
    )
    event = event_from_dict(mapped)
    assert (event.type, event.reason, event.quantity) == ("stock_change", "transfer_in", 3.0)


def test_an_unknown_interface_is_refused_by_the_contracts_parser() -> None:
    with pytest.raises(InvalidEvent) as refused:
        event_from_dict(
            to_contract({"infno": "9999", "fixmedins_code": "P1", "fixmedins_bchno": "B3"})
        )
    assert refused.value.reason == "unknown_type"


def test_region_scopes() -> None:
    assert region_scope("330000") == "33"
    assert region_scope("330100") == "3301"
    assert region_scope("330110") == "330110"
    province = Grant("a", INSPECTOR, "zj", region="330000")
    city = Grant("b", INSPECTOR, "hz", region="330100")
    assert province.may_read("P1", "330102") and city.may_read("P1", "330102")
    assert not city.may_read("P1", "330200") and not province.may_read("P1", "110101")
    assert not province.may_read("P1", None)
    pharmacy = Grant("c", INSTITUTION, "p1", institution="P1")
    assert pharmacy.may_read("P1", None) and not pharmacy.may_read("P2", "330102")


def test_the_rate_limiter_lets_a_burst_through_then_says_how_long_to_wait() -> None:
    limiter = RateLimiter(rate=10, burst=3)
    assert [limiter.take("t") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("t")
    assert 0 < wait <= 0.1
    assert limiter.take("other") == 0.0


def test_the_summary_counts_split_sales_of_one_box_at_one_place_once() -> None:
    def dispense(inst: str, ev: str, ts: int, units: int = 0, returned: int = 0) -> list[object]:
        return [inst, f"e:{ev}", ev, ts, units, returned, 1, 0, "", 480, ""]

    assert code_history("C", None, None)["summary"] == "no_sale"
    split = {"d": [dispense("P1", "a", 100, 6000), dispense("P1", "b", 200, 6000)]}
    assert code_history("C", split, None)["summary"] == "one_sale"
    returned = {"d": [dispense("P1", "a", 100, returned=150), dispense("P2", "b", 200)]}
    assert code_history("C", returned, None)["summary"] == "one_sale"
    resold = {"d": [dispense("P1", "a", 100), dispense("P2", "b", 200)], "h": [["P1", 50, 1]]}
    found = code_history("C", resold, "P1")
    assert found["summary"] == "sold_more_than_once"
    assert [e["type"] for e in found["history"]] == ["receipt", "dispense"]
