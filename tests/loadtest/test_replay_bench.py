"""The bench's replay figure is the shipped command's CPU, start-up taken off: a measurement
that runs, costs more for more events, and counts instructions where valgrind is installed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from loadtest.generator import write_dataset
from loadtest.replay_bench import _head, _instructions, _run, measure


def test_replay_is_measured_per_event_with_start_up_taken_off(tmp_path: Path) -> None:
    data = write_dataset(str(tmp_path), 3000, seed=5)
    figures = measure(data["events"], data["catalog"], instruction_events=0)
    assert set(figures) == {"replay_cpu_us", "replay_eps_per_core"}
    # a python process's start-up alone is tens of ms: per event over 3,000 events that would
    # be >= 10 us if it were left in; the detectors cost more than 1 us an event in any case
    assert 1 < figures["replay_cpu_us"] < 5000
    assert figures["replay_eps_per_core"] == pytest.approx(1e6 / figures["replay_cpu_us"])


def test_the_head_of_a_file_is_its_first_lines(tmp_path: Path) -> None:
    source = tmp_path / "e.jsonl"
    source.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(10)))
    path, taken = _head(str(source), 4, str(tmp_path))
    assert taken == 4 and Path(path).read_bytes().splitlines()[-1] == b'{"n":3}'
    _, taken = _head(str(source), 40, str(tmp_path))
    assert taken == 10


def test_a_failing_command_is_an_error_not_a_figure() -> None:
    with pytest.raises(RuntimeError, match="exited 3"):
        _run([sys.executable, "-c", "import sys; sys.exit(3)"])


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_instructions_are_counted_and_grow_with_the_work() -> None:
    small = _instructions([sys.executable, "-c", "pass"])
    large = _instructions([sys.executable, "-c", "sum(range(3_000_000))"])
    assert 1_000_000 < small < large
