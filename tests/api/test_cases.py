"""The case routes over real HTTP: a `tracewatch api` process with DATABASE_URL on a real
PostgreSQL, cases recorded as the sink records them; inspectors within their region only."""

from __future__ import annotations

import pytest

from harness.services import Services
from tests.api.conftest import Api
from tests.cases.conftest import alert, record

pytestmark = pytest.mark.integration


def test_inspectors_list_read_and_move_cases_of_their_region(
    api_with_cases: tuple[Api, str],
) -> None:
    api, url = api_with_cases
    record(url, *(alert(n, rule="INVALID_CODE") for n in range(1, 4)), region="330102")
    record(url, alert(4, code="81000010000000000091"), region="330102")
    record(url, alert(9, institution="H9"), region="110101")
    with api.client("zhejiang") as zj, api.client("beijing") as bj, api.client("P1") as p1:
        page = zj.get("/v1/cases", params={"limit": 2})
        assert page.status_code == 200, page.text
        first = page.json()
        assert len(first["cases"]) == 2 and first["next"]
        rest = zj.get("/v1/cases", params={"limit": 2, "after": first["next"]}).json()
        ids = {c["alert_id"] for c in first["cases"] + rest["cases"]}
        assert ids == {f"{n:024x}" for n in range(1, 5)} and rest["next"] is None
        assert {c["alert_id"] for c in bj.get("/v1/cases").json()["cases"]} == {f"{9:024x}"}
        assert p1.get("/v1/cases").status_code == 403  # cases are inspectors'
        assert zj.get("/v1/cases", params={"region": "110000"}).status_code == 403
        assert bj.get(f"/v1/cases/{4:024x}").status_code == 404  # not in its scope

        case = zj.get(f"/v1/cases/{4:024x}").json()
        assert case["status"] == "new" and case["audit"][0]["action"] == "opened"
        assert case["code_history"]["code"] == "81000010000000000091"
        move = {"to": "investigating", "version": case["version"]}
        moved = zj.post(f"/v1/cases/{4:024x}/transitions", json=move)
        assert moved.status_code == 200 and moved.json()["status"] == "investigating"
        stale = zj.post(f"/v1/cases/{4:024x}/transitions", json={**move, "to": "escalated"})
        assert stale.status_code == 409, stale.text  # someone moved it since that version
        refused = zj.post(f"/v1/cases/{4:024x}/transitions", json={"to": "escalated"})
        assert refused.status_code == 422 and "reason" in refused.json()["detail"]

        bulk = zj.post(
            "/v1/cases/transitions",
            json={
                "where": {"rule": "INVALID_CODE", "institution": "P1"},
                "to": "closed",
                "closure_reason": "scanner_fault",
                "reason": "counter 2 scanner faulty",
            },
        )
        assert bulk.status_code == 200 and bulk.json()["moved"] == 3, bulk.text
        assigned = zj.put(f"/v1/cases/{4:024x}/assignee", json={"assignee": "li"})
        assert assigned.json()["assignee"] == "li"
        trail = zj.get(f"/v1/cases/{1:024x}").json()["audit"]
        assert [e["action"] for e in trail] == ["opened", "transition"]
        assert (
            trail[-1]["actor"].endswith(")") and trail[-1]["reason"] == "counter 2 scanner faulty"
        )


def test_without_a_case_store_the_routes_say_so(api: Api) -> None:
    with api.client("zhejiang") as zj:
        answer = zj.get("/v1/cases")
    assert answer.status_code == 503 and "DATABASE_URL" in answer.json()["detail"]


def test_the_openapi_document_lists_the_case_routes(api: Api) -> None:
    with api.client() as anyone:
        paths = anyone.get("/openapi.json").json()["paths"]
    assert {"/v1/cases", "/v1/cases/{alert_id}", "/v1/cases/transitions"} <= set(paths)


def test_profiles_and_reports_over_http_within_scope(
    svc: Services, api_with_cases: tuple[Api, str]
) -> None:
    import asyncio

    from detectors.activity import ActivityBatch
    from detectors.pipeline import partition_of
    from streams.redis_state import IngestStore, connect
    from topics import names

    api, url = api_with_cases
    batch = ActivityBatch()
    batch.days[("P1", "20261103")] = [10, 8, 8, 6, 9, 7, 40]  # FIELDS order

    async def save() -> None:
        client = connect(svc.redis_url)
        try:
            store = IngestStore(client, api.prefix, days=7)
            await store.save(
                partition_of("P1", names.EVENTS.partitions), {}, {}, [], activity=batch
            )
        finally:
            await client.aclose()

    asyncio.run(save())
    record(
        url,
        alert(
            60,
            rule="NO_CODE",
            occurred_at="2026-11-03T09:00:00+08:00",
            detected_at="2026-11-03T09:00:01+08:00",
        ),
        region="330102",
    )
    period = {"since": "2026-11-01", "until": "2026-11-30"}
    with (
        api.client("zhejiang") as zj,
        api.client("beijing") as bj,
        api.client("P1") as p1,
        api.client("P2") as p2,
    ):
        profile = zj.get("/v1/institutions/P1", params=period)
        assert profile.status_code == 200, profile.text
        body = profile.json()
        assert body["activity"]["events"] == 10 and body["activity"]["scan_rate"] == 0.75
        assert body["alerts"]["by_rule"]["NO_CODE"]["alerts"] == 1
        assert body["risk"]["factors"][0]["factor"] == "confirmed_cases"
        assert p1.get("/v1/institutions/P1", params=period).json()["activity"]["scans"] == 40
        assert p2.get("/v1/institutions/P1").status_code == 403
        assert bj.get("/v1/institutions/P1").status_code == 404
        bad = zj.get("/v1/institutions/P1", params={"since": "2026-11-31"})
        assert bad.status_code == 422
        query = {"region": "330100", "month": "2026-11"}
        report = zj.get("/v1/reports/supervision", params=query)
        assert report.status_code == 200, report.text
        assert report.json()["total"]["events"] == 10
        as_csv = zj.get("/v1/reports/supervision", params={**query, "format": "csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert as_csv.text.splitlines()[0].startswith("kind,institutions,active")
        assert bj.get("/v1/reports/supervision", params=query).status_code == 403
        assert p1.get("/v1/reports/supervision", params=query).status_code == 403
