"""The determinism harness through the real stream: two workers, small batches, an arrival order
with one input partition lagging behind the others - the standing alerts equal replay's of that
order, which equal replay's of any other order (`tests/detectors/test_arrival_order.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.catalog import load_catalog
from streams.services import Services
from tests.detectors.arrival_orders import arrival_orders, replay_standing
from tests.streams.test_pipeline_integration import Pipe, _distinct, standing

pytestmark = pytest.mark.integration


def test_two_workers_small_batches_lagging_partition_equal_replay(
    svc: Services, redis_prefix: str, tmp_path: Path
) -> None:
    pipe = Pipe(svc, redis_prefix, tmp_path, events=1200, seed=9)
    pipe.env["TRACEWATCH_BATCH_SIZE"] = "50"
    events = Path(pipe.data["events"]).read_bytes().splitlines()
    catalog = load_catalog(pipe.data["catalog"])
    lagging = list(arrival_orders(events, 2, seed=4))[1]  # one lane's partition arrives last
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
