"""Replay as shipped: `tracewatch replay` in a child process, its CPU per event, and (where
valgrind is installed) its instructions per event.

Measured in a child so the figure is the product's (its garbage-collector settings, nothing of
the bench's own memory) and as CPU time, not wall time, so a busy machine slows it less. The
child's start-up (imports, the catalog) is measured on an empty input and taken off, so the
figures are per event of the detectors, parsing included. Instructions are counted on the first
2N events less the first N, so first-event costs (lazy imports, cold caches) stay out too.

`python -m loadtest.replay_bench EVENTS CATALOG [--instructions N]` prints them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.run import ROOT

INSTRUCTION_EVENTS = 1500  # N: 2N events run under valgrind (about 50x slower than native)


def _run(command: list[str]) -> tuple[float, str]:
    """CPU seconds (user + system) of `command` run to the end, and its stderr."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode not in (0, 2):  # 2: invalid lines were reported, as generated on purpose
        raise RuntimeError(f"{command[:4]} exited {proc.returncode}: {stderr[-2000:]}")
    return usage.ru_utime + usage.ru_stime, stderr


def _replay(events: str, catalog: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli",
        "replay",
        "--catalog",
        catalog,
        "--allow-invalid",
        "--out",
        os.devnull,
        events,
    ]


def _head(events: str, count: int, folder: str) -> tuple[str, int]:
    path = Path(folder) / f"head{count}.jsonl"
    with open(events, "rb") as src, open(path, "wb") as dst:
        taken = 0
        for line in src:
            if taken == count:
                break
            dst.write(line)
            taken += 1
    return str(path), taken


def _instructions(command: list[str]) -> int:
    _, stderr = _run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command])
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise RuntimeError(f"valgrind printed no instruction count: {stderr[-1000:]}")
    return int(found.group(1))


def measure(
    events: str, catalog: str, instruction_events: int = INSTRUCTION_EVENTS
) -> dict[str, float]:
    """`replay_cpu_us` and `replay_eps_per_core` on the whole file; `replay_instructions` per
    event of events N+1..2N (N = `instruction_events`) when valgrind is installed (else
    absent)."""
    with tempfile.TemporaryDirectory(prefix="tracewatch-replay-") as folder:
        empty = str(Path(folder) / "empty.jsonl")
        Path(empty).write_bytes(b"")
        with open(events, "rb") as fh:
            count = sum(1 for _ in fh)
        start_up, _ = _run(_replay(empty, catalog))
        total, _ = _run(_replay(events, catalog))
        per_event = max(total - start_up, 1e-9) / count
        out = {"replay_cpu_us": per_event * 1e6, "replay_eps_per_core": 1 / per_event}
        if shutil.which("valgrind") and instruction_events > 0:
            first, _ = _head(events, instruction_events, folder)
            both, taken = _head(events, 2 * instruction_events, folder)
            base = _instructions(_replay(first, catalog))
            more = _instructions(_replay(both, catalog)) - base
            out["replay_instructions"] = more / max(1, taken - instruction_events)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events")
    parser.add_argument("catalog")
    parser.add_argument("--instructions", type=int, default=INSTRUCTION_EVENTS)
    args = parser.parse_args(argv)
    figures = measure(args.events, args.catalog, args.instructions)
    for name, value in figures.items():
        print(f"{name}: {value:,.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
