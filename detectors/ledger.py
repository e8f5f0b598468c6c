"""The per-(institution, product) ledger (进销存): NO_CODE, OVERSOLD, STOCK_COUNT_MISMATCH.

All quantities are integers in thousandths of the product's smallest unit (packs converted with
the catalog's pack size at ingest), so sums are exact: 0.45 + 0.55 of a bottle is one bottle.

A ledger key's records all come from one institution, in its own order. State:
- `h`: the recent history, in event-time order: `[ts, seq, total, delta, event_id, offset,
  standing, kind, units]` - `kind` `c` a stock count (`units` counted), `d` a dispense, `+` any
  other change; `seq` the arrival order at this key (ties of event time keep the upload's order);
  `standing` the rule standing against it (`O` OVERSOLD, `M` STOCK_COUNT_MISMATCH);
- `b`, `tot`, `cnt`: what is final - stock after every record older than the institution's own
  time less the grace period (`detectors.event_time`), the totals since the last final count that
  make it up (`in` received, `rs` returned to supplier, `out` dispensed, `ret` returned by
  patients, `chg` other changes, `leg` legacy registered), and that count `[ts, units]`;
- `ow`: the institution's own time (the latest `occurred_at` it sent, carried on every record);
- `legacy`: registered uncoded stock (无码库) still available to settle without codes;
- `nr`: units dispensed beyond what the ledger held when they arrived.

Checks are judged on the history in event-time order (`_judge`), once event time has passed their
moment + grace: a dispense that took the stock from >= -tolerance to below it is OVERSOLD (once
per crossing: replenishment or a recount re-arms it); a count that differs from the stock at its
moment is STOCK_COUNT_MISMATCH and becomes the new baseline. A purchase uploaded a day late counts
where it belongs; a count uploaded in the nightly batch, after that day's real-time settlements
made after it, is compared with the stock at its own time. Until a record is final, a later upload
can change a judgement: the alert is then withdrawn (or raised late). Records older than the final
horizon are applied to the final stock as they come (`b`), on top of any count before them.

Opening balance: an institution with no count starts from zero - the first purchase, legacy
registration or count sets it. Starting from "unknown" would make OVERSOLD blind for exactly the
institutions that never count; a first count that differs from what its purchases imply is itself
worth a STOCK_COUNT_MISMATCH.

One dispense is counted once: the second record of a sale and its settlement (same institution
and settlement id) arrives marked `dup` by ingest and moves nothing. Voids and cancellations undo
what the event they name counted.

NO_CODE (CONTRACT.md): a settlement line of a code-required product with no scan at all, which
registered legacy stock does not cover. A covered line draws the stock down; an uncovered line is
rejected, so it draws nothing (partial cover is no cover: the fund pays the line whole or not at
all). Either way the dispense counts in the ledger: the drug left the shelf.
"""

from __future__ import annotations

from bisect import insort
from itertools import islice
from typing import Any

from detectors.alerts import local_iso, make_alert, withdrawal
from detectors.code_state import CANCEL, VOID
from detectors.event_time import DEFAULT_GRACE_SECONDS, NEVER, TimeFrame
from detectors.stage import BaseStage, Record, StageOutput, State, lane_of
from topics.records import KEY_SEP, Alert

DEFAULT_TOLERANCE_UNITS = 0.5  # covers rounding of fractional packs to units
MILLI = 1000  # ledger quantities are thousandths of the smallest unit
MAX_HISTORY = 512  # records kept open per ledger key; beyond that the oldest are made final

COUNT, DISPENSED, CHANGE = "c", "d", "+"
OVERSOLD, MISMATCH = "O", "M"

# the signed change each record type makes to stock, and the total it is booked under
_DIRECTION: dict[str, tuple[int, str]] = {
    "purchase": (1, "in"),
    "purchase_return": (-1, "rs"),
    "sale": (-1, "out"),
    "settlement": (-1, "out"),
    "sale_return": (1, "ret"),
    "stock_change": (1, "chg"),  # units carry their own sign
    "legacy_stock": (1, "leg"),
}
_DISPENSES = frozenset({"sale", "settlement"})
_SIGN = {"in": 1, "rs": -1, "out": -1, "ret": 1, "chg": 1, "leg": 1}
_TOTAL_NAMES = {
    "in": "received",
    "rs": "returned_to_supplier",
    "out": "dispensed",
    "ret": "returned_by_patients",
    "chg": "other_changes",
    "leg": "legacy_registered",
}
# history entry fields
TS, SEQ, TOTAL, DELTA, EV, OFF, STANDING, KIND, UNITS = range(9)


