"""The pre-settlement check (事前提醒): the verdict the stream would give a settlement now.

Nothing here decides a rule. The settlement is routed by `detectors.routing.route`, its ledger
records judged by the ledger's own `LedgerStage.judge_settlement` (what `apply` decides about a
settlement: NO_CODE against legacy stock; the stock figures it also updates wait for event time
and reject nothing) and its code records applied by `CodeStage.apply` (which judges through
`code_state.judge`), on states the caller loaded for this check alone and throws away
afterwards; the verdict is assembled by `settlement_gate.verdict`.
So the check and the stream cannot disagree about a rule: they run one implementation. They
agree about a settlement when the states are the ones the stream will apply it to - checked and
then submitted with nothing in between.

Event time does not change a verdict: the rules that wait for it (NO_PROVENANCE, OVERSOLD) are
not among the rejecting ones, so the stages run in an empty time frame here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from detectors.catalog import Catalog
from detectors.code_state import CodeStage
from detectors.codes import classify
from detectors.event_time import DEFAULT_GRACE_SECONDS, TimeFrame
from detectors.ledger import LedgerStage
from detectors.routing import IngestView, ledger_key, route
from detectors.settlement_gate import REJECTING_RULES, verdict, verdict_key
from detectors.stage import StageOutput, State
from topics.records import Alert, Event


def state_keys(event: Event) -> tuple[list[str], list[str]]:
    """The ledger keys and code keys routing `event` can touch: what to load before `check`."""
    ledger = list(dict.fromkeys(ledger_key(event.institution, ln.product) for ln in event.lines))
    codes: dict[str, None] = {}
    for line in event.lines:
        for raw in line.codes:
            key = classify(raw).key
            if key is not None:
                codes[key] = None
    return ledger, list(codes)


@dataclass(slots=True)
class Check:
    """The would-be verdict (the contract's verdict shape) and, per line, what a cashier can act
    on: one entry per rejecting alert the settlement would raise."""

    verdict: dict[str, Any]
    evidence: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


def check(
    event: Event,
    catalog: Catalog,
    view: IngestView,
    own: float | None,
    ledger_states: dict[str, State],
    code_states: dict[str, State],
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> Check:
    """Route `event` (a settlement) and apply it to the given states, which it changes: pass
    copies loaded for the check (from Redis they are fresh anyway), never live state."""
    if event.type != "settlement":
        raise ValueError(f"only a settlement can be checked, not a {event.type}")
    routed = route(event, catalog, view, own)
    assert routed.head is not None
    frame = TimeFrame({})
    out = StageOutput()
    ledger = LedgerStage(grace_seconds)
    for record in routed.ledger:
        if record["t"] == "settlement":
            ledger.judge_settlement(record, ledger_states, out)
    codes = CodeStage(grace_seconds)
    for record in routed.codes:
        codes.apply(record, code_states, out, frame)
    vkey = verdict_key(event.institution, event.event_id)
    lines = {str(n): rules for n, rules in out.parts.get(vkey, {}).items()}
    result = Check(verdict(routed.head, [{"lines": lines}]))
    line_of_code = {r["k"]: r["ln"] for r in routed.codes if "vk" in r}
    for alert in _standing(routed.alerts, out.alerts):
        line_no = alert.evidence.get("line_no")
        if line_no is None and alert.code is not None:
            line_no = line_of_code.get(alert.code)
        if line_no is not None:
            result.evidence.setdefault(int(line_no), []).append(_explain(alert, event))
    return result


def _standing(*groups: Iterable[Alert]) -> list[Alert]:
    return [a for g in groups for a in g if a.status is None and a.rule in REJECTING_RULES]


def _explain(alert: Alert, event: Event) -> dict[str, Any]:
    """One alert as a cashier reads it. Other institutions' sales show where and when, not
    their event ids: those are the other institution's data."""
    ev = alert.evidence
    entry: dict[str, Any] = {"rule": alert.rule}
    if alert.code is not None:
        entry["code"] = alert.code
    if "raw" in ev:
        entry["scanned"] = ev["raw"]
    earlier = [_sale(s, event.institution) for s in ev.get("earlier_sales", ())]
    if earlier:
        entry["earlier_sales"] = earlier
    entry["message"] = _message(alert, earlier)
    return entry


def _sale(sale: dict[str, Any], own: str) -> dict[str, Any]:
    shown: dict[str, Any] = {
        k: sale[k] for k in ("institution", "occurred_at", "units") if k in sale
    }
    if sale.get("institution") == own:
        shown["event_id"] = sale.get("event_id")
    return shown


def _message(alert: Alert, earlier: list[dict[str, Any]]) -> str:
    ev = alert.evidence
    code = alert.code
    rule = alert.rule
    if rule in ("CROSS_INSTITUTION_SALE", "DUPLICATE_SALE") and earlier:
        last = earlier[-1]
        where = "here" if rule == "DUPLICATE_SALE" else f"at {last['institution']}"
        return (
            f"code {code} was already sold {where} on {last['occurred_at']} and not returned: "
            "do not settle this box; check it with the patient and the supplier"
        )
    if rule == "SPLIT_OVERFLOW":
        if ev.get("mixed_with_whole_pack"):
            return f"code {code} was already sold here by split units; it cannot also go whole"
        return (
            f"split sales of code {code} reach {ev.get('units_before', 0) + ev.get('units_now', 0)}"
            f" units, more than its pack of {ev.get('pack_size')}"
        )
    if rule == "NO_CODE":
        return (
            f"line {ev.get('line_no')} carries no trace code and registered uncoded stock covers "
            f"{ev.get('legacy_stock_units')} of {ev.get('units_needed')} units: scan each box"
        )
    if rule == "CODE_COUNT_MISMATCH":
        return (
            f"line {ev.get('line_no')} bills {ev.get('packs')} packs but carries "
            f"{ev.get('distinct_codes')} distinct codes: scan one code per box"
        )
    if rule == "WRONG_BARCODE":
        return f"{ev.get('raw')!r} is the commodity barcode, not the trace code: scan the 追溯码"
    if rule == "INVALID_CODE":
        return f"{ev.get('raw')!r} is not a valid trace code ({ev.get('reason')}): scan it again"
    if rule == "PRODUCT_MISMATCH":
        return (
            f"code {code} belongs to {ev.get('code_product')}, the line bills {ev.get('billed')}: "
            "scan the box that is sold"
        )
    return rule
