"""The Redis codecs: every state the detectors make survives pack -> unpack unchanged."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from detectors.catalog import Catalog, product_from_dict
from detectors.pipeline import Pipeline
from loadtest.generator import Generator
from streams.codecs import CodeCodec, JsonCodec
from topics.records import InvalidEvent, normalise_id, parse_event

# what the parser accepts as an identifier: printable text, no control characters, trimmed
ids = st.text(min_size=1, max_size=30).map(normalise_id).filter(lambda v: v is not None)
times = st.integers(min_value=946684800, max_value=4102444800)  # the parser's 2000..2100
dispense = st.tuples(
    ids,
    st.one_of(ids.map(lambda v: f"s:{v}"), st.just("")),
    ids,
    times,
    st.integers(min_value=0, max_value=10**12),
    st.one_of(st.just(0), times),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.sampled_from([0, 1]),
    st.sampled_from(["", "C", "D", "S", "N", "CN", "SN"]),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
    st.one_of(st.just(""), ids),
)


@given(
    product=st.one_of(st.just(None), ids),
    pack=st.integers(min_value=0, max_value=10**9),
    holdings=st.lists(st.tuples(ids, times, st.sampled_from([1, -1])), max_size=4),
    dispenses=st.lists(dispense, max_size=4),
    due=st.one_of(st.just(None), st.tuples(times, st.integers(min_value=0, max_value=255))),
    unmatched=st.lists(
        st.tuples(
            ids,
            times,
            ids,
            st.one_of(st.just(""), ids),
            st.one_of(st.none(), st.integers(min_value=0, max_value=2**31 - 1)),
            st.integers(min_value=-14 * 60, max_value=14 * 60),
            st.one_of(st.just(""), st.text(max_size=40).filter(lambda v: v.strip())),
        ),
        max_size=3,
    ),
)
def test_code_state_round_trips(
    product: str | None,
    pack: int,
    holdings: list[tuple[Any, ...]],
    dispenses: list[tuple[Any, ...]],
    due: tuple[int, int] | None,
    unmatched: list[tuple[Any, ...]],
) -> None:
    state: dict[str, Any] = {}
    if product:
        state["p"] = product
    if pack:
        state["ps"] = pack
    if holdings:
        state["h"] = [list(h) for h in holdings]
    if dispenses:
        state["d"] = [[d[0], d[1] or f"e:{d[2]}", *d[2:]] for d in dispenses]
    if due is not None:
        state["due"], state["dl"] = due
    if unmatched:
        state["ur"] = [list(u) for u in unmatched]
    assert CodeCodec.unpack(CodeCodec.pack(state)) == state


@given(st.text(min_size=1, max_size=40))
def test_code_fields_round_trip(key: str) -> None:
    assert CodeCodec.unfield(CodeCodec.field(key)) == key or len(key.encode()) == 9


def test_every_state_of_a_generated_stream_round_trips_and_codes_are_small() -> None:
    gen = Generator(seed=2)
    events, _, _ = gen.generate(3000)
    pipeline = Pipeline(Catalog(product_from_dict(p, "g") for p in gen.catalog))
    for raw in events:
        try:
            pipeline.process(parse_event(raw))
        except InvalidEvent:
            continue
    sizes = []
    for key, state in pipeline.codes.state.items():
        packed = CodeCodec.pack(state)
        assert CodeCodec.unpack(packed) == state, key
        assert CodeCodec.unfield(CodeCodec.field(key)) == key
        sizes.append(len(packed))
    for key, state in pipeline.ledger.state.items():
        assert JsonCodec.unpack(JsonCodec.pack(state)) == state, key
    assert sizes and sum(sizes) / len(sizes) < 120
