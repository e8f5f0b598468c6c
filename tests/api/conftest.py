"""`tracewatch api` as a child process on its own topics and Redis keys, with tokens made the way
an operator makes them (`tracewatch tokens add`)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from harness.services import Services, free_port, fresh_database, pipeline_env, stop_process
from tests.conftest import CATALOG_LINES, ROOT

INSTITUTIONS = [
    '{"institution": "P1", "name": "Pharmacy one", "kind": "pharmacy", "region": "330102"}',
    '{"institution": "P2", "name": "Pharmacy two", "kind": "pharmacy", "region": "330106"}',
    '{"institution": "H9", "name": "Far hospital", "kind": "hospital", "region": "110101"}',
]


def cli(env: dict[str, str], *args: str) -> str:
    """A `tracewatch` command as the operator runs it; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode().strip()


@dataclass
class Api:
    url: str
    env: dict[str, str]
    prefix: str
    proc: subprocess.Popen[bytes]
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, who: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def start_api(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the API exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_process(proc)
    raise AssertionError("the API did not come up within 60 s")


@pytest.fixture(scope="module")
def api(svc: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with api_on(svc, tmp_path_factory.mktemp("api")) as started:
        yield started


@pytest.fixture(scope="module")
def api_with_cases(
    svc: Services, tmp_path_factory: pytest.TempPathFactory, postgres_url: str
) -> Iterator[tuple[Api, str]]:
    """An API with its case store: a database of its own, which the API migrates at start."""
    url = fresh_database(postgres_url, f"twapi_{uuid.uuid4().hex[:10]}")
    with api_on(svc, tmp_path_factory.mktemp("cases"), DATABASE_URL=url) as api:
        yield api, url


@contextlib.contextmanager
def api_on(svc: Services, folder: Path, **extra: str) -> Iterator[Api]:
    """An API process with its tokens on `svc`'s broker and Redis (a cluster's too); `extra`:
    more of its environment (DATABASE_URL)."""
    prefix = f"twapi{uuid.uuid4().hex[:8]}"
    svc.create_topics(prefix)
    catalog = folder / "catalog.jsonl"
    catalog.write_text("\n".join(CATALOG_LINES) + "\n")
    institutions = folder / "institutions.jsonl"
    institutions.write_text("\n".join(INSTITUTIONS) + "\n")
    port = free_port()
    env = pipeline_env(
        svc,
        prefix,
        str(catalog),
        TRACEWATCH_API_PORT=str(port),
        TRACEWATCH_API_TOKEN_CACHE_SECONDS="0",
        TRACEWATCH_API_DELIVERY_TIMEOUT_MS="3000",
        **extra,
    )
    cli(env, "catalog", str(catalog))
    cli(env, "institutions", str(institutions))
    tokens = {
        "P1": cli(env, "tokens", "add", "P1"),
        "P2": cli(env, "tokens", "add", "P2"),
        "zhejiang": cli(env, "tokens", "add", "--inspector", "--region", "330000", "zj"),
        "beijing": cli(env, "tokens", "add", "--inspector", "--region", "110000", "bj"),
    }
    proc = start_api(env, port)
    try:
        yield Api(f"http://127.0.0.1:{port}", env, prefix, proc, tokens)
    finally:
        stop_process(proc)


def catalog_path(api: Api) -> Path:
    return Path(api.env["TRACEWATCH_CATALOG"])
