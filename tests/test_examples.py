"""The sample files under examples/ do what examples/README.md says they do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.conftest import ROOT

EXAMPLES = Path(ROOT) / "examples"


def test_replay_of_the_examples_gives_the_alerts_the_readme_lists() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "replay",
            str(EXAMPLES / "events.jsonl"),
            "--catalog",
            str(EXAMPLES / "catalog.jsonl"),
            "--institutions",
            str(EXAMPLES / "institutions.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2  # line 15 is a dead letter, on purpose
    assert "line 15: dead letter (bad_lines" in result.stderr
    found = sorted(
        (a["rule"], a["event_ids"][-1]) for a in map(orjson.loads, result.stdout.splitlines())
    )
    assert found == [
        ("CODE_COUNT_MISMATCH", "s-7"),
        ("CROSS_INSTITUTION_SALE", "s-6"),
        ("DUPLICATE_SALE", "s-5"),
        ("NO_CODE", "s-2"),
        ("OVERSOLD", "s-7"),
        ("PRODUCT_MISMATCH", "s-8"),
        ("WRONG_BARCODE", "s-7"),
    ]
    readme = (EXAMPLES / "README.md").read_text()
    for rule, _ in found:
        assert f"`{rule}`" in readme
