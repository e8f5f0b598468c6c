"""Bad events of every class seen in the wild, for the poison test and the chaos suite: wrong
types, separators and markers in ids, dates at the calendar's ends, numbers at the edge of
floats, and sizes past what a broker or Redis holds. Each comes with the good settlement that
follows it in the same partition (`poison_and_good`)."""

from __future__ import annotations

from typing import Any

import orjson

WHEN = "2026-03-02T09:00:00+08:00"


def settlement(n: int, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"S{n}",
        "type": "settlement",
        "institution": "H1",
        "occurred_at": WHEN,
        "settlement_id": f"SID{n}",
        "lines": [
            {
                "line_no": 1,
                "product": "XA001",
                "quantity": 1,
                "codes": [f"810000100000{n:08d}"],
            }
        ],
    }
    event.update(changes)
    return event


def _line(**changes: Any) -> dict[str, Any]:
    return {"line_no": 1, "product": "XA001", "quantity": 1, **changes}


def poison() -> list[bytes]:
    """One of each class: wrong types, separators and markers in ids, dates at the edge of the
    calendar, numbers at the edge of floats, and sizes past what a broker or Redis holds."""
    bad: list[Any] = [
        settlement(1001, type=["settlement"]),
        settlement(1002, type={"a": 1}),
        settlement(1003, lines=[_line(unit=["pack"])]),
        settlement(1004, lines=[_line(unit={"u": 1})]),
        {**settlement(1005, type="stock_change"), "reason": ["loss"], "lines": [_line()]},
        settlement(1006, event_id="a\x1eb"),
        settlement(1007, event_id="a\x1fb"),
        settlement(1008, settlement_id="s\x1ft"),
        settlement(1009, institution="H1\x1f"),
        settlement(1010, event_id="?x"),
        settlement(1011, settlement_id="?s"),
        settlement(1012, occurred_at="0001-01-01T00:30:00+01:00"),
        settlement(1013, occurred_at="9999-12-31T23:59:59-12:00"),
        settlement(1014, lines=[_line(quantity=1e308, unit="unit")]),
        settlement(1015, lines=[_line(quantity=float("inf"))]),
        settlement(1016, event_id="x" * 900_000),
        settlement(1017, type="y" * 900_000),
        settlement(1018, lines=[_line(line_no=i) for i in range(1, 10_001)]),
        settlement(1019, lines=[_line(codes=["8100001" + "0" * 13] * 5000)]),
    ]
    raw = [orjson.dumps(b, option=orjson.OPT_NON_STR_KEYS) for b in bad if not isinstance(b, bytes)]
    raw += [
        b"\xff\xfe" * 400_000,  # 0.8 MB of invalid UTF-8
        b"{" * 10_000,
        b"",
        b'{"event_id": "S1020", "type": "settlement", "institution": "H1"',
    ]
    return raw


def poison_and_good(institution: str = "H1") -> list[tuple[bytes, str]]:
    """Each bad event followed by a good settlement of the same institution (so, the same
    partition): (raw message, event id of the good one or '' for a bad one)."""
    out: list[tuple[bytes, str]] = []
    for n, raw in enumerate(poison()):
        out.append((raw, ""))
        good = settlement(
            n,
            institution=institution,
            event_id=f"G{institution}{n}",
            settlement_id=f"GS{institution}{n}",
        )
        out.append((orjson.dumps(good), good["event_id"]))
    return out
