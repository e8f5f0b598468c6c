"""`tracewatch institution ID` and `tracewatch report`: the inspectors' profile of an
institution and the monthly supervision report, from Redis (the stream's counters and the
institution registry) and the case store."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from cli.cases import database_url

T = TypeVar("T")


def _with_sources(body: Callable[..., Awaitable[T]]) -> T:
    """Run `body(reader, registry, store, deadlines)` against REDIS_URL and DATABASE_URL."""
    from psycopg_pool import AsyncConnectionPool

    from cases.store import CaseStore, Deadlines
    from streams.redis_state import ActivityReader, connect
    from streams.reference import InstitutionRegistry
    from streams.settings import Settings
    from topics import names

    settings = Settings()
    url = database_url()
    try:
        deadlines = Deadlines.parse(settings.lead_deadline_days, settings.lead_deadlines)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    async def run() -> T:
        client = connect(settings.redis_url)
        if hasattr(client, "initialize"):
            await client.initialize()
        try:
            async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
                return await body(
                    ActivityReader(client, settings.redis_prefix, names.EVENTS.partitions),
                    InstitutionRegistry(client, settings.redis_prefix),
                    CaseStore(pool),
                    deadlines,
                )
        finally:
            await client.aclose()

    return asyncio.run(run())


def cmd_institution(args: argparse.Namespace) -> int:
    from supervision.figures import Period, PeriodError
    from supervision.profile import institution_profile

    try:
        period = Period.days(args.since, args.until, datetime.date.today())
    except PeriodError as exc:
        raise SystemExit(str(exc)) from None

    async def body(reader: Any, registry: Any, store: Any, deadlines: Any) -> dict[str, Any]:
        return await institution_profile(
            args.institution, period, reader, registry, store, deadlines
        )

    profile = _with_sources(body)
    sys.stdout.buffer.write(orjson.dumps(profile, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from supervision.figures import Period, PeriodError
    from supervision.report import report_csv, supervision_report

    try:
        Period.month(args.month)
    except PeriodError as exc:
        raise SystemExit(str(exc)) from None
    if not (len(args.region) == 6 and args.region.isdigit()):
        raise SystemExit(f"--region {args.region!r} is a 6-digit region code (e.g. 330100)")

    async def body(reader: Any, registry: Any, store: Any, deadlines: Any) -> dict[str, Any]:
        return await supervision_report(
            args.region, args.month, reader, registry, store, deadlines, args.by_region
        )

    report = _with_sources(body)
    if args.csv:
        sys.stdout.write(report_csv(report))
    else:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def add_institution_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("institution")
    p.add_argument("--since", help="first day, YYYY-MM-DD (default: 29 days before --until)")
    p.add_argument("--until", help="last day, YYYY-MM-DD (default: today)")
    p.set_defaults(func=cmd_institution)


def add_report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", required=True, help="6-digit region: 330000 a province, ...")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--by-region", action="store_true", help="a row per region code as well")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="the main table as CSV")
    form.add_argument("--json", action="store_true", help="the whole report as JSON (default)")
    p.set_defaults(func=cmd_report)
