"""The per-code lifecycle (回流药): DUPLICATE_SALE, CROSS_INSTITUTION_SALE, SPLIT_OVERFLOW,
RETURN_WITHOUT_SALE and NO_PROVENANCE.

State per normalised code, the facts of what a box went through:
- `h`: holdings - receipts (purchase, `transfer_in`) and departures (`purchase_return`,
  `transfer_out`, loss...) per institution, `[institution, ts, +1|-1]`;
- `d`: its dispenses in event-time order (`_order`), each `[institution, dispense key, event_id,
  ts, units, returned_at, line_no, records_receipts, standing, offset, undone_by]` - `units` is 0
  for a whole pack, the smallest units (thousandths) of a split (拆零) dispense; `returned_at` the
  event time of the `sale_return`/`settlement_cancel` that undid it and `undone_by` its event;
  `standing` the letters of the rules standing against it;
- `p`, `ps`: the box's product and pack size (thousandths of a unit), for alerts and splits;
- `ur`: returns that matched no dispense when they came, `[institution, ts, event_id,
  original_event_id, line_no, offset, raw scan]`: RETURN_WITHOUT_SALE stands against each until
  the sale it returns arrives (an upload may carry a return before its sale), which then takes
  the return and the alert is withdrawn.

**Alerts are a function of these facts**, not of the order they arrived in (`judge`). Every change
to a code re-judges it; a rule that now holds is raised, a rule that no longer holds - the first
sale's return arrived after the resale was alerted, a purchase turned up - is withdrawn with the
events that explain it. Two institutions' events travel in different partitions and arrive in any
order, so this is what makes the standing alerts the same in every interleaving. The verdict of a
settlement is the judgement of its dispense when it arrives (what the data proves then).

How a dispense D at institution X is judged against the dispenses before it in event time:
1. one at another institution not returned by D's time -> CROSS_INSTITUTION_SALE: the box is with
   that institution's patient, so it came back into trade. A box returned there and then sold at X
   without a receipt is NO_PROVENANCE's case (a legitimate transfer's receipt is often late);
2. else a whole-pack dispense at X not returned -> DUPLICATE_SALE (SPLIT_OVERFLOW if D is split);
3. else split dispenses at X: D whole -> SPLIT_OVERFLOW (mixing); D split and the units pass the
   pack size -> SPLIT_OVERFLOW.
NO_PROVENANCE: X records codes on what it receives (`records_receipts`, learnt by ingest) and holds
no receipt of the box that is at most the grace period later than its first such dispense; decided
once event time (`detectors.event_time`) passed the dispense + grace, and withdrawn if a receipt
inside the grace arrives after all. A voided receipt puts the check back.

Bounds: at most `MAX_DISPENSES` dispenses and `MAX_HOLDINGS` holdings per code are kept (a box
sold that often is a case already); beyond that the oldest go, and their alerts stay as they were.
"""

from __future__ import annotations

from bisect import insort
from typing import Any

from detectors.alerts import local_iso, make_alert, withdrawal
from detectors.event_time import DEFAULT_GRACE_SECONDS, TimeFrame
from detectors.stage import BaseStage, Record, StageOutput, State, lane_of
from topics.records import Alert

# record kinds (`t`) on the by-code stream
RECEIVE = "r"  # purchase, stock_change transfer_in
LEAVE = "o"  # purchase_return, stock_change transfer_out / loss / damage / expired
DISPENSE = "d"  # sale, settlement
RETURN = "u"  # sale_return listing the code
CANCEL = "x"  # settlement_cancel (resolved by ingest to the settlement's codes)
VOID = "v"  # void of an event that did one of the above (`vt` says which)

MAX_DISPENSES = 128
MAX_HOLDINGS = 64
MAX_UNMATCHED_RETURNS = 16

# dispense entry fields
INST, DK, EV, TS, UNITS, RET, LN, RC, STANDING, OFF, UNDONE = range(11)
# holding entry fields
H_INST, H_TS, H_KIND = range(3)
# unmatched return entry fields
U_INST, U_TS, U_EV, U_OF, U_LN, U_OFF, U_RAW = range(7)

