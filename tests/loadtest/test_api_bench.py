"""The check bench's workload must be what its row in RESULTS.md says: valid settlements of
4 codes each, every code one the institution received or sold in the stream."""

from __future__ import annotations

from pathlib import Path

import orjson

from loadtest.api_bench import CODES_PER_CHECK, check_bodies
from loadtest.generator import write_dataset
from topics.records import event_from_dict


def test_check_bodies_are_valid_settlements_of_the_institutions_own_codes(
    tmp_path: Path,
) -> None:
    data = write_dataset(str(tmp_path), 1500, seed=3, days=8)
    events = []
    for line in Path(data["events"]).read_bytes().splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            events.append(obj)
    own: dict[str, set[str]] = {}
    for e in events:
        if e.get("type") in ("receipt", "settlement"):
            for ln in e.get("lines") or ():
                own.setdefault(e["institution"], set()).update(ln.get("codes") or ())
    bodies = check_bodies(events, 200)
    assert len(bodies) == 200
    assert len({inst for inst, _ in bodies}) > 1
    for inst, body in bodies:
        event = event_from_dict(orjson.loads(body))
        assert event.type == "settlement" and event.institution == inst
        codes = [c for line in event.lines for c in line.codes]
        assert len(codes) == CODES_PER_CHECK == len(set(codes))
        assert set(codes) <= own[inst]
        assert all(line.quantity == len(line.codes) for line in event.lines)
