"""SIGTERM - what `timeout`, `docker stop`, systemd and Kubernetes send - stops a worker as
cleanly and as quickly as Ctrl-C, with its broker up or gone."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from harness.embedded_broker import EmbeddedBroker
from harness.services import Services
from tests.conftest import CATALOG_LINES, WorkerProcess

pytestmark = pytest.mark.integration


def _worker(
    svc: Services, broker: EmbeddedBroker, tmp_catalog: str, log: Path | None = None
) -> WorkerProcess:
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
        log,
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


def _all_stages_assigned(worker: WorkerProcess) -> bool:
    assigned = [
        float(line.rsplit(" ", 1)[1])
        for line in worker.metrics().splitlines()
        if line.startswith("tracewatch_assigned_partitions{")
    ]
    return len(assigned) == 4 and all(n > 0 for n in assigned)


def test_a_worker_whose_broker_is_gone_says_so_without_flooding_the_log(
    svc: Services, tmp_path: Path
) -> None:
    """librdkafka and aiokafka each log a connection error about every 100 ms while the
    broker is away (~900 lines in 20 s from one worker): each kind now once a minute."""
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(CATALOG_LINES) + "\n")
    log = tmp_path / "worker.log"
    broker = EmbeddedBroker().start()
    try:
        worker = _worker(svc, broker, str(catalog), log)
        deadline = time.monotonic() + 60
        while not _all_stages_assigned(worker):
            assert time.monotonic() < deadline, "the stages were not assigned within 60 s"
            time.sleep(0.5)
        before = log.stat().st_size
        broker.stop()
        time.sleep(20)
        with log.open("rb") as fh:
            fh.seek(before)
            lines = fh.read().decode(errors="replace").splitlines()
        _stopped_within(worker, 15)
    finally:
        broker.stop()
    assert any("Connection refused" in line for line in lines), lines[:20]
    assert len(lines) < 100, "\n".join(lines[:60])
