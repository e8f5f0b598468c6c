"""`make bench`: throughput, latency, state size and memory, measured together on this machine.

One run, one broker, one Redis, the workers - all on the same cores:
(a) baseline: consume the input topic and `orjson.loads` every value (confluent-kafka, batches);
(a2) peer: the hand-rolled confluent-kafka + dict program (`loadtest/peers/`) on the same topic;
(b) end to end: the full pipeline on a stream produced while the workers run, until every
    settlement has its verdict (events/s and code scans/s), and its ratio to (a);
(c) latency from an event's produce to its alert, at half of (b)'s rate (alerts decided on
    arrival; the parked checks wait for event time by design), on a fresh pipeline;
(d) replay: `tracewatch replay` in a child process, events per CPU second (one core), CPU and
    (valgrind installed) instructions per event, start-up taken off (`loadtest/replay_bench.py`);
(e) bytes of per-code state at rest (Redis MEMORY USAGE of the code stage's hashes / codes);
(f) peak RSS of a worker;
(g) CPU per event during (b), per process kind (workers, Redis, broker; /proc);
(h) Redis script calls and commands per event during (b) (INFO commandstats);
(i) the API's pre-settlement check on (b)'s state at rest: p50/p99 at 1,000 checks/s of 4 codes
    each, open loop (`loadtest/api_bench.py`).
Prints a table and writes loadtest/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from harness.services import stop_process
from loadtest.generator import START, write_dataset
from loadtest.replay_bench import measure as measure_replay
from loadtest.run import ROOT

RESULTS = Path(__file__).with_name("RESULTS.md")


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _lines(path: str) -> list[bytes]:
    return [line for line in Path(path).read_bytes().splitlines() if line.strip()]


def _key(line: bytes) -> bytes | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    inst = obj.get("institution") if isinstance(obj, dict) else None
    return inst.encode() if isinstance(inst, str) else None


# The input producer stands for a gateway batching POS and HIS uploads. The embedded broker
# returns one message set per partition per fetch, so 5 ms message sets (~1 event per partition
# at these rates) cap live intake at ~1,000-2,000 events/s whatever the workers do; 50 ms sets
# hold a few events each. Real Kafka returns every set a fetch has room for. The linger is part
# of the measured latency.
INPUT_LINGER_MS = 50


def produce(
    bootstrap: str,
    topic: str,
    lines: list[bytes],
    rate: float | None = None,
    linger_ms: int = INPUT_LINGER_MS,
) -> dict[str, float]:
    """Produce `lines` (at `rate` per second, or as fast as possible); returns event_id ->
    produce time for events with ids."""
    from confluent_kafka import Producer

    from streams.output import producer_config

    producer = Producer(producer_config(bootstrap, **{"linger.ms": linger_ms}))
    sent: dict[str, float] = {}
    start = time.monotonic()
    for i, line in enumerate(lines):
        if rate is not None:
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        key = _key(line)
        while True:
            try:
                producer.produce(topic, line, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if key is not None and rate is not None:
            event_id = _safe(line).get("event_id")
            if event_id is not None:
                sent[f"{key.decode()}|{event_id}"] = time.time()
    producer.flush(60)
    return sent


def topic_total(bootstrap: str, topic: str, partitions: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
            for p in range(partitions)
        )
    finally:
        consumer.close()


def baseline(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    """(a): read `count` messages from the beginning and parse each; messages per second.
    Partitions are assigned, not subscribed: no group join or rebalance inside the timing."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-baseline-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 20,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    seen = 0
    start = None
    while seen < count:
        # never more than remain: consume() waits its full timeout for a batch to fill
        batch = consumer.consume(min(1000, count - seen), 1.0)
        if batch and start is None:
            start = time.perf_counter()
        for msg in batch:
            if msg.error() is None:
                _safe(msg.value() or b"")
                seen += 1
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    return seen / elapsed if elapsed else 0.0


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_counters(redis_url: str) -> dict[str, float]:
    """The Redis server's pid, and what it ran so far: script calls, and the commands run
    (inside scripts and outside)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        server = client.info("server")
        stats = client.info("commandstats")
    finally:
        client.close()
    inner = sum(
        v["calls"]
        for k, v in stats.items()
        if k not in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_info")
    )
    sent = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    return {"pid": float(server["process_id"]), "sent": float(sent), "commands": float(inner)}


class Costs:
    """CPU of every process and Redis commands over one phase of the bench, per event."""

    def __init__(self, pool: Workers, svc: Any) -> None:
        self._pids = {
            "workers": [proc.pid for proc, _ in pool.procs],
            "redis": [int(redis_counters(svc.redis_url)["pid"])],
            "broker": [svc.broker.pid] if getattr(svc, "broker", None) is not None else [],
        }
        self._svc = svc
        self._start = self._sample()

    def _sample(self) -> dict[str, float]:
        sample = {k: sum(map(cpu_seconds, pids)) for k, pids in self._pids.items()}
        counters = redis_counters(self._svc.redis_url)
        sample["redis_sent"] = counters["sent"]
        sample["redis_commands"] = counters["commands"]
        return sample

    def per_event(self, events: int) -> dict[str, float]:
        end = self._sample()
        delta = {k: end[k] - self._start[k] for k in end}
        out = {f"cpu_us_{k}": delta[k] / events * 1e6 for k in self._pids}
        out["cpu_us_total"] = sum(out[f"cpu_us_{k}"] for k in self._pids)
        out["redis_sent_per_event"] = delta["redis_sent"] / events
        out["redis_commands_per_event"] = delta["redis_commands"] / events
        return out


class Workers:
    def __init__(self, env: dict[str, str], count: int) -> None:
        from harness.services import free_port

        self.procs: list[tuple[subprocess.Popen[bytes], int]] = []
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker"],
                env={**env, "TRACEWATCH_WEB_PORT": str(port)},
                cwd=ROOT,
            )
            self.procs.append((proc, port))
        from loadtest.demo import _wait_for_worker

        for proc, port in self.procs:
            _wait_for_worker(port, proc, timeout=90)

    def _metric(self, pattern: str) -> list[float]:
        """Per worker, the sum of the samples of its `/metrics` matching `pattern` (a regex
        for the sample's name and labels)."""
        import re
        import urllib.request

        sample = re.compile(rf"^{pattern} (\S+)$", re.M)
        sums = []
        for _, port in self.procs:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            sums.append(sum(float(v) for v in sample.findall(text)))
        return sums

    def assigned(self) -> list[int]:
        """Partitions of the input topic each worker holds."""
        held = self._metric(r'tracewatch_assigned_partitions\{topic="[^"]*-events"\}')
        return [int(n) for n in held]

    def processed(self, stage: str) -> int:
        """Input messages a stage has finished, all workers together."""
        name = r"tracewatch_processing_latency_seconds_count"
        return int(sum(self._metric(rf'{name}\{{stage="{stage}"\}}')))

    def wait_settled(self, partitions: int, timeout: float = 180) -> None:
        """Until every worker holds a share of the input topic and they hold all of it: a
        throughput figure must not include the group forming (on the embedded broker each
        rebalance waits out a session timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self.assigned()
            if sum(held) == partitions and all(held):
                return
            time.sleep(0.5)
        raise RuntimeError(f"workers hold {self.assigned()} of {partitions} partitions")

    def peak_rss_mb(self) -> float:
        return max(peak_rss_mb(proc.pid) for proc, _ in self.procs)

    def stop(self) -> None:
        for proc, _ in self.procs:
            proc.terminate()
        for proc, _ in self.procs:
            stop_process(proc)


def state_bytes_per_code(redis_url: str, prefix: str) -> tuple[float, int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    total_bytes = 0
    codes = 0
    for key in client.scan_iter(match=f"{prefix}:{{C*}}:s:*", count=1000):
        total_bytes += client.memory_usage(key, samples=0) or 0
        codes += client.hlen(key)
    return (total_bytes / codes if codes else 0.0), codes


def run(
    events: int,
    workers: int,
    latency_seconds: float,
    linger_ms: int = INPUT_LINGER_MS,
    api_rate: float = 1000,
    api_seconds: float = 20,
) -> dict[str, Any]:
    from harness.services import pipeline_env, services
    from topics.names import all_topics

    workdir = tempfile.mkdtemp(prefix="tracewatch-bench-")
    log(f"generating {events} events")
    days = max(8.0, events / 20000)
    data = write_dataset(workdir, events, seed=99, days=days)
    lines = _lines(data["events"])
    scans = sum(
        len(ln.get("codes") or ()) for e in map(_safe, lines) for ln in e.get("lines") or ()
    )
    settlements = len(
        {
            (e["institution"], e["event_id"])
            for e in map(_safe, lines)
            if e.get("type") == "settlement"
        }
    )
    expected_codes = sum(1 for _ in lines) * 2
    results: dict[str, Any] = {"events": len(lines), "scans": scans}

    log("replay: tracewatch replay in a child process")
    replay = measure_replay(data["events"], data["catalog"])
    results["replay_eps"] = replay["replay_eps_per_core"]
    results["replay_cpu_us"] = replay["replay_cpu_us"]
    results["replay_instructions"] = replay.get("replay_instructions")
    log(f"replay: {results['replay_eps']:,.0f} events per CPU second")

    with services() as svc:
        prefix = f"twbench{time.time_ns()}"
        svc.create_topics(prefix)
        topics = {spec.name.rsplit("-", 1)[-1]: spec for spec in all_topics(prefix)}
        events_topic = f"{prefix}-events"
        verdicts_topic = f"{prefix}-verdicts"
        buckets = max(1, expected_codes // 16 // 100)
        env = pipeline_env(svc, prefix, data["catalog"], TRACEWATCH_STATE_BUCKETS=str(buckets))
        log(f"starting {workers} worker(s)")
        pool = Workers(env, workers)
        try:
            pool.wait_settled(topics["events"].partitions)
            log(f"workers hold {pool.assigned()} input partitions")
            log(f"end to end: producing {len(lines)} events while the workers run")
            costs = Costs(pool, svc)
            start = time.perf_counter()
            producer = threading.Thread(
                target=produce, args=(svc.kafka_bootstrap, events_topic, lines, None, linger_ms)
            )
            producer.start()
            last_report = 0.0
            while True:
                done = topic_total(
                    svc.kafka_bootstrap, verdicts_topic, topics["verdicts"].partitions
                )
                now = time.perf_counter()
                if now - last_report > 5:
                    log(f"  {done}/{settlements} verdicts after {now - start:.0f}s")
                    last_report = now
                if done >= settlements and drained(pool, svc.kafka_bootstrap, prefix, len(lines)):
                    break
                if now - start > 1800:
                    raise RuntimeError(f"only {done} of {settlements} verdicts after 30 min")
                time.sleep(0.2)
            elapsed = time.perf_counter() - start
            producer.join()
            results.update(costs.per_event(len(lines)))
            results["stream_eps"] = len(lines) / elapsed
            results["stream_scans_per_s"] = scans / elapsed
            log(f"end to end: {results['stream_eps']:,.0f} events/s")

            bpc, codes = state_bytes_per_code(svc.redis_url, prefix)
            results["state_bytes_per_code"] = bpc
            results["codes"] = codes
            results["peak_rss_mb"] = pool.peak_rss_mb()
        finally:
            pool.stop()
        # the check reads what the workers left; they are stopped, as they would run elsewhere
        from loadtest import api_bench

        results["api"] = api_bench.run(
            env, svc.redis_url, prefix, [_safe(ln) for ln in lines], api_rate, api_seconds
        )
        # Latency on a fresh pipeline: the generated streams compress days of event time into
        # seconds, so on the first pipeline every check the first stream parked (grace: days)
        # would fall due at once in the window - a burst steady traffic never produces.
        rate = results["stream_eps"] / 2
        fresh = f"{prefix}l"
        svc.create_topics(fresh)
        env = pipeline_env(svc, fresh, data["catalog"], TRACEWATCH_STATE_BUCKETS="64")
        pool = Workers(env, workers)
        try:
            pool.wait_settled(topics["events"].partitions)
            log(f"latency: {latency_seconds:.0f}s of fresh traffic at {rate:,.0f} events/s")
            results["latency"] = latency(
                svc.kafka_bootstrap, fresh, rate, latency_seconds, workdir, days, linger_ms
            )
        finally:
            pool.stop()
        # with the workers stopped: the baseline gets the cores the pipeline had
        log("baseline: consume + orjson.loads the same input topic")
        results["baseline_eps"] = baseline(
            svc.kafka_bootstrap, events_topic, topics["events"].partitions, len(lines)
        )
        results["ratio"] = results["stream_eps"] / results["baseline_eps"]
        log("peer: confluent-kafka + a dict, one process, the same input topic")
        from loadtest.peers import dict_peer

        svc.create_topics(f"{prefix}p")  # somewhere for its alerts
        results["peer_eps"], results["peer_alerts"] = dict_peer.run(
            svc.kafka_bootstrap,
            events_topic,
            topics["events"].partitions,
            len(lines),
            f"{prefix}p-alerts",
        )
        results["peer_ratio"] = results["stream_eps"] / results["peer_eps"]
    results["workers"] = workers
    results["linger_ms"] = linger_ms
    return results


def drained(pool: Workers, bootstrap: str, prefix: str, events: int) -> bool:
    """Every stage has finished every message of its input topic: the verdicts alone do not
    say so (receipts and stock counts feed no verdict)."""
    from topics.names import all_topics

    if pool.processed("ingest") < events:
        return False
    specs = {spec.name: spec for spec in all_topics(prefix)}
    for stage, suffix in (
        ("ledger", "by-ledger"),
        ("code", "by-code"),
        ("verdict", "verdict-parts"),
    ):
        spec = specs[f"{prefix}-{suffix}"]
        if pool.processed(stage) < topic_total(bootstrap, spec.name, spec.partitions):
            return False
    return True


def _safe(line: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def latency(
    bootstrap: str,
    prefix: str,
    rate: float,
    seconds: float,
    workdir: str,
    after_days: float,
    linger_ms: int = INPUT_LINGER_MS,
) -> dict[str, float]:
    """Produce a second, fresh stream at `rate`; match each alert decided on arrival to its
    triggering event's produce time: the latest produced of the events it cites (an alert that
    joins two events is decided when the second arrives, whichever of them is older in event
    time). A withdrawal counts from the events that explain it; one that event time alone
    decided (it explains nothing by an event) is left out, as are the parked rules."""
    from confluent_kafka import Consumer

    count = int(rate * seconds)
    # right after the first stream in event time: the watermarks move on as in real life
    data = write_dataset(
        os.path.join(workdir, "latency"),
        count,
        seed=123,
        days=8.0,
        start=START + timedelta(days=after_days),
    )
    lines = _lines(data["events"])
    # fresh ids and institutions: nothing collides with the first stream's state
    lines = [ln.replace(b'"P0', b'"Q0') for ln in lines]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-latency-{time.time_ns()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.subscribe([f"{prefix}-alerts"])
    consumer.consume(1, 3.0)  # join the group before producing
    sent: dict[str, float] = {}
    thread = threading.Thread(
        target=lambda: sent.update(produce(bootstrap, f"{prefix}-events", lines, rate, linger_ms))
    )
    thread.start()
    samples: list[float] = []
    deadline = time.monotonic() + seconds + 30
    parked = {"NO_PROVENANCE", "OVERSOLD", "STOCK_COUNT_MISMATCH"}
    pending: list[tuple[list[str], float]] = []
    while time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            if msg.error() is not None:
                continue
            alert = orjson.loads(msg.value() or b"{}")
            if alert.get("rule", "") in parked:
                continue
            if alert.get("status") and not alert["evidence"].get("explained_by"):
                continue
            keys = [f"{alert['institution']}|{eid}" for eid in alert["event_ids"]]
            pending.append((keys, msg.timestamp()[1] / 1000))
        if not thread.is_alive() and time.monotonic() > deadline - 25:
            break
    thread.join()
    consumer.close()
    for keys, at in pending:
        produced = [sent[key] for key in keys if key in sent]
        if produced:
            samples.append((at - max(produced)) * 1000)
    if not samples:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    samples.sort()
    return {
        "p50": statistics.median(samples),
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "n": len(samples),
    }


def machine() -> str:
    cpus = os.cpu_count()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpus} cores {model}, Python {platform.python_version()}"


def _instructions(count: float | None) -> str:
    return f"{count:,.0f}" if count is not None else "valgrind not installed"


def write_results(results: dict[str, Any]) -> str:
    lat = results["latency"]
    api = results["api"]
    table = f"""# Benchmark results

