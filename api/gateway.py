"""The ingest gateway's producer: an event is answered `accepted` only once the broker has it.

One idempotent confluent-kafka producer per API process (acks=all), shared by every request: a
request's events are queued at once and each one's delivery report resolves its own future, so
concurrent requests neither wait for each other's batches nor see each other's errors (the
worker's `OutputProducer` flushes a whole batch and cannot tell requests apart). A thread serves
the delivery reports; `message.timeout.ms` bounds how long a request waits for a broker that is
down, and the caller then answers 503 with Retry-After.

A report of failure does not always mean the broker lacks the event (a timeout can come after
the write): the client retries, and the worker's `(institution, event_id)` filter drops the
second copy, so a retry is always safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from streams.output import producer_config

log = logging.getLogger("tracewatch.api.gateway")


class EventGateway:
    def __init__(self, bootstrap: str, timeout_ms: int = 5000, **overrides: Any) -> None:
        self.timeout = timeout_ms / 1000
        self._config = {
            **producer_config(bootstrap, **{"linger.ms": 2, **overrides}),
            "acks": "all",
            "message.timeout.ms": timeout_ms,
            "error_cb": self._on_error,
        }
        self._producer = Producer(self._config)
        self._fatal = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tw-api-delivery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:  # a fatal error raised out of a callback: replaced on next send
                self._fatal = True
                self._stop.wait(0.05)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = True
            log.error("gateway producer fatal error: %s", err.str())

    def _replace(self) -> None:
        self._fatal = False
        old = self._producer
        self._producer = Producer(self._config)
        with contextlib.suppress(KafkaException):
            old.purge()
        log.warning("gateway producer in a fatal state replaced")

    async def send(self, topic: str, messages: list[tuple[str, bytes]]) -> list[str | None]:
        """Produce (key, value) pairs; per message None once delivered, else why not."""
        if self._fatal:
            self._replace()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[str | None]] = []
        for key, value in messages:
            future: asyncio.Future[str | None] = loop.create_future()
            futures.append(future)

            def report(
                err: KafkaError | None, _msg: Any, f: asyncio.Future[str | None] = future
            ) -> None:
                loop.call_soon_threadsafe(_resolve, f, None if err is None else err.str())

            try:
                self._producer.produce(topic, value, key, on_delivery=report)
            except BufferError:
                future.set_result("the gateway's send queue is full")
            except KafkaException as exc:
                future.set_result(str(exc))
        try:
            # the producer's own timeout ends every wait; this only guards against a lost report
            return await asyncio.wait_for(asyncio.gather(*futures), self.timeout + 5)
        except TimeoutError:
            return [f.result() if f.done() else "no delivery report" for f in futures]

    def ready(self, topic: str, timeout: float = 2.0) -> bool:
        """The broker answers metadata for `topic` (blocking: run it in a thread)."""
        try:
            meta = self._producer.list_topics(topic, timeout=timeout)
        except KafkaException:
            return False
        found = meta.topics.get(topic)
        return found is not None and found.error is None

    def close(self, timeout: float = 5.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)


def _resolve(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)
