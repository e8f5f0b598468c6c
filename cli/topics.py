"""The pipeline's topics on a real Kafka, as `tracewatch topics` creates them: names and
partition counts from `topics.names`, the settings each needs (`topic_config`)."""

from __future__ import annotations

import os

from topics.names import EVENTS, PREFIX, TopicSpec, all_topics


def input_retention_ms() -> str:
    """`TRACEWATCH_INPUT_RETENTION_MS`: how long the input topic keeps events; -1 (the default)
    keeps them for ever, since `tracewatch rebuild` treats the input topic as the record."""
    return os.environ.get("TRACEWATCH_INPUT_RETENTION_MS", "-1").strip() or "-1"


def topic_config(spec: TopicSpec) -> dict[str, str]:
    """A topic's settings. The input topic's timestamps are the broker's (`LogAppendTime`):
    the code stage applies input in timestamp order and takes a caught-up partition's
    high-water read time as a bound, which only a broker-set time makes exact
    (`streams.alignment`). The input topic is the record `rebuild` replays: kept for ever
    unless the operator chooses otherwise (`input_retention_ms`)."""
    config = {"cleanup.policy": spec.cleanup_policy}
    if spec.name.endswith(EVENTS.name[len(PREFIX) :]):
        config["message.timestamp.type"] = "LogAppendTime"
        config["retention.ms"] = input_retention_ms()
        config["retention.bytes"] = "-1"
    return config


def create_topics(bootstrap: str, prefix: str = PREFIX, timeout: float = 30.0) -> list[str]:
    """Create every topic of `topics.names` through the admin API (real Kafka); existing ones
    are left as they are. Returns the names created."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from streams.kafka_config import client_config

    admin = AdminClient(client_config(bootstrap))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=-1,  # the broker's default
            config=topic_config(spec),
        )
        for spec in all_topics(prefix)
        if spec.name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except Exception as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"creating topic {name}: {exc}") from exc
    return created
