"""The one producer idiom of the project: produce without waiting, flush once per batch, verify.

confluent-kafka queues each message in librdkafka and returns at once; `flush()` (run in a thread,
so the event loop keeps serving) waits for every delivery report of the batch. A batch's input is
acknowledged only after `flush` returned with no delivery error: outputs before acks is what makes
the pipeline at-least-once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer


class OutputError(RuntimeError):
    """Outputs of a batch were not all delivered: the batch must be retried, not acknowledged."""


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }
    config.update(overrides)
    return config


class OutputProducer:
    """A producer that survives its own fatal errors: the idempotent producer's fatal state
    (e.g. an out-of-order sequence after broker faults) makes every later send fail, so the
    producer is replaced and the batch redone - its alert ids and record ids make that safe."""

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        self._config = producer_config(bootstrap, **overrides)
        self._producer = Producer(self._config)
        self._errors: list[str] = []
        self._fatal = False
        self.recreated = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")
            if err.fatal():
                self._fatal = True

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
                if exc.args and exc.args[0].fatal():
                    self._fatal = True
                raise OutputError(f"{topic}: {exc}") from None

    async def flush(self, timeout: float = 30.0) -> None:
        remaining = await asyncio.get_running_loop().run_in_executor(
            None, self._producer.flush, timeout
        )
        self._verify(remaining, timeout)

    def flush_sync(self, timeout: float = 30.0) -> None:
        self._verify(self._producer.flush(timeout), timeout)

    def _verify(self, remaining: int, timeout: float) -> None:
        errors, self._errors = self._errors, []
        if self._fatal:
            self._replace()
        if remaining or errors:
            raise OutputError(
                f"{remaining} messages undelivered after {timeout}s; errors: {errors[:5]}"
            )

    def _replace(self) -> None:
        """Drop the producer in its fatal state (its queue is lost with it: the batch that
        owned those messages is redone) and start a new one."""
        self._fatal = False
        self._producer.purge()
        self._producer = Producer(self._config)
        self.recreated += 1
