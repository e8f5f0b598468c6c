"""End to end through a real broker, a real Redis and `tracewatch worker` processes.

The stream's alerts and verdicts must equal `tracewatch replay` on the same file - also when the
worker is SIGKILLed mid-stream and restarted (at-least-once delivery made idempotent).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer

from detectors.catalog import load_catalog
from detectors.ledger import describe
from detectors.pipeline import Pipeline
from harness.services import Services
from loadtest.generator import Rates, write_dataset
from streams.backfill import read_in_input_order
from streams.codecs import CodeCodec, JsonCodec
from tests.conftest import ROOT, WorkerProcess
from topics.records import KEY_SEP, InvalidEvent, parse_event

pytestmark = pytest.mark.integration


def replay(
    data: dict[str, str], pipeline: Pipeline | None = None, lines: list[bytes] | None = None
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], int]:
    """Replay of the data set's file, or of `lines` (e.g. the input topic in its order)."""
    pipeline = pipeline or Pipeline(load_catalog(data["catalog"]))
    alerts: dict[str, dict[str, Any]] = {}
    verdicts: list[dict[str, Any]] = []
    dead = 0
    if lines is None:
        lines = Path(data["events"]).read_bytes().splitlines()
    for line in lines:
        try:
            event = parse_event(line)
        except InvalidEvent:
            dead += 1
            continue
        found, decided = pipeline.process(event)
        alerts.update((a.alert_id, a.to_dict()) for a in found)
        verdicts.extend(decided)
    return alerts, verdicts, dead


def read_topic(
    bootstrap: str, topic: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
        }
    )
    consumer.subscribe([topic])
    values: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(values):
            for msg in consumer.consume(500, 0.2):
                value = msg.value()
                if msg.error() is None and value is not None:
                    values.append(orjson.loads(value))
    finally:
        consumer.close()
    return values


def topic_order(bootstrap: str, topic: str) -> list[bytes]:
    """The input topic's messages in the order the stream applies them."""
    return [raw[3] for raw in read_in_input_order(bootstrap, topic)]


