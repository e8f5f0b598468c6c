"""The command line: replay output, and exit code 2 with the file and line named."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from harness.services import Services
from tests.conftest import ROOT


def tracewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True
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
    # the invalid line is reported, everything else done, and the exit code says so
    assert result.returncode == 2, result.stderr
    assert "1 invalid events, skipped" in result.stderr
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
        [sys.executable, "-m", "cli", "produce", str(events)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    )
    assert result.returncode == 2
    assert f"{events} line 2: not valid JSON" in result.stderr


def test_replay_allow_invalid_exits_0_and_an_unwritable_out_is_one_line(
    tmp_path: Path, catalog_file: Path
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("not json\n")
    allowed = tracewatch("replay", str(events), "--catalog", str(catalog_file), "--allow-invalid")
    assert allowed.returncode == 0, allowed.stderr
    assert "1 invalid events" in allowed.stderr
    out = tmp_path / "no-such-folder" / "alerts.jsonl"
    refused = tracewatch("replay", str(events), "--catalog", str(catalog_file), "--out", str(out))
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        == f"tracewatch: {out}: cannot write (No such file or directory); choose another --out"
    )


def test_version_and_every_command_says_what_it_reads_with_an_example() -> None:
    from cli.main import HELP

    version = tracewatch("--version")
    assert version.returncode == 0 and version.stdout.startswith("tracewatch ")
    for command in HELP:
        helped = tracewatch(command, "--help")
        assert helped.returncode == 0, command
        assert "environment:" in helped.stdout and "example:" in helped.stdout, command
        assert f"tracewatch {command}" in helped.stdout.split("example:")[1], command


def test_an_unreachable_broker_is_one_line_and_exit_2_within_seconds(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"institution": "H1"}\n')
    env = {"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    for args in (["produce", str(events)], ["alerts", "--timeout", "30"]):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert time.monotonic() - started < 20, args
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("tracewatch: cannot reach the Kafka broker at 127.0.0.1:1"), line


def test_alert_filters() -> None:
    from cli.main import AlertFilter, BadInput, _since

    alert = {
        "rule": "DUPLICATE_SALE",
        "institution": "P1",
        "occurred_at": "2026-11-20T14:02:00+08:00",
    }
    assert AlertFilter(["DUPLICATE_SALE"], ["P1"]).matches(alert)
    assert not AlertFilter(["NO_CODE"]).matches(alert)
    assert not AlertFilter(None, ["P2"]).matches(alert)
    assert AlertFilter(since=_since("2026-11-20T06:02:00Z")).matches(alert)  # the same instant
    assert not AlertFilter(since=_since("2026-11-20T14:03:00+08:00")).matches(alert)
    now = datetime.datetime(2026, 11, 21, 6, 2, tzinfo=datetime.UTC).timestamp()
    assert AlertFilter(since=_since("24h", now)).matches(alert)
    assert not AlertFilter(since=_since("23h", now)).matches(alert)
    for bad in ("yesterday", "2026-11-20T14:02:00", "5w"):
        with pytest.raises(BadInput):
            _since(bad)


@pytest.mark.integration
def test_alerts_filters_a_real_topic_into_a_table(svc: Services, redis_prefix: str) -> None:
    from confluent_kafka import Producer

    svc.create_topics(redis_prefix)
    alerts = [
        {"alert_id": "a1", "rule": "NO_CODE", "severity": "high", "institution": "P1",
         "occurred_at": "2026-11-20T09:00:00+08:00", "product": "XA001", "event_ids": ["e1"]},
        {"alert_id": "a2", "rule": "DUPLICATE_SALE", "severity": "critical", "institution": "P2",
         "occurred_at": "2026-11-20T10:00:00+08:00", "code": "81000010000000000077",
         "event_ids": ["e2"]},
        {"alert_id": "a3", "rule": "DUPLICATE_SALE", "severity": "critical", "institution": "P1",
         "occurred_at": "2026-11-19T10:00:00+08:00", "code": "81000010000000000078",
         "event_ids": ["e3"], "status": "withdrawn"},
    ]  # fmt: skip
    producer = Producer({"bootstrap.servers": svc.kafka_bootstrap})
    for alert in alerts:
        producer.produce(f"{redis_prefix}-alerts", orjson.dumps(alert), str(alert["institution"]))
    assert producer.flush(30) == 0
    env = {
        "PATH": "/usr/bin:/bin",
        "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
        "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
    }
    args = ["alerts", "--rule", "DUPLICATE_SALE", "--since", "2026-11-20T00:00:00+08:00"]
    table = subprocess.run(
        [sys.executable, "-m", "cli", *args, "--format", "table", "--max", "1"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["occurred_at", "severity", "rule"]
    assert row.split() == [
        "2026-11-20T10:00:00+08:00", "critical", "DUPLICATE_SALE", "P2",
        "81000010000000000077", "standing",
    ]  # fmt: skip
    lines = subprocess.run(
        [sys.executable, "-m", "cli", "alerts", "--institution", "P1", "--timeout", "6",
         "--from-beginning"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert [orjson.loads(x)["alert_id"] for x in lines.stdout.splitlines()] == ["a1", "a3"]


def test_a_missing_setting_is_bad_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "alerts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("tracewatch: KAFKA_BOOTSTRAP is not set")


def test_the_input_topic_is_kept_for_ever_unless_the_operator_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.topics import topic_config
    from topics.names import ALERTS, EVENTS

    assert topic_config(EVENTS)["retention.ms"] == "-1"
    assert "retention.ms" not in topic_config(ALERTS)
    monkeypatch.setenv("TRACEWATCH_INPUT_RETENTION_MS", "604800000")
    assert topic_config(EVENTS)["retention.ms"] == "604800000"


def test_redis_unreachable_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "tokens", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"},
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tracewatch: cannot reach Redis"), line


def test_verdicts_filter_by_their_lines_rules() -> None:
    from cli.main import AlertFilter

    verdict = {"verdict": "reject", "lines": [{"line_no": 1, "rules": ["NO_CODE"]}]}
    assert AlertFilter(["NO_CODE"]).matches(verdict)
    assert not AlertFilter(["DUPLICATE_SALE"]).matches(verdict)