CROSS, DUPLICATE, SPLIT, NO_PROVENANCE = "C", "D", "S", "N"
RULE_OF = {
    CROSS: "CROSS_INSTITUTION_SALE",
    DUPLICATE: "DUPLICATE_SALE",
    SPLIT: "SPLIT_OVERFLOW",
    NO_PROVENANCE: "NO_PROVENANCE",
}
_VERDICT_LETTERS = (CROSS, DUPLICATE, SPLIT)


def _order(d: list[Any]) -> tuple[Any, ...]:
    """Event-time order of dispenses, ties broken so that every process agrees."""
    return (d[TS], d[INST], d[EV], d[DK])


def provenance(holdings: list[list[Any]], inst: str, ts: float, grace: float) -> bool:
    """Did `inst` hold the box at `ts`: a receipt no later than `ts + grace` (receipts are often
    uploaded late) not followed by a departure before `ts`?"""
    held = False
    for h in holdings:  # in event-time order
        if h[H_TS] > ts + grace:
            break
        if h[H_INST] != inst:
            continue
        if h[H_KIND] > 0:
            held = True
        elif h[H_TS] <= ts:
            held = False
    return held


def judge(entry: State, frame: TimeFrame, grace: float) -> list[str]:
    """The rules standing against each dispense (letters, one string per dispense), from the
    facts alone. Pure: the pre-settlement check calls it on a copy with the would-be dispense."""
    dispenses: list[list[Any]] = entry.get("d", [])
    holdings: list[list[Any]] = entry.get("h", [])
    pack = entry.get("ps") or 0
    result: list[str] = []
    unprovenanced: set[str] = set()
    for i, d in enumerate(dispenses):
        inst, ts, units = d[INST], d[TS], d[UNITS]
        elsewhere = here = here_whole = False
        here_units = 0
        for e in dispenses[:i]:
            if e[RET] and e[RET] <= ts:
                continue
            if e[INST] != inst:
                elsewhere = True
                break
            here = True
            if e[UNITS]:
                here_units += e[UNITS]
            else:
                here_whole = True
        letters = ""
        if elsewhere:
            letters = CROSS
        elif here_whole:
            letters = SPLIT if units else DUPLICATE
        elif here and (not units or (pack and here_units + units > pack)):
            letters = SPLIT
        if d[RC] and inst not in unprovenanced and not provenance(holdings, inst, ts, grace):
            unprovenanced.add(inst)
            if frame.at(lane_of(inst)) >= ts + grace:
                letters += NO_PROVENANCE
        result.append(letters)
    return result


def next_due(entry: State, frame: TimeFrame, grace: float) -> tuple[float, int] | None:
    """When the earliest NO_PROVENANCE check that time has not yet decided is due, and the lane
    whose time decides it."""
    due: tuple[float, int] | None = None
    seen: set[str] = set()
    holdings = entry.get("h", [])
    for d in entry.get("d", ()):
        inst = d[INST]
        if not d[RC] or inst in seen or provenance(holdings, inst, d[TS], grace):
            continue
        seen.add(inst)
        lane = lane_of(inst)
        at = d[TS] + grace
        if frame.at(lane) < at and (due is None or at < due[0]):
            due = (at, lane)
    return due


