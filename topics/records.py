"""The contract's record types (CONTRACT.md, "Input events", "Alerts") and their validation.

Input is parsed with orjson into plain dicts, then checked and turned into slotted dataclasses in
one pass. Every field's type is checked before it is used, and everything has a bound (`Bounds`,
documented in the README): a message outside them is refused here with a reason, never half
accepted, so no later step can fail on it the same way on every retry.

Every way a message can be wrong maps to one of a small, fixed set of reasons
(`DEAD_LETTER_REASONS`), which are the label values of the dead-letter metric; the human-readable
detail names the field and says what was expected.

Identifiers (institution, event, settlement, product ids) may hold any printable text but no
control characters: internal keys join them with `KEY_SEP` (0x1F), which is then injective.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
    "too_large",
    "conflicting_resubmission",
    "over_quota",
    "processing_failed",
)

KEY_SEP = "\x1f"


def join_key(*parts: str) -> str:
    """One string for a tuple of identifiers; injective because identifiers hold no controls."""
    return KEY_SEP.join(parts)


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one event may hold (CONTRACT.md "Bounds"); beyond any of them it is dead-lettered."""

    event_bytes: int = 256 * 1024
    lines: int = 500
    codes_per_line: int = 1000
    id_chars: int = 100  # NHSA's own id fields are at most 30-100 characters
    code_chars: int = 512  # NHSA's trace-code field holds 100; GS1 strings with spare AIs
    max_quantity: float = 1_000_000.0
    min_year: int = 2000
    max_year: int = 2100


BOUNDS = Bounds()
# minutes east of UTC an `occurred_at` may carry (UTC-12 .. UTC+14 are the zones in use)
_MAX_OFFSET = timedelta(hours=14)


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
    price: float | None = None  # yuan per `unit`, optional (价格监测: PRICE_ABOVE_CAP)


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
    # minutes east of UTC of occurred_at: alerts show times in the event's own offset
    offset_minutes: int = 0
    # hash of the event's content: a resubmission with other content is not a retry
    digest: str = ""

    @property
    def key(self) -> str:
        """The idempotency key: `(institution, event_id)` as one string."""
        return join_key(self.institution, self.event_id)


def _short(value: Any) -> str:
    """A value as it may appear in a dead letter's detail: never the whole of a huge input."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has_controls(text: str) -> bool:
    return (
        any(unicodedata.category(ch)[0] == "C" for ch in text) if not text.isprintable() else False
    )


def normalise_id(value: Any) -> str | None:
    """An identifier as every part of the system keys it (ingest, `tracewatch produce`, the
    gateway): numbers as their decimal text, surrounding whitespace removed. None if unusable."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # ids sent as numbers are common in HIS exports
    if not isinstance(value, str):
        return None
    text: str = value.strip()
    if not text or len(text) > BOUNDS.id_chars or _has_controls(text):
        return None
    return text


