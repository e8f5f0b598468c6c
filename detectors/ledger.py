"""The per-(institution, product) ledger (进销存): NO_CODE, OVERSOLD, STOCK_COUNT_MISMATCH.

State per `institution|product`, in the product's smallest unit (packs converted with the
catalog's pack size at ingest):
- `b`: expected stock on hand - last count + received - returned to supplier - dispensed +
  returned by patients + other changes + registered legacy stock;
- `tot`: the totals since the last count that make up `b`, for evidence and the read API:
  `in` received, `rs` returned to supplier, `out` dispensed, `ret` returned by patients,
  `chg` other stock changes (signed), `leg` legacy stock registered;
- `nr`: units dispensed beyond what the ledger held (dispensed without any recorded purchase);
- `cnt`: the last count `[event time, units]` once one has been fired into the baseline;
- `legacy`: registered uncoded stock (无码库) still available to settle without codes;
- `pend`/`due`: checks parked until the watermark passes their event time + grace.

Opening balance: an institution with no count starts from zero - the first purchase, legacy
registration or count sets it. Starting from "unknown" would make OVERSOLD blind for exactly the
institutions that never count; a first count that differs from what its purchases imply is
itself worth a STOCK_COUNT_MISMATCH.

One dispense is counted once: the second record of a sale and its settlement (same institution
and settlement id) arrives marked `dup` by ingest and moves nothing. Voids and cancellations undo
what the event they name counted.

Late purchases (daily 进销存 batches are normal) must not raise OVERSOLD, and a count must be
compared with the stock at the moment it was taken. So both checks run in event time: a dispense
that leaves the ledger below zero, and every count, park a check `[kind, ts, event, units,
after, occurred_at]`; every later record whose event time is after `ts` adds its change to
`after` (per total). When the watermark passes `ts` + grace, the stock at `ts` is `b - after`, with every
record of up to grace lateness in it:
- OVERSOLD fires when that dispense took the stock at `ts` from >= -tolerance to below it: once
  per crossing, re-armed by any replenishment or recount that lifts the stock back;
- STOCK_COUNT_MISMATCH fires when the count differs from the stock at `ts` beyond tolerance; the
  count becomes the baseline either way (`b` = count + after).
A record later than the grace period is applied to `b` as it comes; if it predates a count
already fired into the baseline it is counted on top of it (the README says so).

NO_CODE (CONTRACT.md): a settlement line of a code-required product with no scan at all, which
registered legacy stock does not cover. A covered line draws the stock down; an uncovered line is
rejected, so it draws nothing (partial cover is no cover: the fund pays the line whole or not at
all). Either way the dispense counts in the ledger: the drug left the shelf.
"""

from __future__ import annotations

from typing import Any

from detectors.alerts import make_alert
from detectors.code_state import CANCEL, VOID, iso
from detectors.stage import BaseStage, Record, StageOutput, State, Watermarks, lane_of

DEFAULT_GRACE_SECONDS = 72 * 3600
DEFAULT_TOLERANCE_UNITS = 0.5  # covers rounding of fractional packs to units
MAX_PENDING = 64  # parked checks per ledger key; beyond that the oldest is run early

OVERSOLD_CHECK = "o"
COUNT_CHECK = "c"

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
_TS, _KIND = 1, 0
_EV, _UNITS, _AFTER, _AT = 2, 3, 4, 5


