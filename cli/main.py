"""`tracewatch`: the one entry point (CONTRACT.md, "Command line").

Exit codes: 0 success; 2 bad usage or settings, a bad input file (with a message naming the file
and line) or a broker or Redis that cannot be reached; 1 when the command ran and the answer is
no (no ledger for the institution, no token with that id, a loadtest that scored below 1.0, a
rebuild refused because the prefix holds state).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from cli.cases import DATABASE, add_cases_parser, cmd_cases, cmd_sink
from cli.supervision import add_institution_parser, add_report_parser
from detectors.catalog import ReferenceDataError, iter_jsonl, load_catalog
from streams.kafka_config import BrokerUnreachable, reachable
from streams.settings import Settings

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """Bad usage or input file: reported on stderr, exit code 2."""


def _open_lines(path: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            yield from fh
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None


def cmd_replay(args: argparse.Namespace) -> int:
    from detectors.pipeline import Pipeline
    from topics.records import InvalidEvent, parse_event

    catalog = load_catalog(args.catalog)
    if args.institutions:
        for _ in iter_jsonl(_open_lines(args.institutions), args.institutions):
            pass  # validated only: no rule reads institutions yet
    # the workers' grace period (TRACEWATCH_GRACE_HOURS), so replay and stream agree
    settings = Settings()
    pipeline = Pipeline(
        catalog,
        grace_seconds=settings.grace_hours * 3600,
        idle_seconds=settings.idle_hours * 3600,
    )
    from streams import gc_tuning

    gc_tuning.tune()
    dead = 0
    with contextlib.ExitStack() as files:
        out: IO[bytes] = files.enter_context(_create(args.out)) if args.out else sys.stdout.buffer
        verdicts_out: IO[bytes] | None = (
            files.enter_context(_create(args.verdicts)) if args.verdicts else None
        )
        for number, line in enumerate(_open_lines(args.events), 1):
            if not line.strip():
                continue
            try:
                event = parse_event(line)
            except InvalidEvent as exc:
                dead += 1
                print(f"{args.events} line {number}: dead letter ({exc})", file=sys.stderr)
                continue
            conflicts = len(pipeline.conflicts)
            alerts, verdicts = pipeline.process(event)
            if len(pipeline.conflicts) > conflicts:
                dead += 1
                print(
                    f"{args.events} line {number}: dead letter (conflicting_resubmission: "
                    f"event {event.event_id} of {event.institution} was sent before with "
                    "other content; the first stands)",
                    file=sys.stderr,
                )
            if alerts:
                detected = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                for alert in alerts:
                    alert.detected_at = detected
                    out.write(alert.to_json() + b"\n")
            if verdicts_out is not None:
                for verdict in verdicts:
                    verdicts_out.write(orjson.dumps(verdict) + b"\n")
    if dead:
        print(
            f"{args.events}: {dead} invalid events, skipped (the worker sends these to the "
            "dead-letter topic)" + ("" if args.allow_invalid else "; exit code 2"),
            file=sys.stderr,
        )
        return 0 if args.allow_invalid else EXIT_BAD_INPUT
    return 0


def _create(path: str) -> IO[bytes]:
    try:
        return open(path, "wb")
    except OSError as exc:
        raise BadInput(f"{path}: cannot write ({exc.strerror}); choose another --out") from None


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker
    from streams.layout import check_topics

    settings = Settings()
    # topics made for these partition counts (the state's layout: once Redis answers, in the
    # worker's start-up task - a worker may start while Redis is down)
    check_topics(settings.require_kafka())
    run_worker(settings)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.output import OutputProducer
    from topics import names
    from topics.records import normalise_id

    bootstrap = Settings().require_kafka()
    messages: list[tuple[bytes, bytes | None]] = []
    for number, line in enumerate(_open_lines(args.events), 1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        key: bytes | None = None
        try:
            obj = orjson.loads(line)
            # keyed as ingest will read it (trimmed, numbers as text): an institution sent as
            # " H1 " must land in H1's partition, or its void would miss its sale
            inst = normalise_id(obj.get("institution")) if isinstance(obj, dict) else None
            if inst is not None:
                key = inst.encode()
            elif not args.allow_invalid:
                raise BadInput(
                    f"{args.events} line {number}: not an event object with an institution"
                )
        except orjson.JSONDecodeError as exc:
            if not args.allow_invalid:
                raise BadInput(f"{args.events} line {number}: not valid JSON ({exc})") from None
        messages.append((line, key))
    reachable(bootstrap)
    producer = OutputProducer(bootstrap)
    producer.warm_up(names.EVENTS.name)
    # Keyed by institution: one institution's events stay in order in one partition.
    for value, key in messages:
        producer.produce(names.EVENTS.name, value, key)
    producer.flush_sync(60)
    print(f"produced {len(messages)} events to {names.EVENTS.name}", file=sys.stderr)
    return 0


def follow_topic(
    bootstrap: str,
    topic: str,
    from_beginning: bool,
    timeout: float | None = None,
    limit: int | None = None,
    quiet: float | None = None,
) -> Iterator[bytes]:
    """Values of a topic as they come, under a throwaway consumer group that commits nothing.
    Stops after `timeout` seconds, `limit` values, or `quiet` seconds without a new value."""
    from confluent_kafka import Consumer

    from streams.kafka_config import client_config

    consumer = Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": f"tracewatch-cli-{time.time_ns()}",
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            },
        )
    )
    consumer.subscribe([topic])
    start = last = time.monotonic()
    count = 0
    try:
        while (timeout is None or time.monotonic() - start < timeout) and (
            quiet is None or time.monotonic() - last < quiet
        ):
            for msg in consumer.consume(500, 0.2):
                value = msg.value()
                if msg.error() is None and value is not None:
                    last = time.monotonic()
                    yield value
                    count += 1
                    if limit is not None and count >= limit:
                        return
    finally:
        consumer.close()


def cmd_alerts(args: argparse.Namespace) -> int:
    from topics import names

    bootstrap = Settings().require_kafka()
    topic = names.VERDICTS.name if args.verdicts else names.ALERTS.name
    if args.verdicts and args.since is not None:
        raise BadInput("--since filters alerts by event time; verdicts carry none")
    wanted = AlertFilter(args.rule, args.institution, _since(args.since))
    reachable(bootstrap)
    shown = 0
    try:
        for value in follow_topic(
            bootstrap, topic, args.from_beginning or args.since is not None, args.timeout
        ):
            try:
                message = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(message, dict) or not wanted.matches(message):
                continue
            if args.format == "table":
                if shown % 40 == 0:
                    print(_TABLE.format(*_COLUMNS))
                print(_row(message))
            else:
                sys.stdout.buffer.write(value + b"\n")
            sys.stdout.flush()
            shown += 1
            if args.max is not None and shown >= args.max:
                break
    except KeyboardInterrupt:
        pass
    return 0


@dataclass(frozen=True)
class AlertFilter:
    rules: list[str] | None = None
    institutions: list[str] | None = None
    since: datetime.datetime | None = None

    def matches(self, message: dict[str, Any]) -> bool:
        if self.rules and not self.rules_match(message):
            return False
        if self.institutions and message.get("institution") not in self.institutions:
            return False
        if self.since is not None:
            try:
                at = datetime.datetime.fromisoformat(str(message.get("occurred_at")))
            except ValueError:
                return False
            if at.tzinfo is None or at < self.since:
                return False
        return True

    def rules_match(self, message: dict[str, Any]) -> bool:
        """An alert by its rule; a verdict by the rules of any of its lines."""
        assert self.rules
        if "verdict" in message:
            lines = message.get("lines") or ()
            return any(r in self.rules for ln in lines for r in ln.get("rules") or ())
        return message.get("rule") in self.rules


_AGE = {"m": 60, "h": 3600, "d": 86400}


def _since(text: str | None, now: float | None = None) -> datetime.datetime | None:
    if text is None:
        return None
    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in _AGE:
        at = (time.time() if now is None else now) - int(text[:-1]) * _AGE[text[-1]]
        return datetime.datetime.fromtimestamp(at, datetime.UTC)
    try:
        since = datetime.datetime.fromisoformat(text)
    except ValueError:
        since = None
    if since is None or since.tzinfo is None:
        raise BadInput(
            f"--since {text!r}: give an ISO-8601 time with its offset "
            "(2026-11-20T08:00:00+08:00) or an age (30m, 6h, 7d)"
        )
    return since


_COLUMNS = ("occurred_at", "severity", "rule", "institution", "code / product", "status")
_TABLE = "{:<25} {:<8} {:<24} {:<10} {:<28} {}"


def _row(message: dict[str, Any]) -> str:
    if "verdict" in message:  # a verdict, from --verdicts
        rules = sorted({r for line in message.get("lines") or () for r in line.get("rules", ())})
        return _TABLE.format(
            str(message.get("occurred_at", "")),
            "",
            ",".join(rules) or "-",
            str(message.get("institution", "")),
            str(message.get("settlement_id", "")),
            str(message.get("verdict", "")),
        )
    return _TABLE.format(
        str(message.get("occurred_at", "")),
        str(message.get("severity", "")),
        str(message.get("rule", "")),
        str(message.get("institution", "")),
        str(message.get("code") or message.get("product") or ""),
        str(message.get("status") or "standing"),
    )


def cmd_topics(args: argparse.Namespace) -> int:
    from cli.topics import create_topics, input_retention_ms

    bootstrap = Settings().require_kafka()
    reachable(bootstrap)
    created = create_topics(bootstrap)
    print(f"topics ready ({len(created)} created)", file=sys.stderr)
    if input_retention_ms() != "-1":
        print(
            f"warning: the input topic keeps events {input_retention_ms()} ms "
            "(TRACEWATCH_INPUT_RETENTION_MS): `tracewatch rebuild` can then rebuild only what "
            "is left - keep backups of Redis (AOF or RDB) to restore from",
            file=sys.stderr,
        )
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from streams.output import OutputProducer
    from streams.redis_state import connect
    from streams.reference import CatalogCache

    settings = Settings()
    catalog = load_catalog(args.file)

    async def publish() -> int:
        client = connect(settings.redis_url)
        producer = OutputProducer(settings.kafka_bootstrap) if settings.kafka_bootstrap else None
        try:
            cache = CatalogCache(client, settings.redis_prefix)
            before = await cache.size()
            await cache.publish(catalog, producer)
            return before
        finally:
            await client.aclose()

    before = asyncio.run(publish())
    print(
        f"catalog published: {len(catalog)} products, replacing the {before} published before "
        "(a catalog is replaced whole, never merged: publish the full list)",
        file=sys.stderr,
    )
    return 0


def _hand_over(module: str, argv: list[str]) -> int:
    """Run a tool of the local harness (`loadtest/`) in this process's place: the operator
    CLI never imports it (the production image may leave it out), it only starts it."""
    import importlib.util
    import os

    if importlib.util.find_spec(module) is None:
        raise BadInput(f"{module} is not installed here: it ships with the source checkout")
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
    return 0  # not reached: execv replaces the process


def cmd_demo(args: argparse.Namespace) -> int:
    return _hand_over("loadtest.demo", ["--events", str(args.events), "--seed", str(args.seed)])


def cmd_ledger(args: argparse.Namespace) -> int:
    from streams.ledger_view import ledger_figures
    from streams.redis_state import connect

    settings = Settings()

    async def read() -> list[dict[str, Any]]:
        client = connect(settings.redis_url)
        try:
            return await ledger_figures(client, settings, args.institution, args.product)
        finally:
            await client.aclose()

    figures = asyncio.run(read())
    if not figures:
        print(
            f"tracewatch: no ledger for {args.institution}"
            + (f" and {args.product}" if args.product else "")
            + " in Redis (is REDIS_URL / TRACEWATCH_REDIS_PREFIX the worker's?)",
            file=sys.stderr,
        )
        return 1
    for figure in figures:
        sys.stdout.buffer.write(orjson.dumps(figure) + b"\n")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from streams.rebuild import RebuildError, rebuild

    settings = Settings()
    path = args.catalog or settings.catalog_path
    if not path:
        raise BadInput("rebuild needs the catalog: --catalog FILE or TRACEWATCH_CATALOG")
    try:
        counts = rebuild(settings, load_catalog(path))
    except RebuildError as exc:
        print(f"tracewatch: {exc}", file=sys.stderr)
        return 1
    print(
        "rebuilt from {messages} input messages: {L} ledger keys, {C} codes, "
        "{seen} events remembered, {index} index entries".format(**counts)
    )
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    argv = ["--events", str(args.events), "--seed", str(args.seed)]
    argv += ["--fraud-scale", str(args.fraud_scale)]
    argv += ["--replay-only"] if args.replay_only else []
    argv += ["--dir", args.dir] if args.dir else []
    return _hand_over("loadtest.run", argv)


def cmd_api(args: argparse.Namespace) -> int:
    from api.server import serve
    from streams.layout import check_layout

    # it reads the workers' keys: the same layout; it starts without them (/readyz says so)
    check_layout(Settings(), claim=False, wait=False)
    serve()
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from api.auth import INSPECTOR, INSTITUTION, TokenStore
    from streams.redis_state import connect

    settings = Settings()

    async def run() -> int:
        client = connect(settings.redis_url)
        store = TokenStore(client, settings.redis_prefix)
        try:
            if args.action == "add":
                if args.inspector:
                    if not args.region:
                        raise BadInput("an inspector token needs --region (e.g. 330100)")
                    role, institution, region = INSPECTOR, None, args.region
                else:
                    role, institution, region = INSTITUTION, args.subject, None
                try:
                    token, grant = await store.add(
                        role, args.name or args.subject, institution, region
                    )
                except ValueError as exc:
                    raise BadInput(str(exc)) from None
                print(
                    f"token {grant.id} for {grant.role} {grant.institution or grant.region} "
                    "(shown once; store it now):",
                    file=sys.stderr,
                )
                print(token)
                return 0
            if args.action == "revoke":
                if await store.revoke(args.subject):
                    print(f"token {args.subject} revoked", file=sys.stderr)
                    return 0
                print(f"tracewatch: no token with id {args.subject!r}", file=sys.stderr)
                return 1
            for _digest, grant in await store.grants():
                if args.subject and args.subject not in (grant.institution, grant.region):
                    continue
                state = "revoked" if grant.revoked else "live"
                scope = grant.institution or f"region {grant.region}"
                print(f"{grant.id}\t{grant.role}\t{scope}\t{grant.name}\t{state}")
            return 0
        finally:
            await client.aclose()

    return asyncio.run(run())


def cmd_institutions(args: argparse.Namespace) -> int:
    from detectors.catalog import load_institutions
    from streams.redis_state import connect
    from streams.reference import InstitutionRegistry

    settings = Settings()
    institutions = load_institutions(args.file)

    async def publish() -> None:
        client = connect(settings.redis_url)
        try:
            await InstitutionRegistry(client, settings.redis_prefix).publish(institutions)
        finally:
            await client.aclose()

    asyncio.run(publish())
    print(f"institutions replaced: {len(institutions)}", file=sys.stderr)
    return 0


_KAFKA = "KAFKA_BOOTSTRAP (and KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*: streams/kafka_config.py)"
_REDIS = "REDIS_URL, TRACEWATCH_REDIS_PREFIX"
_TOPICS = "TRACEWATCH_TOPIC_PREFIX (topic names: topics/names.py)"

SHORT = {
    "replay": "run the detectors over a JSONL file in one process (no Kafka, no Redis)",
    "worker": "run the stream processor",
    "produce": "send a JSONL file of events to the input topic",
    "alerts": "follow the alerts (or verdicts) topic: JSON lines or a table, filtered",
    "topics": "create the pipeline's topics on the cluster",
    "catalog": "publish a catalog JSONL to the workers (replaces the catalog)",
    "rebuild": "rebuild the workers' Redis state from the input topic (workers stopped)",
    "ledger": "an institution's 进销存 figures per product (from Redis)",
    "loadtest": "generated stream with ground truth: score replay and stream",
    "api": "the HTTP API: ingest, pre-settlement check, code history",
    "tokens": "API tokens: add INSTITUTION | add --inspector --region R NAME | revoke ID | list",
    "institutions": "replace the institution registry (region, kind) in Redis",
    "demo": "embedded broker + Redis + worker + API + demo stream (make run)",
    "sink": "the alerts topic into the case store (PostgreSQL), exactly once per message",
    "cases": "the inspectors' cases: list | show ID | move ID STATUS | assign | move-all",
    "institution": "an institution's profile and risk score over a period (JSON)",
    "report": "the monthly supervision report of a region (JSON or CSV)",
}

# name -> (what it does, the environment it reads, an example)
HELP: dict[str, tuple[str, list[str], str]] = {
    "replay": (
        "Run the detectors over a JSONL file of events in one process, in file order, without "
        "Kafka or Redis; the alerts are the streaming pipeline's for the same input. Invalid "
        "lines are reported (file and line) and skipped; then the exit code is 2 unless "
        "--allow-invalid.",
        ["TRACEWATCH_GRACE_HOURS", "TRACEWATCH_IDLE_HOURS"],
        "tracewatch replay examples/events.jsonl --catalog examples/catalog.jsonl --out alerts.jsonl",
    ),
    "worker": (
        "Run the stream processor: consume the input topic, keep state in Redis, write alerts "
        "and verdicts. Run several for more throughput; they share the partitions.",
        [
            _KAFKA,
            _REDIS,
            _TOPICS,
            "TRACEWATCH_CATALOG",
            "TRACEWATCH_WEB_PORT (metrics)",
            "the rest: streams/settings.py",
        ],
        "KAFKA_BOOTSTRAP=kafka:9092 REDIS_URL=redis://redis:6379/0 tracewatch worker",
    ),
    "produce": (
        "Send a JSONL file of events to the input topic, keyed by institution, and wait until "
        "the broker confirmed them. A line that is not an event object stops it (exit 2) "
        "unless --allow-invalid; an unreachable broker stops it within seconds (exit 2).",
        [_KAFKA, _TOPICS],
        "tracewatch produce examples/events.jsonl",
    ),
    "alerts": (
        "Follow the alerts topic (or the verdicts topic) and print each message, as JSON lines "
        "or a table, optionally filtered by rule, institution and event time.",
        [_KAFKA, _TOPICS],
        "tracewatch alerts --from-beginning --rule DUPLICATE_SALE --since 24h --format table",
    ),
    "topics": (
        "Create every topic of the pipeline on the cluster (partitions; on the input topic "
        "LogAppendTime stamps and retention for ever, since rebuild replays it); existing "
        "topics are kept as they are.",
        [_KAFKA, _TOPICS, "TRACEWATCH_INPUT_RETENTION_MS (default -1: for ever)"],
        "tracewatch topics",
    ),
    "catalog": (
        "Publish a catalog JSONL to the workers: it replaces the catalog in Redis whole (it "
        "does not merge) and goes to the catalog topic. The file is refused, naming the line, "
        "when it is empty, lists a product twice, gives one prefix or GTIN to two products, or "
        "holds a GTIN with a bad check digit.",
        [_REDIS, "KAFKA_BOOTSTRAP (optional: the catalog topic)", _TOPICS],
        "tracewatch catalog examples/catalog.jsonl",
    ),
    "rebuild": (
        "Rebuild the workers' Redis state from the input topic (stop the workers first): the "
        "input topic is the record.",
        [_KAFKA, _REDIS, _TOPICS, "TRACEWATCH_CATALOG"],
        "tracewatch rebuild --catalog examples/catalog.jsonl",
    ),
    "ledger": (
        "Print an institution's purchase-sale-stock (进销存) figures per product, from the "
        "workers' Redis state.",
        [_REDIS],
        "tracewatch ledger P0001 XA001",
    ),
    "loadtest": (
        "Generate a stream with ground truth, run it through replay and the streaming "
        "pipeline (embedded broker and a private Redis unless set), and score both.",
        ["KAFKA_BOOTSTRAP, REDIS_URL (optional)"],
        "tracewatch loadtest --events 20000",
    ),
    "api": (
        "Serve the HTTP API: event ingest for POS/HIS (POST /v1/events), the pre-settlement "
        "check (POST /v1/settlements/check), code history (GET /v1/codes/{code}); OpenAPI at "
        "/openapi.json, docs at /docs.",
        [_KAFKA, _REDIS, _TOPICS, "TRACEWATCH_API_* (api/config.py: port 8080, limits)"],
        "TRACEWATCH_API_HOST=0.0.0.0 tracewatch api",
    ),
    "tokens": (
        "Manage API tokens, stored hashed in Redis: add one for an institution or an "
        "inspector's region (printed once), revoke by id, list.",
        [_REDIS],
        "tracewatch tokens add P0001; tracewatch tokens add --inspector --region 330100 'Hangzhou'",
    ),
    "institutions": (
        "Replace the institution registry (name, kind, 6-digit region) in Redis: inspectors' "
        "tokens read the institutions of their region.",
        [_REDIS],
        "tracewatch institutions examples/institutions.jsonl",
    ),
    "sink": (
        "Consume the alerts topic into the case store: a case per alert_id, a withdrawal "
        "closes its case (withdrawn), an alert raised again reopens it. Offsets are stored with "
        "the data, so a crash or redelivery records nothing twice. Migrates the schema first.",
        [
            _KAFKA,
            _TOPICS,
            DATABASE,
            _REDIS + " (institution regions, for inspectors' scopes)",
            "TRACEWATCH_SINK_METRICS_PORT (Prometheus metrics; unset: none)",
        ],
        "DATABASE_URL=postgresql://tw@db/tracewatch tracewatch sink",
    ),
    "cases": (
        "Work the case list: new -> seen -> investigating -> escalated -> closed, a reason "
        "for every move except to investigating, closure reasons from a fixed list; the "
        "database enforces the workflow and keeps an audit entry per change. Exit 1 when a "
        "move is refused (not allowed, no such case, changed meanwhile).",
        [DATABASE, "USER (the actor, unless --actor)"],
        "tracewatch cases move-all closed --rule INVALID_CODE --institution P1 "
        "--closure scanner_fault --reason 'counter 2 scanner faulty'",
    ),
    "institution": (
        "An institution's profile (信用画像) over a period: events, scan and code collection "
        "rates, alerts per 10,000 scans by rule, confirmed and open cases, oversold units, "
        "prices against the region's, and the risk score with its factors and its rank in "
        "the region. Read from the stream's counters and the case store.",
        [_REDIS, DATABASE, "TRACEWATCH_LEAD_DEADLINE_DAYS, TRACEWATCH_LEAD_DEADLINES"],
        "tracewatch institution P1 --since 2026-11-01 --until 2026-11-30",
    ),
    "report": (
        "The monthly supervision report of a region: institutions by kind (active, with "
        "alerts, with confirmed problems), cases opened / closed / still open, by rule, leads "
        "past the deadline, the institutions ranked by risk score, the price spread per "
        "product; --by-region adds a row per region code (a province's cities).",
        [_REDIS, DATABASE, "TRACEWATCH_LEAD_DEADLINE_DAYS, TRACEWATCH_LEAD_DEADLINES"],
        "tracewatch report --region 330100 --month 2026-11 --csv",
    ),
    "demo": (
        "What `make run` runs: broker and Redis (embedded unless set), a worker, the API, a "
        "generated demo stream partly through the API; alerts live; Ctrl-C stops everything.",
        ["KAFKA_BOOTSTRAP, REDIS_URL (optional)", "TRACEWATCH_DEMO_EXIT=1 (stop when done)"],
        "tracewatch demo --events 3000",
    ),
}


def _command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    summary, env, example = HELP[name]
    epilog = "environment:\n" + "".join(f"  {e}\n" for e in env) + f"\nexample:\n  {example}"
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=SHORT[name],
        description=summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tracewatch")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracewatch",
        description=__doc__.splitlines()[0],
        epilog="`tracewatch COMMAND --help` says what a command does, what it reads, and shows "
        "an example.",
    )
    parser.add_argument("--version", action="version", version=f"tracewatch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "replay")
    p.add_argument("events")
    p.add_argument("--catalog", required=True)
    p.add_argument("--institutions")
    p.add_argument("--out", help="alerts file (default stdout)")
    p.add_argument("--verdicts", help="write settlement verdicts to this file")
    p.add_argument(
        "--allow-invalid",
        action="store_true",
        help="exit 0 even when lines were invalid (they are still reported)",
    )
    p.set_defaults(func=cmd_replay)

    p = _command(sub, "worker")
    p.set_defaults(func=cmd_worker)

    p = _command(sub, "produce")
    p.add_argument("events")
    p.add_argument(
        "--allow-invalid",
        action="store_true",
        help="send lines that are not event objects too (they go to the dead-letter topic)",
    )
    p.set_defaults(func=cmd_produce)

    p = _command(sub, "alerts")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--max", type=int, help="stop after printing this many")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--verdicts", action="store_true", help="follow the verdicts topic instead")
    p.add_argument("--rule", action="append", help="only this rule (repeat for several)")
    p.add_argument(
        "--institution", action="append", help="only this institution (repeat for several)"
    )
    p.add_argument(
        "--since",
        help="only what occurred (event time) at or after this: an ISO-8601 time with offset, "
        "or an age like 30m, 6h, 7d; reads the topic from the beginning",
    )
    p.add_argument("--format", choices=("json", "table"), default="json")
    p.set_defaults(func=cmd_alerts)

    p = _command(sub, "topics")
    p.set_defaults(func=cmd_topics)

    p = _command(sub, "catalog")
    p.add_argument("file")
    p.set_defaults(func=cmd_catalog)

    p = _command(sub, "rebuild")
    p.add_argument("--catalog", help="catalog JSONL (default TRACEWATCH_CATALOG)")
    p.set_defaults(func=cmd_rebuild)

    p = _command(sub, "ledger")
    p.add_argument("institution")
    p.add_argument("product", nargs="?")
    p.set_defaults(func=cmd_ledger)

    p = _command(sub, "loadtest")
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fraud-scale", type=float, default=1.0, help="multiply every fraud rate")
    p.add_argument("--replay-only", action="store_true", help="skip the streaming run")
    p.add_argument("--dir", help="where to write the dataset (default: a temporary folder)")
    p.set_defaults(func=cmd_loadtest)

    p = _command(sub, "api")
    p.set_defaults(func=cmd_api)

    p = _command(sub, "tokens")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", help="make a token; it is printed once, on stdout")
    a.add_argument("subject", help="the institution code (with --inspector: the holder's name)")
    a.add_argument("--inspector", action="store_true", help="an inspector's read-only token")
    a.add_argument("--region", help="inspector's region code: 330000 province, 330100 city")
    a.add_argument("--name", help="who holds it (shown in list)")
    a = actions.add_parser("revoke", help="revoke a token by its id (from list)")
    a.add_argument("subject", metavar="ID")
    a = actions.add_parser("list", help="tokens by id, role, scope, holder, live/revoked")
    a.add_argument("subject", nargs="?", default="", help="only this institution or region")
    p.set_defaults(func=cmd_tokens)

    p = _command(sub, "institutions")
    p.add_argument("file")
    p.set_defaults(func=cmd_institutions)

    p = _command(sub, "sink")
    p.set_defaults(func=cmd_sink)

    p = _command(sub, "cases")
    add_cases_parser(p)
    p.set_defaults(func=cmd_cases)

    add_institution_parser(_command(sub, "institution"))
    add_report_parser(_command(sub, "report"))

    p = _command(sub, "demo")
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.func(args)
        return int(result or 0)
    except (BadInput, ReferenceDataError, BrokerUnreachable) as exc:
        print(f"tracewatch: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RedisConnectionError as exc:
        print(
            f"tracewatch: cannot reach Redis ({exc}): is REDIS_URL right, and is Redis up?",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # a setting that cannot work (KAFKA_BOOTSTRAP unset, a bad KAFKA_SECURITY_PROTOCOL)
        print(f"tracewatch: {exc.code}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
