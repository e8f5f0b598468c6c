"""The alert rules are valid and do what their unit tests say (`promtool`), and a real
Prometheus scraping a real worker answers PromQL over the metric names the rules and the
dashboard use - so a renamed metric breaks here, not on call."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from harness.services import Services, free_port
from tests.conftest import CATALOG_LINES, ROOT, WorkerProcess

DEPLOY = Path(ROOT) / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tracewatch.json"


def _tool(name: str) -> str:
    """`make test` unpacks Debian's prometheus package into .tools; elsewhere, PATH. In CI a
    missing tool is a failure, not a skip."""
    for candidate in (Path(ROOT) / ".tools" / "usr" / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing: `make test` fetches it (apt-get download prometheus)")
    pytest.skip(f"{name} not installed (`make test` fetches it from Debian's prometheus package)")


def test_the_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_has_a_runbook_entry() -> None:
    operations = (Path(ROOT) / "docs" / "operations.md").read_text().lower()
    for alert in re.findall(r"- alert: (\w+)", RULES.read_text()):
        assert f"### {alert.lower()}" in operations, f"docs/operations.md says nothing of {alert}"


def _exported_names() -> set[str]:
    """Every metric name the worker and the API export, from their definitions."""
    names: set[str] = set()
    for module in ("streams/metrics.py", "api/metrics.py"):
        text = (Path(ROOT) / module).read_text()
        for kind, name in re.findall(r"(Counter|Gauge|Histogram)\(\s*\"(tracewatch_\w+)\"", text):
            if kind == "Counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind == "Histogram":
                names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
            else:
                names.add(name)
    return names


def _queries() -> list[str]:
    """The PromQL of every alert rule and every dashboard panel."""
    found = re.findall(r"expr: >?\n?((?:.+\n)+?)\s+for:", RULES.read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        found += [target["expr"] for target in panel.get("targets", ())]
    return [" ".join(q.split()) for q in found]


def test_rules_and_dashboard_use_only_metrics_that_exist() -> None:
    exported = _exported_names() | {"up"}
    queries = _queries()
    assert len(queries) >= 20
    for query in queries:
        for name in re.findall(r"\b(tracewatch_\w+|up)\b", query):
            assert name in exported, f"{name} (in {query!r}) is not exported"


def _query(url: str, promql: str) -> dict[str, Any]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10
    ) as answer:
        body: dict[str, Any] = json.loads(answer.read())
    return body


@pytest.mark.integration
def test_a_real_prometheus_scrapes_a_worker(
    svc: Services, tmp_path: Path, redis_prefix: str
) -> None:
    prometheus = _tool("prometheus")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(CATALOG_LINES) + "\n")
    svc.create_topics(redis_prefix)
    worker = WorkerProcess(
        svc,
        {
            "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
            "TRACEWATCH_REDIS_PREFIX": redis_prefix,
            "TRACEWATCH_CATALOG": str(catalog),
            "TRACEWATCH_EMBEDDED_BROKER": "1" if svc.kafka_embedded else "",
        },
    ).start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        "  - job_name: tracewatch-worker\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{worker.port}']}}]\n"
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        held: list[Any] = []
        while time.monotonic() < deadline and not held:
            time.sleep(1)
            try:
                answer = _query(
                    url, f'tracewatch_assigned_partitions{{topic="{redis_prefix}-events"}}'
                )
            except OSError:
                continue
            held = answer["data"]["result"]
        assert held, "Prometheus never got the worker's assigned partitions"
        assert float(held[0]["value"][1]) == 16  # one worker holds the whole input topic
        up = _query(url, 'up{job="tracewatch-worker"}')["data"]["result"]
        assert [float(r["value"][1]) for r in up] == [1.0]
        for query in _queries():  # every rule and panel is PromQL this Prometheus accepts
            answer = _query(url, query)
            assert answer["status"] == "success", (query, answer)
        with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=10) as answer:
            groups = json.loads(answer.read())["data"]["groups"]
        loaded = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"TracewatchWorkerDown", "TracewatchConsumerLagGrowing"} <= loaded
        assert all(r["health"] == "ok" for g in groups for r in g["rules"] if "health" in r), groups
    finally:
        server.terminate()
        server.wait(timeout=30)
        worker.stop()
