"""Input validation: every way a message can be wrong has a reason and a detail that says what
to fix."""

from __future__ import annotations

import orjson
import pytest

from topics.records import DEAD_LETTER_REASONS, InvalidEvent, parse_event

GOOD = {
    "event_id": "e1",
    "type": "settlement",
    "institution": "H1",
    "occurred_at": "2026-03-02T09:00:00+08:00",
    "settlement_id": "S1",
    "lines": [{"line_no": 1, "product": "XA001", "quantity": 1, "codes": ["81000010000000000001"]}],
}


def test_good_event_parses() -> None:
    event = parse_event(orjson.dumps({**GOOD, "extra": {"kept": "ignored"}}))
    assert event.key == "H1\x1fe1"
    assert event.lines[0].unit == "pack" and event.lines[0].split is False
    assert event.occurred_ts == 1772413200.0


def _with(**changes: object) -> bytes:
    obj = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    ("raw", "reason", "detail_part"),
    [
        (b"{oops", "not_json", "JSON"),
        (b"\xff\xfe", "not_json", "JSON"),
        (b"[1,2]", "not_object", "object"),
        (_with(event_id=...), "missing_field", "event_id"),
        (_with(type="refund"), "unknown_type", "refund"),
        (_with(occurred_at="yesterday"), "bad_timestamp", "ISO-8601"),
        (_with(occurred_at="2026-03-02T09:00:00"), "bad_timestamp", "offset"),
        (_with(lines=[]), "bad_lines", "non-empty"),
        (_with(lines=[{"line_no": 1, "product": "X", "quantity": 1}] * 2), "bad_lines", "unique"),
        (_with(lines=[{"line_no": 1, "product": "X", "quantity": -1}]), "bad_field", "positive"),
        (_with(lines=[{"line_no": 1, "product": "X", "quantity": "2"}]), "bad_field", "number"),
        (
            _with(lines=[{"line_no": 1, "product": "X", "quantity": 1, "unit": "box"}]),
            "bad_field",
            "unit",
        ),
        (
            _with(lines=[{"line_no": 1, "product": "X", "quantity": 1, "codes": "81"}]),
            "bad_field",
            "codes",
        ),
        (_with(settlement_id=...), "missing_field", "settlement_id"),
    ],
)
def test_invalid_events(raw: bytes, reason: str, detail_part: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    assert info.value.reason == reason
    assert reason in DEAD_LETTER_REASONS
    assert detail_part in info.value.detail


def test_ids_holding_the_old_separator_do_not_collide() -> None:
    """`A` + event `B|C` and `A|B` + event `C` were one key when ids were joined with `|`."""
    first = parse_event(_with(institution="A", event_id="B|C", settlement_id="S1"))
    second = parse_event(_with(institution="A|B", event_id="C", settlement_id="S1"))
    assert first.key != second.key
    from detectors.catalog import Catalog
    from detectors.pipeline import Pipeline

    pipeline = Pipeline(Catalog())
    verdicts = [v for e in (first, second) for v in pipeline.process(e)[1]]
    assert [(v["institution"], v["event_id"]) for v in verdicts] == [("A", "B|C"), ("A|B", "C")]


@pytest.mark.parametrize("sep", ["\x1f", "\x1e", "\x00", "\n"])
def test_ids_with_control_characters_are_refused(sep: str) -> None:
    for field in ("institution", "event_id", "settlement_id"):
        with pytest.raises(InvalidEvent) as info:
            parse_event(_with(**{field: f"A{sep}B"}))
        assert info.value.reason == "bad_field" and field in info.value.detail


LINE: dict[str, object] = {"line_no": 1, "product": "XA001", "quantity": 1, "codes": []}


def _line(**changes: object) -> dict[str, object]:
    return {**LINE, **changes}


@pytest.mark.parametrize(
    ("batch", "patient", "parsed"),
    [
        ("L2026-11", "pt7", ("L2026-11", "pt7")),
        (20261101, 1099, ("20261101", "1099")),  # numbers, as HIS exports send ids
        ("  ", "", (None, None)),  # blank: not given
        (None, None, (None, None)),
    ],
)
def test_optional_batch_and_patient_are_kept_or_absent(
    batch: object, patient: object, parsed: tuple[str | None, str | None]
) -> None:
    event = parse_event(_with(patient=patient, lines=[_line(batch=batch)]))
    assert (event.lines[0].batch, event.patient) == parsed


@pytest.mark.parametrize(
    "changes",
    [
        {"lines": [_line(batch={"lot": 1})]},
        {"lines": [_line(batch="L" * 101)]},
        {"patient": ["pt7"]},
        {"patient": "p\x00t"},
    ],
)
def test_a_bad_optional_field_dead_letters_the_event_and_is_never_dropped(
    changes: dict[str, object],
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(_with(**changes))
    assert caught.value.reason == "bad_field"
