"""The bench's peer must find what it claims to find, or its figure compares nothing."""

from __future__ import annotations

import orjson

from loadtest.peers.dict_peer import DictPeer


def _dispense(kind: str, eid: str, inst: str, codes: list[str], sid: str = "") -> dict[str, object]:
    event: dict[str, object] = {
        "type": kind,
        "event_id": eid,
        "institution": inst,
        "lines": [{"line_no": 1, "codes": codes}],
    }
    if sid:
        event["settlement_id"] = sid
    return event


def test_resale_elsewhere_and_here_alert_and_legitimate_repeats_do_not() -> None:
    peer = DictPeer()
    peer.handle(_dispense("sale", "e1", "P1", ["81000010000000000001"], sid="S1"))
    peer.handle(_dispense("settlement", "e2", "P1", ["81000010000000000001"], sid="S1"))
    assert peer.alerts == []  # a sale and its settlement are one dispense
    peer.handle(_dispense("sale", "e3", "P2", ["8100001000000000 0001"]))
    peer.handle(_dispense("sale", "e4", "P2", ["81000010000000000001"]))
    assert [orjson.loads(a)["rule"] for a in peer.alerts] == [
        "CROSS_INSTITUTION_SALE",
        "DUPLICATE_SALE",
    ]
    peer.alerts.clear()
    peer.handle(_dispense("sale_return", "e5", "P2", ["81000010000000000001"]))
    peer.handle(_dispense("sale", "e6", "P2", ["81000010000000000001"]))
    assert peer.alerts == []  # resale after a return at the same institution


def test_a_cancelled_settlement_gives_its_codes_back() -> None:
    peer = DictPeer()
    peer.handle(_dispense("settlement", "e1", "H1", ["81000010000000000002"], sid="S9"))
    peer.handle({"type": "settlement_cancel", "institution": "H1", "settlement_id": "S9"})
    peer.handle(_dispense("settlement", "e2", "H1", ["81000010000000000002"], sid="S10"))
    assert peer.alerts == []