class Pipe:
    """One isolated pipeline: its own topics, app id and Redis key prefix."""

    def __init__(self, svc: Services, prefix: str, tmp: Path, events: int, seed: int) -> None:
        self.svc = svc
        self.prefix = prefix
        svc.create_topics(prefix)
        # fraud three times as often as the default: every rule shows up in a short stream
        self.data = write_dataset(str(tmp), events, seed, rates=Rates().scaled(3))
        self.env = {
            "TRACEWATCH_TOPIC_PREFIX": prefix,
            "TRACEWATCH_REDIS_PREFIX": prefix,
            "TRACEWATCH_CATALOG": self.data["catalog"],
            "TRACEWATCH_BATCH_SIZE": "200",
        }

    def worker(self) -> WorkerProcess:
        return WorkerProcess(self.svc, self.env).start()

    def produce(self, path: str) -> None:
        env = {**WorkerProcess(self.svc, self.env).env}
        subprocess.run(
            [sys.executable, "-m", "cli", "produce", path, "--allow-invalid"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def outputs(
        self, alerts: dict[str, dict[str, Any]], verdicts: int, timeout: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Alerts and verdicts read back until the standing alerts are `alerts`' and every
        verdict arrived."""
        want = set(standing(alerts))
        got = read_topic(
            self.svc.kafka_bootstrap,
            self.topic("alerts"),
            lambda v: set(standing(_distinct(v))) == want,
            timeout=timeout,
        )
        got_verdicts = read_topic(
            self.svc.kafka_bootstrap,
            self.topic("verdicts"),
            lambda v: len({x["event_id"] for x in v}) >= verdicts,
            timeout=60,
        )
        return got, got_verdicts


def _distinct(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last message of each alert id (sinks upsert by id; one id stays in one partition)."""
    out = {}
    for a in alerts:
        a = dict(a)
        assert a.pop("detected_at"), "stream alerts carry a detection time"
        out[a["alert_id"]] = a
    return out


def standing(alerts: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Alert id -> (rule, institution) of the alerts raised and not withdrawn."""
    return {
        aid: (a["rule"], a["institution"]) for aid, a in alerts.items() if a.get("status") is None
    }


def assert_same_verdicts(stream: list[dict[str, Any]], replay: list[dict[str, Any]]) -> None:
    """Equal to replay of the input topic in its order (`topic_order`), every one."""
    got = {v["event_id"]: v for v in stream}
    want = {v["event_id"]: v for v in replay}
    assert got.keys() == want.keys()
    differing = [event_id for event_id, verdict in want.items() if got[event_id] != verdict]
    assert not differing, [(got[e], want[e]) for e in differing[:3]]


def test_stream_equals_replay(svc: Services, redis_prefix: str, tmp_path: Path) -> None:
    pipe = Pipe(svc, redis_prefix, tmp_path, events=800, seed=11)
    replayed = Pipeline(load_catalog(pipe.data["catalog"]))
    expected, verdicts, dead = replay(pipe.data, replayed)
    assert expected and dead, "the generated stream must exercise alerts and dead letters"
    worker = pipe.worker()
    try:
        pipe.produce(pipe.data["events"])
        got, got_verdicts = pipe.outputs(expected, len(verdicts), timeout=120)
        letters = read_topic(
            svc.kafka_bootstrap, pipe.topic("dead-letters"), lambda v: len(v) >= dead, timeout=30
        )
        metrics = worker.metrics()
        closed = []
        for path in ("/router/", "/table/", "/graph/", "/stats/", "/ledger/P00001"):
            try:
                worker.get(path)
            except urllib.error.HTTPError as exc:
                closed.append(exc.code == 404)
            else:
                closed.append(False)
        cli = subprocess.run(
            [sys.executable, "-m", "cli", "ledger", "P00001"],
            env=worker.env,
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
    finally:
        worker.stop()
    # the read API shows what replay's ledger holds for the institution
    want = [
        describe(key, state)
        for key, state in sorted(replayed.ledger.state.items())
        if key.startswith("P00001" + KEY_SEP)
    ]
    assert want and [orjson.loads(line) for line in cli.stdout.splitlines()] == want
    assert standing(_distinct(got)) == standing(expected)
    assert len(got_verdicts) == len(verdicts), "one verdict per settlement"
    _, in_topic_order, _ = replay(
        pipe.data, lines=topic_order(svc.kafka_bootstrap, pipe.topic("events"))
    )
    assert_same_verdicts(got_verdicts, in_topic_order)
    assert len(letters) == dead
    assert all(closed), "the worker's web server carries no data views"
    assert all(letter["reason"] and letter["detail"] for letter in letters)
    rules = {a["rule"] for a in expected.values()}
    assert {"CROSS_INSTITUTION_SALE", "NO_PROVENANCE", "DUPLICATE_SALE", "NO_CODE"} <= rules
    assert all(f'tracewatch_alerts_total{{rule="{rule}"}}' in metrics for rule in rules)
    assert "tracewatch_dead_letters_total" in metrics
    assert "tracewatch_resubmissions_total" in metrics
    # the one worker holds every input partition
    held = f'tracewatch_assigned_partitions{{topic="{pipe.topic("events")}"}} 16.0'
    assert held in metrics


def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    svc: Services, redis_prefix: str, tmp_path: Path
) -> None:
    pipe = Pipe(svc, redis_prefix, tmp_path, events=1500, seed=5)
    expected, verdicts, _ = replay(pipe.data)
    lines = Path(pipe.data["events"]).read_bytes().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(b"".join(lines[: len(lines) // 2]))
    second.write_bytes(b"".join(lines[len(lines) // 2 :]))

    worker = pipe.worker()
    pipe.produce(str(first))
    # Kill once the worker is busy: some alerts out, the batch in flight lost.
    read_topic(svc.kafka_bootstrap, pipe.topic("alerts"), lambda v: len(v) >= 3, timeout=60)
    worker.kill()
    pipe.produce(str(second))
    worker = pipe.worker()
    try:
        got, got_verdicts = pipe.outputs(expected, len(verdicts), timeout=180)
    finally:
        worker.stop()
    # Repeats of one alert carry one id; the standing alerts are exactly replay's, so no NO_CODE
    # was lost and no legacy stock drawn down twice.
    assert standing(_distinct(got)) == standing(expected)
    # the institutions' counted days (their profiles) hold every event once: the batch the
    # kill interrupted counted nothing, and its redelivery counted once
    counting = Pipeline(load_catalog(pipe.data["catalog"]), track_activity=True)
    replay(pipe.data, counting)
    assert counting.activity is not None and counting.activity.days
    want = {k: list(v) for k, v in counting.activity.days.items()}
    assert _eventually(lambda: _activity(svc.redis_url, redis_prefix), want) == want
    _, in_topic_order, _ = replay(
        pipe.data, lines=topic_order(svc.kafka_bootstrap, pipe.topic("events"))
    )
    assert_same_verdicts(got_verdicts, in_topic_order)


def _activity(redis_url: str, prefix: str) -> dict[tuple[str, str], list[int]]:
    """Every institution's counted days under a prefix (`detectors.activity`)."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    days: dict[tuple[str, str], list[int]] = {}
    for key in client.scan_iter(match=f"{prefix}:{{E*}}:act:*", count=1000):
        _, _, month, inst = str(key).rsplit(":", 3)
        for day, text in client.hgetall(key).items():
            days[(inst, month + str(day))] = [int(x) for x in str(text).split(",")]
    return days


def _eventually(read: Callable[[], Any], want: Any, timeout: float = 20.0) -> Any:
    """`read()` once it equals `want` (the last batch's save may trail its outputs), or the
    last value read when `timeout` passes."""
    deadline = time.monotonic() + timeout
    got = read()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = read()
    return got


def _stage_states(redis_url: str, prefix: str, tag: str, codec: Any) -> dict[str, Any]:
    """Every state of one stage under a prefix, lists sorted (arrival order across partitions
    may differ between the stream and a rebuild; the facts may not)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    states: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{prefix}:{{{tag}*}}:s:*", count=1000):
        for field, raw in client.hgetall(key).items():
            state = codec.unpack(raw)
            states[codec.unfield(field)] = {
                k: sorted(v, key=repr) if isinstance(v, list) else v for k, v in state.items()
            }
    return states


def test_rebuild_recreates_the_workers_state_from_the_input_topic(
    svc: Services, redis_prefix: str, tmp_path: Path
) -> None:
    pipe = Pipe(svc, redis_prefix, tmp_path, events=600, seed=3)
    expected, verdicts, _ = replay(pipe.data)
    worker = pipe.worker()
    try:
        pipe.produce(pipe.data["events"])
        pipe.outputs(expected, len(verdicts), timeout=120)
    finally:
        worker.stop()
    rebuilt_prefix = f"{redis_prefix}rb"
    env = {**WorkerProcess(svc, {**pipe.env, "TRACEWATCH_REDIS_PREFIX": rebuilt_prefix}).env}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "rebuild"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "rebuilt from" in done.stdout
    for tag, codec in (("L", JsonCodec()), ("C", CodeCodec())):
        live = _stage_states(svc.redis_url, redis_prefix, tag, codec)
        rebuilt = _stage_states(svc.redis_url, rebuilt_prefix, tag, codec)
        assert live and rebuilt == live, tag
    live_days = _activity(svc.redis_url, redis_prefix)
    assert live_days and _activity(svc.redis_url, rebuilt_prefix) == live_days
    again = subprocess.run(
        [sys.executable, "-m", "cli", "rebuild"], env=env, cwd=ROOT, capture_output=True
    )
    assert again.returncode == 1 and b"already holds state" in again.stderr


def test_catalog_update_reaches_a_running_worker(
    svc: Services, redis_prefix: str, tmp_path: Path
) -> None:
    """`tracewatch catalog` while a worker runs: the next settlements are judged by the new
    catalog, without a restart."""
    svc.create_topics(redis_prefix)
    old = tmp_path / "old.jsonl"
    new = tmp_path / "new.jsonl"
    old.write_bytes(b'{"product": "XA001", "prefixes": ["8100001"], "pack_size": 10}\n')
    new.write_bytes(
        old.read_bytes() + b'{"product": "XB002", "prefixes": ["8777777"], "pack_size": 10}\n'
    )
    env = {
        "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
        "TRACEWATCH_REDIS_PREFIX": redis_prefix,
        "TRACEWATCH_CATALOG": str(old),
        "TRACEWATCH_BATCH_SIZE": "50",
    }

    def settlement(n: int) -> bytes:
        line = {
            "line_no": 1,
            "product": "XB002",
            "quantity": 1,
            "codes": [f"877777700000000000{n:02d}"],
        }
        event = {
            "event_id": f"S{n}",
            "type": "settlement",
            "institution": "H1",
            "occurred_at": "2026-03-02T09:00:00+08:00",
            "settlement_id": f"SID{n}",
            "lines": [line],
        }
        return orjson.dumps(event) + b"\n"

    worker = WorkerProcess(svc, env).start()
    try:
        first = tmp_path / "first.jsonl"
        first.write_bytes(settlement(1))

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [sys.executable, "-m", "cli", *args],
                env=worker.env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )

        run("produce", str(first))
        verdicts_topic = f"{redis_prefix}-verdicts"
        got = read_topic(svc.kafka_bootstrap, verdicts_topic, lambda v: len(v) >= 1, 60)
        assert got[0]["verdict"] == "pass"  # UNKNOWN_CODE alerts but does not reject
        alerts = read_topic(
            svc.kafka_bootstrap, f"{redis_prefix}-alerts", lambda v: len(v) >= 1, 30
        )
        assert [a["rule"] for a in alerts] == ["UNKNOWN_CODE"]
        run("catalog", str(new))
        time.sleep(6)  # workers poll the catalog version every 5 s
        second = tmp_path / "second.jsonl"
        second.write_bytes(settlement(2))
        run("produce", str(second))
        got = read_topic(svc.kafka_bootstrap, verdicts_topic, lambda v: len(v) >= 2, 60)
        assert {v["event_id"] for v in got} == {"S1", "S2"}
        alerts = read_topic(svc.kafka_bootstrap, f"{redis_prefix}-alerts", lambda v: False, 5)
        assert [a["event_ids"] for a in alerts if a["rule"] == "UNKNOWN_CODE"] == [["S1"]]
    finally:
        worker.stop()
