"""Ingest: one validated event -> the stateless gate's alerts and the records each stage keys on.

Kafka Streams would call this the re-key step. Ledger records are keyed by `institution|product`
(the 进销存 ledger and registered uncoded stock), code records by normalised code (the per-code
lifecycle). Records are plain dicts with short keys: they travel packed, many to a Kafka message.
Each carries an `id` unique per (event, line[, code]) that stages use to apply it exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detectors.catalog import Catalog
from detectors.settlement_gate import (
    CheckedLine,
    check_settlement,
    classify_line,
    verdict_head,
    verdict_key,
)
from topics.records import Alert, Event


@dataclass(slots=True)
class Routed:
    alerts: list[Alert] = field(default_factory=list)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    codes: list[dict[str, Any]] = field(default_factory=list)
    head: dict[str, Any] | None = None  # verdict head, for settlements


def ledger_key(institution: str, product: str) -> str:
    return f"{institution}|{product}"


def route(event: Event, catalog: Catalog) -> Routed:
    out = Routed()
    if event.type == "settlement":
        checked, out.alerts = check_settlement(event, catalog)
        out.head = verdict_head(event, checked)
    elif event.lines:
        checked = [classify_line(line, catalog) for line in event.lines]
    else:
        checked = []
    vkey = verdict_key(event.institution, event.event_id) if event.type == "settlement" else None
    for cl in checked:
        out.ledger.append(_line_record(event, cl, vkey))
    if event.product is not None:
        out.ledger.append(_product_record(event, catalog))
    return out


def _line_record(event: Event, cl: CheckedLine, vkey: str | None) -> dict[str, Any]:
    line = cl.line
    product = cl.product
    units = product.units(line.quantity, line.unit) if product else line.quantity
    record: dict[str, Any] = {
        "k": ledger_key(event.institution, line.product),
        "id": f"{event.key}|{line.line_no}",
        "t": event.type,
        "inst": event.institution,
        "ev": event.event_id,
        "at": event.occurred_at,
        "ts": event.occurred_ts,
        "p": line.product,
        "ln": line.line_no,
        "u": units,
        "q": line.quantity,
        "unit": line.unit,
        "split": line.split,
        "scans": len(cl.scans),
        # An unknown product is treated as code-required: the rule's default is "scan it".
        "req": product.code_required if product else True,
        "known": product is not None,
    }
    if event.settlement_id is not None:
        record["sid"] = event.settlement_id
    if vkey is not None:
        record["vk"] = vkey
    return record


def _product_record(event: Event, catalog: Catalog) -> dict[str, Any]:
    assert event.product is not None and event.quantity is not None
    product = catalog.get(event.product)
    units = product.units(event.quantity, event.unit) if product else event.quantity
    record: dict[str, Any] = {
        "k": ledger_key(event.institution, event.product),
        "id": event.key,
        "t": event.type,
        "inst": event.institution,
        "ev": event.event_id,
        "at": event.occurred_at,
        "ts": event.occurred_ts,
        "p": event.product,
        "u": units,
        "q": event.quantity,
        "unit": event.unit,
        "known": product is not None,
    }
    if event.reason is not None:
        record["reason"] = event.reason
    return record
