"""An embedded Kafka-protocol broker: librdkafka's built-in cluster, hosted by a small process.

The confluent-kafka wheel ships librdkafka, whose C API can start an in-memory cluster that speaks
the Kafka protocol on a loopback TCP port (its API calls it a "mock cluster"). Any client -
aiokafka under Faust, confluent-kafka - uses it like a broker. It is the default when no
`KAFKA_BOOTSTRAP` is given and no Docker engine exists, for `make run` and for the tests.

Known limits (see README): memory only, gone with its host process; no topic admin API, so this
host creates every topic of `topics.names` itself; each partition keeps at most 5 MiB / 100,000
message sets and silently drops the oldest beyond that; an empty fetch is held for the consumer's
full max-wait, so consumers must use a short `fetch.wait.max.ms`.

Run as `python -m harness.embedded_broker`: prints `BOOTSTRAP host:port` once the topics exist,
then serves until SIGTERM/SIGINT or until stdin closes (so it never outlives its parent). A line
`TOPICS <prefix>` on stdin creates the pipeline's topics under another prefix (answer: `OK`).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType

import confluent_kafka

from topics.names import ALL_TOPICS, TopicSpec, all_topics


def _librdkafka() -> ctypes.CDLL:
    libdir = os.path.join(
        os.path.dirname(confluent_kafka.__file__), os.pardir, "confluent_kafka.libs"
    )
    candidates = sorted(glob.glob(os.path.join(libdir, "librdkafka-*.so*")))
    if not candidates:
        raise RuntimeError(
            f"librdkafka not found in {os.path.normpath(libdir)}: reinstall confluent-kafka from "
            "its manylinux wheel (pip install --force-reinstall confluent-kafka), or set "
            "KAFKA_BOOTSTRAP to a real Kafka cluster"
        )
    lib = ctypes.CDLL(candidates[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
    lib.rd_kafka_mock_topic_create.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.rd_kafka_mock_set_controller_id.restype = ctypes.c_int
    lib.rd_kafka_mock_set_controller_id.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_rtt.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int16,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.rd_kafka_mock_clear_request_errors.argtypes = [ctypes.c_void_p, ctypes.c_int16]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    return lib


class MockCluster:
    """The cluster itself, inside this process (use `EmbeddedBroker` from other processes)."""

    def __init__(self, topics: Iterable[TopicSpec] = ALL_TOPICS, brokers: int = 1) -> None:
        self._lib = _librdkafka()
        errstr = ctypes.create_string_buffer(512)
        conf = self._lib.rd_kafka_conf_new()
        # The hosting client has no brokers of its own to talk to: silence its warning.
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr))
        self._rk = self._lib.rd_kafka_new(0, conf, errstr, len(errstr))  # 0 = producer
        if not self._rk:
            raise RuntimeError(f"librdkafka: {errstr.value.decode()}")
        self._mc = self._lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._mc:
            raise RuntimeError("librdkafka could not start its built-in cluster")
        # Without a controller id, admin requests (e.g. DescribeCluster) time out.
        self._lib.rd_kafka_mock_set_controller_id(self._mc, 1)
        self.bootstrap: str = self._lib.rd_kafka_mock_cluster_bootstraps(self._mc).decode()
        for spec in topics:
            self.create_topic(spec.name, spec.partitions)

    def create_topic(self, name: str, partitions: int) -> None:
        err = self._lib.rd_kafka_mock_topic_create(self._mc, name.encode(), partitions, 1)
        if err:
            raise RuntimeError(f"creating topic {name} on the embedded broker: error {err}")

    # -- fault injection (librdkafka's mock API), for the chaos suite ---------------------------

    def broker_down(self, broker: int = 1) -> None:
        """Close the broker's connections and refuse new ones until `broker_up`."""
        self._lib.rd_kafka_mock_broker_set_down(self._mc, broker)

    def broker_up(self, broker: int = 1) -> None:
        self._lib.rd_kafka_mock_broker_set_up(self._mc, broker)

    def set_rtt(self, milliseconds: int, broker: int = 1) -> None:
        """Delay every answer of the broker by `milliseconds`."""
        self._lib.rd_kafka_mock_broker_set_rtt(self._mc, broker, milliseconds)

    def push_errors(self, api_key: int, errors: Sequence[int]) -> None:
        """Answer the next `len(errors)` requests of `api_key` (0 Produce, 1 Fetch, 8
        OffsetCommit, 11 JoinGroup, ...) with these error codes, one each, from any client."""
        array = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(self._mc, api_key, len(errors), array)

    def clear_errors(self, api_key: int) -> None:
        """Forget the injected errors of `api_key` that no request has consumed yet."""
        self._lib.rd_kafka_mock_clear_request_errors(self._mc, api_key)

    def command(self, words: Sequence[str]) -> None:
        """One line of the host protocol's fault commands: DOWN, UP, RTT <ms>, ERRORS <api>
        <code>..., CLEAR <api>."""
        verb, args = words[0], [int(w) for w in words[1:]]
        if verb == "DOWN":
            self.broker_down(*args)
        elif verb == "UP":
            self.broker_up(*args)
        elif verb == "RTT":
            self.set_rtt(*args)
        elif verb == "ERRORS" and len(args) >= 2:
            self.push_errors(args[0], args[1:])
        elif verb == "CLEAR" and len(args) == 1:
            self.clear_errors(args[0])
        else:
            raise RuntimeError(f"unknown command {' '.join(words)!r}")

    def close(self) -> None:
        if self._mc:
            self._lib.rd_kafka_mock_cluster_destroy(self._mc)
            self._mc = None
        if self._rk:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None


