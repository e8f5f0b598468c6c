"""A settlement checked and then submitted with nothing in between gets the same verdict from the
check as from the stream; then the code's history tells what happened, per viewer."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from harness.services import Services
from tests.api.conftest import Api
from tests.api.test_api import settlement
from tests.conftest import WorkerProcess
from tests.streams.test_pipeline_integration import read_topic

pytestmark = pytest.mark.integration

CODE = "81000010000000000091"
OTHER = "81000010000000000092"


def _at_least(count: int, values: list[dict[str, Any]]) -> bool:
    return len(values) >= count


def _verdict_of(answer: dict[str, Any]) -> dict[str, Any]:
    """The check's answer in the stream's verdict shape."""
    return {
        "settlement_id": answer["settlement_id"],
        "institution": answer["institution"],
        "event_id": answer["event_id"],
        "verdict": answer["verdict"],
        "lines": [{k: line[k] for k in ("line_no", "status", "rules")} for line in answer["lines"]],
    }


def test_checked_then_submitted_the_check_and_the_stream_agree(svc: Services, api: Api) -> None:
    env = {k: v for k, v in api.env.items() if k.startswith(("TRACEWATCH_", "KAFKA", "REDIS"))}
    env.pop("TRACEWATCH_API_PORT", None)
    worker = WorkerProcess(svc, env).start()

    def at(minute: int) -> dict[str, str]:
        return {"occurred_at": f"2026-11-20T14:{minute:02d}:00+08:00"}

    two_lines = settlement("P1", OTHER, **at(4))
    two_lines["lines"].append({"line_no": 2, "product": "XA002", "quantity": 1})  # NO_CODE
    steps = [
        ("P1", settlement("P1", CODE, **at(1))),  # first sale: pass
        ("P1", settlement("P1", CODE, **at(2))),  # sold again here: DUPLICATE_SALE
        ("P2", settlement("P2", CODE, **at(3))),  # sold elsewhere: CROSS_INSTITUTION_SALE
        ("P1", two_lines),  # a fresh code passes, the uncoded line is NO_CODE
    ]
    checked: dict[str, dict[str, Any]] = {}
    streamed: dict[str, dict[str, Any]] = {}
    try:
        for n, (who, event) in enumerate(steps):
            with api.client(who) as client:
                answer = client.post("/v1/settlements/check", json=event)
                assert answer.status_code == 200, answer.text
                assert answer.json()["already_submitted"] is False
                checked[event["event_id"]] = answer.json()
                sent = client.post("/v1/events", json=[event])
                assert sent.json()["results"][0]["status"] == "accepted", sent.text
                again = client.post("/v1/settlements/check", json=event).json()
                assert again["already_submitted"] is True
            # nothing in between: the next check waits for this verdict
            verdicts = read_topic(
                svc.kafka_bootstrap,
                f"{api.prefix}-verdicts",
                functools.partial(_at_least, n + 1),
                timeout=90,
            )
            streamed = {v["event_id"]: v for v in verdicts}
            assert event["event_id"] in streamed, f"no verdict for step {n}"
        with api.client("P1") as p1, api.client("zhejiang") as inspector:
            own = p1.get(f"/v1/codes/{CODE[:10]} {CODE[10:]}").json()  # any spelling
            everything = inspector.get(f"/v1/codes/{CODE}").json()
    finally:
        worker.stop()
    for event_id, given in checked.items():
        assert _verdict_of(given) == streamed[event_id], event_id
    rules = [checked[e["event_id"]]["lines"][0]["rules"] for _w, e in steps]
    assert rules == [[], ["DUPLICATE_SALE"], ["CROSS_INSTITUTION_SALE"], []]
    assert checked[two_lines["event_id"]]["lines"][1]["rules"] == ["NO_CODE"]
    cross = checked[steps[2][1]["event_id"]]["lines"][0]["evidence"][0]
    assert cross["earlier_sales"][0]["institution"] == "P1"
    assert "event_id" not in cross["earlier_sales"][0], "another institution's event ids"
    assert own["summary"] == everything["summary"] == "sold_more_than_once"
    assert {e["institution"] for e in own["history"]} == {"P1"}
    assert {e["institution"] for e in everything["history"]} == {"P1", "P2"}
    dispensed = [e["event_id"] for e in everything["history"] if e["type"] == "dispense"]
    assert sorted(dispensed) == sorted(e["event_id"] for _w, e in steps[:3])