def _str(obj: dict[str, Any], name: str, where: str, required: bool = True) -> str | None:
    value = obj.get(name)
    if (
        type(value) is str
        and 0 < len(value) <= BOUNDS.id_chars
        and value.isprintable()
        and not value[0].isspace()
        and not value[-1].isspace()
    ):
        return value  # already as `normalise_id` would make it: most ids, checked at C speed
    if value is None or (not required and isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidEvent("missing_field", f"{where}{name} is required")
        return None  # an optional field sent blank is not given
    text = normalise_id(value)
    if text is None:
        raise InvalidEvent(
            "bad_field",
            f"{where}{name} must be a non-empty string of at most {BOUNDS.id_chars} characters "
            f"without control characters, got {_short(value)}",
        )
    return text


def _number(obj: dict[str, Any], name: str, where: str) -> float:
    value = obj.get(name)
    if value is None:
        raise InvalidEvent("missing_field", f"{where}{name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidEvent(
            "bad_field", f"{where}{name} must be a finite number, got {_short(value)}"
        )
    if abs(value) > BOUNDS.max_quantity:
        raise InvalidEvent(
            "bad_field", f"{where}{name} must be at most {BOUNDS.max_quantity:g}, got {value:g}"
        )
    return float(value)


def _choice(
    obj: dict[str, Any], name: str, where: str, allowed: frozenset[str], default: str | None
) -> str | None:
    value = obj.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or value not in allowed:
        raise InvalidEvent(
            "bad_field", f"{where}{name} must be one of {sorted(allowed)}, got {_short(value)}"
        )
    return str(value)


def _unit(obj: dict[str, Any], where: str) -> str:
    return _choice(obj, "unit", where, UNITS, "pack") or "pack"


def _codes(obj: dict[str, Any], where: str) -> tuple[str, ...]:
    codes = obj.get("codes")
    if codes is None:
        return ()
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        raise InvalidEvent("bad_field", f"{where}codes must be a list of strings")
    if len(codes) > BOUNDS.codes_per_line:
        raise InvalidEvent(
            "too_large", f"{where}codes holds {len(codes)} scans, at most {BOUNDS.codes_per_line}"
        )
    for i, code in enumerate(codes):
        if len(code) > BOUNDS.code_chars:
            raise InvalidEvent(
                "too_large",
                f"{where}codes[{i}] is {len(code)} characters, at most {BOUNDS.code_chars}",
            )
    return tuple(codes)


def parse_timestamp(text: Any, where: str = "occurred_at") -> tuple[float, int]:
    """Seconds since the epoch and the offset in minutes east of UTC."""
    if not isinstance(text, str) or len(text) > 64:
        raise InvalidEvent("bad_timestamp", f"{where} must be an ISO-8601 string with offset")
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidEvent(
            "bad_timestamp", f"{where} {text!r} is not ISO-8601 (e.g. 2025-07-01T09:30:00+08:00)"
        ) from None
    offset = ts.utcoffset()
    if offset is None:
        raise InvalidEvent(
            "bad_timestamp", f"{where} {text!r} has no UTC offset; add one, e.g. +08:00"
        )
    if not BOUNDS.min_year <= ts.year <= BOUNDS.max_year or abs(offset) > _MAX_OFFSET:
        raise InvalidEvent(
            "bad_timestamp",
            f"{where} {text!r} is outside {BOUNDS.min_year}-{BOUNDS.max_year} or its offset "
            "outside -14:00..+14:00",
        )
    return ts.timestamp(), int(offset.total_seconds() // 60)


def _line(obj: Any, index: int) -> Line:
    where = f"lines[{index}]."
    if not isinstance(obj, dict):
        raise InvalidEvent("bad_lines", f"lines[{index}] must be an object")
    line_no = obj.get("line_no")
    if isinstance(line_no, bool) or not isinstance(line_no, int) or not 0 <= line_no < 2**31:
        raise InvalidEvent("bad_lines", f"{where}line_no must be an integer from 0 to 2^31-1")
    quantity = _number(obj, "quantity", where)
    if quantity <= 0:
        raise InvalidEvent("bad_field", f"{where}quantity must be positive, got {quantity:g}")
    split = obj.get("split", False)
    if split is None:
        split = False
    if not isinstance(split, bool):
        raise InvalidEvent("bad_field", f"{where}split must be true or false")
    return Line(
        line_no=line_no,
        product=_str(obj, "product", where) or "",
        quantity=quantity,
        unit=_unit(obj, where),
        split=split,
        codes=_codes(obj, where),
        # optional, but never dropped silently: a batch that cannot be right dead-letters the
        # event like any other bad field (numbers are taken as their text, as ids are)
        batch=_str(obj, "batch", where, required=False),
        price=_price(obj, where),
    )


def _price(obj: dict[str, Any], where: str) -> float | None:
    """Optional; when given, a finite number >= 0 (a bad one dead-letters the event)."""
    if obj.get("price") is None:
        return None
    price = _number(obj, "price", where)
    if price < 0:
        raise InvalidEvent("bad_field", f"{where}price must not be negative, got {price:g}")
    return price


def parse_event(raw: bytes | str) -> Event:
    """Decode and validate one input message; raises InvalidEvent with the reason."""
    size = len(raw)
    if size > BOUNDS.event_bytes:
        raise InvalidEvent(
            "too_large", f"the event is {size} bytes, at most {BOUNDS.event_bytes} are accepted"
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"not valid UTF-8 JSON ({_short(str(exc))})") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", "an event must be a JSON object")
    return event_from_dict(obj)


def _digest(obj: dict[str, Any]) -> str:
    try:
        canonical = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):  # non-str keys from a caller's dict
        canonical = repr(obj).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def event_from_dict(obj: dict[str, Any]) -> Event:
    event_id = _str(obj, "event_id", "") or ""
    etype = obj.get("type")
    if etype is None:
        raise InvalidEvent("missing_field", "type is required")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        raise InvalidEvent(
            "unknown_type", f"type {_short(etype)} is not one of {sorted(EVENT_TYPES)}"
        )
    institution = _str(obj, "institution", "") or ""
    if "occurred_at" not in obj:
        raise InvalidEvent("missing_field", "occurred_at is required")
    occurred_ts, offset = parse_timestamp(obj["occurred_at"])
    common: dict[str, Any] = {
        "event_id": event_id,
        "type": etype,
        "institution": institution,
        "occurred_at": obj["occurred_at"],
        "occurred_ts": occurred_ts,
        "offset_minutes": offset,
    }
    if etype in LINE_TYPES:
        lines = obj.get("lines")
        if not isinstance(lines, list) or not lines:
            raise InvalidEvent("bad_lines", f"a {etype} needs a non-empty list of lines")
        if len(lines) > BOUNDS.lines:
            raise InvalidEvent(
                "too_large", f"the {etype} has {len(lines)} lines, at most {BOUNDS.lines}"
            )
        parsed = tuple(_line(item, i) for i, item in enumerate(lines))
        if len({ln.line_no for ln in parsed}) != len(parsed):
            raise InvalidEvent("bad_lines", "line_no must be unique within the event")
        common["lines"] = parsed
        if etype == "settlement":
            common["settlement_id"] = _str(obj, "settlement_id", "")
            common["patient"] = _str(obj, "patient", "", required=False)
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
            if reason is None:
                raise InvalidEvent("missing_field", "reason is required for a stock_change")
            common["reason"] = _choice(obj, "reason", "", STOCK_CHANGE_REASONS, None)
            common["codes"] = _codes(obj, "")
    elif etype == "settlement_cancel":
        common["settlement_id"] = _str(obj, "settlement_id", "")
    elif etype == "void":
        common["voided_event_id"] = _str(obj, "voided_event_id", "")
    common["digest"] = _digest(obj)
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
    # None: the alert stands. "withdrawn": data that arrived later explains it away; the message
    # repeats the alert's id and facts, and `evidence.explained_by` names the events that did.
    status: str | None = None

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"status": self.status} if self.status is not None else {}
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
            **extra,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())
