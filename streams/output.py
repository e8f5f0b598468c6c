"""The one producer idiom of the project: produce without waiting, flush once per batch, verify.

confluent-kafka queues each message in librdkafka and returns at once; `flush()` (run in a thread,
so the event loop keeps serving) waits for every delivery report of the batch. A batch's input is
acknowledged only after `flush` returned with no delivery error: outputs before acks is what makes
the pipeline at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streams import metrics
from streams.kafka_config import client_config

log = logging.getLogger("tracewatch.output")


class OutputError(RuntimeError):
    """Outputs of a batch were not all delivered: the batch must be retried, not acknowledged.
    `permanent`: the broker refused a message for what it is (too large, invalid), so retrying
    the same batch cannot help (`streams.retry` then isolates it)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# Delivery errors that say something about the message, not about the broker's health.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_MSG,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
    }
)


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        **client_config(bootstrap),
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }
    config.update(overrides)
    return config


def _is_fatal(err: Any) -> bool:
    """The producer is in its fatal state. Once it is, `produce` refuses every message with
    code `_FATAL` on an error whose own fatal flag is not set - that refusal is the only sign
    a batch may see before its flush, so it counts too."""
    return isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL)


class OutputProducer:
    """A producer that survives its own fatal errors: the idempotent producer's fatal state
    (e.g. an out-of-order sequence after broker faults) makes every later send fail, so the
    producer is replaced and the batch redone - its alert ids and record ids make that safe."""

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        # With no error callback, librdkafka's fatal error is raised out of whichever call
        # serves events next (flush, poll): the callback turns it into state we act on.
        self._config = {"error_cb": self._on_error, **producer_config(bootstrap, **overrides)}
        self._producer = Producer(self._config)
        # flush runs in threads of this pool; a pool goes with the producer it served when that
        # one is replaced (a thread that served a fatal error's callbacks kept failing)
        self._flushers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tw-flush")
        self._errors: list[str] = []
        self._permanent = False
        self._fatal = False
        self.recreated = 0

    def warm_up(self, topic: str, timeout: float = 30.0) -> None:
        """Fetch the topic's metadata before the first send. A message's create-time stamp is
        taken at `produce`; a cold producer holds its first messages about half a second while
        it learns the cluster (and its idempotent id), so they reach the log stamped that much
        before what came in meanwhile - on an input topic with create-time stamps, the code
        stage's alignment then counts them late (`streams.alignment`)."""
        self._producer.list_topics(topic, timeout=timeout)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = True
            self._errors.append(f"fatal: {err.str()}")

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")
            if _is_fatal(err):
                self._fatal = True
            if err.code() in _PERMANENT:
                self._permanent = True

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | str | None = None,
        partition: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, key, **kwargs)
                return
            except BufferError:
                # librdkafka's queue is full: serve delivery reports to make room.
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._errors.clear()
                err = exc.args[0] if exc.args else None
                if self._fatal or _is_fatal(err):
                    self._replace()  # the next attempt of the batch gets a working producer
                permanent = err is not None and err.code() in _PERMANENT
                raise OutputError(f"{topic}: {exc}", permanent) from None
            except SystemError as exc:  # a fatal error raised out of a callback produce served
                self._errors.clear()
                self._replace()
                raise OutputError(f"{topic}: {exc!r}") from None

    async def flush(self, timeout: float = 30.0) -> None:
        try:
            remaining = await asyncio.get_running_loop().run_in_executor(
                self._flushers, self._producer.flush, timeout
            )
        except Exception as exc:
            self._failed_flush(exc)
        self._verify(remaining, timeout)

    def flush_sync(self, timeout: float = 30.0) -> None:
        try:
            remaining = self._producer.flush(timeout)
        except Exception as exc:
            self._failed_flush(exc)
        self._verify(remaining, timeout)

    def _failed_flush(self, exc: Exception) -> NoReturn:
        """librdkafka raises its fatal error out of the callbacks flush serves (as a
        KafkaException, or a SystemError around one): the producer is not to be trusted
        afterwards, whatever the error was, so it is replaced and the batch redone."""
        self._errors.clear()
        self._replace()
        raise OutputError(f"flush failed: {exc!r}") from None

    def _verify(self, remaining: int, timeout: float) -> None:
        errors, self._errors = self._errors, []
        permanent, self._permanent = self._permanent, False
        if self._fatal:
            self._replace()
        if remaining or errors:
            raise OutputError(
                f"{remaining} messages undelivered after {timeout}s; errors: {errors[:5]}",
                permanent,
            )

    def _replace(self) -> None:
        """Drop the producer in its fatal state (its queue is lost with it: the batch that
        owned those messages is redone) and start a new one."""
        self._fatal = False
        # a producer in its fatal state may refuse even this; it is dropped anyway
        with contextlib.suppress(KafkaException):
            self._producer.purge()
        self._producer = Producer(self._config)
        self._flushers.shutdown(wait=False)
        self._flushers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tw-flush")
        self.recreated += 1
        metrics.PRODUCERS_REPLACED.inc()
        log.warning("producer in a fatal state replaced; the batch is redone")
