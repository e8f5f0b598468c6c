"""`make loadtest` (`python -m loadtest.run`; `tracewatch loadtest` starts it): generate a stream with ground truth, run it through
replay and through the streaming pipeline, and score both.

Prints precision and recall per rule, false alerts per 10,000 scans, and every difference
between replay's alerts and the stream's. The stream runs on its own topic and Redis prefix,
against `KAFKA_BOOTSTRAP`/`REDIS_URL` when set, else on an embedded broker and a private Redis.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detectors.catalog import load_catalog
from detectors.pipeline import Pipeline
from harness.services import Services
from loadtest.generator import Rates, write_dataset
from loadtest.score import Score, count_scans, score
from topics.records import InvalidEvent, parse_event

ROOT = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class LoadtestResult:
    events: int
    scans: int
    truth: list[str]
    replay_alerts: list[dict[str, Any]]
    replay: Score
    stream_alerts: list[dict[str, Any]] = field(default_factory=list)
    stream: Score | None = None
    only_in_replay: list[str] = field(default_factory=list)
    only_in_stream: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"events: {self.events}, code scans: {self.scans}, truth: {len(self.truth)}"]
        lines += ["", "replay", self.replay.table(self.scans)]
        if self.stream is not None:
            lines += ["", "stream", self.stream.table(self.scans)]
            lines.append(
                f"replay vs stream: {len(self.only_in_replay)} alerts only in replay, "
                f"{len(self.only_in_stream)} only in the stream"
            )
            lines += [f"  only in replay: {k}" for k in self.only_in_replay[:20]]
            lines += [f"  only in stream: {k}" for k in self.only_in_stream[:20]]
        return "\n".join(lines)


def standing(alerts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The alerts raised and not withdrawn, from the last message of each alert id."""
    return [a for a in alerts.values() if a.get("status") is None]


def replay_file(events_path: str, catalog_path: str) -> list[dict[str, Any]]:
    """The alerts standing after replaying the file."""
    pipeline = Pipeline(load_catalog(catalog_path))
    alerts: dict[str, dict[str, Any]] = {}
    with open(events_path, "rb") as fh:
        for line in fh:
            try:
                event = parse_event(line)
            except InvalidEvent:
                continue
            found, _ = pipeline.process(event)
            alerts.update((a.alert_id, a.to_dict()) for a in found)
    return standing(alerts)


def run_loadtest(
    events: int,
    seed: int = 7,
    stream: bool = True,
    workdir: str | None = None,
    rates: Rates | None = None,
    timeout: float = 600,
    progress: bool = False,
    svc: Services | None = None,
) -> LoadtestResult:
    """`svc`: broker and Redis to use (tests pass theirs); default: `harness.services`."""
    workdir = workdir or tempfile.mkdtemp(prefix="tracewatch-loadtest-")
    data = write_dataset(workdir, events, seed, rates=rates or Rates())
    truth: list[str] = orjson.loads(Path(data["truth"]).read_bytes())["alerts"]
    raw = Path(data["events"]).read_bytes().splitlines()
    started = time.monotonic()
    replayed = replay_file(data["events"], data["catalog"])
    if progress:
        print(f"replay: {len(raw)} events in {time.monotonic() - started:.1f}s", file=sys.stderr)
    result = LoadtestResult(
        events=len(raw),
        scans=count_scans(raw),
        truth=truth,
        replay_alerts=replayed,
        replay=score(replayed, truth),
    )
    if stream:
        result.stream_alerts = stream_file(
            data, {a["alert_id"] for a in replayed}, timeout, progress, svc
        )
        result.stream = score(result.stream_alerts, truth)
        mine = {a["alert_id"] for a in replayed}
        theirs = {a["alert_id"] for a in result.stream_alerts}
        result.only_in_replay = sorted(mine - theirs)
        result.only_in_stream = sorted(theirs - mine)
    return result


def stream_file(
    data: dict[str, str],
    expected: set[str],
    timeout: float,
    progress: bool = False,
    given: Services | None = None,
) -> list[dict[str, Any]]:
    """The alerts standing after a worker ran the file, read until the standing ids are
    `expected` or nothing came for a while after the input was consumed."""
    from cli.main import follow_topic
    from harness.services import free_port, pipeline_env, services, stop_process
    from loadtest.demo import _wait_for_worker

    prefix = f"twload{time.time_ns()}"
    with contextlib.nullcontext(given) if given is not None else services() as svc:
        svc.create_topics(prefix)
        port = free_port()
        env = pipeline_env(svc, prefix, data["catalog"], TRACEWATCH_WEB_PORT=str(port))
        worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, cwd=ROOT)
        try:
            _wait_for_worker(port, worker)
            subprocess.run(
                [sys.executable, "-m", "cli", "produce", data["events"], "--allow-invalid"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            alerts: dict[str, dict[str, Any]] = {}
            topic = f"{prefix}-alerts"
            for n, value in enumerate(
                follow_topic(svc.kafka_bootstrap, topic, True, timeout=timeout, quiet=60), 1
            ):
                alert = orjson.loads(value)
                alerts[alert["alert_id"]] = alert
                if progress and n % 500 == 0:
                    print(f"stream: {n} alert messages", file=sys.stderr)
                if n % 20 == 0 and {a["alert_id"] for a in standing(alerts)} == expected:
                    break
            # then everything on the topic, so alerts beyond replay's count are seen too
            for value in follow_topic(svc.kafka_bootstrap, topic, True, timeout=60, quiet=3.0):
                alert = orjson.loads(value)
                alerts[alert["alert_id"]] = alert
            return standing(alerts)
        finally:
            stop_process(worker)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when replay (and the stream) scored precision and recall 1.0, else 1."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description="`make loadtest` (also `tracewatch loadtest`): a generated stream with "
        "ground truth through replay and the streaming pipeline (embedded broker and a private "
        "Redis unless KAFKA_BOOTSTRAP / REDIS_URL are set), both scored.",
    )
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fraud-scale", type=float, default=1.0, help="multiply every fraud rate")
    parser.add_argument("--replay-only", action="store_true", help="skip the streaming run")
    parser.add_argument("--dir", help="where to write the dataset (default: a temporary folder)")
    args = parser.parse_args(argv)
    result = run_loadtest(
        args.events,
        args.seed,
        stream=not args.replay_only,
        workdir=args.dir,
        rates=Rates().scaled(args.fraud_scale),
        progress=True,
    )
    print(result.report())
    perfect = result.replay.precision() == result.replay.recall() == 1.0
    if result.stream is not None:
        perfect = perfect and result.stream.precision() == result.stream.recall() == 1.0
    return 0 if perfect else 1


if __name__ == "__main__":
    sys.exit(main())
