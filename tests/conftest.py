"""Session fixtures: a real Kafka-protocol broker and a real Redis (see harness.services)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cases.schema import migrate
from harness.services import PostgresServer, Services, free_port, fresh_database, services

ROOT = Path(__file__).resolve().parent.parent
CATALOG_LINES = [
    '{"product": "XA001", "name": "Amoxicillin 0.25g x 24", "prefixes": ["8100001"], '
    '"gtins": ["06912345678902"], "pack_size": 24, "code_required": true}',
    '{"product": "XA002", "name": "Metformin 0.5g x 60", "prefixes": ["8100002"], '
    '"gtins": [], "pack_size": 60, "code_required": true}',
    '{"product": "TCM01", "name": "Herbal slices", "prefixes": [], "gtins": [], '
    '"pack_size": 1, "code_required": false}',
]


@pytest.fixture(scope="session")
def svc() -> Iterator[Services]:
    with services() as found:
        yield found


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key prefix per test: tests never touch keys they did not write."""
    return f"twtest{uuid.uuid4().hex[:10]}"


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(CATALOG_LINES) + "\n")
    return path


class WorkerProcess:
    """`tracewatch worker` as a child process, as operators run it."""

    def __init__(self, svc: Services, env: dict[str, str], log: Path | None = None) -> None:
        """`log`: where its stdout and stderr go (default: the test's)."""
        self.log = log
        self.port = free_port()
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
            "REDIS_URL": svc.redis_url,
            "TRACEWATCH_WEB_PORT": str(self.port),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        out = None if self.log is None else open(self.log, "ab")  # noqa: SIM115 (the child's)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"],
            env=self.env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
        if out is not None:
            out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("worker did not come up within 60 s")

    def metrics(self) -> str:
        return self.get("/metrics")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL: `DATABASE_URL` if set, else a private server started from the
    PostgreSQL binaries (`harness.services.PostgresServer`)."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def database(postgres_url: str) -> str:
    """A database of the test's own, created and migrated here: no test touches one it did
    not create."""
    url = fresh_database(postgres_url, f"twtest_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(url) as conn:
        migrate(conn)
    return url