Measured by `make bench` on {datetime.date.today().isoformat()}, {machine()}.
Broker (embedded librdkafka cluster), Redis and {results["workers"]} worker process(es) on the
same machine. Input: {results["events"]:,} generated events, {results["scans"]:,} code scans,
produced with linger.ms={results["linger_ms"]} (a gateway batching uploads; see `INPUT_LINGER_MS`).

| figure | value |
|---|---|
| (a) baseline: consume + orjson.loads | {results["baseline_eps"]:,.0f} events/s |
| (b) end to end, full pipeline | {results["stream_eps"]:,.0f} events/s ({results["stream_scans_per_s"]:,.0f} scans/s) |
| (b)/(a) | {results["ratio"]:.3f} |
| (a2) peer: confluent-kafka + a dict, one process (`loadtest/peers/dict_peer.py`; resale alerts only, no recoverable state) | {results["peer_eps"]:,.0f} events/s ({results["peer_alerts"]:,} alerts) |
| (b)/(a2) | {results["peer_ratio"]:.3f} |
| (c) produce -> alert at half load (fresh pipeline), p50 / p99 | {lat["p50"]:.0f} ms / {lat["p99"]:.0f} ms ({lat["n"]} alerts) |
| (d) replay (`tracewatch replay`), one process: events per CPU second / CPU per event / instructions per event | {results["replay_eps"]:,.0f} events/s / {results["replay_cpu_us"]:.0f} us / {_instructions(results["replay_instructions"])} |
| (e) per-code state at rest | {results["state_bytes_per_code"]:.1f} B/code ({results["codes"]:,} codes) |
| (f) peak RSS of a worker | {results["peak_rss_mb"]:.0f} MB |
| (g) CPU per event during (b): workers / Redis / broker / all | {results["cpu_us_workers"]:.0f} / {results["cpu_us_redis"]:.0f} / {results["cpu_us_broker"]:.0f} / {results["cpu_us_total"]:.0f} us |
| (h) Redis per event during (b): script calls / commands run (inside scripts too) | {results["redis_sent_per_event"]:.2f} / {results["redis_commands_per_event"]:.1f} |
| (i) `POST /v1/settlements/check`, 4 codes, {api["processes"]} API processes, {api["rate"]:,.0f}/s open loop for {api["n"]:,} checks (achieved {api["achieved"]:,.0f}/s): p50 / p99 / p99.9 / max | {api["p50"]:.1f} / {api["p99"]:.1f} / {api["p999"]:.1f} / {api["max"]:.0f} ms ({api["failed"]} not 200) |
| (i) CPU per check: API processes / Redis | {api["cpu_us_api"]:.0f} / {api["cpu_us_redis"]:.0f} us |

