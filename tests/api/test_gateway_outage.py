"""The gateway under a broker outage: 503 with Retry-After while it is down, and nothing lost -
every event the client was told is accepted is on the input topic, and a retry of the refused
request after the outage gets the rest there."""

from __future__ import annotations

import pytest

from harness.services import Services
from tests.api.conftest import Api
from tests.api.test_api import input_messages, settlement

pytestmark = pytest.mark.integration


def test_a_broker_outage_gives_503_and_loses_nothing(svc: Services, api: Api) -> None:
    if svc.broker is None:
        pytest.skip("needs the embedded broker's fault injection")
    before = [settlement("P1") for _ in range(3)]
    during = [settlement("P1") for _ in range(5)]
    with api.client("P1") as client:
        assert client.post("/v1/events", json=before).status_code == 202
        svc.broker.fault("DOWN")
        try:
            refused = client.post("/v1/events", json=during)
            ready = client.get("/readyz")
        finally:
            svc.broker.fault("UP")
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert {r["status"] for r in refused.json()["results"]} == {"unavailable"}
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] is False
        retried = client.post("/v1/events", json=during)
        assert retried.status_code == 202, retried.text
        assert {r["status"] for r in retried.json()["results"]} == {"accepted"}
    wanted = {e["event_id"] for e in before + during}
    on_topic = input_messages(api, wanted, timeout=60)
    assert set(on_topic) == wanted
