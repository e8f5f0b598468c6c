"""The per-code lifecycle (回流药): DUPLICATE_SALE, CROSS_INSTITUTION_SALE, SPLIT_OVERFLOW,
RETURN_WITHOUT_SALE and NO_PROVENANCE.

State per normalised code, what a box goes through:
- `r`: institutions that received it (purchase, `transfer_in`) and still hold it (a
  `purchase_return` or `transfer_out` removes the institution);
- `d`: its dispenses, oldest first, each `[institution, dispense key, event_id, ts, units,
  returned]` - `units` is 0 for a whole pack, the smallest units taken for a split (拆零)
  dispense; `returned` is the event time of the `sale_return`/`settlement_cancel` that undid
  it (0 while it stands);
- `xc`: cross-institution checks parked for dispenses by an institution that holds a receipt
  of the box (see rule 1);
- `np`: NO_PROVENANCE checks waiting for their grace period (event time) to pass, one per
  institution that dispensed the code without holding a receipt of it; `due` is when the oldest
  is ripe.

A dispense is keyed by `s:<settlement_id>` when it names a settlement (a `sale` and its
`settlement` are one dispense) and by `e:<event_id>` otherwise, so the second record of a sale
and its settlement is recognised and changes nothing.

How a new dispense at institution X is judged (one rule per scan, the most specific one):
1. an active (not returned) dispense at another institution, earlier in event time ->
   CROSS_INSTITUTION_SALE: the box is with a patient of that institution, so it came back into
   trade. If the other dispense is the later one (two institutions' events travel in different
   partitions and can arrive out of order), the alert goes to it instead - raised now, after its
   settlement's verdict was given; alerts do not depend on arrival order. A box returned there is back
   in its stock; if it then moves to X without a recorded receipt, that is NO_PROVENANCE's case,
   not this one (a legitimate transfer's receipt is often uploaded a day late);
2. else an active whole-pack dispense at X -> DUPLICATE_SALE for a whole pack, SPLIT_OVERFLOW
   for a split one (split mixed with a whole-pack sale);
3. else active split dispenses at X: a whole pack -> SPLIT_OVERFLOW (mixing); a split one whose
   units bring the total beyond the pack size -> SPLIT_OVERFLOW.
The dispense is recorded either way: it happened, and the next one is judged against it.

NO_PROVENANCE: an institution that records codes on what it receives (ingest marks such
institutions from their first coded receipt: `rc`) dispenses a code it holds no receipt of. The
check is parked until the stage's watermark passes the dispense time + grace; a receipt by that
institution arriving before then cancels it.

Voids retract what the voided event did to this code; everything is idempotent per record id
(`detectors.stage.apply_records`), so a redelivered record changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from detectors.alerts import make_alert
from detectors.stage import BaseStage, Record, StageOutput, State, Watermarks, lane_of

# record kinds (`t`) on the by-code stream
RECEIVE = "r"  # purchase, stock_change transfer_in
LEAVE = "o"  # purchase_return, stock_change transfer_out
DISPENSE = "d"  # sale, settlement
RETURN = "u"  # sale_return listing the code
CANCEL = "x"  # settlement_cancel (resolved by ingest to the settlement's codes)
VOID = "v"  # void of an event that did one of the above (`vt` says which)

DEFAULT_GRACE_SECONDS = 72 * 3600
MAX_DISPENSES = 8  # history kept per code; returned entries are dropped first
_SPLIT_TOLERANCE = 1e-6

_US = "\x1f"  # between fields
_RS = "\x1e"  # between sections
_EPOCH = 1704067200  # 2024-01-01T00:00Z: keeps stored times short
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"

# dispense entry fields
_INST, _DK, _EV, _TS, _UNITS, _RET = range(6)


def _b36(ts: float) -> str:
    n = round(ts) - _EPOCH
    sign, n = ("-", -n) if n < 0 else ("", n)
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = _DIGITS[r] + digits
        if not n:
            return sign + digits


def _unb36(text: str) -> float:
    return float(int(text, 36) + _EPOCH)


def _num(units: float) -> str:
    if not units:
        return ""
    return str(int(units)) if units == int(units) else repr(units)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class CodeStage(BaseStage):
    name = "code"

    def __init__(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        self.grace = grace_seconds

    # -- storage codec: per-code state is the big number at national scale ----------------------
    # Text fields joined by ASCII unit/record separators instead of JSON: no quotes, no brackets,
    # times as base-36 seconds since 2024, the first receiver's id not repeated in dispenses,
    # the dispense key left out when it is the event itself. A received-and-sold box packs into
    # about 40 bytes; `field` stores a 20-digit code as 9 binary bytes.

    @staticmethod
    def field(key: str) -> bytes:
        if len(key) == 20 and key.isdigit():
            return int(key).to_bytes(9, "big")
        return key.encode()

    @staticmethod
    def unfield(raw: bytes) -> str:
        return f"{int.from_bytes(raw, 'big'):020d}" if len(raw) == 9 else raw.decode()

    @staticmethod
    def pack(state: State) -> bytes:
        receivers: list[str] = state.get("r", [])
        home = receivers[0] if receivers else None
        sections = [_US.join(receivers)]
        for inst, dk, ev, ts, units, returned in state.get("d", ()):
            if dk == f"e:{ev}":
                dk = ""
            elif dk.startswith("s:"):
                dk = dk[2:]
            else:
                dk = "=" + dk
            sections.append(
                _US.join(
                    (
                        "" if inst == home else inst,
                        dk,
                        ev,
                        _b36(ts),
                        _num(units),
                        _b36(returned) if returned else "",
                    )
                )
            )
        for mark, name in (("?", "np"), ("!", "xc")):
            for inst, ev, ts in state.get(name, ()):
                sections.append(mark + _US.join((inst, ev, _b36(ts))))
        return _RS.join(sections).encode()

    def unpack(self, raw: bytes) -> State:
        first, *sections = raw.decode().split(_RS)
        state: State = {}
        receivers = first.split(_US) if first else []
        if receivers:
            state["r"] = receivers
        home = receivers[0] if receivers else ""
        dispenses: list[list[Any]] = []
        for section in sections:
            if section[:1] in ("?", "!"):
                inst, ev, ts = section[1:].split(_US)
                name = "np" if section[0] == "?" else "xc"
                state.setdefault(name, []).append([inst, ev, _unb36(ts)])
                continue
            inst, dk, ev, ts, units, returned = section.split(_US)
            if not dk:
                dk = f"e:{ev}"
            elif dk.startswith("="):
                dk = dk[1:]
            else:
                dk = f"s:{dk}"
            dispenses.append(
                [
                    inst or home,
                    dk,
                    ev,
                    _unb36(ts),
                    float(units) if units else 0,
                    _unb36(returned) if returned else 0,
                ]
            )
        if dispenses:
            state["d"] = dispenses
        self._set_due(state)
        return state

    def _set_due(self, entry: State) -> None:
        """`due` is when the oldest parked check is ripe and `dl` the lane it waits on (its
        institution's); the store indexes keys by them. A later check of another institution
        whose lane is ahead waits with it."""
        pending = [*entry.get("np", ()), *entry.get("xc", ())]
        for name in ("np", "xc"):
            if not entry.get(name):
                entry.pop(name, None)
        if pending:
            first = min(pending, key=lambda p: (p[2], p[0]))
            entry["due"] = first[2] + round(self.grace)
            entry["dl"] = lane_of(first[0])
        else:
            entry.pop("due", None)
            entry.pop("dl", None)

    # -- records ---------------------------------------------------------------------------------

    def apply(self, record: Record, state: dict[str, State], out: StageOutput) -> None:
        key = record["k"]
        entry = _copy(state.get(key))
        kind = record["t"]
        if kind == DISPENSE:
            rules = self._dispense(key, entry, record, out)
            if "vk" in record:
                out.line_rules(record["vk"], record["ln"], rules)
        elif kind == RECEIVE:
            _receive(entry, record["inst"])
        elif kind == LEAVE:
            _leave(entry, record["inst"])
        elif kind == RETURN:
            if not _undo(entry, record["inst"], None, record["ts"]):
                out.alerts.append(_return_without_sale(key, entry, record))
        elif kind == CANCEL:
            # Ingest resolved the settlement to this code, so the dispense is here unless a
            # void removed it; the settlement-level RETURN_WITHOUT_SALE is ingest's to raise.
            _undo(entry, record["inst"], record["dk"], record["ts"])
        elif kind == VOID:
            _void(entry, record)
        self._set_due(entry)
        state[key] = _compact(entry)

    def fire(
        self, key: str, state: dict[str, State], watermarks: Watermarks, out: StageOutput
    ) -> None:
        """The watermark passed this code's `due`: run the parked NO_PROVENANCE checks that
        are ripe; the others stay parked."""
        entry = _copy(state.get(key))
        grace = round(self.grace)
        waiting = []
        for inst, ev, ts in entry.get("np", ()):
            if ts + grace > watermarks.get(lane_of(inst), float("-inf")):
                waiting.append([inst, ev, ts])
                continue
            if inst not in entry.get("r", ()):
                out.alerts.append(
                    make_alert(
                        "NO_PROVENANCE",
                        institution=inst,
                        event_ids=[ev],
                        occurred_at=iso(ts),
                        evidence={
                            "dispensed_at": iso(ts),
                            "grace_hours": self.grace / 3600,
                            "checked_after": iso(ts + grace),
                            # Only what every run has seen when this lane's time passed the
                            # due time: this institution's own sales of the box up to then.
                            # Other institutions' sales travel in other lanes and may still be
                            # on their way (their part is CROSS_INSTITUTION_SALE's evidence).
                            "dispenses_until_checked": _describe(
                                [
                                    d
                                    for d in entry.get("d", ())
                                    if d[_INST] == inst and d[_TS] <= ts + grace
                                ],
                                with_returns=False,
                            ),
                        },
                        id_facts=(key, ev),
                        code=key,
                    )
                )
        entry["np"] = waiting
        parked = []
        for inst, ev, ts in entry.get("xc", ()):
            sale = next((d for d in entry.get("d", ()) if d[_INST] == inst and d[_EV] == ev), None)
            if sale is None:
                continue  # voided meanwhile
            # with it now: dispenses elsewhere standing at its time (not returned before it)
            standing = [
                d
                for d in entry.get("d", ())
                if d[_INST] != inst and _order(d) < _order(sale) and not 0 < d[_RET] <= ts
            ]
            lanes = {lane_of(d[_INST]) for d in standing} | {lane_of(inst)}
            if any(ts + grace > watermarks.get(lane, float("-inf")) for lane in lanes):
                parked.append([inst, ev, ts])
            elif standing:
                out.alerts.append(_cross_alert(key, sale, standing))
        entry["xc"] = parked
        self._set_due(entry)
        state[key] = _compact(entry)

    def _dispense(self, key: str, entry: State, record: Record, out: StageOutput) -> list[str]:
        inst: str = record["inst"]
        dk: str = record["dk"]
        dispenses: list[list[Any]] = entry.setdefault("d", [])
        if any(d[_INST] == inst and d[_DK] == dk for d in dispenses):
            return []  # the sale and the settlement of one dispense, whichever came second
        split: bool = record["sp"]
        units: float = record["u"] if split else 0
        ts = round(record["ts"])  # what the packed form keeps: replay and stream agree
        new = [inst, dk, record["ev"], ts, units, 0]
        active = [d for d in dispenses if not d[_RET]]
        here = [d for d in active if d[_INST] == inst]
        # Two institutions' events travel in different input partitions, so the resale may be
        # processed before the first sale. CROSS_INSTITUTION_SALE goes to whichever of the two
        # is later in event time, whatever the order of arrival.
        receivers = entry.get("r", ())
        earlier = [d for d in active if d[_INST] != inst and _order(d) < _order(new)]
        for later in (d for d in active if d[_INST] != inst and _order(d) > _order(new)):
            if later[_INST] in receivers:
                continue  # its check is parked (below) and will see this sale
            if not any(
                d[_INST] != later[_INST] and _order(d) < _order(later) for d in active
            ):  # its first sale elsewhere has just arrived: this is its alert, late
                out.alerts.append(_cross_alert(key, later, [new]))
        rule: str | None = None
        evidence: dict[str, Any] = {}
        if earlier and inst in receivers:
            # The box reached this institution through a recorded receipt (a transfer, a
            # purchase): the earlier sale may have been returned in an upload still to come
            # (returns travel in daily batches). Decide once event time has passed.
            entry.setdefault("xc", []).append([inst, record["ev"], ts])
            earlier = []
        if earlier:
            rule = "CROSS_INSTITUTION_SALE"
        elif any(not d[_UNITS] for d in here):
            rule = "SPLIT_OVERFLOW" if split else "DUPLICATE_SALE"
            evidence = {"earlier_sales": _describe(here)}
        elif here and not split:
            rule = "SPLIT_OVERFLOW"
            evidence = {"earlier_sales": _describe(here), "mixed_with_whole_pack": True}
        elif here and record.get("ps"):
            used = sum(d[_UNITS] for d in here)
            if used + units > record["ps"] + _SPLIT_TOLERANCE:
                rule = "SPLIT_OVERFLOW"
                evidence = {
                    "earlier_sales": _describe(here),
                    "units_before": used,
                    "units_now": units,
                    "pack_size": record["ps"],
                }
        dispenses.append(new)
        _trim(dispenses)
        pending = entry.setdefault("np", [])
        unreceived = record.get("rc") and inst not in entry.get("r", ())
        if unreceived and not any(p[0] == inst for p in pending):
            pending.append([inst, record["ev"], ts])
        if rule == "CROSS_INSTITUTION_SALE":
            out.alerts.append(_cross_alert(key, new, earlier))
            return [rule]
        if rule is None:
            return []
        evidence.update({"line_no": record["ln"], "raw": record.get("raw"), "split": split})
        out.alerts.append(
            make_alert(
                rule,
                institution=inst,
                event_ids=_event_ids(evidence["earlier_sales"], record["ev"]),
                occurred_at=record["at"],
                evidence=evidence,
                id_facts=(key, record["ev"], record["ln"]),
                product=record.get("p"),
                code=key,
                settlement_id=record.get("sid"),
            )
        )
        return [rule]


def _order(d: list[Any]) -> tuple[Any, ...]:
    """Event-time order of dispenses, ties broken so that every process agrees."""
    return (d[_TS], d[_INST], d[_EV])


def _cross_alert(key: str, resale: list[Any], earlier: list[list[Any]]) -> Any:
    """Built from stored dispenses only, so it is the same whichever sale arrived first."""
    dk = resale[_DK]
    return make_alert(
        "CROSS_INSTITUTION_SALE",
        institution=resale[_INST],
        event_ids=_event_ids(_describe(earlier), resale[_EV]),
        occurred_at=iso(resale[_TS]),
        evidence={
            "earlier_sales": _describe(earlier),
            "resale": _describe([resale])[0],
        },
        id_facts=(key, resale[_EV]),
        code=key,
        settlement_id=dk[2:] if dk.startswith("s:") else None,
    )


def _event_ids(earlier: list[dict[str, Any]], ev: str) -> list[str]:
    ids = list(dict.fromkeys(d["event_id"] for d in earlier))
    return [*ids, ev] if ev not in ids else ids


def _describe(dispenses: Any, with_returns: bool = True) -> list[dict[str, Any]]:
    """Earlier sales as an inspector reads them: where, which event, when, how much."""
    described = []
    for d in sorted(dispenses, key=_order):  # event time, not arrival order: every run agrees
        item = {
            "institution": d[_INST],
            "event_id": d[_EV],
            "dispense": d[_DK],
            "occurred_at": iso(d[_TS]),
            "units": d[_UNITS] or "whole pack",
        }
        if with_returns:
            item["returned"] = bool(d[_RET])
        described.append(item)
    return described


def _copy(entry: State | None) -> State:
    if not entry:
        return {}
    copied = dict(entry)
    if "r" in copied:
        copied["r"] = list(copied["r"])
    if "d" in copied:
        copied["d"] = [list(d) for d in copied["d"]]
    for name in ("np", "xc"):
        if name in copied:
            copied[name] = [list(p) for p in copied[name]]
    return copied


def _compact(entry: State) -> State:
    return {k: v for k, v in entry.items() if v or k in ("due", "dl")}


def _trim(dispenses: list[list[Any]]) -> None:
    while len(dispenses) > MAX_DISPENSES:
        returned = next((i for i, d in enumerate(dispenses) if d[_RET]), 0)
        del dispenses[returned]


def _receive(entry: State, inst: str) -> None:
    receivers: list[str] = entry.setdefault("r", [])
    if inst not in receivers:
        receivers.append(inst)
    if "np" in entry:
        entry["np"] = [p for p in entry["np"] if p[0] != inst]


def _leave(entry: State, inst: str) -> None:
    receivers: list[str] = entry.get("r", [])
    if inst in receivers:
        receivers.remove(inst)


def _undo(entry: State, inst: str, dk: str | None, ts: float) -> bool:
    """Mark the latest active dispense at `inst` (with key `dk`, if given) returned at `ts`."""
    for d in reversed(entry.get("d", ())):
        if d[_INST] == inst and not d[_RET] and (dk is None or d[_DK] == dk):
            d[_RET] = max(1, round(ts))
            return True
    return False


def _void(entry: State, record: Record) -> None:
    inst = record["inst"]
    voided = record["vt"]
    if voided == DISPENSE:
        dispenses = entry.get("d", [])
        entry["d"] = [d for d in dispenses if not (d[_INST] == inst and d[_EV] == record["of"])]
        if "np" in entry:
            entry["np"] = [p for p in entry["np"] if not (p[0] == inst and p[1] == record["of"])]
    elif voided == RECEIVE:
        _leave(entry, inst)
    elif voided == LEAVE:
        _receive(entry, inst)
    elif voided in (RETURN, CANCEL):
        for d in reversed(entry.get("d", ())):
            if d[_INST] == inst and d[_RET]:
                d[_RET] = 0
                break


def _return_without_sale(key: str, entry: State, record: Record) -> Any:
    return make_alert(
        "RETURN_WITHOUT_SALE",
        institution=record["inst"],
        event_ids=[record["ev"]],
        occurred_at=record["at"],
        evidence={
            "line_no": record.get("ln"),
            "raw": record.get("raw"),
            "dispenses": _describe(entry.get("d", ())),
        },
        id_facts=(key, record["ev"], record.get("ln")),
        product=record.get("p"),
        code=key,
    )
