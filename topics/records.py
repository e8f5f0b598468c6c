"""The contract's record types (CONTRACT.md, "Input events", "Alerts") and their validation.

Input is parsed with orjson into plain dicts, then checked and turned into slotted dataclasses in
one pass. Every way a message can be wrong maps to one of a small, fixed set of reasons
(`DEAD_LETTER_REASONS`), which are the label values of the dead-letter metric; the human-readable
detail names the field and says what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

EVENT_TYPES = frozenset(
    {
        "purchase",
        "purchase_return",
        "sale",
        "sale_return",
        "settlement",
        "settlement_cancel",
        "stock_count",
        "stock_change",
        "void",
        "legacy_stock",
    }
)
LINE_TYPES = frozenset({"purchase", "purchase_return", "sale", "sale_return", "settlement"})
PRODUCT_TYPES = frozenset({"stock_count", "stock_change", "legacy_stock"})
STOCK_CHANGE_REASONS = frozenset(
    {"loss", "damage", "expired", "transfer_in", "transfer_out", "other"}
)
UNITS = frozenset({"pack", "unit"})

DEAD_LETTER_REASONS = (
    "not_json",
    "not_object",
    "missing_field",
    "bad_field",
    "unknown_type",
    "bad_timestamp",
    "bad_lines",
)


class InvalidEvent(ValueError):
    """A message that violates the contract; `reason` is one of DEAD_LETTER_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class Line:
    line_no: int
    product: str
    quantity: float
    unit: str
    split: bool
    codes: tuple[str, ...]
    batch: str | None = None


@dataclass(slots=True, frozen=True)
class Event:
    event_id: str
    type: str
    institution: str
    occurred_at: str
    occurred_ts: float  # seconds since the epoch, from occurred_at
    lines: tuple[Line, ...] = ()
    settlement_id: str | None = None
    patient: str | None = None
    original_event_id: str | None = None
    voided_event_id: str | None = None
    # stock_count / stock_change / legacy_stock
    product: str | None = None
    quantity: float | None = None
    unit: str = "pack"
    reason: str | None = None
    codes: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        """The idempotency key: `(institution, event_id)` as one string."""
        return f"{self.institution}|{self.event_id}"


