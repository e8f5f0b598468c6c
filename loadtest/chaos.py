"""`make chaos`: the streaming pipeline under faults, compared with `replay` of the same input.

Each scenario runs a generated stream (fraud three times as often as the default, so every rule
fires) through workers on their own topics, against the embedded broker and a private Redis with
an AOF fsynced every second, while one kind of fault happens mid-stream: workers SIGKILLed or
SIGTERMed and restarted, Redis SIGKILLed (losing its last second) or shut down and restarted,
the broker down, 500 ms of broker round trip, Produce errors (retriable, and the idempotent
producer's fatal out-of-order sequence), Fetch, OffsetCommit and JoinGroup errors, poison events
interleaved with good ones. Then it reads the alerts, verdicts and dead letters back and prints
what differs from replay: alerts and verdicts lost, spurious, or duplicated with different
content, dead letters lost or spurious, and the time from the last fault to a drained pipeline.

Standing alerts are compared with replay of the file (any arrival order gives them); verdicts,
exactly, with replay of the input topic in the order the stream applies it (by input timestamp,
then partition and offset: `streams.alignment`), since the feeder's retries and the partitions'
interleaving are the topic's, not the file's.

Fault injection uses librdkafka's mock-cluster API, so broker scenarios need the embedded broker
(they are skipped when `KAFKA_BOOTSTRAP` points at a real cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer

from detectors.catalog import load_catalog
from detectors.pipeline import Pipeline
from harness.services import RedisServer, Services, free_port, pipeline_env, services, stop_process
from loadtest.generator import Rates, write_dataset
from loadtest.poison import poison_and_good
from streams.backfill import read_in_input_order
from topics.records import InvalidEvent, normalise_id, parse_event

ROOT = Path(__file__).resolve().parent.parent

# Kafka API keys and error codes for `EmbeddedBroker.fault("ERRORS", ...)`
PRODUCE, FETCH, OFFSET_COMMIT, JOIN_GROUP = 0, 1, 8, 11
NOT_LEADER_OR_FOLLOWER = 6
REQUEST_TIMED_OUT = 7
NOT_COORDINATOR = 16
COORDINATOR_LOAD_IN_PROGRESS = 14
REBALANCE_IN_PROGRESS = 27
OUT_OF_ORDER_SEQUENCE_NUMBER = 45


# -- the run: workers, Redis, the broker's faults -------------------------------------------------


class Run:
    """One isolated pipeline (topics and keys under a fresh prefix) and the handles a fault
    needs: its workers, its Redis, the broker."""

    def __init__(self, svc: Services, catalog: str, workers: int, batch_size: int) -> None:
        self.svc = svc
        self.prefix = f"twchaos{time.time_ns()}"
        svc.create_topics(self.prefix)
        self.redis = RedisServer(appendonly=True).start()
        self.catalog = catalog
        self.batch_size = batch_size
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.ports = [free_port() for _ in range(workers)]
        # workers' output: TRACEWATCH_CHAOS_LOG names a file to keep it in (else discarded)
        self.log = open(os.environ.get("TRACEWATCH_CHAOS_LOG", os.devnull), "ab")  # noqa: SIM115
        self.faults: list[str] = []

    def env(self, i: int) -> dict[str, str]:
        return pipeline_env(
            self.svc,
            self.prefix,
            self.catalog,
            REDIS_URL=self.redis.url,
            TRACEWATCH_WEB_PORT=str(self.ports[i]),
            TRACEWATCH_BATCH_SIZE=str(self.batch_size),
            TRACEWATCH_LOG_LEVEL=os.environ.get("TRACEWATCH_CHAOS_LOG_LEVEL", "ERROR"),
        )

    def start_worker(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"],
            env=self.env(i),
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
        )

    def signal_worker(self, i: int, sig: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.faults.append(f"{signal.Signals(sig).name} worker {i}")

    def broker(self, *words: str | int) -> None:
        if self.svc.broker is None:
            raise RuntimeError("broker faults need the embedded broker (unset KAFKA_BOOTSTRAP)")
        self.svc.broker.fault(*words)
        self.faults.append(" ".join(str(w) for w in words))

    def metric(self, name: str) -> float:
        """Sum of a metric over the live workers."""
        import urllib.request

        total = 0.0
        for port, proc in zip(self.ports, self.procs, strict=True):
            if proc is None or proc.poll() is not None:
                continue
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r,
            ):
                for line in r.read().decode().splitlines():
                    if line.startswith(name) and not line.startswith("#"):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        for proc in self.procs:
            if proc is not None:
                stop_process(proc)
        self.redis.stop()
        self.log.close()


# -- faults ---------------------------------------------------------------------------------------

Fault = Callable[[Run, threading.Event], None]


def _every(period: float, times: int, done: threading.Event, step: Callable[[int], None]) -> None:
    """`times` steps, `period` apart; they run their course even after the input ends."""
    for n in range(times):
        time.sleep(period)
        step(n)


def _workers_signalled(sig: int, times: int = 4) -> Fault:
    def fault(run: Run, done: threading.Event) -> None:
        rng = random.Random(sig)

        def step(_n: int) -> None:
            i = rng.randrange(len(run.procs))
            run.signal_worker(i, sig)
            time.sleep(1.0)
            run.start_worker(i)

        _every(4.0, times, done, step)

    return fault


def _redis_killed(run: Run, done: threading.Event) -> None:
    def step(_n: int) -> None:
        run.redis.kill()
        run.faults.append("SIGKILL redis")
        time.sleep(3.0)
        run.redis.start(run.redis.port)

    _every(5.0, 2, done, step)


def _redis_shut_down(run: Run, done: threading.Event) -> None:
    def step(_n: int) -> None:
        import redis

        with contextlib.suppress(redis.exceptions.ConnectionError):
            redis.Redis.from_url(run.redis.url).shutdown(nosave=False)
        run.redis.kill()  # reap the process (it has exited)
        run.faults.append("SHUTDOWN redis")
        time.sleep(5.0)
        run.redis.start(run.redis.port)

    _every(4.0, 1, done, step)


def _broker_down(run: Run, done: threading.Event) -> None:
    if not done.wait(3.0):
        run.broker("DOWN", 1)
        time.sleep(20.0)
        run.broker("UP", 1)


def _slow_broker(run: Run, done: threading.Event) -> None:
    run.broker("RTT", 500, 1)
    done.wait(20.0)
    time.sleep(5.0)
    run.broker("RTT", 0, 1)


def _errors(api: int, code: int, count: int, times: int = 3, period: float = 3.0) -> Fault:
    def fault(run: Run, done: threading.Event) -> None:
        _every(period, times, done, lambda _n: run.broker("ERRORS", api, *([code] * count)))

    return fault


def _join_errors(run: Run, done: threading.Event) -> None:
    """JoinGroup errors while a worker restart makes the group rejoin."""

    def step(_n: int) -> None:
        run.broker("ERRORS", JOIN_GROUP, *([COORDINATOR_LOAD_IN_PROGRESS] * 5))
        run.signal_worker(0, signal.SIGTERM)
        run.start_worker(0)

    _every(4.0, 2, done, step)


def _nothing(run: Run, done: threading.Event) -> None:
    done.wait()


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault
    workers: int = 2
    broker_faults: bool = False
    poison: bool = False
    # The input is produced first, as a backlog, and the fault hits while workers drain it:
    # injected Produce errors then reach the workers' producers, not the feeder's.
    backlog: bool = False


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("baseline", _nothing),
        Scenario("worker-sigkill", _workers_signalled(signal.SIGKILL)),
        Scenario("worker-sigterm", _workers_signalled(signal.SIGTERM)),
        Scenario("redis-sigkill", _redis_killed),
        Scenario("redis-shutdown", _redis_shut_down),
        Scenario("broker-down", _broker_down, broker_faults=True),
        Scenario("broker-rtt-500ms", _slow_broker, broker_faults=True),
        Scenario(
            "produce-retriable",
            _errors(PRODUCE, NOT_LEADER_OR_FOLLOWER, 10, times=4, period=0.5),
            broker_faults=True,
            backlog=True,
        ),
        Scenario(
            "produce-fatal",
            _errors(PRODUCE, OUT_OF_ORDER_SEQUENCE_NUMBER, 3, times=3, period=0.5),
            broker_faults=True,
            backlog=True,
        ),
        Scenario("fetch-errors", _errors(FETCH, NOT_LEADER_OR_FOLLOWER, 20), broker_faults=True),
        Scenario(
            "offset-commit-errors",
            _errors(OFFSET_COMMIT, REBALANCE_IN_PROGRESS, 10),
            broker_faults=True,
        ),
        Scenario("join-group-errors", _join_errors, broker_faults=True),
        Scenario("poison", _nothing, poison=True),
    ]
}


# -- input, expectation, outputs -----------------------------------------------------------------


def _key(raw: bytes) -> bytes:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return b""
    inst = normalise_id(obj.get("institution")) if isinstance(obj, dict) else None
    return inst.encode() if inst is not None else b""


def _input(events: int, seed: int, workdir: str, with_poison: bool) -> tuple[list[bytes], str]:
    data = write_dataset(workdir, events, seed, rates=Rates().scaled(3))
    lines = [line for line in Path(data["events"]).read_bytes().splitlines() if line.strip()]
    if with_poison:
        rng = random.Random(seed)
        for raw, _good in poison_and_good("CHAOSPOISON"):
            lines.insert(rng.randrange(len(lines) + 1), raw)
    return lines, data["catalog"]


@dataclass
class Expected:
    alerts: dict[str, dict[str, Any]]
    verdicts: dict[str, dict[str, Any]]
    dead_letters: int


def _replay(lines: list[bytes], catalog: str) -> Expected:
    pipeline = Pipeline(load_catalog(catalog))
    alerts: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, dict[str, Any]] = {}
    dead = 0
    for raw in lines:
        try:
            event = parse_event(raw)
        except InvalidEvent:
            dead += 1
            continue
        found, decided = pipeline.process(event)
        alerts.update((a.alert_id, a.to_dict()) for a in found)
        verdicts.update((v["event_id"], v) for v in decided)
    return Expected(alerts, verdicts, dead + len(pipeline.conflicts))


def _feed(bootstrap: str, topic: str, lines: list[bytes], seconds: float) -> None:
    """Produce the input spread over `seconds`, so that faults land mid-stream; a producer
    driven into its fatal state by an injected error is replaced and what it had not delivered
    is sent again (only that: a malformed line sent twice would be two dead letters)."""
    chunk = max(1, len(lines) // max(1, int(seconds * 4)))
    config = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "message.max.bytes": 2_000_000,
        "linger.ms": 5,
    }
    producer = Producer(config)
    producer.list_topics(topic, timeout=30)  # warm: `OutputProducer.warm_up` says why
    for start in range(0, len(lines), chunk):
        pending = list(range(start, min(start + chunk, len(lines))))
        while pending:
            delivered: set[int] = set()

            def done(i: int, err: Any, _msg: Any, into: set[int] = delivered) -> None:
                if err is None:
                    into.add(i)

            try:
                for i in pending:
                    producer.produce(
                        topic, lines[i], _key(lines[i]), on_delivery=functools.partial(done, i)
                    )
                producer.flush(60)
            except (KafkaException, SystemError):
                pass
            pending = [i for i in pending if i not in delivered]
            if pending:
                producer = Producer(config)
                producer.list_topics(topic, timeout=30)
        if seconds:
            time.sleep(0.25)


@dataclass
class Outputs:
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # last message per id
    alert_messages: int = 0
    verdicts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dead_letters: set[str] = field(default_factory=set)


class Reader:
    """Follows the three output topics into `Outputs`."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.topics = {f"{prefix}-alerts": "a", f"{prefix}-verdicts": "v"}
        self.topics[f"{prefix}-dead-letters"] = "d"
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"{prefix}-reader",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        self.consumer.subscribe(list(self.topics))
        self.out = Outputs()

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(1000, 0.2):
                if msg.error() is not None or msg.value() is None:
                    continue
                value = orjson.loads(msg.value() or b"null")
                kind = self.topics.get(msg.topic() or "")
                if kind == "a":
                    self.out.alert_messages += 1
                    self.out.alerts[value["alert_id"]] = value
                elif kind == "v":
                    self.out.verdicts.setdefault(value["event_id"], []).append(value)
                elif kind == "d":
                    self.out.dead_letters.add(
                        f"{value['topic']}/{value['partition']}/{value['offset']}"
                    )

    def close(self) -> None:
        self.consumer.close()