class LedgerStage(BaseStage):
    name = "ledger"

    def __init__(
        self,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        tolerance: float = DEFAULT_TOLERANCE_UNITS,
    ) -> None:
        self.grace = round(grace_seconds)
        self.tolerance = tolerance

    def apply(self, record: Record, state: dict[str, State], out: StageOutput) -> None:
        kind = record["t"]
        key = record["k"]
        entry = _copy(state.get(key))
        if kind == "stock_count":
            self._park(
                entry, [COUNT_CHECK, record["ts"], record["ev"], record["u"], {}, record["at"]]
            )
        elif kind == CANCEL:
            # a cancelled settlement: its units come back from the patient
            if record["vt"] in _DISPENSES and not record.get("dup"):
                self._change(entry, record, record["u"], "ret")
        elif kind == VOID:
            voided = record["vt"]
            if voided in _DIRECTION and not record.get("dup"):
                sign, total = _DIRECTION[voided]
                self._change(entry, record, -sign * record["u"], total)
                if voided == "legacy_stock":
                    entry["legacy"] = max(0, entry.get("legacy", 0) - record["u"])
        elif kind in _DIRECTION:
            if kind == "legacy_stock":
                entry["legacy"] = entry.get("legacy", 0) + record["u"]
            if kind == "settlement":
                rules = self._no_code(entry, record, out)
                out.line_rules(record["vk"], record["ln"], rules)
            if not record.get("dup"):
                sign, total = _DIRECTION[kind]
                before = entry.get("b", 0)
                self._change(entry, record, sign * record["u"], total)
                if kind in _DISPENSES:
                    self._dispensed(entry, record, before)
        self._set_due(entry, out, key)
        state[key] = entry

    # -- arithmetic --------------------------------------------------------------------------------

    def _change(self, entry: State, record: Record, delta: float, total: str) -> None:
        booked = delta * _SIGN[total]  # totals count in their own direction
        entry["b"] = entry.get("b", 0) + delta
        tot = entry.setdefault("tot", {})
        tot[total] = tot.get(total, 0) + booked
        ts = record["ts"]
        for check in entry.get("pend", ()):
            if ts > check[_TS]:  # happened after the check's moment: not part of its stock
                after = check[_AFTER]
                after["b"] = after.get("b", 0) + delta
                after[total] = after.get(total, 0) + booked

    def _dispensed(self, entry: State, record: Record, before: float) -> None:
        units = record["u"]
        uncovered = units - max(0.0, before)
        if uncovered > 0:
            entry["nr"] = entry.get("nr", 0) + min(units, uncovered)
        if entry["b"] < -self.tolerance:
            self._park(entry, [OVERSOLD_CHECK, record["ts"], record["ev"], units, {}, record["at"]])

    def _park(self, entry: State, check: list[Any]) -> None:
        pending: list[list[Any]] = entry.setdefault("pend", [])
        pending.append(check)

    def _set_due(self, entry: State, out: StageOutput, key: str) -> None:
        pending = entry.get("pend")
        if not pending:
            entry.pop("pend", None)
            entry.pop("due", None)
            entry.pop("dl", None)
            return
        if len(pending) > MAX_PENDING:
            # a ledger far below zero parks a check per dispense: run the oldest now
            pending.sort(key=lambda c: c[_TS])
            oldest = pending.pop(0)
            self._run(entry, oldest, key, out)
        entry["due"] = min(c[_TS] for c in pending) + self.grace
        entry["dl"] = lane_of(key.split("|", 1)[0])

    # -- checks in event time --------------------------------------------------------------------

    def fire(
        self, key: str, state: dict[str, State], watermarks: Watermarks, out: StageOutput
    ) -> None:
        entry = _copy(state.get(key))
        watermark = watermarks.get(lane_of(key.split("|", 1)[0]), float("-inf"))
        ripe = sorted(
            (c for c in entry.get("pend", ()) if c[_TS] + self.grace <= watermark),
            key=lambda c: c[_TS],
        )
        entry["pend"] = [c for c in entry.get("pend", ()) if c[_TS] + self.grace > watermark]
        for check in ripe:
            self._run(entry, check, key, out)
        self._set_due(entry, out, key)
        state[key] = entry

    def _run(self, entry: State, check: list[Any], key: str, out: StageOutput) -> None:
        after: dict[str, float] = check[_AFTER]
        at_ts = entry.get("b", 0) - after.get("b", 0)  # stock at the check's event time
        tot = entry.get("tot", {})
        totals_then = {k: v - after.get(k, 0) for k, v in tot.items()}
        inst, product = key.split("|", 1)
        if check[_KIND] == OVERSOLD_CHECK:
            before = at_ts + check[_UNITS]
            if at_ts < -self.tolerance <= before:
                out.alerts.append(
                    self._alert(
                        "OVERSOLD",
                        inst,
                        product,
                        check,
                        entry,
                        totals_then,
                        {
                            "expected_stock_before": before,
                            "units_dispensed": check[_UNITS],
                            "expected_stock_after": at_ts,
                        },
                    )
                )
            return
        counted = check[_UNITS]
        if abs(counted - at_ts) > self.tolerance:
            out.alerts.append(
                self._alert(
                    "STOCK_COUNT_MISMATCH",
                    inst,
                    product,
                    check,
                    entry,
                    totals_then,
                    {
                        "expected_units": at_ts,
                        "counted_units": counted,
                        "difference_units": counted - at_ts,
                    },
                )
            )
        # the count is the new baseline; what happened after it is the new "since last count"
        entry["b"] = counted + after.get("b", 0)
        entry["cnt"] = [check[_TS], counted]
        entry["tot"] = {k: v for k, v in after.items() if k != "b" and v}

    def _alert(
        self,
        rule: str,
        inst: str,
        product: str,
        check: list[Any],
        entry: State,
        totals: dict[str, float],
        facts: dict[str, Any],
    ) -> Any:
        last = entry.get("cnt")
        return make_alert(
            rule,
            institution=inst,
            event_ids=[check[_EV]],
            occurred_at=check[_AT],
            evidence={
                **facts,
                "unit": "smallest unit (pack_size per pack)",
                "tolerance_units": self.tolerance,
                "since_last_count": _totals(totals),
                "last_count": {"at": iso(last[0]), "units": last[1]} if last else None,
                "grace_hours": self.grace / 3600,
            },
            id_facts=(product, check[_EV]),
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
                occurred_at=record["at"],
                evidence={
                    "line_no": record["ln"],
                    "quantity": record["q"],
                    "unit": record["unit"],
                    "legacy_stock_units": legacy,
                    "units_needed": record["u"],
                    "known_product": record["known"],
                },
                id_facts=(record["ev"], record["ln"]),
                product=record["p"],
                settlement_id=record.get("sid"),
            )
        )
        return ["NO_CODE"]


