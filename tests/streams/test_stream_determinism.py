"""The determinism harness through the real stream: two workers, small batches, arrival orders
of the harness (CI: one input partition lagging behind the others; `make determinism-stream`:
`TRACEWATCH_STREAM_ORDERS` of them, every kind) - the standing alerts equal replay's of that
order, which equal replay's of any other order (`tests/detectors/test_arrival_order.py`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detectors.catalog import load_catalog
from harness.services import Services
from tests.detectors.arrival_orders import arrival_orders, replay_standing
from tests.streams.test_pipeline_integration import Pipe, _distinct, standing

pytestmark = pytest.mark.integration


ORDERS = int(os.environ.get("TRACEWATCH_STREAM_ORDERS", "1"))


@pytest.mark.parametrize("order", range(1, 1 + ORDERS))
def test_two_workers_small_batches_equal_replay_of_the_same_order(
    svc: Services, redis_prefix: str, tmp_path: Path, order: int
) -> None:
    pipe = Pipe(svc, redis_prefix, tmp_path, events=1200, seed=9)
    pipe.env["TRACEWATCH_BATCH_SIZE"] = "50"
    events = Path(pipe.data["events"]).read_bytes().splitlines()
    catalog = load_catalog(pipe.data["catalog"])
    # order 1: one lane's partition arrives last; then every kind of `arrival_orders` in turn
    lagging = list(arrival_orders(events, order + 1, seed=4))[order]
    in_file_order, _, _ = replay_standing(events, catalog)
    in_this_order, _, _ = replay_standing(lagging, catalog)
    assert in_this_order == in_file_order and in_file_order
    path = tmp_path / "lagging.jsonl"
    path.write_bytes(b"\n".join(lagging) + b"\n")
    workers = [pipe.worker(), pipe.worker()]
    try:
        pipe.produce(str(path))
        expected = {aid: {"alert_id": aid, "rule": "", "institution": ""} for aid in in_this_order}
        got, _ = pipe.outputs(expected, 0, timeout=180)
    finally:
        for worker in workers:
            worker.stop()
    assert set(standing(_distinct(got))) == in_this_order
