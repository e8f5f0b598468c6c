"""The command line: replay output, and exit code 2 with the file and line named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.conftest import ROOT


def tracewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_replay_writes_alerts_and_verdicts(tmp_path: Path, catalog_file: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        orjson.dumps(
            {
                "event_id": "e1",
                "type": "settlement",
                "institution": "H1",
                "occurred_at": "2026-03-02T09:00:00+08:00",
                "settlement_id": "S1",
                "lines": [{"line_no": 1, "product": "XA001", "quantity": 1}],
            }
        ).decode()
        + "\nnot json\n"
    )
    out, verdicts = tmp_path / "alerts.jsonl", tmp_path / "verdicts.jsonl"
    result = tracewatch(
        "replay",
        str(events),
        "--catalog",
        str(catalog_file),
        "--out",
        str(out),
        "--verdicts",
        str(verdicts),
    )
    assert result.returncode == 0, result.stderr
    (alert,) = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert alert["rule"] == "NO_CODE" and alert["settlement_id"] == "S1"
    (verdict,) = [orjson.loads(x) for x in verdicts.read_text().splitlines()]
    assert verdict["verdict"] == "reject"
    assert f"{events} line 2: dead letter (not_json" in result.stderr


def test_bad_catalog_names_file_and_line(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"product": "A", "pack_size": 10}\n{"product": "B", "pack_size": 0}\n')
    events = tmp_path / "events.jsonl"
    events.write_text("")
    result = tracewatch("replay", str(events), "--catalog", str(catalog))
    assert result.returncode == 2
    assert f"{catalog} line 2: pack_size must be a positive integer" in result.stderr


def test_missing_file_and_bad_usage(tmp_path: Path, catalog_file: Path) -> None:
    result = tracewatch("replay", str(tmp_path / "nope.jsonl"), "--catalog", str(catalog_file))
    assert result.returncode == 2 and "nope.jsonl: cannot read" in result.stderr
    assert tracewatch("replay").returncode == 2


def test_produce_refuses_a_non_json_line(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"institution": "H1"}\n{broken\n')
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "produce", str(events)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    )
    assert result.returncode == 2
    assert f"{events} line 2: not valid JSON" in result.stderr