class EmbeddedBroker:
    """Starts the cluster in a child process, so that workers can be killed around it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self.bootstrap = ""

    def start(self) -> EmbeddedBroker:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "harness.embedded_broker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("BOOTSTRAP "):
            self.stop()
            raise RuntimeError(f"embedded broker did not start (said {line!r})")
        self.bootstrap = line.split(" ", 1)[1]
        return self

    @property
    def pid(self) -> int:
        """The host process (what `make bench` charges the broker's CPU to)."""
        assert self._proc is not None, "the broker is not started"
        return self._proc.pid

    def create_topics(self, prefix: str) -> None:
        """Create the pipeline's topics under `prefix` (the broker has no admin API for it)."""
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(f"TOPICS {prefix}\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().strip()
        if answer != "OK":
            raise RuntimeError(f"embedded broker could not create topics for {prefix}: {answer}")

    def fault(self, *words: str | int) -> None:
        """Inject a fault into the running broker: `fault("DOWN")`, `fault("UP")`,
        `fault("RTT", 500)`, `fault("ERRORS", 0, 45)` (see `MockCluster.command`)."""
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().strip()
        if answer != "OK":
            raise RuntimeError(f"embedded broker refused {words}: {answer}")

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    cluster = MockCluster()
    stop = threading.Event()
    hosted = not sys.stdin.isatty()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Hosted, a terminal's Ctrl-C reaches the whole process group at once; the host stops the
    # workers first (they commit offsets and leave the group through this broker) and then
    # closes our stdin. Gone first, the broker left them retrying and logging for half a minute.
    signal.signal(signal.SIGINT, signal.SIG_IGN if hosted else lambda *_: stop.set())

    def watch_stdin() -> None:
        for line in sys.stdin:  # ends when the parent closes our stdin or dies
            words = line.split()
            if len(words) == 2 and words[0] == "TOPICS":
                try:
                    for spec in all_topics(words[1]):
                        cluster.create_topic(spec.name, spec.partitions)
                    print("OK", flush=True)
                except RuntimeError as exc:
                    print(f"ERROR {exc}", flush=True)
            elif words:
                try:
                    cluster.command(words)
                    print("OK", flush=True)
                except (RuntimeError, ValueError, TypeError) as exc:
                    print(f"ERROR {exc}", flush=True)
        stop.set()

    if hosted:
        threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"BOOTSTRAP {cluster.bootstrap}", flush=True)
    stop.wait()
    cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
