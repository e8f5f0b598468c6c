"""`EffectiveMarks` (replay's one-lane-at-a-time watermarks) against `effective_marks`, the
definition the stream uses: the same marks after every event, and `update` names exactly the
lanes whose mark moved."""

from __future__ import annotations

import random

import pytest

from detectors.event_time import (
    CLOCK_SKEW,
    EffectiveMarks,
    LaneClock,
    effective_marks,
)

IDLE = 6 * 3600.0


@pytest.mark.parametrize("seed", range(12))
def test_incremental_marks_equal_the_definition_after_every_event(seed: int) -> None:
    rng = random.Random(seed)
    clock = LaneClock()
    marks = EffectiveMarks(IDLE)
    lanes = rng.randint(1, 5)
    institutions = [f"I{n}" for n in range(rng.randint(1, 12))]
    lane_of = {inst: rng.randrange(lanes) for inst in institutions}
    t = 1.7e9
    before: dict[int, float] = {}
    for _ in range(400):
        inst = rng.choice(institutions)
        t += rng.choice([0, 1, 60, 3600, 30 * 3600])
        # late uploads, and now and then a device clock far ahead (the skew cap's case)
        ts = t - rng.choice([0, 0, 0, 7200, 90000]) + rng.choice([0] * 20 + [5 * CLOCK_SKEW])
        lane = lane_of[inst]
        clock.observe(inst, lane, ts)
        moved = marks.update(lane, clock.top(lane))
        expected = effective_marks(clock.tops(), IDLE)
        assert marks.marks == expected
        assert sorted(moved) == sorted(k for k, v in expected.items() if before.get(k) != v)
        before = dict(expected)


def test_a_lane_with_one_clock_follows_the_idle_bound() -> None:
    clock = LaneClock()
    marks = EffectiveMarks(IDLE)
    for inst, lane, ts in [("A", 0, 100_000.0), ("B", 0, 90_000.0), ("C", 1, 500_000.0)]:
        clock.observe(inst, lane, ts)
        marks.update(lane, clock.top(lane))
    assert marks.marks == {0: 90_000.0 + CLOCK_SKEW, 1: 90_000.0 + CLOCK_SKEW - IDLE}
