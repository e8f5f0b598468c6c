"""The one producer idiom of the project: produce without waiting, flush once per batch, verify.

confluent-kafka queues each message in librdkafka and returns at once; `flush()` (run in a thread,
so the event loop keeps serving) waits for every delivery report of the batch. A batch's input is
acknowledged only after `flush` returned with no delivery error: outputs before acks is what makes
the pipeline at-least-once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import KafkaError, Message, Producer


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
    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        self._producer = Producer(producer_config(bootstrap, **overrides))
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")

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

    async def flush(self, timeout: float = 30.0) -> None:
        remaining = await asyncio.get_running_loop().run_in_executor(
            None, self._producer.flush, timeout
        )
        self._verify(remaining, timeout)

    def flush_sync(self, timeout: float = 30.0) -> None:
        self._verify(self._producer.flush(timeout), timeout)

    def _verify(self, remaining: int, timeout: float) -> None:
        errors, self._errors = self._errors, []
        if remaining or errors:
            raise OutputError(
                f"{remaining} messages undelivered after {timeout}s; errors: {errors[:5]}"
            )