streaming throughput: {results["stream_eps"]:.0f} events/s
ratio to baseline: {results["ratio"]:.3f}
replay throughput: {results["replay_eps"]:.0f} events/s per core
p99 latency: {lat["p99"]:.0f} ms
state bytes per code: {results["state_bytes_per_code"]:.1f}
check p99 at {api["rate"]:.0f}/s: {api["p99"]:.1f} ms
"""
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-seconds", type=float, default=20)
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=INPUT_LINGER_MS,
        help="linger of the input producer (part of the measured latency)",
    )
    parser.add_argument("--api-rate", type=float, default=1000, help="checks per second")
    parser.add_argument("--api-seconds", type=float, default=20)
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    results = run(
        args.events,
        args.workers,
        args.latency_seconds,
        args.linger_ms,
        args.api_rate,
        args.api_seconds,
    )
    text = write_results(results)
    print(text)
    if not args.no_write:
        previous = RESULTS.read_text() if RESULTS.exists() else ""
        history = (
            previous.split("\n## Earlier runs\n", 1)[1] if "## Earlier runs" in previous else ""
        )
        latest = previous.split("\n## Earlier runs\n", 1)[0] if previous else ""
        kept = "\n".join(
            line for line in latest.splitlines() if line.startswith("| (b) end to end")
        )
        RESULTS.write_text(
            text + "\n## Earlier runs\n" + (f"- {kept}\n" if kept else "") + history.lstrip("\n")
        )
        log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
