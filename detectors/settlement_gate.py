"""No code, no settlement (无码不结算): the scan checks on settlement lines and the verdict.

The gate's rules split by what they need:
- stateless, decided at ingest from the scans and the catalog: INVALID_CODE, WRONG_BARCODE,
  UNKNOWN_CODE, PRODUCT_MISMATCH, CODE_COUNT_MISMATCH, and from the line's price and the
  product's cap PRICE_ABOVE_CAP (`check_settlement`; it does not reject);
- per (institution, product) state - registered uncoded stock (无码库) - decided by the ledger:
  NO_CODE (`detectors.ledger`);
- per code state, decided by the code lifecycle: DUPLICATE_SALE, CROSS_INSTITUTION_SALE,
  SPLIT_OVERFLOW.
A verdict is assembled from the stateless head plus one part from every stage partition that
received a line of the settlement (`verdict`; the streaming side collects the parts in
`detectors.verdicts`), so one verdict names every rule that rejected each line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detectors.alerts import make_alert
from detectors.catalog import Catalog, Product
from detectors.codes import CodeKind, ScannedCode, classify
from topics.records import Alert, Event, Line, join_key

# CONTRACT.md, "Settlement verdicts": the rules that reject a line.
REJECTING_RULES = frozenset(
    {
        "NO_CODE",
        "CODE_COUNT_MISMATCH",
        "INVALID_CODE",
        "WRONG_BARCODE",
        "PRODUCT_MISMATCH",
        "DUPLICATE_SALE",
        "CROSS_INSTITUTION_SALE",
        "SPLIT_OVERFLOW",
    }
)


@dataclass(slots=True)
class CheckedLine:
    """One line after its scans were classified; what later stages need of it."""

    line: Line
    product: Product | None
    scans: list[ScannedCode]
    codes: list[ScannedCode] = field(default_factory=list)  # distinct well-formed, scan order
    rules: set[str] = field(default_factory=set)


def code_owner(scan: ScannedCode, catalog: Catalog) -> Product | None:
    if scan.kind is CodeKind.CN20 and scan.prefix is not None:
        return catalog.by_prefix.get(scan.prefix)
    if scan.kind is CodeKind.GS1 and scan.gtin is not None:
        return catalog.by_gtin.get(scan.gtin)
    return None


def classify_line(line: Line, catalog: Catalog) -> CheckedLine:
    scans = [classify(raw) for raw in line.codes]
    checked = CheckedLine(line, catalog.get(line.product), scans)
    seen: set[str] = set()
    for scan in scans:
        if scan.key is not None and scan.key not in seen:
            seen.add(scan.key)
            checked.codes.append(scan)
    return checked


def check_settlement(event: Event, catalog: Catalog) -> tuple[list[CheckedLine], list[Alert]]:
    """The stateless gate rules for every line of a settlement: one alert per bad scan/line."""
    checked = [classify_line(line, catalog) for line in event.lines]
    alerts: list[Alert] = []
    for cl in checked:
        line = cl.line
        for index, scan in enumerate(cl.scans):
            rule, evidence = _scan_rule(scan, cl, catalog)
            if rule is None:
                continue
            cl.rules.add(rule)
            alerts.append(
                make_alert(
                    rule,
                    institution=event.institution,
                    event_ids=[event.event_id],
                    occurred_at=event.occurred_at,
                    evidence={"line_no": line.line_no, "raw": scan.raw, **evidence},
                    id_facts=(event.event_id, line.line_no, index),
                    product=line.product,
                    code=scan.key,
                    settlement_id=event.settlement_id,
                )
            )
        # a whole-pack line carries one distinct code per pack, whichever unit it is billed in
        packs = line.quantity
        if line.unit == "unit":
            packs = line.quantity / (cl.product.pack_size if cl.product else 1)
        if cl.scans and not line.split and len(cl.codes) != packs:
            cl.rules.add("CODE_COUNT_MISMATCH")
            alerts.append(
                make_alert(
                    "CODE_COUNT_MISMATCH",
                    institution=event.institution,
                    event_ids=[event.event_id],
                    occurred_at=event.occurred_at,
                    evidence={
                        "line_no": line.line_no,
                        "packs": packs,
                        "distinct_codes": len(cl.codes),
                        "scans": len(cl.scans),
                    },
                    id_facts=(event.event_id, line.line_no),
                    product=line.product,
                    settlement_id=event.settlement_id,
                )
            )
        price_alert = _price_above_cap(event, cl)
        if price_alert is not None:
            cl.rules.add("PRICE_ABOVE_CAP")
            alerts.append(price_alert)
    return checked, alerts


def _price_above_cap(event: Event, cl: CheckedLine) -> Alert | None:
    """A line priced above its product's cap (价格监测), compared per pack in fen (integers,
    so 12.30 against a 12.3 cap is not "above" by a float's last bit). Does not reject."""
    line, product = cl.line, cl.product
    if line.price is None or product is None or product.price_cap is None:
        return None
    per_pack = line.price * (product.pack_size if line.unit == "unit" else 1)
    over = round(per_pack * 100) - round(product.price_cap * 100)
    if over <= 0:
        return None
    return make_alert(
        "PRICE_ABOVE_CAP",
        institution=event.institution,
        event_ids=[event.event_id],
        occurred_at=event.occurred_at,
        evidence={
            "line_no": line.line_no,
            "price": line.price,
            "unit": line.unit,
            "price_per_pack": round(per_pack, 2),
            "price_cap": product.price_cap,
            "over_by": over / 100,
        },
        id_facts=(event.event_id, line.line_no),
        product=line.product,
        settlement_id=event.settlement_id,
    )


