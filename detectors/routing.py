"""Ingest: one validated event -> the stateless gate's alerts and the records each stage keys on.

Kafka Streams would call this the re-key step. Ledger records are keyed by `institution|product`
(the 进销存 ledger and registered uncoded stock), code records by normalised code (the per-code
lifecycle, `detectors.code_state`). Records are plain dicts with short keys: they travel packed,
many to a Kafka message. Each carries an `id` unique per (event, line[, code]) that stages use to
apply it exactly once.

Two kinds of event name earlier events instead of carrying lines: a `void` (by event id) and a
`settlement_cancel` (by settlement id). Ingest resolves them through `IngestView`, its memory of
what each event of an institution routed where, and sends the undo to the same keys. The input
topic is keyed by institution, so the view is local to an input partition. An upload may carry a
void or a cancellation before the event it names: the view then keeps it, and the event, when
it comes, is routed and undone at once (a cancellation's RETURN_WITHOUT_SALE is withdrawn).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from detectors import code_state
from detectors.alerts import make_alert, withdrawal
from detectors.catalog import Catalog, Product
from detectors.codes import classify
from detectors.settlement_gate import (
    CheckedLine,
    check_settlement,
    classify_line,
    code_owner,
    verdict_head,
    verdict_key,
)
from topics.records import Alert, Event, join_key

# line event type -> what it does to each code it lists
_CODE_KIND = {
    "purchase": code_state.RECEIVE,
    "purchase_return": code_state.LEAVE,
    "sale": code_state.DISPENSE,
    "settlement": code_state.DISPENSE,
    "sale_return": code_state.RETURN,
}
_STOCK_CHANGE_KIND = {
    "transfer_in": code_state.RECEIVE,
    "transfer_out": code_state.LEAVE,
    "loss": code_state.LEAVE,
    "damage": code_state.LEAVE,
    "expired": code_state.LEAVE,
}
CODE_TARGET = "c"
LEDGER_TARGET = "l"
# an index entry holding a void or cancellation that came before the event it names:
# [[EARLY, its event id, occurred_at, occurred_ts, offset minutes]]
EARLY = "w"


@dataclass(slots=True)
class Routed:
    alerts: list[Alert] = field(default_factory=list)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    codes: list[dict[str, Any]] = field(default_factory=list)
    head: dict[str, Any] | None = None  # verdict head, for settlements


def event_index_key(institution: str, event_id: str) -> str:
    return join_key("e", institution, event_id)


def settlement_index_key(institution: str, settlement_id: str) -> str:
    return join_key("s", institution, settlement_id)


def dispense_key(event: Event) -> str:
    """A sale and its settlement are one dispense: both are keyed by the settlement id."""
    if event.settlement_id is not None:
        return f"s:{event.settlement_id}"
    return f"e:{event.event_id}"


class IngestView:
    """What ingest remembers of an input partition's institutions.

    - `index`: per event (`e|inst|event_id`) and per settlement (`s|inst|settlement_id`), the
      targets its records went to - `["c", code, kind, dispense key]` or
      `["l", ledger key, type, units, second]` (`second`: the second record of a sale and its
      settlement, which the ledger did not count) - so a void or a cancellation can undo them;
    - `receivers`: institutions that record codes on what they receive (from their first coded
      purchase or transfer in); only their dispenses are checked for NO_PROVENANCE.
    Replay keeps one view for the whole run; a worker loads the entries a batch needs from Redis
    and writes back what the batch added (`added`, `new_receivers`) once its outputs are flushed.
    """

    def __init__(
        self,
        index: dict[str, list[Any]] | None = None,
        receivers: set[str] | None = None,
    ) -> None:
        self.index: dict[str, list[Any]] = index if index is not None else {}
        self.receivers: set[str] = receivers if receivers is not None else set()
        self.added: dict[str, list[Any]] = {}
        self.new_receivers: set[str] = set()

    @staticmethod
    def lookups(event: Event) -> list[str]:
        """The index entries routing this event will read: what a void or cancel names, and
        for any other event whether a void of it came first (and its settlement's entry)."""
        if event.type == "void" and event.voided_event_id is not None:
            return [event_index_key(event.institution, event.voided_event_id)]
        if event.type == "settlement_cancel" and event.settlement_id is not None:
            return [settlement_index_key(event.institution, event.settlement_id)]
        own = event_index_key(event.institution, event.event_id)
        if event.settlement_id is not None:  # a dispense: is it the first of two?
            return [settlement_index_key(event.institution, event.settlement_id), own]
        return [own]

    def remember(self, key: str, targets: list[Any]) -> None:
        self.index[key] = targets
        self.added[key] = targets

    def mark_receiver(self, institution: str) -> None:
        if institution not in self.receivers:
            self.receivers.add(institution)
            self.new_receivers.add(institution)


def ledger_key(institution: str, product: str) -> str:
    return join_key(institution, product)


def route(event: Event, catalog: Catalog, view: IngestView, own: float | None = None) -> Routed:
    """`own`: the institution's own event time after this event (`detectors.event_time`), which
    the ledger finalises its figures by; defaults to the event's own time."""
    out = Routed()
    own_time = event.occurred_ts if own is None else own
    if event.type == "void":
        voided = event_index_key(event.institution, event.voided_event_id or "")
        targets = view.index.get(voided)
        if targets is None:  # not here yet: undone when it comes
            view.remember(voided, [_early(event)])
        elif not _is_early(targets):
            _route_undo(event, targets, code_state.VOID, out, own_time)
            view.remember(voided, [])  # a second void of it has nothing left to retract
        return out
    if event.type == "settlement_cancel":
        cancelled = settlement_index_key(event.institution, event.settlement_id or "")
        targets = view.index.get(cancelled)
        if targets is None:
            out.alerts.append(_cancel_without_settlement(event))
            view.remember(cancelled, [_early(event)])  # withdrawn if the settlement comes after all
        elif not _is_early(targets):
            _route_undo(event, targets, code_state.CANCEL, out, own_time)
        return out
    if event.type == "settlement":
        checked, out.alerts = check_settlement(event, catalog)
        out.head = verdict_head(event, checked)
    elif event.lines:
        checked = [classify_line(line, catalog) for line in event.lines]
    else:
        checked = []
    vkey = verdict_key(event.institution, event.event_id) if event.type == "settlement" else None
    skey = None
    if event.settlement_id is not None and event.type in ("sale", "settlement"):
        skey = settlement_index_key(event.institution, event.settlement_id)
    # the second of a sale and its settlement: the ledger has counted this dispense already
    settlement_entry = view.index.get(skey) if skey is not None else None
    cancelled_early = settlement_entry is not None and _is_early(settlement_entry)
    second = settlement_entry is not None and not cancelled_early
    for cl in checked:
        record = _line_record(event, cl, vkey, own_time)
        if second:
            record["dup"] = 1
        out.ledger.append(record)
    kind = _CODE_KIND.get(event.type)
    if kind is not None:
        for cl in checked:
            _code_records(event, cl, kind, vkey, catalog, view, out, own_time)
    if event.product is not None:
        out.ledger.append(_product_record(event, catalog, own_time))
        if event.codes and event.reason in _STOCK_CHANGE_KIND:
            _stock_change_codes(event, _STOCK_CHANGE_KIND[event.reason], view, out, own_time)
    targets = [
        *([CODE_TARGET, r["k"], r["t"], r.get("dk")] for r in out.codes),
        *([LEDGER_TARGET, r["k"], r["t"], r["u"], r.get("dup", 0)] for r in out.ledger),
    ]
    own_key = event_index_key(event.institution, event.event_id)
    voided_early = view.index.get(own_key)
    view.remember(own_key, targets)
    if skey is not None and not second:  # the first of a sale and its settlement stands for both
        view.remember(skey, targets)
    if voided_early and _is_early(voided_early):
        _route_undo(
            _undoer(event, voided_early[0], "void"), targets, code_state.VOID, out, own_time
        )
        view.remember(own_key, [])
    if cancelled_early and settlement_entry:
        cancel = _undoer(event, settlement_entry[0], "settlement_cancel")
        _route_undo(cancel, targets, code_state.CANCEL, out, own_time)
        out.alerts.append(
            withdrawal(
                _cancel_without_settlement(cancel),
                [event.event_id],
                "the settlement it cancels arrived after it",
            )
        )
    return out


def _early(event: Event) -> list[Any]:
    return [EARLY, event.event_id, event.occurred_at, event.occurred_ts, event.offset_minutes]


def _is_early(targets: list[Any]) -> bool:
    return bool(targets) and targets[0][0] == EARLY


def _undoer(event: Event, early: list[Any], etype: str) -> Event:
    """The void or cancellation that came before `event`, as the event it was."""
    return replace(
        event,
        event_id=early[1],
        type=etype,
        occurred_at=early[2],
        occurred_ts=early[3],
        offset_minutes=early[4],
        voided_event_id=event.event_id if etype == "void" else None,
        lines=(),
        product=None,
        quantity=None,
        codes=(),
    )


def _header(event: Event, key: str, record_id: str, kind: str, own: float) -> dict[str, Any]:
    """What every record carries: its key, its id (unique per event, line and key), what it
    does, the event it comes from (time and UTC offset) and the institution's own time."""
    return {
        "k": key,
        "id": record_id,
        "t": kind,
        "inst": event.institution,
        "ev": event.event_id,
        "ts": event.occurred_ts,
        "off": event.offset_minutes,
        "ow": own,
    }


def _code_records(
    event: Event,
    cl: CheckedLine,
    kind: str,
    vkey: str | None,
    catalog: Catalog,
    view: IngestView,
    out: Routed,
    own: float,
) -> None:
    if not cl.codes:
        return
    if kind == code_state.RECEIVE:
        view.mark_receiver(event.institution)
    line = cl.line
    share = 0
    if kind == code_state.DISPENSE and line.split:
        share = units_of(cl.product, line.quantity, line.unit) // len(cl.codes)
    for scan in cl.codes:
        assert scan.key is not None
        owner = code_owner(scan, catalog) or cl.product
        record: dict[str, Any] = {
            **_header(event, scan.key, join_key(event.key, str(line.line_no), scan.key), kind, own),
            "ln": line.line_no,
            "p": line.product,
            "cp": owner.product if owner else line.product,
            "raw": scan.raw,
        }
        if kind == code_state.RETURN and event.original_event_id is not None:
            record["of"] = event.original_event_id
        if kind == code_state.DISPENSE:
            record["dk"] = dispense_key(event)
            record["sp"] = line.split
            record["u"] = share
            record["ps"] = units_of(owner, 1, "pack") if owner else None
            record["rc"] = event.institution in view.receivers
            if event.settlement_id is not None:
                record["sid"] = event.settlement_id
            if vkey is not None:
                record["vk"] = vkey
        out.codes.append(record)


def _stock_change_codes(event: Event, kind: str, view: IngestView, out: Routed, own: float) -> None:
    keys = dict.fromkeys(scan.key for scan in map(classify, event.codes) if scan.key is not None)
    if keys and kind == code_state.RECEIVE:
        view.mark_receiver(event.institution)
    for key in keys:
        assert key is not None
        out.codes.append(
            {
                **_header(event, key, join_key(event.key, key), kind, own),
                "p": event.product,
                "cp": event.product,
            }
        )


def _route_undo(
    event: Event, targets: list[Any] | None, kind: str, out: Routed, own: float
) -> None:
    """Send a void or a cancellation to every key the event it names went to.

    A void naming nothing ingest remembers (never seen, or older than the index window) has
    nothing to retract; the caller counts it.
    """
    for i, target in enumerate(targets or ()):
        record: dict[str, Any] = {
            **_header(event, target[1], join_key(event.key, str(i)), kind, own),
            "vt": target[2],
            "of": event.voided_event_id,
        }
        if target[0] == CODE_TARGET:
            record["dk"] = target[3]
            out.codes.append(record)
        else:
            record["u"] = target[3]
            if target[4]:
                record["dup"] = 1
            out.ledger.append(record)


def _cancel_without_settlement(event: Event) -> Alert:
    return make_alert(
        "RETURN_WITHOUT_SALE",
        institution=event.institution,
        event_ids=[event.event_id],
        occurred_at=event.occurred_at,
        evidence={"cancelled_settlement_id": event.settlement_id, "found": False},
        id_facts=(event.event_id, event.settlement_id),
        settlement_id=event.settlement_id,
    )


def units_of(product: Product | None, quantity: float, unit: str) -> int:
    """A quantity in thousandths of the smallest unit (an unknown product has packs of one)."""
    return product.units(quantity, unit) if product else round(quantity * 1000)


def _line_record(event: Event, cl: CheckedLine, vkey: str | None, own: float) -> dict[str, Any]:
    line = cl.line
    product = cl.product
    units = units_of(product, line.quantity, line.unit)
    record: dict[str, Any] = {
        **_header(
            event,
            ledger_key(event.institution, line.product),
            join_key(event.key, str(line.line_no)),
            event.type,
            own,
        ),
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


def _product_record(event: Event, catalog: Catalog, own: float) -> dict[str, Any]:
    assert event.product is not None and event.quantity is not None
    product = catalog.get(event.product)
    units = units_of(product, event.quantity, event.unit)
    record: dict[str, Any] = {
        **_header(event, ledger_key(event.institution, event.product), event.key, event.type, own),
        "p": event.product,
        "u": units,
        "q": event.quantity,
        "unit": event.unit,
        "known": product is not None,
    }
    if event.reason is not None:
        record["reason"] = event.reason
    return record
