"""The fuzzer, bounded for CI (`make fuzz` runs a million inputs), and a hypothesis property
over structured events: what the parser accepts travels between hops and into Redis unchanged."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.catalog import Catalog, product_from_dict
from detectors.pipeline import Pipeline
from detectors.routing import IngestView, route
from loadtest import fuzz
from streams.codecs import CodeCodec, JsonCodec
from topics.records import InvalidEvent, parse_event


def test_bounded_fuzz_finds_nothing() -> None:
    findings = fuzz.run(12_000, seed=11, events=600)
    assert findings.total == 0, findings.counts


CATALOG = Catalog(
    [
        product_from_dict(
            {
                "product": "XA001",
                "prefixes": ["8100001"],
                "gtins": ["06912345678902"],
                "pack_size": 24,
            },
            "test",
        )
    ]
)

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
ids = st.sampled_from(["H1", "H2", "e1", "e2", " H1 ", "P1", "名"]) | st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=12
)
codes = st.lists(
    st.sampled_from(
        ["81000010000000000001", "81000010000000000002", "(01)06912345678902(21)AB1", "xyz"]
    ),
    max_size=3,
)
line_body = st.fixed_dictionaries(
    {
        "product": st.sampled_from(["XA001", "ZZ"]),
        "quantity": st.sampled_from([1, 2, 0.5, 24, 1e-3]),
    },
    optional={"codes": codes, "unit": st.sampled_from(["pack", "unit"]), "split": st.booleans()},
)
lines = st.lists(line_body, min_size=1, max_size=3).map(
    lambda ls: [{"line_no": i + 1, **ln} for i, ln in enumerate(ls)]
)
valid = st.fixed_dictionaries(
    {
        "event_id": ids,
        "type": st.sampled_from(
            [
                "sale",
                "settlement",
                "sale_return",
                "purchase",
                "void",
                "settlement_cancel",
                "stock_count",
                "stock_change",
                "purchase_return",
            ]
        ),
        "institution": ids,
        "occurred_at": st.sampled_from(
            ["2026-03-02T09:00:00+08:00", "2026-03-02T10:00:00+08:00", "2026-03-01T23:00:00Z"]
        ),
        "lines": lines,
        "settlement_id": ids,
        "voided_event_id": ids,
        "original_event_id": ids,
        "reason": st.sampled_from(["transfer_in", "loss", "transfer_out"]),
    }
)
# a valid event, or one with a field (or a line's field) replaced by anything at all
corrupted = st.tuples(
    valid,
    st.none()
    | st.tuples(
        st.sampled_from(
            ["event_id", "type", "institution", "occurred_at", "lines", "settlement_id", "reason"]
        ),
        anything,
    ),
    st.none()
    | st.tuples(
        st.sampled_from(["line_no", "product", "quantity", "codes", "unit", "split"]), anything
    ),
)


def _apply(case: tuple[dict[str, Any], Any, Any]) -> dict[str, Any]:
    obj, top, inner = case
    obj = dict(obj)
    if top is not None:
        obj[top[0]] = top[1]
    first = obj["lines"][0] if isinstance(obj.get("lines"), list) and obj["lines"] else None
    if inner is not None and isinstance(first, dict):
        obj["lines"] = [{**first, inner[0]: inner[1]}, *obj["lines"][1:]]
    return obj


event = corrupted.map(_apply)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event, min_size=1, max_size=4))
def test_accepted_events_survive_every_hop(events: list[dict[str, Any]]) -> None:
    pipeline = Pipeline(CATALOG)
    view = IngestView()
    for obj in events:
        try:
            raw = orjson.dumps(obj)
        except TypeError:
            continue  # integers past 64 bits: the fuzzer sends those as text
        try:
            parsed = parse_event(raw)
        except InvalidEvent:
            continue
        routed = route(parsed, CATALOG, view, parsed.occurred_ts)
        for record in [*routed.ledger, *routed.codes]:
            assert orjson.loads(orjson.dumps(record)) == record  # the packed hop is JSON
        pipeline.process(parsed)
        for key, state in pipeline.codes.state.items():
            assert CodeCodec.unpack(CodeCodec.pack(state)) == state
            assert CodeCodec.unfield(CodeCodec.field(key)) == key
        for state in pipeline.ledger.state.values():
            assert JsonCodec.unpack(JsonCodec.pack(state)) == state