_TOTAL_NAMES = {
    "in": "received",
    "rs": "returned_to_supplier",
    "out": "dispensed",
    "ret": "returned_by_patients",
    "chg": "other_changes",
    "leg": "legacy_registered",
}
_SIGN = {"in": 1, "rs": -1, "out": -1, "ret": 1, "chg": 1, "leg": 1}


def _totals(tot: dict[str, float]) -> dict[str, float]:
    return {name: tot.get(short, 0) for short, name in _TOTAL_NAMES.items()}


def describe(key: str, entry: State) -> dict[str, Any]:
    """One ledger as an inspector reads it (the read API and `tracewatch ledger`)."""
    inst, product = key.split("|", 1)
    last = entry.get("cnt")
    return {
        "institution": inst,
        "product": product,
        "expected_units": entry.get("b", 0),
        "legacy_stock_units": entry.get("legacy", 0),
        "units_dispensed_without_purchase": entry.get("nr", 0),
        "last_count": {"at": iso(last[0]), "units": last[1]} if last else None,
        "since_last_count": _totals(entry.get("tot", {})),
        "checks_waiting": len(entry.get("pend", ())),
    }


def _copy(entry: State | None) -> State:
    if not entry:
        return {}
    copied = dict(entry)
    if "tot" in copied:
        copied["tot"] = dict(copied["tot"])
    if "pend" in copied:
        copied["pend"] = [list(c) for c in copied["pend"]]
    return copied
