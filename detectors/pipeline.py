"""The whole topology in one process, in file order: what `tracewatch replay` and tests run.

The same functions run in the workers: `route` at ingest, then each stage through
`apply_records`; only where state lives and how records travel differ. Here every stage has one
"partition", so a settlement expects at most one part per stage.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from detectors.catalog import Catalog
from detectors.ledger import LedgerStage
from detectors.routing import Routed, route
from detectors.stage import Record, Stage, StageOutput, State, apply_records
from detectors.verdicts import VerdictStage, head_record, part_record
from topics.records import Alert, Event

LEDGER_PART = "L"


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and Python versions (unlike hash()), cheap, and well spread."""
    return zlib.crc32(key.encode()) % partitions


def expected_parts(routed: Routed, ledger_partition: Callable[[str], int]) -> list[str]:
    """The parts a settlement's verdict waits for: one per ledger partition holding its lines."""
    return sorted({f"{LEDGER_PART}{ledger_partition(r['k'])}" for r in routed.ledger if "vk" in r})


class MemoryStage:
    """A stage with its state and applied ids in dicts: replay's store."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.state: dict[str, State] = {}
        self.applied: set[str] = set()

    def apply(self, records: list[Record], out: StageOutput) -> None:
        apply_records(self.stage, records, self.state, self.applied, out)
        for key in [k for k, v in self.state.items() if not v]:
            del self.state[key]


class Pipeline:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.seen: set[str] = set()
        self.ledger = MemoryStage(LedgerStage())
        self.verdicts = MemoryStage(VerdictStage())

    def process(self, event: Event) -> tuple[list[Alert], list[dict[str, Any]]]:
        """Alerts and verdicts caused by one event; nothing for an exact resubmission."""
        if event.key in self.seen:
            return [], []
        self.seen.add(event.key)
        routed = route(event, self.catalog)
        out = StageOutput()
        out.alerts.extend(routed.alerts)
        self.ledger.apply(routed.ledger, out)
        if routed.head is not None:
            vkey = f"{event.institution}|{event.event_id}"
            records = [head_record(vkey, routed.head, expected_parts(routed, lambda _k: 0))]
            records += [
                part_record(key, f"{LEDGER_PART}0", lines) for key, lines in out.parts.items()
            ]
            self.verdicts.apply(records, out)
        return out.alerts, out.verdicts
