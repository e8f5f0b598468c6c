"""All configuration in one place: each setting, its environment variable, default and advice.

| variable | default | meaning |
|---|---|---|
| `KAFKA_BOOTSTRAP` | (none) | Kafka bootstrap servers. Unset: `make run` and tests start the embedded broker. |
| `REDIS_URL` | `redis://127.0.0.1:6379/0` | Redis holding per-key state, seen ids, catalog cache. |
| `TRACEWATCH_REDIS_PREFIX` | `tw` | Prefix of every Redis key: lets several deployments or test runs share one Redis. |
| `TRACEWATCH_BATCH_SIZE` | `1000` | Messages per consumer batch (`consume(n)`). Larger = fewer Redis/Kafka round trips, more latency. |
| `TRACEWATCH_BATCH_WITHIN` | `0.1` | Seconds an idle consumer waits for a first message before it looks again (and sees a stop). A batch starts with its first message, not on a clock. |
| `TRACEWATCH_BATCH_LINGER` | `0` | Seconds a batch waits after its first message for more (up to `TRACEWATCH_BATCH_SIZE`). 0: it takes what the consumer already fetched and goes; under load what arrives while one batch runs is the next, so batches grow with the load by themselves. Measured at 3,000 events/s, two workers, in paired runs: 0 gave p50 157-188 ms / p99 524-634 ms produce to alert, 0.1 s gave 214-298 / 700-1,027 ms, for about 30% less worker CPU and half the Redis commands per event (`loadtest/RESULTS.md`). Raise it if Redis or the broker is the bottleneck: fewer, larger batches, fewer round trips per event. |
| `TRACEWATCH_FETCH_MAX_WAIT_MS` | `20` | Data-plane consumers' `fetch.wait.max.ms`. The embedded broker holds an empty fetch this long even when data arrives; 1500 ms (Faust's hard-coded value) halved throughput there. |
| `TRACEWATCH_SESSION_TIMEOUT` | `10` | Seconds of silence before the group drops a worker (heartbeats every fifth of it). Also what one rebalance costs on the embedded broker, which elects only when this runs out; Faust's 60 s default stalled the pipeline for a minute there. |
| `TRACEWATCH_EMBEDDED_BROKER` | (empty) | `1` when `KAFKA_BOOTSTRAP` is the embedded broker (the project's own tools set it): the group leader then waits 0.5 s before it sends the assignment, because that broker rejects a follower's SyncGroup once the leader's arrived first, and the follower sits out a session timeout. |
| `TRACEWATCH_WEB_PORT` | `6066` | Worker HTTP port: `/metrics` (Prometheus). |
| `TRACEWATCH_SEEN_TTL_DAYS` | `7` | How long ingest remembers an event: to drop client resubmissions of it, and to resolve a `void` or `settlement_cancel` that names it. |
| `TRACEWATCH_INSTITUTION_DAILY_QUOTA` | `2000000` | Events one institution may have accepted per UTC day (0: no limit); beyond it they are dead-lettered `over_quota`. Bounds what one misbehaving client can make Redis hold (seen ids, index, state); a large hospital sends tens of thousands a day. |
| `TRACEWATCH_GRACE_HOURS` | `72` | Event time NO_PROVENANCE waits for a late receipt before it fires. |
| `TRACEWATCH_APPLIED_TTL_DAYS` | `2` | How long stages remember applied record ids (redelivery after a crash or rebalance). |
| `TRACEWATCH_CODE_STATE_TTL_DAYS` | `1100` | A code's state expires this long after its last change (a box is in date for at most about three years; 0 = never). Needs Redis >= 7.4 (per-field HEXPIRE); older servers keep every code. |
| `TRACEWATCH_ALIGN_WAIT_SECONDS` | `60` | Longest the code stage holds a record until every input partition has been routed past it (`streams.alignment`): verdicts then depend only on what reached the input topic before the settlement, live, after a crash and in replay of the topic. It only runs out when an input partition has no live owner (a dead worker before the group moves its partitions): set it above the session timeout plus a restart. 0: no alignment (records applied as they arrive). |
| `TRACEWATCH_ALIGN_HEARTBEAT_SECONDS` | `0.2` | How often ingest tells the code stage that its caught-up input partitions have nothing new: the latency alignment adds to a live verdict is about this plus the margin. |
| `TRACEWATCH_ALIGN_MARGIN_MS` | `1000` | Taken off a caught-up input partition's high-water read time before it vouches that nothing earlier can come. With create-time stamps (the producer's clock, taken at `produce`) it must cover how long a producer holds a message before the log has it: linger, retries, a busy broker (the embedded one held bursts about 0.5 s). `tracewatch topics` gives the input topic broker-set `LogAppendTime` stamps; then 100 covers the clocks of brokers and workers, and live verdicts wait that much less. |
| `TRACEWATCH_STATE_BUCKETS` | `1024` | Hashes per stage partition that hold per-key state; aim for ~100 keys per hash. Recorded with the partition counts in `{prefix}:layout`: a process configured otherwise refuses to start (`streams.layout`). |
| `TRACEWATCH_INPUT_PARTITIONS` | `16` | Partitions of the input topic, and the number of watermark lanes (`topics.names`); 256 at national scale. Checked against the topics at start. |
| `TRACEWATCH_STAGE_PARTITIONS` | `16` | Partitions of the stage topics (by-ledger, by-code, verdict-parts). Checked against the topics at start. |
| `TRACEWATCH_INPUT_RETENTION_MS` | `-1` | Retention `tracewatch topics` gives the input topic: for ever by default, since `rebuild` replays it. |
| `TRACEWATCH_CATALOG` | (none) | Catalog JSONL loaded into Redis at worker start (else the cached catalog is used). |
| `TRACEWATCH_LOG_LEVEL` | `WARNING` | Worker log level. |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r}: must be an integer") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r}: must be a number") from None


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str | None = field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP"))
    redis_url: str = field(
        default_factory=lambda: os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    redis_prefix: str = field(
        default_factory=lambda: os.environ.get("TRACEWATCH_REDIS_PREFIX", "tw")
    )
    batch_size: int = field(default_factory=lambda: _env_int("TRACEWATCH_BATCH_SIZE", 1000))
    batch_within: float = field(default_factory=lambda: _env_float("TRACEWATCH_BATCH_WITHIN", 0.1))
    batch_linger: float = field(default_factory=lambda: _env_float("TRACEWATCH_BATCH_LINGER", 0.0))
    fetch_max_wait_ms: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_FETCH_MAX_WAIT_MS", 20)
    )
    session_timeout: float = field(
        default_factory=lambda: _env_float("TRACEWATCH_SESSION_TIMEOUT", 10.0)
    )
    embedded_broker: bool = field(
        default_factory=lambda: os.environ.get("TRACEWATCH_EMBEDDED_BROKER", "") == "1"
    )
    web_port: int = field(default_factory=lambda: _env_int("TRACEWATCH_WEB_PORT", 6066))
    # The worker's web server carries only /metrics and health; it listens on loopback unless
    # the operator opens it (e.g. 0.0.0.0 in a container, for Prometheus).
    web_host: str = field(
        default_factory=lambda: os.environ.get("TRACEWATCH_WEB_HOST", "127.0.0.1")
    )
    seen_ttl_days: int = field(default_factory=lambda: _env_int("TRACEWATCH_SEEN_TTL_DAYS", 7))
    # how long an institution's counted days and prices are kept (its profile and the monthly
    # report read them): 400 days holds a year and the month before it
    activity_days: int = field(default_factory=lambda: _env_int("TRACEWATCH_ACTIVITY_DAYS", 400))
    # an open case (lead) older than this many days is overdue (直查快办); per region prefix,
    # longest first: TRACEWATCH_LEAD_DEADLINES="330100=7,33=10"
    lead_deadline_days: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_LEAD_DEADLINE_DAYS", 14)
    )
    lead_deadlines: str = field(
        default_factory=lambda: os.environ.get("TRACEWATCH_LEAD_DEADLINES", "")
    )
    institution_daily_quota: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_INSTITUTION_DAILY_QUOTA", 2_000_000)
    )
    grace_hours: float = field(default_factory=lambda: _env_float("TRACEWATCH_GRACE_HOURS", 72.0))
    # A lane (input partition) whose institutions are all silent is taken to be at most this far
    # behind the others in event time, so its parked checks still run (detectors.event_time).
    idle_hours: float = field(default_factory=lambda: _env_float("TRACEWATCH_IDLE_HOURS", 24.0))
    code_state_ttl_days: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_CODE_STATE_TTL_DAYS", 1100)
    )
    applied_ttl_days: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_APPLIED_TTL_DAYS", 2)
    )
    align_wait: float = field(
        default_factory=lambda: _env_float("TRACEWATCH_ALIGN_WAIT_SECONDS", 60.0)
    )
    align_heartbeat: float = field(
        default_factory=lambda: _env_float("TRACEWATCH_ALIGN_HEARTBEAT_SECONDS", 0.2)
    )
    align_margin_ms: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_ALIGN_MARGIN_MS", 1000)
    )
    state_buckets: int = field(default_factory=lambda: _env_int("TRACEWATCH_STATE_BUCKETS", 1024))
    catalog_path: str | None = field(default_factory=lambda: os.environ.get("TRACEWATCH_CATALOG"))
    log_level: str = field(
        default_factory=lambda: os.environ.get("TRACEWATCH_LOG_LEVEL", "WARNING")
    )

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise SystemExit(
                "KAFKA_BOOTSTRAP is not set: point it at a Kafka cluster (host:port), "
                "or use `make run`, which starts an embedded broker"
            )
        return self.kafka_bootstrap
