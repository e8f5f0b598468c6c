"""Alert construction shared by every rule: deterministic ids and default severities.

Processing is at-least-once, so an event may be evaluated twice after a crash; an alert's id is a
hash of the facts that make it (rule, institution, event, line, code), never of time or order of
arrival, so the repeat carries the same id and sinks drop it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from topics.records import KEY_SEP, Alert

SEVERITY: dict[str, str] = {
    "NO_CODE": "high",
    "CODE_COUNT_MISMATCH": "medium",
    "INVALID_CODE": "medium",
    "WRONG_BARCODE": "medium",
    "UNKNOWN_CODE": "low",
    "PRODUCT_MISMATCH": "high",
    "DUPLICATE_SALE": "high",
    "CROSS_INSTITUTION_SALE": "critical",
    "SPLIT_OVERFLOW": "high",
    "RETURN_WITHOUT_SALE": "medium",
    "NO_PROVENANCE": "high",
    "OVERSOLD": "high",
    "STOCK_COUNT_MISMATCH": "medium",
    "PRICE_ABOVE_CAP": "medium",
}
RULES = tuple(SEVERITY)


def alert_id(rule: str, *facts: object) -> str:
    text = KEY_SEP.join([rule, *(str(f) for f in facts)])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


_ZONES: dict[int, timezone] = {}


def local_iso(ts: float, offset_minutes: int = 0) -> str:
    """An event time as the institution wrote it: its own UTC offset, whole seconds."""
    zone = _ZONES.get(offset_minutes)
    if zone is None:
        zone = UTC if not offset_minutes else timezone(timedelta(minutes=offset_minutes))
        _ZONES[offset_minutes] = zone
    text = datetime.fromtimestamp(round(ts), zone).isoformat()
    return text.replace("+00:00", "Z")


def withdrawal(alert: Alert, explained_by: list[str], why: str) -> Alert:
    """The message that takes back a standing alert: same id and facts, `status: withdrawn`,
    and the events that explain it away."""
    alert.status = "withdrawn"
    alert.event_ids = list(dict.fromkeys([*alert.event_ids, *explained_by]))
    alert.evidence = {"explained_by": explained_by, "why": why, "was": alert.evidence}
    return alert


def make_alert(
    rule: str,
    *,
    institution: str,
    event_ids: list[str],
    occurred_at: str,
    evidence: dict[str, Any],
    id_facts: tuple[object, ...],
    product: str | None = None,
    code: str | None = None,
    settlement_id: str | None = None,
    severity: str | None = None,
) -> Alert:
    return Alert(
        alert_id=alert_id(rule, institution, *id_facts),
        rule=rule,
        severity=severity or SEVERITY[rule],
        institution=institution,
        event_ids=event_ids,
        occurred_at=occurred_at,
        evidence=evidence,
        product=product,
        code=code,
        settlement_id=settlement_id,
    )
