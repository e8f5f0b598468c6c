"""`tracewatch sink`: the alerts topic into the case store, exactly once per message.

Per batch, in one database transaction: each message through `case_record_alert()` (new case,
alert updated, a withdrawal closing the case, a re-raised alert reopening it), in offset order,
and the partition's next offset in `sink_offsets`. Kafka's committed offsets follow the database
commit. A crash between the two redelivers messages the database already has: their offsets are
below `sink_offsets`, and they are skipped - no audit entry is written twice. A message the
store refuses (not an alert) is kept in `sink_rejected` with the reason, counted, and skipped;
the database away is waited out, the batch redone.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from prometheus_client import Counter

from cases.schema import migrate
from streams.kafka_config import client_config
from topics import names

log = logging.getLogger("tracewatch.sink")

SINK_MESSAGES = Counter(
    "tracewatch_sink_messages_total",
    "Alerts-topic messages the case sink handled, by result",
    ["result"],  # recorded, redelivered (already in the store), rejected
)

_CREATE_REJECTED = """
CREATE TABLE IF NOT EXISTS sink_rejected (
    topic text NOT NULL, partition integer NOT NULL, "offset" bigint NOT NULL,
    reason text NOT NULL, raw bytea, at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset"))
"""


class CaseSink:
    def __init__(
        self,
        bootstrap: str,
        database_url: str,
        regions: Any = None,
        batch_size: int = 500,
        session_timeout: float = 10.0,
        stopping: threading.Event | None = None,
    ) -> None:
        """`regions`: institution -> region code lookups for a batch (the API's registry), so
        inspectors' region scopes apply to cases; None leaves regions unset."""
        self._topic = names.ALERTS.name
        self._db_url = database_url
        self._regions = regions
        self._batch = batch_size
        self._conn: psycopg.Connection | None = None
        self._next: dict[int, int] = {}
        self._stopping = stopping or threading.Event()
        self._consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": f"{names.APP_ID}-cases-sink",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    "enable.partition.eof": False,
                    # a sink killed without leaving the group holds its partitions this long
                    "session.timeout.ms": int(session_timeout * 1000),
                    "heartbeat.interval.ms": max(100, int(session_timeout * 200)),
                },
            )
        )

    def stop(self) -> None:
        self._stopping.set()

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._db_url)
            migrate(self._conn)
            self._conn.execute(_CREATE_REJECTED)
            self._conn.commit()
        return self._conn

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition where the database says it got to."""
        stored = self._stored_offsets([p.partition for p in partitions])
        for p in partitions:
            if p.partition in stored:
                p.offset = stored[p.partition]
                self._next[p.partition] = stored[p.partition]
        consumer.assign(partitions)

    def _stored_offsets(self, partitions: list[int]) -> dict[int, int]:
        while True:
            try:
                conn = self._db()
                rows = conn.execute(
                    "SELECT partition, next_offset FROM sink_offsets "
                    "WHERE topic = %s AND partition = ANY(%s)",
                    (self._topic, partitions),
                ).fetchall()
                conn.rollback()
                return {int(p): int(o) for p, o in rows}
            except psycopg.OperationalError as exc:
                log.warning("case store unreachable (%s); retrying", exc)
                self._conn = None
                time.sleep(1.0)

    def run(self) -> None:
        self._consumer.subscribe([self._topic], on_assign=self._on_assign)
        try:
            while not self._stopping.is_set():
                batch = [m for m in self._consumer.consume(self._batch, 0.5) if self._usable(m)]
                if batch:
                    self._until_stored(batch)
        finally:
            self._consumer.close()
            if self._conn is not None:
                self._conn.close()

    @staticmethod
    def _usable(m: Message) -> bool:
        err = m.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("alerts consumer: %s", err)
            return False
        return True

    def _until_stored(self, batch: list[Message]) -> None:
        delay = 0.5
        while True:
            try:
                offsets = self._store(batch)
                break
            except psycopg.OperationalError as exc:  # the database away: wait it out
                log.error("case store unreachable, batch of %d retried: %s", len(batch), exc)
                self._conn = None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=False)

    def _store(self, batch: Sequence[Message]) -> list[TopicPartition]:
        fresh = [m for m in batch if (m.offset() or 0) >= self._next.get(m.partition() or 0, 0)]
        SINK_MESSAGES.labels("redelivered").inc(len(batch) - len(fresh))
        parsed: list[tuple[Message, dict[str, Any] | None]] = []
        for m in fresh:
            try:
                value = orjson.loads(m.value() or b"")
                parsed.append((m, value if isinstance(value, dict) else None))
            except orjson.JSONDecodeError:
                parsed.append((m, None))
        institutions = {v.get("institution") for _, v in parsed if v}
        regions = self._regions(sorted(i for i in institutions if i)) if self._regions else {}
        conn = self._db()
        advanced: dict[int, int] = {}
        recorded = rejected = 0
        with conn.transaction():
            for m, value in parsed:
                partition, offset = m.partition() or 0, m.offset() or 0
                advanced[partition] = offset + 1
                reason = "not a JSON object"
                if value is not None:
                    try:
                        with conn.transaction():  # a savepoint: one refusal, not the batch
                            conn.execute(
                                "SELECT case_record_alert(%s::jsonb, %s)",
                                (
                                    orjson.dumps(value).decode(),
                                    regions.get(value.get("institution")),
                                ),
                            )
                        recorded += 1
                        continue
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error as exc:
                        reason = exc.diag.message_primary or type(exc).__name__
                rejected += 1
                log.error("alerts %d/%d not recorded: %s", partition, offset, reason)
                conn.execute(
                    'INSERT INTO sink_rejected (topic, partition, "offset", reason, raw) '
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (self._topic, partition, offset, reason, m.value()),
                )
            for partition, following in advanced.items():
                conn.execute(
                    "INSERT INTO sink_offsets (topic, partition, next_offset) VALUES (%s, %s, %s) "
                    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = "
                    "GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset)",
                    (self._topic, partition, following),
                )
        self._next.update(advanced)
        SINK_MESSAGES.labels("recorded").inc(recorded)
        SINK_MESSAGES.labels("rejected").inc(rejected)
        return [TopicPartition(self._topic, p, o) for p, o in advanced.items()]


def run_sink(
    bootstrap: str,
    database_url: str,
    regions: Any = None,
    batch_size: int = 500,
    session_timeout: float = 10.0,
) -> None:
    """Until SIGTERM or SIGINT, which finish the batch, commit and leave the group."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    sink = CaseSink(bootstrap, database_url, regions, batch_size, session_timeout, stopping)
    sink.run()