def split_key(key: str) -> tuple[str, str]:
    inst, product = key.split(KEY_SEP, 1)
    return inst, product


class LedgerStage(BaseStage):
    name = "ledger"

    def __init__(
        self,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        tolerance: float = DEFAULT_TOLERANCE_UNITS,
    ) -> None:
        self.grace = round(grace_seconds)
        self.tolerance = round(tolerance * MILLI)

    def apply(
        self, record: Record, state: dict[str, State], out: StageOutput, frame: TimeFrame
    ) -> None:
        kind = record["t"]
        key = record["k"]
        entry = state.get(key)
        if entry is None:
            entry = state[key] = {}
        entry["ow"] = max(entry.get("ow", NEVER), record.get("ow", record["ts"]))
        if kind == "stock_count":
            self._add(entry, record, COUNT, "", 0)
        elif kind == CANCEL:
            # a cancelled settlement: its units come back from the patient
            if record["vt"] in _DISPENSES and not record.get("dup"):
                self._add(entry, record, CHANGE, "ret", record["u"])
        elif kind == VOID:
            self._void(key, entry, record, out)
        elif kind in _DIRECTION:
            if kind == "legacy_stock":
                entry["legacy"] = entry.get("legacy", 0) + record["u"]
            if kind == "settlement":
                self.judge_settlement(record, state, out)
            if not record.get("dup"):
                sign, total = _DIRECTION[kind]
                if kind in _DISPENSES:
                    held = self.stock(entry)
                    if record["u"] > max(0, held):
                        entry["nr"] = entry.get("nr", 0) + min(
                            record["u"], record["u"] - max(0, held)
                        )
                    self._add(entry, record, DISPENSED, total, -record["u"])
                else:
                    self._add(entry, record, CHANGE, total, sign * record["u"])
        self._settle(key, entry, out, frame, record)

    def judge_settlement(self, record: Record, state: dict[str, State], out: StageOutput) -> None:
        """A settlement line's verdict from the ledger: NO_CODE unless registered legacy stock
        covers it. `apply` calls it; the pre-settlement check calls it alone, since it is the
        whole of what the ledger decides about a settlement - it draws the legacy stock down,
        which is all a later line of the same settlement depends on, and the stock figures
        (OVERSOLD) wait for event time and reject nothing."""
        entry = state.get(record["k"])
        if entry is None:
            entry = state[record["k"]] = {}
        rules = self._no_code(entry, record, out)
        out.line_rules(record["vk"], record["ln"], rules)

    def fire(self, key: str, state: dict[str, State], out: StageOutput, frame: TimeFrame) -> None:
        entry = state.get(key)
        if entry is not None:
            self._settle(key, entry, out, frame, None)

    # -- history -----------------------------------------------------------------------------------

    def _add(
        self,
        entry: State,
        record: Record,
        kind: str,
        total: str,
        delta: int,
    ) -> None:
        history: list[list[Any]] = entry.setdefault("h", [])
        # in (ts, seq) order: entries compare as lists, and `seq` is unique per key, so no
        # comparison reaches the fields after it
        insort(history, self._entry(entry, record, kind, total, delta))

    def _entry(self, entry: State, record: Record, kind: str, total: str, delta: int) -> list[Any]:
        seq = entry.get("seq", 0) + 1
        entry["seq"] = seq
        units = record["u"] if kind != CHANGE else abs(delta)
        return [
            round(record["ts"]),
            seq,
            total,
            delta,
            record["ev"],
            record.get("off", 0),
            "",
            kind,
            units,
        ]

    def _void(self, key: str, entry: State, record: Record, out: StageOutput) -> None:
        """A void of a movement is booked when the void is made (the cash sale taken back, the
        mistaken purchase taken off the shelf); a void of a count removes the count."""
        voided = record["vt"]
        if voided == "legacy_stock":
            entry["legacy"] = max(0, entry.get("legacy", 0) - record["u"])
        if record.get("dup"):
            return
        if voided in _DIRECTION:
            sign, total = _DIRECTION[voided]
            self._add(entry, record, CHANGE, total, -sign * record["u"])
            return
        if voided != "stock_count":
            return
        history = entry.get("h", [])
        for i, e in enumerate(history):
            if e[EV] == record["of"] and e[KIND] == COUNT:
                del history[i]
                if e[STANDING]:
                    inst, product = split_key(key)
                    alert = self._alert(e[STANDING], inst, product, e, 0, {}, None)
                    out.alerts.append(withdrawal(alert, [record["ev"]], "the count was voided"))
                return

    def _finalise_one(self, key: str, entry: State, e: list[Any], out: StageOutput) -> None:
        if e[KIND] == COUNT:
            if not e[STANDING] and abs(e[UNITS] - entry.get("b", 0)) > self.tolerance:
                # a count later than the grace period: judged against the final figures
                inst, product = split_key(key)
                out.alerts.append(
                    self._alert(
                        MISMATCH,
                        inst,
                        product,
                        e,
                        entry.get("b", 0),
                        entry.get("tot", {}),
                        entry.get("cnt"),
                    )
                )
            entry["b"] = e[UNITS]
            entry["tot"] = {}
            entry["cnt"] = [e[TS], e[UNITS]]
            return
        entry["b"] = entry.get("b", 0) + e[DELTA]
        tot = entry.setdefault("tot", {})
        tot[e[TOTAL]] = tot.get(e[TOTAL], 0) + e[DELTA] * _SIGN[e[TOTAL]]

    @staticmethod
    def stock(entry: State) -> int:
        """Expected stock on hand after everything known (on every dispense: no totals)."""
        stock: int = entry.get("b", 0)
        for e in entry.get("h", ()):
            stock = e[UNITS] if e[KIND] == COUNT else stock + e[DELTA]
        return stock

    # -- judging -----------------------------------------------------------------------------------

    def _settle(
        self, key: str, entry: State, out: StageOutput, frame: TimeFrame, cause: Record | None
    ) -> None:
        history: list[list[Any]] = entry.get("h", [])
        inst, product = split_key(key)
        now = max(frame.at(lane_of(inst)), entry.get("ow", NEVER))
        stock = entry.get("b", 0)
        totals = dict(entry.get("tot", {}))
        last = entry.get("cnt")
        due: float | None = None
        grace = self.grace
        for at, e in enumerate(history):
            ripe = e[TS] + grace <= now
            if not ripe and due is None:
                # the first open record (the history is in time order): the earliest due, and
                # every later one is open too, so nothing there to judge - unless one of them
                # still holds a rule judged when time stood later than now (then walk on and
                # withdraw it; while event time only rises this never happens)
                due = e[TS] + grace
                if not any(later[STANDING] for later in islice(history, at, None)):
                    break
            before = stock
            letters = ""
            if e[KIND] == COUNT:
                if ripe and abs(e[UNITS] - stock) > self.tolerance:
                    letters = MISMATCH
                stock = e[UNITS]
            else:
                stock += e[DELTA]
                if e[KIND] == DISPENSED and ripe and stock < -self.tolerance <= before:
                    letters = OVERSOLD
            if letters != e[STANDING]:
                if letters:
                    out.alerts.append(self._alert(letters, inst, product, e, before, totals, last))
                else:
                    alert = self._alert(e[STANDING], inst, product, e, before, totals, last)
                    explained = [cause["ev"]] if cause is not None else []
                    out.alerts.append(
                        withdrawal(alert, explained, "a later upload changed the stock at its time")
                    )
                e[STANDING] = letters
            if e[KIND] == COUNT:
                totals, last = {}, [e[TS], e[UNITS]]
            else:
                totals[e[TOTAL]] = totals.get(e[TOTAL], 0) + e[DELTA] * _SIGN[e[TOTAL]]
        # what the institution's own time has passed is final
        horizon = entry.get("ow", NEVER) - self.grace
        while history and (history[0][TS] <= horizon or len(history) > MAX_HISTORY):
            self._finalise_one(key, entry, history.pop(0), out)
        if not history:
            entry.pop("h", None)
            entry.pop("seq", None)
            due = None
        if due is None:
            entry.pop("due", None)
            entry.pop("dl", None)
        else:
            entry["due"], entry["dl"] = due, lane_of(inst)

    def _alert(
        self,
        letter: str,
        inst: str,
        product: str,
        e: list[Any],
        before: int,
        totals: dict[str, int],
        last: list[Any] | None,
    ) -> Alert:
        if letter == OVERSOLD:
            rule = "OVERSOLD"
            facts: dict[str, Any] = {
                "expected_stock_before": before / MILLI,
                "units_dispensed": e[UNITS] / MILLI,
                "expected_stock_after": (before + e[DELTA]) / MILLI,
            }
        else:
            rule = "STOCK_COUNT_MISMATCH"
            facts = {
                "expected_units": before / MILLI,
                "counted_units": e[UNITS] / MILLI,
                "difference_units": (e[UNITS] - before) / MILLI,
            }
        return make_alert(
            rule,
            institution=inst,
            event_ids=[e[EV]],
            occurred_at=local_iso(e[TS], e[OFF]),
            evidence={
                **facts,
                "unit": "smallest unit (pack_size per pack)",
                "tolerance_units": self.tolerance / MILLI,
                "since_last_count": _totals(totals),
                "last_count": {"at": local_iso(last[0], e[OFF]), "units": last[1] / MILLI}
                if last
                else None,
                "grace_hours": self.grace / 3600,
            },
            id_facts=(product, e[EV]),
            product=product,
        )

    # -- registered uncoded stock ------------------------------------------------------------------

    def _no_code(self, entry: State, record: Record, out: StageOutput) -> list[str]:
        if record["scans"] or not record["req"]:
            return []
        legacy = entry.get("legacy", 0)
        if legacy >= record["u"]:
            entry["legacy"] = legacy - record["u"]
            return []
        out.alerts.append(
            make_alert(
                "NO_CODE",
                institution=record["inst"],
                event_ids=[record["ev"]],
                occurred_at=local_iso(record["ts"], record.get("off", 0)),
                evidence={
                    "line_no": record["ln"],
                    "quantity": record["q"],
                    "unit": record["unit"],
                    "legacy_stock_units": legacy / MILLI,
                    "units_needed": record["u"] / MILLI,
                    "known_product": record["known"],
                },
                id_facts=(record["ev"], record["ln"]),
                product=record["p"],
                settlement_id=record.get("sid"),
            )
        )
        return ["NO_CODE"]


