"""The small interface every stateful detector sits behind, and the loop that applies records.

A stage (the ledger, the code lifecycle, the verdict assembly) sees records one at a time with
a plain dict of the states it may touch. Where that dict comes from is not its business: in
`replay` it is the whole state in memory; in a worker it holds the states of one batch's keys,
loaded from Redis in one round trip and written back in another. `apply_records` is the one loop
both use, so idempotency (skip records already applied) is implemented once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from topics.records import Alert

Record = dict[str, Any]
State = dict[str, Any]


class StageOutput:
    """What applying records produced: alerts, and per settlement the rules found per line."""

    __slots__ = ("alerts", "parts", "verdicts")

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        # verdict key -> line_no -> rules: one verdict part per settlement touched
        self.parts: dict[str, dict[int, list[str]]] = {}
        self.verdicts: list[dict[str, Any]] = []

    def line_rules(self, verdict_key: str, line_no: int, rules: Iterable[str]) -> None:
        lines = self.parts.setdefault(verdict_key, {})
        lines.setdefault(line_no, []).extend(rules)


class Stage(Protocol):
    name: str

    def apply(self, record: Record, state: dict[str, State], out: StageOutput) -> None:
        """Apply one record; read and replace `state[record['k']]` (absent = never seen)."""
        ...


def apply_records(
    stage: Stage,
    records: Iterable[Record],
    state: dict[str, State],
    applied: set[str],
    out: StageOutput,
) -> list[str]:
    """Apply the records not yet applied, in order; returns the ids newly applied.

    `applied` holds the ids of records whose effects are already in `state` (it grows here), so
    a record redelivered after a crash, or re-sent by an upstream that crashed after producing,
    changes nothing and raises no alert twice.
    """
    new_ids: list[str] = []
    for record in records:
        rid = record["id"]
        if rid in applied:
            continue
        stage.apply(record, state, out)
        applied.add(rid)
        new_ids.append(rid)
    return new_ids
