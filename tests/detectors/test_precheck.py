"""The pre-settlement check gives, for every settlement, the verdict the pipeline then gives it."""

from __future__ import annotations

import copy

from detectors.catalog import Catalog, Product, product_from_dict
from detectors.pipeline import Pipeline
from detectors.precheck import check, state_keys
from detectors.routing import IngestView
from loadtest.generator import Generator
from topics.records import Event, event_from_dict, parse_event


def _checked_then_processed(pipeline: Pipeline, event: Event) -> tuple[object, object]:
    """The check on copies of the pipeline's state, then the pipeline's own verdict."""
    ledger_keys, code_keys = state_keys(event)
    ledger = {k: copy.deepcopy(s) for k in ledger_keys if (s := pipeline.ledger.state.get(k))}
    codes = {k: copy.deepcopy(s) for k in code_keys if (s := pipeline.codes.state.get(k))}
    # routing only ever replaces index entries, so a shallow copy keeps the pipeline's intact
    view = IngestView(dict(pipeline.view.index), set(pipeline.view.receivers))
    index_before = len(pipeline.view.index)
    touched_before = copy.deepcopy(
        (
            [pipeline.ledger.state.get(k) for k in ledger_keys],
            [pipeline.codes.state.get(k) for k in code_keys],
        )
    )
    result = check(event, pipeline.catalog, view, None, ledger, codes)
    # the check wrote nothing into the pipeline's state
    touched_after = (
        [pipeline.ledger.state.get(k) for k in ledger_keys],
        [pipeline.codes.state.get(k) for k in code_keys],
    )
    assert touched_after == touched_before
    assert len(pipeline.view.index) == index_before
    _alerts, verdicts = pipeline.process(event)
    assert len(verdicts) == 1
    return result, verdicts[0]


def test_the_check_agrees_with_the_pipeline_on_a_generated_stream() -> None:
    gen = Generator(seed=23)
    events, _truth, _ = gen.generate(4000)
    catalog = Catalog(product_from_dict(p, "gen") for p in gen.catalog)
    pipeline = Pipeline(catalog)
    compared = rejected = with_evidence = 0
    for raw in events:
        try:
            event = parse_event(raw)
        except ValueError:
            continue
        if event.type != "settlement" or event.key in pipeline.seen:
            pipeline.process(event)
            continue
        result, streamed = _checked_then_processed(pipeline, event)
        assert result.verdict == streamed, event.event_id  # type: ignore[attr-defined]
        compared += 1
        if streamed["verdict"] == "reject":  # type: ignore[index]
            rejected += 1
            rejected_lines = {
                ln["line_no"]
                for ln in streamed["lines"]  # type: ignore[index]
                if ln["status"] == "rejected"
            }
            evidence = result.evidence  # type: ignore[attr-defined]
            # every rejected line says why, in words a cashier can act on
            assert rejected_lines <= set(evidence), (event.event_id, rejected_lines, evidence)
            with_evidence += 1
    assert compared > 500
    assert rejected > 20, "the stream should hold rejected settlements to compare"
    assert with_evidence == rejected


def _product() -> Product:
    return Product("XA001", "Amoxicillin", ("8100001",), (), 24, True)


def _settlement(event_id: str, institution: str, code: str, when: str) -> Event:
    return event_from_dict(
        {
            "event_id": event_id,
            "type": "settlement",
            "institution": institution,
            "occurred_at": when,
            "settlement_id": f"S-{event_id}",
            "lines": [{"line_no": 1, "product": "XA001", "quantity": 1, "codes": [code]}],
        }
    )


def test_a_box_sold_elsewhere_is_named_with_where_and_when_but_not_the_other_event() -> None:
    pipeline = Pipeline(Catalog([_product()]))
    code = "81000010000000000077"
    pipeline.process(_settlement("E1", "P7", code, "2026-11-20T14:02:00+08:00"))
    later = _settlement("E2", "P9", code, "2026-11-21T09:00:00+08:00")
    result, streamed = _checked_then_processed(pipeline, later)
    assert result.verdict == streamed  # type: ignore[attr-defined]
    assert result.verdict["verdict"] == "reject"  # type: ignore[attr-defined]
    [entry] = result.evidence[1]  # type: ignore[attr-defined]
    assert entry["rule"] == "CROSS_INSTITUTION_SALE"
    assert entry["earlier_sales"] == [
        {"institution": "P7", "occurred_at": "2026-11-20T14:02:00+08:00", "units": "whole pack"}
    ]
    assert "P7" in entry["message"] and "2026-11-20T14:02" in entry["message"]


def test_only_a_settlement_can_be_checked() -> None:
    sale = event_from_dict(
        {
            "event_id": "X",
            "type": "purchase",
            "institution": "P1",
            "occurred_at": "2026-11-20T14:02:00+08:00",
            "lines": [{"line_no": 1, "product": "XA001", "quantity": 1}],
        }
    )
    try:
        check(sale, Catalog([_product()]), IngestView(), None, {}, {})
    except ValueError as exc:
        assert "settlement" in str(exc)
    else:
        raise AssertionError("a purchase was checked")