class CodeStage(BaseStage):
    name = "code"

    def __init__(
        self,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self.grace = round(grace_seconds)

    def apply(
        self, record: Record, state: dict[str, State], out: StageOutput, frame: TimeFrame
    ) -> None:
        key = record["k"]
        entry = state.get(key)
        if entry is None:
            entry = state[key] = {}
        if "p" not in entry and record.get("cp"):
            entry["p"] = record["cp"]
        kind = record["t"]
        if kind == DISPENSE:
            if record.get("ps"):
                entry.setdefault("ps", record["ps"])
            dispense = self._dispense(entry, record)
            if dispense is not None and entry.get("ur"):
                self._match_return(key, entry, dispense, out)
            self._settle(key, entry, out, frame, record)
            if "vk" in record:
                letters = dispense[STANDING] if dispense is not None else ""
                rules = [RULE_OF[x] for x in _VERDICT_LETTERS if x in letters]
                out.line_rules(record["vk"], record["ln"], rules)
            return
        if kind in (RECEIVE, LEAVE):
            holding = [record["inst"], round(record["ts"]), 1 if kind == RECEIVE else -1]
            holdings = entry.setdefault("h", [])
            insort(holdings, holding, key=lambda h: (h[H_TS], h[H_INST], h[H_KIND]))
            if len(holdings) > MAX_HOLDINGS:
                del holdings[0]
        elif kind == RETURN:
            if not _undo(entry, record, record.get("of")):
                out.alerts.append(_return_without_sale(key, entry, record))
                unmatched = entry.setdefault("ur", [])
                unmatched.append(
                    [
                        record["inst"],
                        max(1, round(record["ts"])),
                        record["ev"],
                        record.get("of") or "",
                        record.get("ln"),
                        record.get("off", 0),
                        record.get("raw") or "",
                    ]
                )
                if len(unmatched) > MAX_UNMATCHED_RETURNS:
                    del unmatched[0]  # its alert stays
        elif kind == CANCEL:
            # Ingest resolved the settlement to this code, so the dispense is here unless a
            # void removed it; the settlement-level RETURN_WITHOUT_SALE is ingest's to raise.
            _undo(entry, record, None)
        elif kind == VOID:
            self._void(key, entry, record, out)
        self._settle(key, entry, out, frame, record)

    def fire(self, key: str, state: dict[str, State], out: StageOutput, frame: TimeFrame) -> None:
        """Event time passed this code's `due`: decide the checks that time has now decided."""
        entry = state.get(key)
        if entry is not None:
            self._settle(key, entry, out, frame, None)

    # -- records ---------------------------------------------------------------------------------

    def _dispense(self, entry: State, record: Record) -> list[Any] | None:
        """Record the dispense (once: a sale and its settlement are one); returns its entry."""
        inst: str = record["inst"]
        dk: str = record["dk"]
        dispenses: list[list[Any]] = entry.setdefault("d", [])
        for d in dispenses:
            if d[INST] == inst and d[DK] == dk:
                return d  # the second record of one dispense: judged when the first came
        new = [
            inst,
            dk,
            record["ev"],
            round(record["ts"]),  # what the packed form keeps: replay and stream agree
            record["u"] if record["sp"] else 0,
            0,
            record["ln"],
            1 if record.get("rc") else 0,
            "",
            record.get("off", 0),
            "",
        ]
        insort(dispenses, new, key=_order)
        if len(dispenses) > MAX_DISPENSES:
            oldest = next((d for d in dispenses if d[RET]), dispenses[0])
            dispenses.remove(oldest)
            if oldest is new:
                return None
        return new

    def _match_return(self, key: str, entry: State, dispense: list[Any], out: StageOutput) -> None:
        """A dispense arrived after a return of it: the return undoes it (the earliest return
        at that institution no earlier in event time that names it or names nothing) and its
        RETURN_WITHOUT_SALE is withdrawn."""
        unmatched: list[list[Any]] = entry["ur"]
        for i, u in enumerate(unmatched):
            if (
                u[U_INST] == dispense[INST]
                and u[U_TS] >= dispense[TS]
                and u[U_OF] in ("", dispense[EV])
                and not dispense[RET]
            ):
                dispense[RET], dispense[UNDONE] = u[U_TS], u[U_EV]
                del unmatched[i]
                alert = _return_without_sale(key, entry, _unmatched_record(u))
                out.alerts.append(
                    withdrawal(alert, [dispense[EV]], "the sale it returns arrived after it")
                )
                break
        if not unmatched:
            del entry["ur"]

    def _void(self, key: str, entry: State, record: Record, out: StageOutput) -> None:
        inst, voided, of = record["inst"], record["vt"], record["of"]
        if voided == DISPENSE:
            kept = []
            for d in entry.get("d", ()):
                if d[INST] == inst and d[EV] == of:
                    for letter in d[STANDING]:
                        alert = self._alert(key, entry, entry["d"].index(d), letter)
                        out.alerts.append(
                            withdrawal(alert, [record["ev"]], "the dispense was voided")
                        )
                else:
                    kept.append(d)
            entry["d"] = kept
        elif voided in (RECEIVE, LEAVE):
            sign = 1 if voided == RECEIVE else -1
            holdings = entry.get("h", [])
            for i in range(len(holdings) - 1, -1, -1):
                if holdings[i][H_INST] == inst and holdings[i][H_KIND] == sign:
                    del holdings[i]
                    break
        elif voided in (RETURN, CANCEL):
            for d in entry.get("d", ()):
                if d[INST] == inst and d[UNDONE] == of:
                    d[RET], d[UNDONE] = 0, ""
            unmatched = entry.get("ur", [])
            for u in [u for u in unmatched if u[U_INST] == inst and u[U_EV] == of]:
                unmatched.remove(u)
                alert = _return_without_sale(key, entry, _unmatched_record(u))
                out.alerts.append(withdrawal(alert, [record["ev"]], "the return was voided"))
            if not unmatched:
                entry.pop("ur", None)

    # -- judging ---------------------------------------------------------------------------------

    def _settle(
        self,
        key: str,
        entry: State,
        out: StageOutput,
        frame: TimeFrame,
        cause: Record | None,
    ) -> None:
        """Re-judge the code; raise what now holds, withdraw what no longer does."""
        dispenses = entry.get("d", [])
        for i, letters in enumerate(judge(entry, frame, self.grace)):
            d = dispenses[i]
            before = d[STANDING]
            if before == letters:
                continue
            for letter in letters:
                if letter not in before:
                    out.alerts.append(self._alert(key, entry, i, letter))
            for letter in before:
                if letter not in letters:
                    explained = [cause["ev"]] if cause is not None else []
                    why = _WHY.get((letter, cause["t"] if cause is not None else ""), "")
                    alert = withdrawal(self._alert(key, entry, i, letter), explained, why)
                    out.alerts.append(alert)
            d[STANDING] = letters
        due = next_due(entry, frame, self.grace)
        if due is None:
            entry.pop("due", None)
            entry.pop("dl", None)
        else:
            entry["due"], entry["dl"] = due
        if not dispenses:
            entry.pop("d", None)
        if not entry.get("h", True):
            del entry["h"]

    def _alert(self, key: str, entry: State, i: int, letter: str) -> Alert:
        dispenses = entry["d"]
        d = dispenses[i]
        inst, ts = d[INST], d[TS]
        standing = [e for e in dispenses[:i] if not (e[RET] and e[RET] <= ts)]
        common: dict[str, Any] = {
            "institution": inst,
            "occurred_at": local_iso(ts, d[OFF]),
            "product": entry.get("p"),
            "code": key,
            "settlement_id": d[DK][2:] if d[DK].startswith("s:") else None,
        }
        if letter == CROSS:
            earlier = [e for e in standing if e[INST] != inst]
            return make_alert(
                "CROSS_INSTITUTION_SALE",
                event_ids=_event_ids(earlier, d[EV]),
                evidence={"earlier_sales": describe(earlier), "resale": describe([d])[0]},
                id_facts=(key, d[EV]),
                **common,
            )
        if letter == NO_PROVENANCE:
            return make_alert(
                "NO_PROVENANCE",
                event_ids=[d[EV]],
                evidence={
                    "dispensed_at": local_iso(ts, d[OFF]),
                    "grace_hours": self.grace / 3600,
                    "checked_after": local_iso(ts + self.grace, d[OFF]),
                    "dispenses_until_checked": describe(
                        [e for e in dispenses if e[INST] == inst and e[TS] <= ts + self.grace],
                        with_returns=False,
                    ),
                    "receipts_here": [
                        {"occurred_at": local_iso(h[H_TS], d[OFF]), "received": h[H_KIND] > 0}
                        for h in entry.get("h", ())
                        if h[H_INST] == inst
                    ],
                },
                id_facts=(key, d[EV]),
                **common,
            )
        here = [e for e in standing if e[INST] == inst]
        evidence: dict[str, Any] = {"earlier_sales": describe(here), "line_no": d[LN]}
        if d[UNITS]:
            evidence.update(
                units_before=sum(e[UNITS] for e in here) / 1000,
                units_now=d[UNITS] / 1000,
                pack_size=(entry.get("ps") or 0) / 1000,
            )
        if not d[UNITS] and letter == SPLIT:
            evidence["mixed_with_whole_pack"] = True
        return make_alert(
            RULE_OF[letter],
            event_ids=_event_ids(here, d[EV]),
            evidence=evidence,
            id_facts=(key, d[EV], d[LN]),
            **common,
        )


_WHY = {
    (CROSS, RETURN): "the earlier sale was returned before the resale",
    (CROSS, CANCEL): "the earlier settlement was cancelled before the resale",
    (CROSS, VOID): "an event it rested on was voided",
    (DUPLICATE, RETURN): "the earlier sale was returned before this one",
    (DUPLICATE, CANCEL): "the earlier settlement was cancelled before this one",
    (DUPLICATE, VOID): "an event it rested on was voided",
    (SPLIT, RETURN): "units of an earlier split sale were returned",
    (SPLIT, CANCEL): "an earlier split settlement was cancelled",
    (SPLIT, VOID): "an event it rested on was voided",
    (NO_PROVENANCE, RECEIVE): "a receipt of the box within the grace period arrived",
    (NO_PROVENANCE, VOID): "an event it rested on was voided",
}


def _event_ids(earlier: list[list[Any]], ev: str) -> list[str]:
    ids = list(dict.fromkeys(e[EV] for e in earlier))
    return [*ids, ev] if ev not in ids else ids


def describe(dispenses: list[list[Any]], with_returns: bool = True) -> list[dict[str, Any]]:
    """Dispenses as an inspector reads them: where, which event, when, how much."""
    described = []
    for d in sorted(dispenses, key=_order):  # event time, not arrival order: every run agrees
        item: dict[str, Any] = {
            "institution": d[INST],
            "event_id": d[EV],
            "dispense": d[DK],
            "occurred_at": local_iso(d[TS], d[OFF]),
            "units": d[UNITS] / 1000 if d[UNITS] else "whole pack",
        }
        if with_returns:
            item["returned"] = bool(d[RET])
        described.append(item)
    return described


def _undo(entry: State, record: Record, original: str | None) -> bool:
    """Mark a dispense at the record's institution returned: the one `record["dk"]` names (a
    cancellation), else the sale the return names (`original_event_id`), else the latest one
    before the return in event time - a return never undoes a later sale (the sale it returns
    may simply not have arrived yet: the return then waits, see `ur`)."""
    inst, dk = record["inst"], record.get("dk")
    at = round(record["ts"])
    candidates = [
        d
        for d in entry.get("d", ())
        if d[INST] == inst and not d[RET] and (d[DK] == dk if dk is not None else d[TS] <= at)
    ]
    if not candidates:
        return False
    named = [d for d in candidates if d[EV] == original] if original else []
    d = (named or candidates)[-1]
    d[RET] = max(1, round(record["ts"]))
    d[UNDONE] = record["ev"]
    return True


def _unmatched_record(u: list[Any]) -> Record:
    """The fields of the return record an unmatched return keeps, as its alert needs them."""
    return {
        "inst": u[U_INST],
        "ev": u[U_EV],
        "ts": u[U_TS],
        "off": u[U_OFF],
        "ln": u[U_LN],
        "raw": u[U_RAW] or None,
    }


def _return_without_sale(key: str, entry: State, record: Record) -> Alert:
    return make_alert(
        "RETURN_WITHOUT_SALE",
        institution=record["inst"],
        event_ids=[record["ev"]],
        occurred_at=local_iso(record["ts"], record.get("off", 0)),
        evidence={
            "line_no": record.get("ln"),
            "raw": record.get("raw"),
            "dispenses": describe(entry.get("d", [])),
        },
        id_facts=(key, record["ev"], record.get("ln")),
        product=entry.get("p") or record.get("p"),
        code=key,
    )
