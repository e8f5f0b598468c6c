"""Verdict assembly: one verdict per settlement from the gate's head and each stage's part.

Ingest sends a head (the stateless rules per line, and the ids of the parts to expect: one per
stage partition that received a line of the settlement); each stage partition sends one part
(line_no -> rules) per settlement in a batch. When the head and every expected part are in, the
verdict is emitted and the entry deleted. A part redelivered after that is already in the
applied-ids window, so it cannot resurrect the entry.
"""

from __future__ import annotations

from typing import Any

from detectors.event_time import TimeFrame
from detectors.settlement_gate import verdict
from detectors.stage import BaseStage, Record, StageOutput, State
from topics.records import join_key

HEAD = "H"


def part_record(vkey: str, part_id: str, lines: dict[int, list[str]]) -> Record:
    # JSON object keys are strings: line numbers travel as text and `verdict` turns them back.
    return {
        "k": vkey,
        "id": join_key(vkey, part_id),
        "part": part_id,
        "lines": {str(n): r for n, r in lines.items()},
    }


def head_record(vkey: str, head: dict[str, Any], expect: list[str]) -> Record:
    return {"k": vkey, "id": join_key(vkey, HEAD), "part": HEAD, "head": head, "expect": expect}


class VerdictStage(BaseStage):
    name = "verdict"

    def apply(
        self, record: Record, state: dict[str, State], out: StageOutput, frame: TimeFrame
    ) -> None:
        key = record["k"]
        entry = dict(state.get(key) or {"parts": {}})
        if record["part"] == HEAD:
            entry["head"] = record["head"]
            entry["expect"] = record["expect"]
        else:
            entry["parts"] = {**entry["parts"], record["part"]: record["lines"]}
        head = entry.get("head")
        if head is not None and all(p in entry["parts"] for p in entry["expect"]):
            out.verdicts.append(verdict(head, [{"lines": ln} for ln in entry["parts"].values()]))
            state[key] = {}  # an empty state is deleted when written back
        else:
            state[key] = entry
