"""Transient versus deterministic failures of a batch.

An outage (Redis or the broker away, a delivery that timed out) is retried with backoff for as
long as it lasts: the batch is not acknowledged, so nothing behind it is lost. Anything else that
fails a batch twice the same way is a property of its data: the batch is split, each message
retried alone, and a message that still fails alone is dead-lettered with the exception and
skipped - the rest of the batch goes on. Raising would end the stage's consumer loop
(`streams.consumer`), which stores a batch's offsets when this returns: an unprocessed batch
must never get that far.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions
from confluent_kafka import KafkaException

from streams import metrics
from streams.backfill import BackfillError
from streams.output import OutputError
from streams.redis_state import PartitionLost

log = logging.getLogger("tracewatch.retry")

M = TypeVar("M")

# What an outage raises; retried as long as it lasts, never blamed on a message.
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    OutputError,
    BackfillError,
    KafkaException,
    PartitionLost,
    OSError,
)

MAX_DELAY = 10.0


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT):
        return not getattr(exc, "permanent", False)
    return _broken_redis_connection(exc)


def _broken_redis_connection(exc: BaseException) -> bool:
    """redis-py's asyncio client writing on a connection the peer (or a failover) closed can
    raise AttributeError, TypeError or RuntimeError from its connection code instead of a
    ConnectionError (redis-py #4287): an outage, which no message's data can cause."""
    if not isinstance(exc, AttributeError | TypeError | RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_REDIS_CONNECTION):
            return True
        tb = tb.tb_next
    return False


_REDIS_CONNECTION = os.path.join("redis", "asyncio", "connection.py")


async def run_batch(
    stage: str,
    fn: Callable[[list[M]], Awaitable[None]],
    batch: list[M],
    dead_letter: Callable[[M, BaseException], Awaitable[None]],
    first_delay: float = 0.2,
) -> None:
    """Run `fn` on the batch until it succeeds; see the module docstring for the policy."""
    if await _until_done_or_repeated(stage, fn, batch, first_delay) is None:
        return
    log.error("%s batch of %d failed twice the same way: its messages go alone", stage, len(batch))
    for message in batch:
        failure = await _until_done_or_repeated(stage, fn, [message], first_delay)
        if failure is not None:
            log.error("%s: a message fails alone the same way twice: %r", stage, failure)
            await _until_delivered(stage, dead_letter, message, failure, first_delay)


async def _until_done_or_repeated(
    stage: str,
    fn: Callable[[list[M]], Awaitable[None]],
    batch: list[M],
    first_delay: float,
) -> BaseException | None:
    """None once `fn(batch)` succeeded; the exception once it failed twice the same way, not as
    an outage fails (outages are waited out, with backoff, however long they last)."""
    delay = first_delay
    last: str | None = None
    while True:
        try:
            with metrics.BATCH_SECONDS.labels(stage).time():
                await fn(batch)
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.BATCH_RETRIES.labels(stage).inc()
            if not is_transient(exc):
                if last == repr(exc):
                    return exc
                last = repr(exc)
            log.error("%s batch of %d failed, retrying in %.1fs: %r", stage, len(batch), delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)


async def _until_delivered(
    stage: str,
    dead_letter: Callable[[M, BaseException], Awaitable[None]],
    message: M,
    exc: BaseException,
    delay: float,
) -> None:
    while True:
        try:
            await dead_letter(message, exc)
            return
        except asyncio.CancelledError:
            raise
        except Exception as failure:  # the broker is away: the dead letter waits for it
            log.error("%s: dead letter not delivered, retrying: %r", stage, failure)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
