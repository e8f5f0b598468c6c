"""The layout a deployment's topics and Redis state were made with, checked before a process
that reads or writes them starts.

Partition counts (`TRACEWATCH_INPUT_PARTITIONS`, `TRACEWATCH_STAGE_PARTITIONS`) and the state's
hashes per partition (`TRACEWATCH_STATE_BUCKETS`) decide where every key lives: a Redis key
carries its stage partition, an institution's ingest memory its input partition, a code its
bucket. A process configured for other counts than the topics or the state were made with would
look in the wrong places - silently, with wrong verdicts - so it refuses to start instead, and
says what to set. The first worker (or `tracewatch rebuild`) records the layout in Redis
(`{prefix}:layout`).
"""

from __future__ import annotations

import redis

from streams.settings import Settings
from topics import names


class LayoutMismatch(SystemExit):
    """Topics or state made for other counts: the message says what to do; exit code 2."""


def layout_text(settings: Settings) -> str:
    return (
        f"input_partitions={names.INPUT_PARTITIONS} stage_partitions={names.STAGE_PARTITIONS} "
        f"state_buckets={settings.state_buckets}"
    )


def check_topics(bootstrap: str, timeout: float = 10.0) -> None:
    """Every topic that exists has the partitions this process expects (a missing one is left
    to `tracewatch topics`)."""
    from confluent_kafka.admin import AdminClient

    from streams.kafka_config import client_config

    metadata = AdminClient(client_config(bootstrap)).list_topics(timeout=timeout)
    wrong = []
    for spec in names.ALL_TOPICS:
        found = metadata.topics.get(spec.name)
        if found is None or found.error is not None:
            continue
        if len(found.partitions) != spec.partitions:
            wrong.append(f"{spec.name} has {len(found.partitions)}, not {spec.partitions}")
    if wrong:
        raise LayoutMismatch(
            "the topics' partition counts differ from this process's settings ("
            + "; ".join(wrong)
            + "): set TRACEWATCH_INPUT_PARTITIONS / TRACEWATCH_STAGE_PARTITIONS to the topics' "
            "counts, or create topics with the new counts under a new TRACEWATCH_TOPIC_PREFIX "
            "(`tracewatch topics`) and `tracewatch rebuild` into a new TRACEWATCH_REDIS_PREFIX"
        )


def check_state(settings: Settings, claim: bool, overwrite: bool = False) -> None:
    """The state under the Redis prefix was laid out as this process would lay it out.
    `claim`: record this layout when none is recorded (a worker); `overwrite`: record it
    whatever was there (`rebuild`, which has just written the state)."""
    client = redis.Redis.from_url(settings.redis_url)
    key = f"{settings.redis_prefix}:layout"
    mine = layout_text(settings)
    try:
        if overwrite:
            client.set(key, mine)
            return
        found = client.get(key)
        if found is None:
            if claim:
                client.set(key, mine, nx=True)
                found = client.get(key)
            if found is None:
                return
    finally:
        client.close()
    recorded = found.decode() if isinstance(found, bytes) else str(found)
    if recorded != mine:
        raise LayoutMismatch(
            f"Redis prefix {settings.redis_prefix!r} holds state laid out as {recorded!r}, this "
            f"process is configured for {mine!r}: set TRACEWATCH_INPUT_PARTITIONS, "
            "TRACEWATCH_STAGE_PARTITIONS and TRACEWATCH_STATE_BUCKETS back, or `tracewatch "
            "rebuild` into a new TRACEWATCH_REDIS_PREFIX with the new values"
        )


def check_layout(settings: Settings, claim: bool) -> None:
    check_topics(settings.require_kafka())
    check_state(settings, claim)