def _str(obj: dict[str, Any], name: str, where: str, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent("missing_field", f"{where}{name} is required")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # ids sent as numbers are common in HIS exports
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent("bad_field", f"{where}{name} must be a non-empty string")
    return value.strip()


def _number(obj: dict[str, Any], name: str, where: str) -> float:
    value = obj.get(name)
    if value is None:
        raise InvalidEvent("missing_field", f"{where}{name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidEvent("bad_field", f"{where}{name} must be a finite number, got {value!r}")
    return float(value)


def _unit(obj: dict[str, Any], where: str) -> str:
    unit = obj.get("unit", "pack")
    if unit is None:
        return "pack"
    if unit not in UNITS:
        raise InvalidEvent("bad_field", f"{where}unit must be 'pack' or 'unit', got {unit!r}")
    return str(unit)


def _codes(obj: dict[str, Any], where: str) -> tuple[str, ...]:
    codes = obj.get("codes")
    if codes is None:
        return ()
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        raise InvalidEvent("bad_field", f"{where}codes must be a list of strings")
    return tuple(codes)


def parse_timestamp(text: Any, where: str = "occurred_at") -> float:
    if not isinstance(text, str):
        raise InvalidEvent("bad_timestamp", f"{where} must be an ISO-8601 string with offset")
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidEvent(
            "bad_timestamp", f"{where} {text!r} is not ISO-8601 (e.g. 2025-07-01T09:30:00+08:00)"
        ) from None
    if ts.tzinfo is None:
        raise InvalidEvent(
            "bad_timestamp", f"{where} {text!r} has no UTC offset; add one, e.g. +08:00"
        )
    return ts.timestamp()


def _line(obj: Any, index: int) -> Line:
    where = f"lines[{index}]."
    if not isinstance(obj, dict):
        raise InvalidEvent("bad_lines", f"lines[{index}] must be an object")
    line_no = obj.get("line_no")
    if isinstance(line_no, bool) or not isinstance(line_no, int):
        raise InvalidEvent("bad_lines", f"{where}line_no must be an integer")
    quantity = _number(obj, "quantity", where)
    if quantity <= 0:
        raise InvalidEvent("bad_field", f"{where}quantity must be positive, got {quantity}")
    split = obj.get("split", False)
    if not isinstance(split, bool):
        raise InvalidEvent("bad_field", f"{where}split must be true or false")
    batch = obj.get("batch")
    return Line(
        line_no=line_no,
        product=_str(obj, "product", where) or "",
        quantity=quantity,
        unit=_unit(obj, where),
        split=split,
        codes=_codes(obj, where),
        batch=batch if isinstance(batch, str) else None,
    )


def parse_event(raw: bytes | str) -> Event:
    """Decode and validate one input message; raises InvalidEvent with the reason."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"not valid UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", "an event must be a JSON object")
    return event_from_dict(obj)


def event_from_dict(obj: dict[str, Any]) -> Event:
    event_id = _str(obj, "event_id", "") or ""
    etype = obj.get("type")
    if etype is None:
        raise InvalidEvent("missing_field", "type is required")
    if etype not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type {etype!r} is not one of {sorted(EVENT_TYPES)}")
    institution = _str(obj, "institution", "") or ""
    if "occurred_at" not in obj:
        raise InvalidEvent("missing_field", "occurred_at is required")
    occurred_ts = parse_timestamp(obj["occurred_at"])
    common: dict[str, Any] = {
        "event_id": event_id,
        "type": etype,
        "institution": institution,
        "occurred_at": obj["occurred_at"],
        "occurred_ts": occurred_ts,
    }
    if etype in LINE_TYPES:
        lines = obj.get("lines")
        if not isinstance(lines, list) or not lines:
            raise InvalidEvent("bad_lines", f"a {etype} needs a non-empty list of lines")
        parsed = tuple(_line(item, i) for i, item in enumerate(lines))
        if len({ln.line_no for ln in parsed}) != len(parsed):
            raise InvalidEvent("bad_lines", "line_no must be unique within the event")
        common["lines"] = parsed
        if etype == "settlement":
            common["settlement_id"] = _str(obj, "settlement_id", "")
            patient = obj.get("patient")
            common["patient"] = patient if isinstance(patient, str) else None
        elif etype == "sale":
            common["settlement_id"] = _str(obj, "settlement_id", "", required=False)
        elif etype == "sale_return":
            common["original_event_id"] = _str(obj, "original_event_id", "", required=False)
    elif etype in PRODUCT_TYPES:
        common["product"] = _str(obj, "product", "")
        quantity = _number(obj, "quantity", "")
        if etype != "stock_change" and quantity < 0:
            raise InvalidEvent("bad_field", f"quantity must not be negative for a {etype}")
        common["quantity"] = quantity
        common["unit"] = _unit(obj, "")
        if etype == "stock_change":
            reason = obj.get("reason")
            if reason not in STOCK_CHANGE_REASONS:
                raise InvalidEvent(
                    "bad_field", f"reason must be one of {sorted(STOCK_CHANGE_REASONS)}"
                )
            common["reason"] = reason
            common["codes"] = _codes(obj, "")
    elif etype == "settlement_cancel":
        common["settlement_id"] = _str(obj, "settlement_id", "")
    elif etype == "void":
        common["voided_event_id"] = _str(obj, "voided_event_id", "")
    return Event(**common)


@dataclass(slots=True)
class Alert:
    """One alert (CONTRACT.md, "Alerts"). `alert_id` is derived from the facts that make it."""

    alert_id: str
    rule: str
    severity: str
    institution: str
    event_ids: list[str]
    occurred_at: str
    evidence: dict[str, Any]
    product: str | None = None
    code: str | None = None
    settlement_id: str | None = None
    detected_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "rule": self.rule,
            "severity": self.severity,
            "institution": self.institution,
            "product": self.product,
            "code": self.code,
            "settlement_id": self.settlement_id,
            "event_ids": self.event_ids,
            "occurred_at": self.occurred_at,
            "detected_at": self.detected_at,
            "evidence": self.evidence,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())
