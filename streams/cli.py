"""`tracewatch`: the one entry point (CONTRACT.md, "Command line").

Exit codes: 0 success; 2 bad usage or a bad input file, with a message naming the file and line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import orjson

from detectors.catalog import ReferenceDataError, iter_jsonl, load_catalog
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
        out: IO[bytes] = (
            files.enter_context(open(args.out, "wb")) if args.out else sys.stdout.buffer
        )
        verdicts_out: IO[bytes] | None = (
            files.enter_context(open(args.verdicts, "wb")) if args.verdicts else None
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
            f"{dead} invalid events (the worker sends these to the dead-letter topic)",
            file=sys.stderr,
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker

    run_worker(Settings())
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
    try:
        for value in follow_topic(bootstrap, topic, args.from_beginning, args.timeout, args.max):
            sys.stdout.buffer.write(value + b"\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from streams.services import create_topics

    created = create_topics(Settings().require_kafka())
    print(f"topics ready ({len(created)} created)", file=sys.stderr)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from streams.output import OutputProducer
    from streams.redis_state import connect
    from streams.reference import CatalogCache

    settings = Settings()
    catalog = load_catalog(args.file)

    async def publish() -> None:
        client = connect(settings.redis_url)
        producer = OutputProducer(settings.kafka_bootstrap) if settings.kafka_bootstrap else None
        try:
            await CatalogCache(client, settings.redis_prefix).publish(catalog, producer)
        finally:
            await client.aclose()

    asyncio.run(publish())
    print(f"catalog published: {len(catalog)} products", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(events=args.events, seed=args.seed)


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
    from loadtest.generator import Rates
    from loadtest.run import run_loadtest

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


def cmd_api(args: argparse.Namespace) -> int:
    from api.server import serve

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracewatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="run the detectors over a JSONL file, in one process")
    p.add_argument("events")
    p.add_argument("--catalog", required=True)
    p.add_argument("--institutions")
    p.add_argument("--out", help="alerts file (default stdout)")
    p.add_argument("--verdicts", help="write settlement verdicts to this file")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("worker", help="run the stream processor (KAFKA_BOOTSTRAP, REDIS_URL)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("produce", help="send a JSONL file of events to the input topic")
    p.add_argument("events")
    p.add_argument(
        "--allow-invalid",
        action="store_true",
        help="send lines that are not event objects too (they go to the dead-letter topic)",
    )
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("alerts", help="follow the alerts topic and print alerts")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--max", type=int, help="stop after this many")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--verdicts", action="store_true", help="follow the verdicts topic instead")
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("topics", help="create the pipeline's topics on KAFKA_BOOTSTRAP")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("catalog", help="publish a catalog JSONL to the workers (Redis and topic)")
    p.add_argument("file")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser(
        "rebuild", help="rebuild the workers' Redis state from the input topic (workers stopped)"
    )
    p.add_argument("--catalog", help="catalog JSONL (default TRACEWATCH_CATALOG)")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("ledger", help="an institution's 进销存 figures per product (from Redis)")
    p.add_argument("institution")
    p.add_argument("product", nargs="?")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser(
        "loadtest", help="generated stream with ground truth: score replay and stream"
    )
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fraud-scale", type=float, default=1.0, help="multiply every fraud rate")
    p.add_argument("--replay-only", action="store_true", help="skip the streaming run")
    p.add_argument("--dir", help="where to write the dataset (default: a temporary folder)")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser(
        "api",
        help="the HTTP API: event ingest, pre-settlement check, code history (port "
        "TRACEWATCH_API_PORT, default 8080)",
    )
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "tokens",
        help="API tokens: add INSTITUTION | add --inspector --region R NAME | revoke ID | list",
    )
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

    p = sub.add_parser(
        "institutions", help="replace the institution registry (JSONL: region, kind) in Redis"
    )
    p.add_argument("file")
    p.set_defaults(func=cmd_institutions)

    p = sub.add_parser("demo", help="embedded broker + Redis + worker + demo stream (make run)")
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
    except (BadInput, ReferenceDataError) as exc:
        print(f"tracewatch: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