def _standing(alerts: dict[str, dict[str, Any]]) -> set[str]:
    return {aid for aid, a in alerts.items() if a.get("status") is None}


@dataclass
class Report:
    scenario: str
    events: int
    faults: list[str]
    lost_alerts: int
    spurious_alerts: int
    lost_verdicts: int
    spurious_verdicts: int
    conflicting_verdicts: int  # one settlement, two different verdicts on the topic
    verdicts_differing: int  # from replay of the input topic in its order
    lost_dead_letters: int
    spurious_dead_letters: int
    redelivered_alert_messages: int
    drain_seconds: float | None
    producers_replaced: float = 0.0
    state_gaps_read_back: float = 0.0
    late_records: float = 0.0  # applied out of input order (`streams.alignment`)

    @property
    def clean(self) -> bool:
        return (
            self.lost_alerts == self.spurious_alerts == 0
            and self.lost_verdicts == self.spurious_verdicts == self.conflicting_verdicts == 0
            and self.verdicts_differing == 0
            and self.lost_dead_letters == self.spurious_dead_letters == 0
            and self.drain_seconds is not None
        )

    def line(self) -> str:
        drained = f"{self.drain_seconds:.0f}s" if self.drain_seconds is not None else "NO"
        return (
            f"{self.scenario:<22} alerts lost {self.lost_alerts} spurious {self.spurious_alerts} | "
            f"verdicts lost {self.lost_verdicts} spurious {self.spurious_verdicts} "
            f"conflicting {self.conflicting_verdicts} differing {self.verdicts_differing} | "
            f"dead letters lost {self.lost_dead_letters} spurious {self.spurious_dead_letters} | "
            f"redelivered alert msgs {self.redelivered_alert_messages} | drained {drained} | "
            f"{'ok' if self.clean else 'FAILED'}"
        )


