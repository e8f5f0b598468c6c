"""`make run`: broker, Redis, a worker, the HTTP API and a generated demo stream, with alerts
shown live.

Starts what is missing (see `harness.services`), publishes the sample catalog, starts one worker
process and `tracewatch api` beside it, makes an API token for one institution and submits that
institution's events through `POST /v1/events` as its POS would, produces the rest of the demo
stream straight to the input topic (`tracewatch produce`), prints each alert as it arrives, then
a summary; it keeps the worker and the API up (metrics, `/docs` stay readable) until Ctrl-C, then
stops everything it started.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from cli.main import follow_topic
from harness.services import free_port, services, stop_process, wait_for_http
from topics import names


def _wait_for_worker(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    wait_for_http(f"http://127.0.0.1:{port}/metrics", proc, "worker", timeout)


def split_by_institution(events_file: str, workdir: str) -> tuple[str, list[bytes], str]:
    """The institution with most events, its lines (for the API), and a file of the rest."""
    lines = Path(events_file).read_bytes().splitlines()
    owners: list[str | None] = []
    for line in lines:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        inst = obj.get("institution") if isinstance(obj, dict) else None
        owners.append(inst if isinstance(inst, str) else None)
    counts = collections.Counter(o for o in owners if o is not None)
    chosen = counts.most_common(1)[0][0]
    rest = os.path.join(workdir, "events-rest.jsonl")
    Path(rest).write_bytes(
        b"".join(line + b"\n" for line, o in zip(lines, owners, strict=True) if o != chosen)
    )
    return chosen, [line for line, o in zip(lines, owners, strict=True) if o == chosen], rest


def submit(url: str, token: str, lines: list[bytes], batch: int = 500) -> collections.Counter[str]:
    """POST the lines as JSON lines, `batch` a request, as a POS uploads; results by status."""
    import urllib.error
    import urllib.request

    results: collections.Counter[str] = collections.Counter()
    for start in range(0, len(lines), batch):
        request = urllib.request.Request(
            f"{url}/v1/events",
            data=b"\n".join(lines[start : start + batch]),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                body = orjson.loads(answer.read())
        except urllib.error.HTTPError as exc:  # 400: every event of the batch was invalid
            body = orjson.loads(exc.read() or b"{}")
            if "results" not in body:
                raise RuntimeError(f"the API answered {exc.code}: {body}") from None
        results.update(r["status"] for r in body["results"])
    return results


def _format(alert: dict[str, Any]) -> str:
    where = alert.get("code") or alert.get("product") or ""
    return (
        f"[{alert['severity']:>8}] {alert['rule']:<22} {alert['institution']:<8} "
        f"{where:<24} events={','.join(alert['event_ids'])}"
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


_STOPS = {signal.SIGINT, signal.SIGTERM}


def _spawn(
    args: list[str], env: dict[str, str], children: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A child process, added to `children` (which the demo stops on its way out) with the stop
    signals held: a stop that arrives mid-spawn is taken once the child is on the list, not
    while it is half made and would be left running. The child starts with them unblocked."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        child = subprocess.Popen(
            args, env=env, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, held)
        )
        children.append(child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return child


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@contextlib.contextmanager
def _case_database() -> Iterator[str | None]:
    """`DATABASE_URL`, else a private PostgreSQL when its binaries are installed, else None
    (the demo runs without the case list)."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    from harness.services import PostgresServer

    try:
        server = PostgresServer().start()
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        yield None
        return
    try:
        yield server.url
    finally:
        server.stop()


def _case_count(url: str) -> int:
    """Cases the sink has recorded, once it has caught up with the alerts shown."""
    import psycopg

    last, steady = -1, 0
    for _ in range(40):
        try:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM cases").fetchone()
            count = int(row[0]) if row else 0
        except psycopg.Error:
            count = 0
        steady = steady + 1 if count == last and count > 0 else 0
        if steady >= 3:
            return count
        last = count
        time.sleep(0.25)
    return max(last, 0)