def _scan_rule(
    scan: ScannedCode, cl: CheckedLine, catalog: Catalog
) -> tuple[str | None, dict[str, Any]]:
    if scan.kind is CodeKind.COMMODITY_BARCODE:
        return "WRONG_BARCODE", {"barcode": scan.gtin}
    if scan.kind is CodeKind.INVALID:
        return "INVALID_CODE", {"reason": scan.error}
    owner = code_owner(scan, catalog)
    if owner is None:
        return "UNKNOWN_CODE", {"prefix": scan.prefix, "gtin": scan.gtin}
    if owner.product != cl.line.product:
        return "PRODUCT_MISMATCH", {"billed": cl.line.product, "code_product": owner.product}
    return None, {}


def verdict_key(institution: str, event_id: str) -> str:
    """Verdicts are keyed by the settlement event, not the settlement id: a re-upload of one
    settlement under a new event id gets a verdict of its own."""
    return join_key(institution, event_id)


def verdict(head: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the stateless head with the stage parts (line_no -> rules) into the verdict."""
    rules: dict[int, set[str]] = {ln["line_no"]: set(ln["rules"]) for ln in head["lines"]}
    for part in parts:
        for line_no, line_rules in part["lines"].items():
            rules.setdefault(int(line_no), set()).update(line_rules)
    lines = []
    for line_no in sorted(rules):
        rejected = sorted(rules[line_no] & REJECTING_RULES)
        lines.append(
            {"line_no": line_no, "status": "rejected" if rejected else "ok", "rules": rejected}
        )
    return {
        "settlement_id": head["settlement_id"],
        "institution": head["institution"],
        "event_id": head["event_id"],
        "verdict": "reject" if any(ln["status"] == "rejected" for ln in lines) else "pass",
        "lines": lines,
    }


def verdict_head(event: Event, checked: list[CheckedLine]) -> dict[str, Any]:
    return {
        "settlement_id": event.settlement_id,
        "institution": event.institution,
        "event_id": event.event_id,
        "lines": [{"line_no": cl.line.line_no, "rules": sorted(cl.rules)} for cl in checked],
    }
