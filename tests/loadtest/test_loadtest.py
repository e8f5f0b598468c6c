"""The small loadtest CI runs: a fixed seed, scored against the generator's ground truth, through
replay and through the streaming pipeline on a real broker and Redis."""

from __future__ import annotations

import os

import pytest

from harness.services import Services
from loadtest.generator import Generator, Rates
from loadtest.run import run_loadtest

pytestmark = pytest.mark.integration


def test_generator_is_deterministic_and_writes_truth() -> None:
    one, truth_one, legit = Generator(3).generate(600)
    two, truth_two, _ = Generator(3).generate(600)
    assert one == two and truth_one == truth_two
    assert truth_one, "fraud is injected"
    assert legit["sale_and_settlement"] and legit["retries"] and legit["late_purchases"]


def test_small_loadtest_precision_and_recall_are_one(svc: Services, tmp_path: object) -> None:
    result = run_loadtest(2500, seed=21, workdir=str(tmp_path), rates=Rates().scaled(2), svc=svc)
    print(result.report())
    rules = {key.split("|", 1)[0] for key in result.truth}
    assert len(rules) == 13, f"every rule is exercised: {sorted(rules)}"
    assert result.replay.precision() == 1.0 and result.replay.recall() == 1.0
    assert result.stream is not None
    assert result.stream.precision() == 1.0 and result.stream.recall() == 1.0
    assert not result.only_in_replay and not result.only_in_stream


def test_generator_output_does_not_depend_on_the_hash_seed() -> None:
    """Replay in one process and the stream's producer in another must see the same stream."""
    import subprocess
    import sys

    script = (
        "import hashlib; from loadtest.generator import Generator; "
        "m, t, _ = Generator(4).generate(800); "
        "print(hashlib.sha256(b''.join(m)).hexdigest(), len(t))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1