def _take_the_terminal() -> Callable[[], None]:
    """Make the demo (and what it starts) the terminal's foreground process group, and return
    how to give the terminal back. Ctrl-C then interrupts the demo, which stops everything and
    exits 0, and not `make` above it too: GNU make, interrupted, reports "*** Interrupt" and
    exits 130 whatever its recipe did. Without a terminal (CI, a supervisor) nothing changes."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return lambda: None
    try:
        before = os.tcgetpgrp(tty)
        if before != os.getpgrp():  # started in the background: leave the terminal alone
            os.close(tty)
            return lambda: None
        os.setpgid(0, 0)
        _foreground(tty, os.getpgrp())
    except OSError:
        os.close(tty)
        return lambda: None

    def give_back() -> None:
        with contextlib.suppress(OSError):
            _foreground(tty, before)
        os.close(tty)

    return give_back


def _foreground(tty: int, group: int) -> None:
    # a process outside the foreground group that sets it gets SIGTTOU unless it ignores it
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(tty, group)
    finally:
        signal.signal(signal.SIGTTOU, previous)


def run_demo(events: int = 3000, seed: int = 7, exit_when_done: bool = False) -> int:
    # SIGTERM (timeout, docker stop, systemd) at any point stops it as Ctrl-C does: what it
    # started is stopped, nothing is left behind. Python's default would end it on the spot.
    signal.signal(signal.SIGTERM, _interrupt)
    give_back = _take_the_terminal()
    try:
        # the generated files, the rest of the stream and the API token go when the demo does
        with tempfile.TemporaryDirectory(prefix="tracewatch-demo-") as workdir:
            return _run_demo(workdir, events, seed, exit_when_done)
    finally:
        give_back()


def _run_demo(workdir: str, events: int, seed: int, exit_when_done: bool) -> int:
    from loadtest.generator import Rates, write_dataset
    from loadtest.score import score

    exit_when_done = exit_when_done or os.environ.get("TRACEWATCH_DEMO_EXIT") == "1"
    data = write_dataset(workdir, events, seed, rates=Rates().scaled(3))
    with services() as svc, _case_database() as database_url:
        print(f"broker: {svc.kafka_bootstrap}{' (embedded)' if svc.kafka_embedded else ''}")
        print(f"redis:  {svc.redis_url}")
        print(f"cases:  {database_url or 'no PostgreSQL here: the case list is not started'}")
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
        if database_url:
            env["DATABASE_URL"] = database_url
        api_port = free_port()
        env["TRACEWATCH_API_PORT"] = str(api_port)
        api_url = f"http://127.0.0.1:{api_port}"
        by_rule: collections.Counter[str] = collections.Counter()
        seen: list[dict[str, Any]] = []
        children: list[subprocess.Popen[bytes]] = []
        stopped = False
        try:
            worker = _spawn([sys.executable, "-m", "cli", "worker"], env, children)
            _wait_for_worker(web_port, worker)
            print(f"worker up; Prometheus metrics at http://127.0.0.1:{web_port}/metrics")
            api = _spawn([sys.executable, "-m", "cli", "api"], env, children)
            wait_for_http(f"{api_url}/readyz", api, "API")
            print(f"API up at {api_url} (OpenAPI at {api_url}/docs)")
            inspector = None
            if database_url:
                # regions for inspectors' scopes, the sink filling the case list
                _cli(env, "institutions", data["institutions"])
                _spawn([sys.executable, "-m", "cli", "sink"], env, children)
                inspector = _cli(env, "tokens", "add", "--inspector", "--region", "330000", "demo")
            chosen, through_api, rest = split_by_institution(data["events"], workdir)
            token = _cli(env, "tokens", "add", chosen)
            results = submit(api_url, token, through_api)
            print(
                f"through the HTTP API: {len(through_api)} events of {chosen} "
                f"({', '.join(f'{n} {status}' for status, n in sorted(results.items()))})"
            )
            subprocess.run(
                [sys.executable, "-m", "cli", "produce", rest, "--allow-invalid"],
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
            # the token goes to a file only its owner reads, never to the terminal's scrollback
            token_file = Path(workdir, "api-token")
            token_file.touch(mode=0o600)
            token_file.write_text(token + "\n")
            print(f"  API: {api_url}/docs (a token for {chosen} is in {token_file})")
            if inspector is not None and database_url:
                cases_file = Path(workdir, "inspector-token")
                cases_file.touch(mode=0o600)
                cases_file.write_text(inspector + "\n")
                print(
                    f"  cases: {_case_count(database_url)} in the case store - "
                    f'curl -H "Authorization: Bearer $(cat {cases_file})" {api_url}/v1/cases '
                    f"(an inspector token for region 330000), or DATABASE_URL={database_url} "
                    "tracewatch cases list"
                )
            if not exit_when_done:
                # sigwait only sees signals that are blocked: unblocked, Ctrl-C went to Python's
                # handler, which cannot run while sigwait waits, and the demo never stopped.
                # Blocked before the line that tells a supervisor the demo is up.
                stop = {signal.SIGINT, signal.SIGTERM}
                signal.pthread_sigmask(signal.SIG_BLOCK, stop)
                print("running; Ctrl-C stops the worker, the API, broker and Redis", flush=True)
                signal.sigwait(stop)
                stopped = True
        except KeyboardInterrupt:
            stopped = True
        finally:
            for child in reversed(children):  # the API, then the worker
                stop_process(child)
        print("stopped")
    # stopped by the user: a clean stop (0); done on its own: 0 only if it showed alerts
    return 0 if by_rule or stopped else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m loadtest.demo",
        description="What `make run` runs (also `tracewatch demo`): broker and Redis (embedded "
        "unless KAFKA_BOOTSTRAP / REDIS_URL are set), a worker, the API and a generated demo "
        "stream partly through the API; alerts live; Ctrl-C stops everything.",
    )
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    return run_demo(events=args.events, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
