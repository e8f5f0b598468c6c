"""deploy/compose.yaml is valid YAML whose mounted files exist and whose services use the
commands, variables, listeners and health checks the code and the images have (no Docker engine
here: `docker compose config` cannot run, so this is what CI checks). Also the image's build
context: deploy/Dockerfile and .dockerignore."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from detectors.catalog import load_catalog
from harness.services import free_port
from tests.conftest import ROOT

DEPLOY = Path(ROOT) / "deploy"
# the packages whose source holds the environment variables the processes read
SOURCE_PACKAGES = (
    "topics",
    "detectors",
    "streams",
    "api",
    "cli",
    "cases",
    "supervision",
    "harness",
)
TRACEWATCH_SERVICES = ("topics", "catalog", "worker", "api", "sink")


def cli_commands() -> set[str]:
    """The subcommands of `tracewatch`, from the module pyproject's entry point names."""
    scripts = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["project"]["scripts"]
    module = importlib.import_module(scripts["tracewatch"].split(":")[0])
    return set(module.HELP)


def source_text() -> str:
    """Every Python file of the packages, to look up the names of variables the code reads."""
    return "\n".join(
        path.read_text(encoding="utf-8")
        for package in SOURCE_PACKAGES
        for path in sorted((Path(ROOT) / package).rglob("*.py"))
    )


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` with VAR unset: the default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _services() -> dict[str, Any]:
    services: dict[str, Any] = _compose()["services"]
    return services


def _listeners(value: str) -> dict[str, str]:
    """`NAME://host:port,...` -> {NAME: "host:port"}."""
    return dict(item.split("://", 1) for item in value.split(","))


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to deploy/, defaults interpolated) or volume."""
    mounts = {}
    for volume in service.get("volumes", ()):
        source, target = interpolate(volume).split(":")[:2]
        mounts[target] = source
    return mounts


def test_mounted_files_exist() -> None:
    for name, service in _services().items():
        for source in _mounts(service).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"


def test_services_run_commands_that_exist() -> None:
    services = _services()
    commands = cli_commands()
    for name in TRACEWATCH_SERVICES:
        command = services[name]["command"]
        assert command[0] == "tracewatch" and command[1] in commands, (name, command)
    assert {"kafka", "redis", "worker", "api", "prometheus", "grafana"} <= set(services)
    # only the gateway principal writes the input topic (deploy/kafka-acls.sh)
    assert services["api"]["environment"]["KAFKA_SASL_USERNAME"] == "gateway"
    assert "--appendonly" in services["redis"]["command"]


def test_services_set_only_variables_the_code_reads() -> None:
    source = source_text()
    for name in TRACEWATCH_SERVICES:
        for variable in _services()[name]["environment"]:
            assert f'"{variable}"' in source, f"{name} sets {variable}, which no code reads"


def test_kafka_keeps_its_log_dir_on_a_volume() -> None:
    compose = _compose()
    kafka = compose["services"]["kafka"]
    log_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    volume = _mounts(kafka).get(log_dir)
    assert volume is not None, f"nothing is mounted on KAFKA_LOG_DIRS={log_dir}"
    assert not volume.startswith((".", "/")), "a named volume, not a host directory"
    assert volume in compose["volumes"], f"volume {volume} is not declared"


def test_kafka_listeners_serve_the_network_and_the_host() -> None:
    services = _services()
    env = services["kafka"]["environment"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocols) == set(listeners)
    # the admin listener and the controller stay on the container's loopback
    assert listeners["ADMIN"].startswith("127.0.0.1:") and protocols["ADMIN"] == "PLAINTEXT"
    assert listeners["CONTROLLER"].startswith("127.0.0.1:")
    assert "CONTROLLER" not in advertised and env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert set(advertised) == set(listeners) - {"CONTROLLER"}
    # the clients in compose bootstrap from the listener advertised on the compose network
    by_address = {address: name for name, address in advertised.items()}
    for name in TRACEWATCH_SERVICES:
        bootstrap = services[name]["environment"]["KAFKA_BOOTSTRAP"]
        assert bootstrap in by_address, f"{name} bootstraps from {bootstrap}, not advertised"
        assert bootstrap.split(":")[0] == "kafka"
        assert protocols[by_address[bootstrap]] == "SASL_PLAINTEXT"
    # one listener for the host: advertised as localhost, published on that port, SASL too
    host = [name for name, address in advertised.items() if address.startswith("localhost:")]
    assert len(host) == 1, advertised
    port = advertised[host[0]].split(":")[1]
    assert listeners[host[0]].endswith(f":{port}")
    assert protocols[host[0]] == "SASL_PLAINTEXT"
    published = [p.rsplit(":", 2)[-2:] for p in services["kafka"]["ports"]]
    assert [port, port] in published, services["kafka"]["ports"]
    # the broker side of SCRAM on every SASL listener (else the broker does not start)
    for name, protocol in protocols.items():
        if protocol.startswith("SASL"):
            key = f"KAFKA_LISTENER_NAME_{name}_SCRAM___SHA___512_SASL_JAAS_CONFIG"
            assert "ScramLoginModule required" in env.get(key, ""), f"{name} lacks {key}"


def test_healthchecks_and_the_conditions_that_wait_for_them() -> None:
    services = _services()
    for name in ("kafka", "redis", "worker", "api", "prometheus"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name} has no healthcheck"
    kafka = services["kafka"]
    admin = _listeners(kafka["environment"]["KAFKA_LISTENERS"])["ADMIN"]
    assert admin in kafka["healthcheck"]["test"], "kafka's check must ask the admin listener"
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, condition in depends.items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}'s health"
            if condition["condition"] == "service_completed_successfully":
                assert services[target].get("restart", "no") != "unless-stopped", target


class _Handler(BaseHTTPRequestHandler):
    path_ok = "/"

    def do_GET(self) -> None:
        self.send_response(200 if self.path == self.path_ok else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("service", "port_variable", "default_port", "path"),
    [
        ("worker", "TRACEWATCH_WEB_PORT", 6066, "/metrics"),
        ("api", "TRACEWATCH_API_PORT", 8080, "/healthz"),
    ],
)
def test_the_python_healthchecks_answer_as_the_process_does(
    service: str,
    port_variable: str,
    default_port: int,
    path: str,
    http_port: tuple[int, type[_Handler]],
) -> None:
    """The image has no curl: the check is python's urllib, run here against a stand-in server
    on the path the process serves (healthy), then on a wrong path and a closed port."""
    spec = _services()[service]
    port = int(spec["environment"].get(port_variable, default_port))
    test = spec["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    assert f"http://127.0.0.1:{port}{path}" in code
    assert spec["environment"].get(
        "TRACEWATCH_WEB_HOST" if service == "worker" else "TRACEWATCH_API_HOST"
    ) in ("0.0.0.0", "127.0.0.1")
    served = {"worker": "streams/app.py", "api": "api/app.py"}[service]
    assert f'"{path}"' in (Path(ROOT) / served).read_text(), f"{served} serves no {path}"

    local_port, handler = http_port

    def run(target: str) -> int:
        local = code.replace(f"http://127.0.0.1:{port}{path}", target)
        return subprocess.run(
            [sys.executable, "-c", local], capture_output=True, timeout=30
        ).returncode

    handler.path_ok = path
    assert run(f"http://127.0.0.1:{local_port}{path}") == 0
    assert run(f"http://127.0.0.1:{local_port}/nothing-here") != 0
    assert run(f"http://127.0.0.1:{free_port()}{path}") != 0


def test_the_catalog_is_published_before_workers_and_api_start() -> None:
    services = _services()
    catalog = services["catalog"]
    command = catalog["command"]
    assert command[:2] == ["tracewatch", "catalog"] and "catalog" in cli_commands()
    # the file it reads is mounted, and the default one is a valid catalog
    mounts = _mounts(catalog)
    assert command[2] in mounts, f"{command[2]} is not mounted"
    source = DEPLOY / mounts[command[2]]
    assert source.is_file(), source
    assert len(load_catalog(str(source))) > 0
    assert "TRACEWATCH_CATALOG_FILE" in catalog["volumes"][0], "the file is configurable"
    # as operator, into the Redis and the topic prefix the workers use
    env = catalog["environment"]
    assert env["KAFKA_SASL_USERNAME"] == "operator"
    assert env["KAFKA_SASL_PASSWORD"] == services["topics"]["environment"]["KAFKA_SASL_PASSWORD"]
    assert env["REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
    assert catalog["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert catalog["depends_on"]["redis"]["condition"] == "service_healthy"
    # a one-shot: restarted on failure only, so that completion can be waited for
    assert catalog["restart"].startswith("on-failure")
    for name in ("worker", "api"):
        condition = services[name]["depends_on"]["catalog"]["condition"]
        assert condition == "service_completed_successfully", name


def test_the_image_holds_every_package_pyproject_installs() -> None:
    packages = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in {p.split(".")[0] for p in packages}:  # a subpackage comes with its parent
        assert f"COPY {package} {package}" in dockerfile, f"the image lacks {package}/"


def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(path: str) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it or one of
    its parent directories decides (`!` patterns put it back)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for line in (Path(ROOT) / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = re.compile(_glob_regex(line.lstrip("!").strip("/")))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_keeps_what_the_image_copies_and_nothing_else() -> None:
    sources = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY":
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    assert {"pyproject.toml", "README.md", "streams", "api"} <= set(sources)
    for source in sources:
        assert not _ignored(source), f".dockerignore leaves out {source}, which the image copies"
        for path in (Path(ROOT) / source).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not _ignored(relative), f".dockerignore leaves out {relative}"
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        ".tools/usr/bin/promtool",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        "streams/__pycache__/app.cpython-311.pyc",
        "tracewatch.egg-info/PKG-INFO",
        "tests/conftest.py",
        "deploy/.env",
        ".env",
    ):
        assert _ignored(unwanted), f"{unwanted} reaches the build context"


def _compose_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config -q` (Debian's docker-compose, unpacked into .tools by `make
    test`): the file as Compose itself reads it, no Docker engine needed. In CI a missing tool
    is a failure, not a skip."""
    tools = Path(ROOT) / ".tools"
    binary = tools / "usr" / "bin" / "docker-compose"
    if not binary.is_file():
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: `make test` fetches it (apt-get download)")
        pytest.skip("docker-compose not unpacked (`make test` fetches Debian's package)")
    return subprocess.run(
        ["/usr/bin/python3", str(binary), "-f", str(path), "config", "-q"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(tools / "usr" / "lib" / "python3" / "dist-packages"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


PASSWORDS = {
    **{
        f"KAFKA_PASSWORD_{who}": "x"
        for who in ("GATEWAY", "WORKER", "INSPECTOR", "OPERATOR", "SINK")
    },
    "POSTGRES_PASSWORD": "x",
}


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    done = _compose_config(DEPLOY / "compose.yaml", **PASSWORDS)
    assert done.returncode == 0, done.stderr
    # the same check refuses what Compose would: no passwords, an option it does not know
    assert _compose_config(DEPLOY / "compose.yaml").returncode != 0
    broken = _compose()
    broken["services"]["worker"]["restart_policy"] = "always"
    (tmp_path / "deploy").mkdir()
    copy = tmp_path / "deploy" / "compose.yaml"
    copy.write_text(yaml.safe_dump(broken))
    refused = _compose_config(copy, **PASSWORDS)
    assert refused.returncode != 0 and "restart_policy" in refused.stderr, refused.stderr


def test_the_case_store_and_its_sink_are_wired() -> None:
    services = _services()
    sink, api = services["sink"], services["api"]
    assert sink["command"] == ["tracewatch", "sink"]
    assert sink["environment"]["KAFKA_SASL_USERNAME"] == "sink"
    for service in (sink, api):
        url = interpolate(service["environment"]["DATABASE_URL"])
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
    postgres = services["postgres"]
    assert _mounts(postgres)["/var/lib/postgresql/data"] == "postgres-data"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    # the sink's principal may read the alerts topic in the group the sink joins
    acls = (DEPLOY / "kafka-acls.sh").read_text()
    sink_source = (Path(ROOT) / "cases" / "sink.py").read_text()
    assert '"group.id": f"{names.APP_ID}-cases-sink"' in sink_source
    assert '--group "$P-worker-cases-sink"' in acls  # APP_ID is "<prefix>-worker"
    assert "for user in gateway worker inspector operator sink" in acls
    port = sink["environment"]["TRACEWATCH_SINK_METRICS_PORT"]
    assert port in " ".join(sink["healthcheck"]["test"])
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert f'names: ["sink"]\n        type: A\n        port: {port}' in scrape
