"""Helpers for the case store tests (the `database` fixture is in tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from cases.store import CaseStore

T = TypeVar("T")


def with_store(url: str, body: Callable[[CaseStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncConnectionPool(url, min_size=1, max_size=4, open=False) as pool:
            return await body(CaseStore(pool))

    return asyncio.run(main())


def alert(
    n: int, rule: str = "DUPLICATE_SALE", institution: str = "P1", **extra: object
) -> dict[str, object]:
    """An alerts-topic message as the stream writes it (docs/contract.md, 5)."""
    return {
        "alert_id": f"{n:024x}",
        "rule": rule,
        "severity": "high",
        "institution": institution,
        "product": "XA001",
        "code": f"8100001000000000{n:04d}",
        "settlement_id": f"S{n}",
        "event_ids": [f"e{n}"],
        "occurred_at": "2026-11-20T10:00:00+08:00",
        "detected_at": f"2026-11-20T02:{n % 60:02d}:00Z",
        "evidence": {"line_no": 1},
        **extra,
    }


def record(url: str, *messages: dict[str, object], region: str | None = "330102") -> None:
    with psycopg.connect(url) as conn:
        for m in messages:
            conn.execute("SELECT case_record_alert(%s::jsonb, %s)", (Jsonb(m), region))
