"""The API over real HTTP against the embedded broker and a private Redis: tokens and tenancy,
the ingest gateway's answers, NHSA field names, health and metrics."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from api.schemas import CheckAnswer, CodeHistory, EventsAnswer
from harness.services import free_port, stop_process
from tests.api.conftest import Api, cli, start_api
from topics.records import InvalidEvent, parse_event

pytestmark = pytest.mark.integration


def settlement(
    institution: str, code: str | None = "81000010000000000077", **extra: Any
) -> dict[str, Any]:
    ident = uuid.uuid4().hex[:12]
    return {
        "event_id": f"E{ident}",
        "type": "settlement",
        "institution": institution,
        "occurred_at": "2026-11-20T14:02:00+08:00",
        "settlement_id": f"S{ident}",
        "lines": [
            {
                "line_no": 1,
                "product": "XA001",
                "quantity": 1,
                "codes": [code] if code else [],
            }
        ],
        **extra,
    }


def input_messages(api: Api, wanted: set[str], timeout: float = 30) -> dict[str, list[bytes]]:
    """The input topic's messages whose event_id is in `wanted`: event_id -> keys seen."""
    topic = f"{api.prefix}-events"
    consumer = Consumer(
        {
            "bootstrap.servers": api.env["KAFKA_BOOTSTRAP"],
            "group.id": f"api-test-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    meta = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
    found: dict[str, list[bytes]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not wanted <= set(found):
            for msg in consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                value = orjson.loads(msg.value() or b"{}")
                if value.get("event_id") in wanted:
                    found.setdefault(value["event_id"], []).append(msg.key() or b"")
    finally:
        consumer.close()
    return found


def test_every_data_endpoint_needs_a_live_token(api: Api) -> None:
    with api.client() as anonymous:
        for method, path, body in (
            ("POST", "/v1/events", [settlement("P1")]),
            ("POST", "/v1/settlements/check", settlement("P1")),
            ("GET", "/v1/codes/81000010000000000077", None),
        ):
            answer = anonymous.request(method, path, json=body)
            assert answer.status_code == 401, (path, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert answer.json()["error"] == "unauthorized"
            forged = anonymous.request(
                method, path, json=body, headers={"Authorization": "Bearer tw_forged"}
            )
            assert forged.status_code == 401, (path, forged.text)


def test_a_revoked_token_is_refused(api: Api) -> None:
    token = cli(api.env, "tokens", "add", "P1", "--name", "till 3")
    listed = cli(api.env, "tokens", "list", "P1")
    token_id = next(line.split("\t")[0] for line in listed.splitlines() if "till 3" in line)
    assert token not in listed, "a token is shown once, when it is made"
    headers = {"Authorization": f"Bearer {token}"}
    with api.client() as client:
        assert client.get("/v1/codes/81000010000000000077", headers=headers).status_code == 200
        cli(api.env, "tokens", "revoke", token_id)
        refused = client.get("/v1/codes/81000010000000000077", headers=headers)
        assert refused.status_code == 401
    assert "revoked" in cli(api.env, "tokens", "list", "P1")


def test_events_are_accepted_once_then_duplicate_and_a_changed_resend_is_refused(
    api: Api,
) -> None:
    first, second = settlement("P1"), settlement("P1", "81000010000000000078")
    invalid = {**settlement("P1"), "occurred_at": None}
    with api.client("P1") as client:
        answer = client.post("/v1/events", json=[first, second, invalid])
        assert answer.status_code == 202, answer.text
        body = EventsAnswer.model_validate(answer.json())
        assert [r.status for r in body.results] == ["accepted", "accepted", "rejected"]
        with pytest.raises(InvalidEvent) as ingest:  # the reason ingest would dead-letter with
            parse_event(orjson.dumps(invalid))
        assert body.results[2].reason == ingest.value.reason
        retried = client.post("/v1/events", json=[first, second]).json()
        assert [r["status"] for r in retried["results"]] == ["duplicate", "duplicate"]
        changed = {**first, "lines": [{**first["lines"][0], "quantity": 2}]}
        conflict = client.post("/v1/events", json=[changed])
        assert conflict.status_code == 400
        assert conflict.json()["results"][0]["reason"] == "conflicting_resubmission"
    on_topic = input_messages(api, {first["event_id"], second["event_id"]})
    assert on_topic == {first["event_id"]: [b"P1"], second["event_id"]: [b"P1"]}


def test_json_lines_and_a_duplicate_inside_one_request(api: Api) -> None:
    one = settlement("P1")
    lines = b"\n".join([orjson.dumps(one), b"not json", orjson.dumps(one)]) + b"\n"
    with api.client("P1") as client:
        answer = client.post(
            "/v1/events", content=lines, headers={"Content-Type": "application/x-ndjson"}
        )
    assert answer.status_code == 202, answer.text
    statuses = [(r["status"], r.get("reason")) for r in answer.json()["results"]]
    assert statuses == [("accepted", None), ("rejected", "not_json"), ("duplicate", None)]


def test_an_event_of_another_institution_is_refused_and_named(api: Api) -> None:
    mine, theirs = settlement("P1"), settlement("P2")
    with api.client("P1") as client:
        mixed = client.post("/v1/events", json=[mine, theirs])
        assert mixed.status_code == 202
        refused = mixed.json()["results"][1]
        assert refused["status"] == "rejected"
        assert refused["reason"] == "forbidden_institution"
        assert refused["event_id"] == theirs["event_id"] and "P2" in refused["detail"]
        only_theirs = client.post("/v1/events", json=[settlement("P2")])
        assert only_theirs.status_code == 403
        assert client.post("/v1/settlements/check", json=settlement("P2")).status_code == 403
    assert theirs["event_id"] not in input_messages(api, {mine["event_id"], theirs["event_id"]})


def test_inspectors_read_their_region_only_and_submit_nothing(api: Api) -> None:
    with api.client("zhejiang") as zhejiang, api.client("beijing") as beijing:
        assert zhejiang.post("/v1/events", json=[settlement("P1")]).status_code == 403
        ok = zhejiang.post("/v1/settlements/check", json=settlement("P1"))
        assert ok.status_code == 200, ok.text
        out = beijing.post("/v1/settlements/check", json=settlement("P1"))
        assert out.status_code == 403 and out.json()["error"] == "out_of_region"
        unknown = zhejiang.post("/v1/settlements/check", json=settlement("NOT-LISTED"))
        assert unknown.status_code == 403
        assert beijing.post("/v1/settlements/check", json=settlement("H9")).status_code == 200


def test_size_limits(api: Api) -> None:
    with api.client("P1") as client:
        many = [settlement("P1") for _ in range(1001)]
        assert client.post("/v1/events", json=many).status_code == 413
        huge = b"[" + b" " * (9 * 1024 * 1024) + b"]"
        answer = client.post(
            "/v1/events", content=huge, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 413
        assert answer.json()["error"] == "body_too_large"


def test_nhsa_field_names_are_mapped_to_the_contract(api: Api) -> None:
    batch = f"B{uuid.uuid4().hex[:10]}"
    record = {
        "infno": "3505",
        "fixmedins_code": "P1",
        "fixmedins_bchno": batch,
        "med_list_codg": "XA001",
        "drugtracinfo": [{"drug_trac_codg": "81000010000000000079"}],
        "trdn_flag": "0",
        "sel_retn_cnt": "1",
        "sel_retn_time": "2026-11-20 14:02:00",
        "setl_id": "SETL-77",
        "manu_lotnum": "L001",
    }
    with api.client("P1") as client:
        answer = client.post("/v1/events", json=[record])
    assert answer.status_code == 202, answer.text
    assert answer.json()["results"][0] == {"index": 0, "event_id": batch, "status": "accepted"}
    topic = f"{api.prefix}-events"
    consumer = Consumer(
        {"bootstrap.servers": api.env["KAFKA_BOOTSTRAP"], "group.id": f"n{time.time_ns()}"}
    )
    meta = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
    event: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while not event and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.2):
            value = orjson.loads(msg.value() or b"{}") if msg.error() is None else {}
            if value.get("event_id") == batch:
                event = value
    consumer.close()
    assert event["type"] == "sale" and event["institution"] == "P1"
    assert event["settlement_id"] == "SETL-77"
    assert event["occurred_at"] == "2026-11-20T14:02:00+08:00"
    assert event["lines"] == [
        {
            "line_no": 1,
            "product": "XA001",
            "quantity": 1.0,
            "unit": "pack",
            "split": False,
            "codes": ["81000010000000000079"],
            "batch": "L001",
        }
    ]


def test_check_answers_in_the_documented_shape_and_records_nothing(api: Api) -> None:
    bad = settlement("P1", "6901234567892")  # a commodity barcode, not a trace code
    with api.client("P1") as client:
        answer = client.post("/v1/settlements/check", json=bad)
        assert answer.status_code == 200, answer.text
        checked = CheckAnswer.model_validate(answer.json())
        assert checked.verdict == "reject" and checked.recorded is False
        [line] = checked.lines
        assert line.rules == ["CODE_COUNT_MISMATCH", "WRONG_BARCODE"]
        said = {e.rule: e.message for e in line.evidence}
        assert "commodity barcode" in said["WRONG_BARCODE"]
        assert "one code per box" in said["CODE_COUNT_MISMATCH"]
        not_settlement = {**bad, "type": "purchase"}
        assert client.post("/v1/settlements/check", json=not_settlement).status_code == 422
        history = client.get("/v1/codes/81000010000000000077")
        CodeHistory.model_validate(history.json())
        assert client.get("/v1/codes/not-a-code").status_code == 422
    assert input_messages(api, {bad["event_id"]}, timeout=3) == {}


def test_health_readiness_and_metrics_by_route(api: Api) -> None:
    with api.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"redis": True, "broker": True}
        client.get("/v1/codes/81000010000000000077")
        metrics = client.get("/metrics").text
        assert 'route="/v1/codes/{code}",status="401"' in metrics
        assert "tracewatch_api_request_seconds_bucket" in metrics
        assert "81000010000000000077" not in metrics
        schema = client.get("/openapi.json").json()
        assert {"/v1/events", "/v1/settlements/check", "/v1/codes/{code}"} <= set(schema["paths"])
        assert client.get("/docs").status_code == 200


def test_the_check_survives_redis_losing_its_scripts(api: Api) -> None:
    """Redis restarted from its data, or an operator ran SCRIPT FLUSH: the check's pipeline
    gets NOSCRIPT, loads the script again and answers."""
    client = redis.Redis.from_url(api.env["REDIS_URL"])
    try:
        client.script_flush()
    finally:
        client.close()
    with api.client("P1") as http:
        answer = http.post("/v1/settlements/check", json=settlement("P1"))
    assert answer.status_code == 200, answer.text
    assert CheckAnswer.model_validate(answer.json()).recorded is False


def test_several_processes_serve_one_port(api: Api) -> None:
    """`TRACEWATCH_API_WORKERS=2`: uvicorn's workers build the app from the environment, and
    SIGTERM to the parent stops them all."""
    port = free_port()
    env = {**api.env, "TRACEWATCH_API_PORT": str(port), "TRACEWATCH_API_WORKERS": "2"}
    proc = start_api(env, port)
    try:
        children = _children(proc.pid)
        assert len(children) >= 2, children  # the workers (and multiprocessing's helper)
        headers = {"Authorization": f"Bearer {api.tokens['P1']}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as http:
            for _ in range(6):
                answer = http.post("/v1/settlements/check", json=settlement("P1"))
                assert answer.status_code == 200, answer.text
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)


def _children(pid: int) -> list[int]:
    deadline = time.monotonic() + 20
    found: list[int] = []
    while time.monotonic() < deadline:
        found = [
            int(c)
            for t in Path(f"/proc/{pid}/task").glob("*/children")
            for c in t.read_text().split()
        ]
        if len(found) >= 2:
            break
        time.sleep(0.2)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
