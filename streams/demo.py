"""`make run`: broker, Redis, a worker and a generated demo stream, with alerts shown live.

Starts what is missing (see `streams.services`), publishes the sample catalog, starts one worker
process, produces the demo stream, prints each alert as it arrives, then a summary; it keeps the
worker up (metrics stay readable) until Ctrl-C, then stops everything it started.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from streams.cli import follow_topic
from streams.services import free_port, services, stop_process
from topics import names


def _wait_for_worker(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {proc.returncode}; see its log above")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the worker did not serve /metrics on port {port} within {timeout}s")


def _format(alert: dict[str, Any]) -> str:
    where = alert.get("code") or alert.get("product") or ""
    return (
        f"[{alert['severity']:>8}] {alert['rule']:<22} {alert['institution']:<8} "
        f"{where:<24} events={','.join(alert['event_ids'])}"
    )


def run_demo(events: int = 3000, seed: int = 7, exit_when_done: bool = False) -> int:
    from loadtest.generator import Rates, write_dataset
    from loadtest.score import score

    exit_when_done = exit_when_done or os.environ.get("TRACEWATCH_DEMO_EXIT") == "1"
    workdir = tempfile.mkdtemp(prefix="tracewatch-demo-")
    data = write_dataset(workdir, events, seed, rates=Rates().scaled(3))
    with services() as svc:
        print(f"broker: {svc.kafka_bootstrap}{' (embedded)' if svc.kafka_embedded else ''}")
        print(f"redis:  {svc.redis_url}")
        web_port = int(os.environ.get("TRACEWATCH_WEB_PORT") or free_port())
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
            "REDIS_URL": svc.redis_url,
            "TRACEWATCH_WEB_PORT": str(web_port),
            "TRACEWATCH_CATALOG": data["catalog"],
        }
        if not svc.redis_owned:
            # A Redis we did not start may hold other data: keep ours apart.
            env["TRACEWATCH_REDIS_PREFIX"] = f"twdemo{time.time_ns()}"
        by_rule: collections.Counter[str] = collections.Counter()
        seen: list[dict[str, Any]] = []
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env)
        try:
            _wait_for_worker(web_port, worker)
            print(f"worker up; Prometheus metrics at http://127.0.0.1:{web_port}/metrics")
            subprocess.run(
                [sys.executable, "-m", "streams.cli", "produce", data["events"], "--allow-invalid"],
                env=env,
                check=True,
            )
            print("alerts as they come:")
            for value in follow_topic(
                svc.kafka_bootstrap, names.ALERTS.name, True, timeout=300, quiet=8.0
            ):
                alert = orjson.loads(value)
                seen.append(alert)
                by_rule[alert["rule"]] += 1
                print(_format(alert), flush=True)
            print("\nsummary")
            print(f"  events produced: {events} (from {data['events']})")
            for rule, count in sorted(by_rule.items()):
                print(f"  {rule:<24} {count}")
            print(f"  alerts total: {sum(by_rule.values())}")
            truth = orjson.loads(Path(data["truth"]).read_bytes())["alerts"]
            result = score(seen, truth)
            print(
                f"  against the generator's ground truth ({len(truth)} alerts): "
                f"precision {result.precision():.3f}, recall {result.recall():.3f}"
            )
            print(f"  metrics: http://127.0.0.1:{web_port}/metrics")
            if not exit_when_done:
                print("running; Ctrl-C stops the worker, broker and Redis", flush=True)
                # sigwait only sees signals that are blocked: unblocked, Ctrl-C went to Python's
                # handler, which cannot run while sigwait waits, and the demo never stopped.
                stop = {signal.SIGINT, signal.SIGTERM}
                signal.pthread_sigmask(signal.SIG_BLOCK, stop)
                signal.sigwait(stop)
        except KeyboardInterrupt:
            pass
        finally:
            stop_process(worker)
        print("stopped")
    return 0 if by_rule else 1
