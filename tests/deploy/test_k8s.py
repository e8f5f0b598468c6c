"""deploy/k8s: every manifest validates against the Kubernetes API's own schemas (offline, strict:
kubernetes-validate ships them), kustomization.yaml lists exactly the manifests, and the pieces
fit each other and the code: commands, ports, probes, variables, selectors, Secrets. No cluster
here, so this is what CI checks."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml

from detectors.catalog import load_catalog
from streams.reference import CatalogCache
from tests.conftest import ROOT
from tests.deploy.test_compose import cli_commands, source_text

K8S = Path(ROOT) / "deploy" / "k8s"
# an older release still common on managed clusters, and the newest schemas the package has
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
WORKLOADS = ("Deployment", "Job")
PRINCIPALS = {
    "worker": "worker",
    "api": "gateway",
    "topics": "operator",
    "catalog": "operator",
    "sink": "sink",
}


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML keeps the last of two equal keys; the API server refuses them: so do we."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    duplicated = {key for key in keys if keys.count(key) > 1}
    if duplicated:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {sorted(duplicated)}", node.start_mark
        )
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), _UniqueKeyLoader) if doc is not None]


def _kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load((K8S / "kustomization.yaml").read_text(), _UniqueKeyLoader)
    return loaded


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


def _objects() -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in _load(path)]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    """(component, workload) for each Deployment and Job."""
    for obj in _objects():
        if obj["kind"] in WORKLOADS:
            yield obj["metadata"]["labels"]["app.kubernetes.io/component"], obj


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _config() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap", "tracewatch-config")["data"]
    return data


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    documents = _load(path)
    assert documents, f"{path.name} is empty"
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {document.get('kind')} at {where}: {exc.message}")


def test_the_validator_refuses_what_the_api_server_would() -> None:
    """The check above can fail: a misspelt field and a wrong type are caught."""
    deployment = _one("Deployment", "tracewatch-worker")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_and_only_files_that_exist() -> None:
    kustomization = _kustomization()
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, missing"
    assert sorted(resources) == sorted(p.name for p in _manifest_files())
    # one namespace, declared, and every object in it says so
    namespace = kustomization["namespace"]
    _one("Namespace", namespace)
    for obj in _objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]
    names = [(o["kind"], o["metadata"]["name"]) for o in _objects()]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


def test_workloads_run_commands_that_exist_from_the_one_image() -> None:
    commands = cli_commands()
    images = {image["name"] for image in _kustomization()["images"]}
    components = set()
    for component, workload in _workloads():
        components.add(component)
        pod = _pod(workload)
        for container in pod["containers"]:
            command = container["command"]
            assert command[0] == "tracewatch" and command[1] in commands, (component, command)
            assert command[1] == component, f"{component} runs {command}"
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"].split(":")[0] in images, container["image"]
    assert components == {"worker", "api", "topics", "catalog", "sink"}


def test_pods_run_as_the_user_the_image_declares() -> None:
    user = re.search(r"^USER (\d+)", (K8S.parent / "Dockerfile").read_text(), re.M)
    assert user, "deploy/Dockerfile sets no numeric USER: runAsNonRoot cannot check a name"
    for component, workload in _workloads():
        context = _pod(workload)["securityContext"]
        assert context["runAsNonRoot"] is True, component
        assert context["runAsUser"] == int(user.group(1)), component


def test_each_workload_authenticates_as_its_own_principal() -> None:
    acls = (K8S.parent / "kafka-acls.sh").read_text()
    for component, workload in _workloads():
        for container in _pod(workload)["containers"]:
            refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
            assert len(refs) == 1, f"{component}: {refs}"
            secret = _one("Secret", refs[0])
            username = secret["stringData"]["KAFKA_SASL_USERNAME"]
            assert username == PRINCIPALS[component], f"{component} runs as {username}"
            assert re.search(rf"for user in [^;]*\b{username}\b", acls), username
    # placeholders only: real passwords never live in the repository
    for obj in _objects():
        if obj["kind"] == "Secret":
            assert set(obj.get("data", {})) == set(), "no base64 data: stringData placeholders"
            secret = obj["stringData"]
            if "DATABASE_URL" in secret:
                assert ":REPLACE-ME@" in secret["DATABASE_URL"]
            else:
                assert secret["KAFKA_SASL_PASSWORD"] == "REPLACE-ME"


def test_referenced_configmaps_and_secrets_exist() -> None:
    for component, workload in _workloads():
        pod = _pod(workload)
        for container in pod["containers"] + pod.get("initContainers", []):
            for source in container.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        _one(kind, source[key]["name"])
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                data = _one("ConfigMap", volume["configMap"]["name"])["data"]
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in data, f"{component}: no key {item['key']}"


def test_the_configmap_holds_only_variables_the_code_reads() -> None:
    source = source_text()
    config = _config()
    for variable in config:
        assert f'"{variable}"' in source, f"the ConfigMap sets {variable}, which no code reads"
    assert {"KAFKA_BOOTSTRAP", "REDIS_URL", "KAFKA_SECURITY_PROTOCOL"} <= set(config)
    # probes and Prometheus come to the pod's address, not its loopback
    assert config["TRACEWATCH_WEB_HOST"] == "0.0.0.0"
    assert config["TRACEWATCH_API_HOST"] == "0.0.0.0"
    for obj in _objects():
        if obj["kind"] == "Secret":
            for variable in obj["stringData"]:
                assert f'"{variable}"' in source, f"{obj['metadata']['name']} sets {variable}"


def _ports(container: dict[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


@pytest.mark.parametrize(
    ("name", "port_variable", "probes", "served_by"),
    [
        (
            "tracewatch-worker",
            "TRACEWATCH_WEB_PORT",
            {"readinessProbe": "/metrics", "livenessProbe": "/metrics"},
            "streams/app.py",
        ),
        (
            "tracewatch-api",
            "TRACEWATCH_API_PORT",
            {"readinessProbe": "/readyz", "livenessProbe": "/healthz"},
            "api/app.py",
        ),
    ],
)
def test_probes_and_scrapes_reach_the_port_the_process_listens_on(
    name: str, port_variable: str, probes: dict[str, str], served_by: str
) -> None:
    deployment = _one("Deployment", name)
    (container,) = _pod(deployment)["containers"]
    ports = _ports(container)
    listening = int(_config()[port_variable])
    assert listening in ports.values(), f"{name} declares {ports}, listens on {listening}"
    served = (Path(ROOT) / served_by).read_text()
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, (probe, get)
        assert ports.get(get["port"]) == listening, f"{probe} asks port {get['port']}"
        assert f'"{path}"' in served, f"{served_by} serves no {path}"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == listening
    assert annotations["prometheus.io/path"] == "/metrics"
    assert '"/metrics"' in served
    assert _pod(deployment)["terminationGracePeriodSeconds"] == 30
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_selectors_match_the_pods_they_mean() -> None:
    objects = _objects()
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    jobs = [o for o in objects if o["kind"] == "Job"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in selector.items())

    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels), name
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} == {"tracewatch-worker", "tracewatch-api"}
    for budget in budgets:
        assert budget["spec"]["maxUnavailable"] == 1
        selector = budget["spec"]["selector"]["matchLabels"]
        covered = [
            n
            for n, d in deployments.items()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert covered == [budget["metadata"]["name"]], (
            f"{budget['metadata']['name']} covers {covered}"
        )
        for job in jobs:
            assert not selects(selector, job["spec"]["template"]["metadata"]["labels"])
    service = _one("Service", "tracewatch-api")
    covered = [
        n
        for n, d in deployments.items()
        if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert covered == ["tracewatch-api"]
    (container,) = _pod(deployments["tracewatch-api"])["containers"]
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in _ports(container), port


def test_the_catalog_job_publishes_a_valid_mounted_catalog(tmp_path: Path) -> None:
    job = _one("Job", "tracewatch-catalog")
    pod = _pod(job)
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:2] == ["tracewatch", "catalog"]
    file = Path(command[2])
    (mount,) = [m for m in container["volumeMounts"] if file.parent == Path(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    paths = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])}
    content = config_map["data"][paths.get(file.name, file.name)]
    copy = tmp_path / "catalog.jsonl"
    copy.write_text(content)
    assert len(load_catalog(str(copy))) > 0  # refused whole, naming the line, otherwise
    assert pod["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] > 0


class _Redis:
    """Stands in for redis.Redis in the init container's script."""

    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.asked: list[str] = []

    def exists(self, key: str) -> int:
        self.asked.append(key)
        return int(key in self.present)


