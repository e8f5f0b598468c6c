"""The per-(institution, product) ledger: registered uncoded stock (无码库) and NO_CODE.

State per `institution|product`, in the product's smallest unit:
- `legacy`: registered uncoded stock still available to settle without codes.

NO_CODE (CONTRACT.md): a settlement line of a code-required product with no scan at all, which
registered legacy stock does not cover. A covered line draws the stock down; an uncovered line is
rejected, so it settles nothing and draws nothing (partial cover is no cover: the fund pays the
line whole or not at all).
"""

from __future__ import annotations

from detectors.alerts import make_alert
from detectors.stage import BaseStage, Record, StageOutput, State


class LedgerStage(BaseStage):
    name = "ledger"

    def apply(self, record: Record, state: dict[str, State], out: StageOutput) -> None:
        kind = record["t"]
        key = record["k"]
        if kind == "legacy_stock":
            entry = dict(state.get(key) or {})
            entry["legacy"] = entry.get("legacy", 0) + record["u"]
            state[key] = entry
        elif kind == "settlement":
            rules = self._settlement_line(record, state, out)
            out.line_rules(record["vk"], record["ln"], rules)

    def _settlement_line(
        self, record: Record, state: dict[str, State], out: StageOutput
    ) -> list[str]:
        if record["scans"] or not record["req"]:
            return []
        key = record["k"]
        entry = state.get(key) or {}
        legacy = entry.get("legacy", 0)
        if legacy >= record["u"]:
            state[key] = {**entry, "legacy": legacy - record["u"]}
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
