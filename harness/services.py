"""Finding or starting the services the pipeline needs: a Kafka-protocol broker and Redis.

Order of preference, the same for `make run` and the tests:
Kafka - `KAFKA_BOOTSTRAP` if set; else a Docker engine -> a testcontainers Kafka; else the
embedded broker (librdkafka's built-in cluster). Redis - `REDIS_URL` if set; else a Docker engine
-> a testcontainers Redis; else a `redis-server` binary on a free loopback port (Debian package
`redis-server`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cli.topics import create_topics


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# Per-key state lives in hashes of ~100 keys; Redis keeps a hash compact (listpack) only while
# every value stays under hash-max-listpack-value (64 B by default) - one code with a long
# history would otherwise turn its whole bucket into a hashtable (~2x the memory).
REDIS_STATE_OPTIONS = ("--hash-max-listpack-value", "512", "--hash-max-listpack-entries", "256")


class RedisServer:
    """A throwaway `redis-server` on a free loopback port, in a temporary directory."""

    def __init__(self, appendonly: bool = False, options: Sequence[str] = ()) -> None:
        """`appendonly`: keep an AOF fsynced every second, as production runs it - a SIGKILL then
        loses up to a second of writes, and a restart on the same port finds the rest.
        `options`: more `redis-server` arguments (a cluster node's)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._appendonly = appendonly
        self._options = tuple(options)
        self.url = ""
        self.port = 0

    def start(self, port: int | None = None) -> RedisServer:
        """On `port` (a free one when None): a test restarts a stopped server on its old port."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no Redis: set REDIS_URL, or install the server (Debian: apt-get install "
                "redis-server), or run a Docker engine"
            )
        if self._dir is None:  # a restart keeps the directory, and the AOF in it
            self._dir = tempfile.TemporaryDirectory(prefix="tracewatch-redis-")
        port = port or free_port()
        self.port = port
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self._appendonly else "no",
                "--appendfsync",
                "everysec",
                *REDIS_STATE_OPTIONS,
                *self._options,
                "--dir",
                self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                self.url = f"redis://127.0.0.1:{port}/0"
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what the AOF had not fsynced is lost; the directory stays for a restart."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def stop(self, keep_data: bool = False) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is not None and not keep_data:
            self._dir.cleanup()
            self._dir = None


class RedisClusterServers:
    """A throwaway Redis Cluster on loopback: `masters` masters with a replica each, from the
    `redis-server` binary, formed by `redis-cli --cluster create`. A short node timeout lets a
    replica take over a killed master within a few seconds."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self._masters = masters
        self._timeout = node_timeout_ms
        self.nodes: list[RedisServer] = []
        self.url = ""

    def start(self) -> RedisClusterServers:
        if shutil.which("redis-cli") is None:
            raise RuntimeError(
                "no redis-cli to form a cluster (Debian: apt-get install redis-tools)"
            )
        options = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self._timeout),
        ]
        try:
            ports: set[int] = set()
            while len(ports) < 2 * self._masters:
                port = free_port()
                if port + 10000 <= 65535 and _port_is_free(port + 10000):  # the cluster bus
                    ports.add(port)
            for port in sorted(ports):
                self.nodes.append(RedisServer(appendonly=True, options=options).start(port))
            subprocess.run(
                ["redis-cli", "--cluster", "create"]
                + [f"127.0.0.1:{n.port}" for n in self.nodes]
                + ["--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)  # any may be killed
        self.url = f"redis+cluster://{seeds}/0"
        return self

    def _cli(self, node: RedisServer, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(node.port), *args], capture_output=True, timeout=10
        )
        return done.stdout.decode()

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now."""
        return [
            n
            for n in self.nodes
            if n.running and "role:master" in self._cli(n, "info", "replication")
        ]

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every running node sees every slot served (`cluster_state:ok`), there are
        `masters` masters (after a failover: once the replica has taken over) and every running
        replica is in sync with its master (one that never synced would not take over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.running]
            states = [self._cli(n, "cluster", "info") for n in running]
            roles = [self._cli(n, "info", "replication") for n in running]
            if (
                all("cluster_state:ok" in s for s in states)
                and sum("role:master" in r for r in roles) == self._masters
                and all("master_link_status:up" in r for r in roles if "role:slave" in r)
            ):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Redis Cluster did not become healthy within {timeout:.0f}s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []


class PostgresServer:
    """A throwaway PostgreSQL on a free loopback port, from the server binaries (`initdb`,
    `postgres`; Debian: apt-get install postgresql), in a temporary directory, trusting local
    connections. As root it runs as the `postgres` user (the server refuses root)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self.url = ""

    @staticmethod
    def _binary(name: str) -> str:
        found = shutil.which(name) or next(
            iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
        )
        if found is None:
            raise RuntimeError(
                "no PostgreSQL: set DATABASE_URL, or install the server (Debian: apt-get "
                "install postgresql), or run a Docker engine"
            )
        return found

    def start(self) -> PostgresServer:
        initdb, postgres = self._binary("initdb"), self._binary("postgres")
        self._dir = tempfile.mkdtemp(prefix="tracewatch-pg-")
        drop: Any = None
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
            os.chown(self._dir, user.pw_uid, user.pw_gid)

            def drop() -> None:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        data = os.path.join(self._dir, "data")
        subprocess.run(
            [initdb, "-D", data, "-U", "tracewatch", "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            preexec_fn=drop,
            timeout=120,
        )
        port = free_port()
        self._proc = subprocess.Popen(
            [
                postgres,
                "-D",
                data,
                "-p",
                str(port),
                "-k",
                self._dir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=drop,
        )
        url = f"postgresql://tracewatch@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        import psycopg

        while time.monotonic() < deadline:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                self.url = url
                return self
            except psycopg.OperationalError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("postgres did not start within 30 s")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=10)  # SIGTERM: smart shutdown, waits for clients
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def fresh_database(url: str, name: str) -> str:
    """A new, empty database `name` on the server of `url`; its URL."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # a test's own name, never user input
    return make_conninfo("", **{**conninfo_to_dict(url), "dbname": name})


@dataclass(frozen=True, slots=True)
class Services:
    kafka_bootstrap: str
    redis_url: str
    kafka_embedded: bool
    redis_owned: bool  # started by us: ours to wipe
    broker: Any = None  # the EmbeddedBroker, when that is what runs

    def create_topics(self, prefix: str) -> None:
        """An isolated copy of the pipeline's topics under `prefix`."""
        if self.broker is not None:
            self.broker.create_topics(prefix)
        else:
            create_topics(self.kafka_bootstrap, prefix)


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """Yields reachable Kafka and Redis, started here if needed, stopped on exit."""
    with contextlib.ExitStack() as stack:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
        broker = None
        if bootstrap:
            create_topics(bootstrap)
        elif docker_available():
            from testcontainers.kafka import KafkaContainer

            kafka = stack.enter_context(KafkaContainer())
            bootstrap = kafka.get_bootstrap_server()
            create_topics(bootstrap)
        else:
            from harness.embedded_broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker())
            bootstrap = broker.bootstrap
        redis_url = os.environ.get("REDIS_URL")
        owned = False
        if not redis_url:
            owned = True
            if docker_available():
                from testcontainers.redis import RedisContainer

                container = stack.enter_context(RedisContainer())
                host = container.get_container_host_ip()
                redis_url = f"redis://{host}:{container.get_exposed_port(6379)}/0"
            else:
                server = RedisServer().start()
                stack.callback(server.stop)
                redis_url = server.url
        yield Services(bootstrap, redis_url, broker is not None, owned, broker)


def pipeline_env(svc: Services, prefix: str, catalog: str, **extra: str) -> dict[str, str]:
    """The environment of a worker (or CLI call) on an isolated pipeline: its own topics and
    Redis keys under `prefix`."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
        "REDIS_URL": svc.redis_url,
        "TRACEWATCH_TOPIC_PREFIX": prefix,
        "TRACEWATCH_REDIS_PREFIX": prefix,
        "TRACEWATCH_CATALOG": catalog,
        "TRACEWATCH_EMBEDDED_BROKER": "1" if svc.kafka_embedded else "",
        **extra,
    }


def wait_for_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    """Until `url` answers 2xx; fails at once, naming `what`, if `proc` exits meanwhile."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} exited with code {proc.returncode}; see its log above")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:  # refused, or an HTTPError (a 503 until the broker and Redis answer)
            time.sleep(0.3)
    raise RuntimeError(f"the {what} did not answer {url} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, and SIGKILL if it has not stopped within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