@pytest.mark.parametrize("name", ["tracewatch-worker", "tracewatch-api"])
def test_pods_wait_for_the_key_the_catalog_publish_writes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The init container's script, run here: it returns once the catalog's version key is in
    Redis, and that key is the one `tracewatch catalog` (CatalogCache.publish) writes."""
    import redis

    (init,) = _pod(_one("Deployment", name))["initContainers"]
    assert init["command"][:2] == ["python", "-c"]
    script = init["command"][2]
    prefix = _config()["TRACEWATCH_REDIS_PREFIX"]
    published = CatalogCache(cast(Any, None), prefix)._version_key
    fake = _Redis({published})
    monkeypatch.setenv("REDIS_URL", _config()["REDIS_URL"])
    monkeypatch.setenv("TRACEWATCH_REDIS_PREFIX", prefix)
    monkeypatch.setattr(redis.Redis, "from_url", lambda *a, **k: fake)
    # a wait that would sleep raises instead: a wrong key fails here rather than hanging
    monkeypatch.setattr("time.sleep", lambda _: (_ for _ in ()).throw(TimeoutError))
    with pytest.raises(SystemExit) as done:
        exec(compile(script, f"{name} wait-for-catalog", "exec"), {})
    assert done.value.code == 0 and fake.asked == [published]
    # and it keeps waiting while the key is absent
    empty = _Redis(set())
    monkeypatch.setattr(redis.Redis, "from_url", lambda *a, **k: empty)
    with pytest.raises(TimeoutError):
        exec(compile(script, f"{name} wait-for-catalog", "exec"), {})
    assert empty.asked == [published]


def test_the_sink_and_the_api_reach_the_case_store() -> None:
    sink = _one("Deployment", "tracewatch-sink")
    assert sink["spec"]["replicas"] == 1 and sink["spec"]["strategy"]["type"] == "Recreate"
    (container,) = _pod(sink)["containers"]
    assert container["command"] == ["tracewatch", "sink"]
    port = int(_config()["TRACEWATCH_SINK_METRICS_PORT"])
    assert _ports(container)["metrics"] == port
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert int(sink["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == port
    for name in ("tracewatch-sink", "tracewatch-api"):
        (main,) = _pod(_one("Deployment", name))["containers"]
        [ref] = [e["valueFrom"]["secretKeyRef"] for e in main["env"] if e["name"] == "DATABASE_URL"]
        assert "DATABASE_URL" in _one("Secret", ref["name"])["stringData"], name
