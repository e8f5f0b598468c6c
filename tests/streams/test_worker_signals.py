"""SIGTERM - what `timeout`, `docker stop`, systemd and Kubernetes send - stops a worker as
cleanly and as quickly as Ctrl-C, with its broker up or gone."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import pytest

from harness.embedded_broker import EmbeddedBroker
from harness.services import Services
from tests.conftest import CATALOG_LINES, WorkerProcess

pytestmark = pytest.mark.integration


def _worker(svc: Services, broker: EmbeddedBroker, tmp_catalog: str) -> WorkerProcess:
    prefix = f"twsig{uuid.uuid4().hex[:8]}"
    broker.create_topics(prefix)
    return WorkerProcess(
        svc,
        {
            "KAFKA_BOOTSTRAP": broker.bootstrap,
            "TRACEWATCH_EMBEDDED_BROKER": "1",
            "TRACEWATCH_TOPIC_PREFIX": prefix,
            "TRACEWATCH_REDIS_PREFIX": prefix,
            "TRACEWATCH_CATALOG": tmp_catalog,
        },
    ).start()


def _stopped_within(worker: WorkerProcess, seconds: float) -> None:
    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    try:
        worker.proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the worker was still running {seconds:.0f} s after SIGTERM")
    assert worker.proc.returncode == 0, worker.proc.returncode
    assert time.monotonic() - started < seconds


@pytest.mark.parametrize("broker_gone", [False, True], ids=["broker-up", "broker-gone"])
def test_sigterm_stops_a_worker_in_seconds(
    svc: Services, tmp_path_factory: pytest.TempPathFactory, broker_gone: bool
) -> None:
    catalog = tmp_path_factory.mktemp("sig") / "catalog.jsonl"
    catalog.write_text("\n".join(CATALOG_LINES) + "\n")
    broker = EmbeddedBroker().start()
    try:
        worker = _worker(svc, broker, str(catalog))
        time.sleep(3)  # past start-up: consumers joined, partitions assigned
        if broker_gone:
            broker.stop()
            time.sleep(1)
        _stopped_within(worker, 15)
    finally:
        broker.stop()
