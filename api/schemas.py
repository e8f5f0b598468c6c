"""The API's documented shapes: what `/openapi.json` says each endpoint takes and answers.

Requests are parsed by the contract's own parser (`topics.records.event_from_dict`), not by these
models, so the API refuses exactly what ingest would dead-letter and with the same reasons; the
request schemas here describe the contract for readers and clients. Answers are built as plain
dicts and sent with orjson (no per-request model validation on the hot path); the response tests
check them against these models (`tests/api`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from topics.records import BOUNDS, EVENT_TYPES, STOCK_CHANGE_REASONS, UNITS

_LINE: dict[str, Any] = {
    "type": "object",
    "required": ["line_no", "product", "quantity"],
    "properties": {
        "line_no": {"type": "integer"},
        "product": {"type": "string", "description": "insurance drug code (med_list_codg)"},
        "quantity": {"type": "number"},
        "unit": {"type": "string", "enum": sorted(UNITS), "default": "pack"},
        "split": {"type": "boolean", "default": False, "description": "拆零 (trdn_flag=1)"},
        "codes": {
            "type": "array",
            "items": {"type": "string"},
            "description": "scanned trace codes exactly as scanned",
        },
        "batch": {"type": "string"},
        "price": {
            "type": "number",
            "minimum": 0,
            "description": "yuan per `unit` (价格监测: PRICE_ABOVE_CAP above the product's cap)",
        },
    },
}
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "An input event of the wire contract (docs: README, 'HTTP API'), or an NHSA record "
        "(3501-3507, 2207) recognised by its `infno` and mapped to one."
    ),
    "required": ["event_id", "type", "institution", "occurred_at"],
    "properties": {
        "event_id": {"type": "string", "maxLength": BOUNDS.id_chars},
        "type": {"type": "string", "enum": sorted(EVENT_TYPES)},
        "institution": {"type": "string", "description": "fixmedins_code"},
        "occurred_at": {"type": "string", "format": "date-time"},
        "lines": {"type": "array", "items": _LINE, "maxItems": BOUNDS.lines},
        "settlement_id": {"type": "string"},
        "patient": {"type": "string"},
        "original_event_id": {"type": "string"},
        "voided_event_id": {"type": "string"},
        "product": {"type": "string"},
        "quantity": {"type": "number"},
        "unit": {"type": "string", "enum": sorted(UNITS)},
        "reason": {"type": "string", "enum": sorted(STOCK_CHANGE_REASONS)},
        "codes": {"type": "array", "items": {"type": "string"}},
    },
}


def events_body(max_events: int) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "array", "items": EVENT_SCHEMA, "maxItems": max_events}
                },
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": "one event object per line"}
                },
            },
        }
    }


def settlement_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EVENT_SCHEMA}},
        }
    }


class ErrorBody(BaseModel):
    error: str = Field(description="a stable code, e.g. `unauthorized`, `body_too_large`")
    detail: str = Field(description="what happened and what to do next")


class EventResult(BaseModel):
    index: int = Field(description="position of the event in the request, from 0")
    event_id: str | None
    status: Literal["accepted", "duplicate", "rejected", "unavailable"]
    reason: str | None = Field(
        None,
        description=(
            "for `rejected`: the dead-letter reason ingest would give (`missing_field`, "
            "`bad_field`, ...), `forbidden_institution` or `conflicting_resubmission`"
        ),
    )
    detail: str | None = None


class EventsAnswer(BaseModel):
    accepted: int
    duplicate: int
    rejected: int
    results: list[EventResult]
    error: str | None = Field(None, description="on 503: `unavailable`")
    detail: str | None = None


class Evidence(BaseModel):
    rule: str
    message: str = Field(description="what the cashier can act on")
    code: str | None = None
    scanned: str | None = None
    earlier_sales: list[dict[str, Any]] | None = None


class CheckedLine(BaseModel):
    line_no: int
    status: Literal["ok", "rejected"]
    rules: list[str]
    evidence: list[Evidence]


class CheckAnswer(BaseModel):
    settlement_id: str | None
    institution: str
    event_id: str
    verdict: Literal["pass", "reject"]
    lines: list[CheckedLine]
    already_submitted: bool = Field(
        description="this (institution, event_id) reached the stream before: it will not be "
        "judged again, and its verdict is the one the stream gave"
    )
    recorded: Literal[False] = Field(description="a check never records anything")


class HistoryEntry(BaseModel):
    type: Literal["receipt", "departure", "dispense", "return", "return_without_sale"]
    institution: str
    occurred_at: str
    event_id: str | None = None
    settlement_id: str | None = None
    returns_event_id: str | None = None
    units: float | str | None = None
    rules: list[str] | None = None


class CodeHistory(BaseModel):
    code: str = Field(description="the normalised code")
    product: str | None
    known: bool = Field(description="the stream has seen this code")
    summary: Literal["no_sale", "one_sale", "sold_more_than_once"]
    standing_sales: int = Field(
        description="sales not returned (split sales of one box at one institution count once)"
    )
    history: list[HistoryEntry]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] | None = None
