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

import logging
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.redis_state import connect_sync
from streams.settings import Settings
from topics import names

log = logging.getLogger("tracewatch.layout")


class LayoutMismatch(SystemExit):
    """Topics or state made for other counts: the message says what to do; exit code 2."""


def layout_text(settings: Settings) -> str:
    return (
        f"input_partitions={names.INPUT_PARTITIONS} stage_partitions={names.STAGE_PARTITIONS} "
        f"state_buckets={settings.state_buckets}"
    )


def check_topics(bootstrap: str, wait: bool = False, timeout: float = 10.0) -> None:
    """Every topic that exists has the partitions this process expects (a missing one is left
    to `tracewatch topics`). A broker that does not answer: `wait` for it (a worker, which would
    wait for it anyway), or skip the check with a warning."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streams.kafka_config import client_config

    admin = AdminClient(client_config(bootstrap))
    while True:
        try:
            metadata = admin.list_topics(timeout=timeout)
            break
        except KafkaException as exc:
            if not wait:
                log.warning("partition counts not checked: the broker does not answer (%s)", exc)
                return
            log.warning("waiting for the broker to check the partition counts (%s)", exc)
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


def check_state(
    settings: Settings, claim: bool, overwrite: bool = False, wait: bool = False
) -> None:
    """The state under the Redis prefix was laid out as this process would lay it out.
    `claim`: record this layout when none is recorded (a worker); `overwrite`: record it
    whatever was there (`rebuild`, which has just written the state). Redis away: `wait` for
    it (a worker, which would wait anyway), or skip the check with a warning."""
    warned = False
    while True:
        try:
            _check_state(settings, claim, overwrite)
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if not wait:
                log.warning("state layout not checked: Redis does not answer (%s)", exc)
                return
            if not warned:
                log.warning("waiting for Redis to check the state layout (%s)", exc)
                warned = True
            time.sleep(1.0)


def check_state_now(settings: Settings, claim: bool, overwrite: bool = False) -> None:
    """`check_state` once: Redis errors are the caller's to retry (the worker's start-up task
    retries them for as long as the outage lasts)."""
    _check_state(settings, claim, overwrite)


def _check_state(settings: Settings, claim: bool, overwrite: bool) -> None:
    client = connect_sync(settings.redis_url)
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


def check_layout(settings: Settings, claim: bool, wait: bool) -> None:
    check_topics(settings.require_kafka(), wait)
    check_state(settings, claim, wait=wait)


def exit_on_mismatch(settings: Settings) -> None:
    """For a running worker's start-up task, before the catalog lets ingest take partitions:
    record or check the layout; on a mismatch say why and end the process (exit 2) before it
    writes state laid out otherwise. Redis errors propagate, for the task to retry."""
    import os

    try:
        check_state_now(settings, claim=True)
    except LayoutMismatch as exc:
        log.critical("%s", exc.code)
        logging.shutdown()
        os._exit(2)