def run_scenario(
    scenario: Scenario,
    svc: Services,
    events: int = 3000,
    seed: int = 5,
    feed_seconds: float = 15.0,
    timeout: float = 300.0,
) -> Report:
    with tempfile.TemporaryDirectory(prefix="tracewatch-chaos-") as workdir:
        lines, catalog = _input(events, seed, workdir, scenario.poison)
        expected = _replay(lines, catalog)
        run = Run(svc, catalog, scenario.workers, batch_size=200)
        reader = Reader(svc.kafka_bootstrap, run.prefix)
        try:
            for i in range(scenario.workers):
                run.start_worker(i)
            time.sleep(8.0)  # the group forms before the input and the faults start
            done = threading.Event()
            faults = threading.Thread(target=scenario.fault, args=(run, done), daemon=True)
            if scenario.backlog:
                _feed(svc.kafka_bootstrap, f"{run.prefix}-events", lines, 0.0)
                faults.start()
                done.set()
            else:
                faults.start()
                _feed(svc.kafka_bootstrap, f"{run.prefix}-events", lines, feed_seconds)
                done.set()
            faults.join()
            calm = time.monotonic()
            want_alerts = _standing(expected.alerts)
            drained: float | None = None
            while time.monotonic() - calm < timeout:
                reader.poll(1.0)
                got = reader.out
                if (
                    _standing(got.alerts) == want_alerts
                    and got.verdicts.keys() >= expected.verdicts.keys()
                    and len(got.dead_letters) >= expected.dead_letters
                ):
                    drained = time.monotonic() - calm
                    break
            reader.poll(5.0)  # whatever else comes: spurious outputs show up here
            replaced = run.metric("tracewatch_producers_replaced_total")
            gaps = run.metric("tracewatch_state_gaps_total")
            late = run.metric("tracewatch_align_late_records_total")
            # verdicts follow the input topic's order (`streams.alignment`): replay that
            in_topic_order = _replay(
                [
                    raw[3]
                    for raw in read_in_input_order(svc.kafka_bootstrap, f"{run.prefix}-events")
                ],
                catalog,
            )
        finally:
            if scenario.broker_faults:  # errors no request consumed must not hit the next run
                for api in (PRODUCE, FETCH, OFFSET_COMMIT, JOIN_GROUP):
                    run.broker("CLEAR", api)
            reader.close()
            run.close()
    got = reader.out
    standing = _standing(got.alerts)
    want_alerts = _standing(expected.alerts)
    differing = conflicting = 0
    for event_id, seen in got.verdicts.items():
        distinct = {orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in seen}
        if len(distinct) > 1:
            conflicting += 1
        want = in_topic_order.verdicts.get(event_id)
        if want is not None and seen[0] != want:
            differing += 1
    return Report(
        scenario=scenario.name,
        events=len(lines),
        faults=run.faults,
        lost_alerts=len(want_alerts - standing),
        spurious_alerts=len(standing - want_alerts),
        lost_verdicts=len(expected.verdicts.keys() - got.verdicts.keys()),
        spurious_verdicts=len(got.verdicts.keys() - expected.verdicts.keys()),
        conflicting_verdicts=conflicting,
        verdicts_differing=differing,
        lost_dead_letters=max(0, expected.dead_letters - len(got.dead_letters)),
        spurious_dead_letters=max(0, len(got.dead_letters) - expected.dead_letters),
        redelivered_alert_messages=got.alert_messages - len(got.alerts),
        drain_seconds=drained,
        producers_replaced=replaced,
        state_gaps_read_back=gaps,
        late_records=late,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    chosen = [SCENARIOS[name] for name in args.scenario or SCENARIOS]
    failed = 0
    with services() as svc:
        for scenario in chosen:
            if scenario.broker_faults and svc.broker is None:
                print(f"{scenario.name:<22} skipped: needs the embedded broker", flush=True)
                continue
            report = run_scenario(scenario, svc, args.events, args.seed)
            print(report.line(), flush=True)
            print(
                f"{'':<22} faults: {', '.join(report.faults) or 'none'}; producers replaced "
                f"{report.producers_replaced:.0f}, state gaps read back "
                f"{report.state_gaps_read_back:.0f}, late records {report.late_records:.0f}",
                flush=True,
            )
            failed += not report.clean
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