def _totals(tot: dict[str, int]) -> dict[str, float]:
    return {name: tot.get(short, 0) / MILLI for short, name in _TOTAL_NAMES.items()}


def figures(entry: State) -> tuple[int, dict[str, int], list[Any] | None]:
    """Stock after everything known, the totals since the last count, and that count."""
    stock = entry.get("b", 0)
    totals = dict(entry.get("tot", {}))
    last = entry.get("cnt")
    for e in entry.get("h", ()):
        if e[KIND] == COUNT:
            stock, totals, last = e[UNITS], {}, [e[TS], e[UNITS]]
        else:
            stock += e[DELTA]
            totals[e[TOTAL]] = totals.get(e[TOTAL], 0) + e[DELTA] * _SIGN[e[TOTAL]]
    return stock, totals, last


def describe(key: str, entry: State) -> dict[str, Any]:
    """One ledger as an inspector reads it (the read API and `tracewatch ledger`)."""
    inst, product = split_key(key)
    stock, totals, last = figures(entry)
    return {
        "institution": inst,
        "product": product,
        "expected_units": stock / MILLI,
        "legacy_stock_units": entry.get("legacy", 0) / MILLI,
        "units_dispensed_without_purchase": entry.get("nr", 0) / MILLI,
        "last_count": {"at": local_iso(last[0]), "units": last[1] / MILLI} if last else None,
        "since_last_count": _totals(totals),
        # records a later upload may still re-judge (younger than the grace period)
        "records_open": len(entry.get("h", ())),
    }
