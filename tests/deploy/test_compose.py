"""deploy/compose.yaml is valid YAML whose mounted files exist and whose services use the
commands and variables the code has (no Docker engine here: `docker compose config` cannot
run, so this is what CI checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from streams.cli import HELP
from tests.conftest import ROOT

DEPLOY = Path(ROOT) / "deploy"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_mounted_files_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"


def test_services_run_commands_that_exist() -> None:
    services = _compose()["services"]
    for name in ("worker", "api", "topics"):
        command = services[name]["command"]
        assert command[0] == "tracewatch" and command[1] in HELP, (name, command)
    assert {"kafka", "redis", "worker", "api", "prometheus", "grafana"} <= set(services)
    # only the gateway principal writes the input topic (deploy/kafka-acls.sh)
    assert services["api"]["environment"]["KAFKA_SASL_USERNAME"] == "gateway"
    assert "--appendonly" in services["redis"]["command"]


def test_the_image_holds_every_package_pyproject_installs() -> None:
    import tomllib

    packages = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile, f"the image lacks {package}/"
