"""`tracewatch sink` and `tracewatch cases ...`: the inspectors' case store from the shell."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from typing import Any

import orjson

from cases import workflow

DATABASE = "DATABASE_URL (PostgreSQL of the case store, e.g. postgresql://user@db/tracewatch)"


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise SystemExit(
            "DATABASE_URL is not set: point it at the case store's PostgreSQL "
            "(postgresql://user:password@host:5432/dbname)"
        )
    return url


def cmd_sink(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from cases.sink import run_sink
    from streams.kafka_config import reachable
    from streams.redis_state import connect_sync
    from streams.settings import Settings

    settings = Settings()
    bootstrap = settings.require_kafka()
    reachable(bootstrap)
    url = database_url()
    client = connect_sync(settings.redis_url)
    registry = f"{settings.redis_prefix}:institutions"

    def regions(institutions: list[str]) -> dict[str, str]:
        """Inspectors' scopes need a case's region: from the registry (`tracewatch
        institutions`); Redis away, the next message of the case fills it in."""
        try:
            values = client.hmget(registry, institutions)
        except RedisError:
            return {}
        return {
            i: orjson.loads(v)["region"] for i, v in zip(institutions, values, strict=True) if v
        }

    port = os.environ.get("TRACEWATCH_SINK_METRICS_PORT", "").strip()
    if port:  # Prometheus: tracewatch_sink_messages_total{result}
        from prometheus_client import start_http_server

        start_http_server(int(port), os.environ.get("TRACEWATCH_WEB_HOST", "127.0.0.1"))
    print("case sink running: alerts topic -> case store (Ctrl-C stops)", file=sys.stderr)
    run_sink(bootstrap, url, regions, settings.batch_size, settings.session_timeout)
    return 0


def _filter(args: argparse.Namespace) -> Any:
    from cases.store import CaseFilter

    since = datetime.datetime.fromisoformat(args.since) if args.since else None
    return CaseFilter(
        rule=args.rule,
        severity=args.severity,
        status=args.status,
        institution=args.institution,
        region=args.region,
        product=args.product,
        since=since,
        open_only=args.open,
    )


def cmd_cases(args: argparse.Namespace) -> int:
    from psycopg_pool import AsyncConnectionPool

    from cases.store import CaseError, CaseStore

    url = database_url()
    actor = args.actor or os.environ.get("USER") or "operator"

    async def run() -> Any:
        async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
            store = CaseStore(pool)
            if args.action == "list":
                rows, cursor = await store.search(_filter(args), args.limit, args.after)
                return {"cases": rows, "next": cursor}
            if args.action == "show":
                return await store.get(args.alert_id)
            if args.action == "move":
                return await store.move(
                    args.alert_id,
                    args.to,
                    actor,
                    args.reason,
                    args.closure,
                    args.comment,
                    args.version,
                    args.duplicate_of,
                )
            if args.action == "assign":
                return await store.assign(args.alert_id, args.assignee, actor, args.version)
            moved = await store.move_all(
                _filter(args), args.to, actor, args.reason, args.closure, args.comment
            )
            return {"moved": len(moved), "alert_ids": moved}

    try:
        result = asyncio.run(run())
    except CaseError as exc:
        print(f"tracewatch: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for row in result["cases"]:
            sys.stdout.buffer.write(orjson.dumps(row) + b"\n")
        if result["next"]:
            print(f"more: --after {result['next']}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule")
    p.add_argument("--severity")
    p.add_argument("--status", choices=workflow.STATUSES)
    p.add_argument("--institution")
    p.add_argument("--region", help="region code prefix scope: 330000 a province, 330100 a city")
    p.add_argument("--product")
    p.add_argument("--since", help="detected at or after (ISO-8601)")
    p.add_argument("--open", action="store_true", help="only cases not closed")


def _move_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("to", choices=workflow.STATUSES)
    p.add_argument("--reason", help="why (required for every move except to investigating)")
    p.add_argument("--closure", choices=sorted(workflow.CLOSURE_REASONS))
    p.add_argument("--comment", help=f"at most {workflow.COMMENT_MAX} characters")


def add_cases_parser(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="cases newest first, filtered; JSON lines")
    _filters(a)
    a.add_argument("--limit", type=int, default=50)
    a.add_argument("--after", help="the cursor a previous page printed")
    a = actions.add_parser("show", help="one case with its alert and audit trail")
    a.add_argument("alert_id")
    a = actions.add_parser("move", help="move one case: seen, investigating, escalated, closed")
    a.add_argument("alert_id")
    _move_args(a)
    a.add_argument("--version", type=int, help="refuse if the case changed since this version")
    a.add_argument("--duplicate-of", help="closing as duplicate: the case it duplicates")
    a = actions.add_parser("assign", help="assign a case (no assignee: unassign)")
    a.add_argument("alert_id")
    a.add_argument("assignee", nargs="?")
    a.add_argument("--version", type=int)
    a = actions.add_parser("move-all", help="move every case a filter selects (audited each)")
    _filters(a)
    _move_args(a)
    p.add_argument("--actor", help="who is acting, for the audit trail (default $USER)")
