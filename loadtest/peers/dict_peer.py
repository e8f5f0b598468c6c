"""What a Python engineer would write instead: confluent-kafka, one process, one dict.

Consumes the input topic in batches of 1,000, parses each event with orjson, keeps
`code -> (institution, dispense)` in a dict and produces an alert when a code is dispensed
again - at another institution, or at the same one in another dispense with no return
between. A sale and its settlement (same `settlement_id`) are one dispense; a `sale_return`
gives its codes back, a `settlement_cancel` the codes of the settlement it names.

It is the yardstick the issue asks for, not a product: no partitioned or recoverable state
(a restart forgets everything), no idempotency, no normalisation beyond stripping spaces, no
gate rules, ledger or verdicts, no event time. `make bench` runs it on the same input as
tracewatch and reports the ratio.
"""

from __future__ import annotations

import time

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

_DISPENSES = ("sale", "settlement")


class DictPeer:
    def __init__(self) -> None:
        self.last: dict[str, tuple[str, str]] = {}  # code -> (institution, dispense)
        self.settled: dict[tuple[str, str], list[str]] = {}  # (institution, settlement) -> codes
        self.alerts: list[bytes] = []

    def handle(self, event: dict[str, object]) -> None:
        kind = event.get("type")
        inst = str(event.get("institution"))
        if kind in _DISPENSES:
            sid = event.get("settlement_id")
            dispense = str(sid) if sid else f"e:{event.get('event_id')}"
            codes = [
                str(c).replace(" ", "")
                for line in event.get("lines") or ()  # type: ignore[attr-defined]
                for c in line.get("codes") or ()
            ]
            for code in codes:
                prev = self.last.get(code)
                if prev is not None and prev != (inst, dispense):
                    rule = "CROSS_INSTITUTION_SALE" if prev[0] != inst else "DUPLICATE_SALE"
                    self.alerts.append(
                        orjson.dumps({"rule": rule, "code": code, "institution": inst})
                    )
                self.last[code] = (inst, dispense)
            if sid:
                self.settled[(inst, str(sid))] = codes
        elif kind == "sale_return":
            for line in event.get("lines") or ():  # type: ignore[attr-defined]
                for c in line.get("codes") or ():
                    code = str(c).replace(" ", "")
                    if self.last.get(code, ("",))[0] == inst:
                        del self.last[code]
        elif kind == "settlement_cancel":
            for code in self.settled.pop((inst, str(event.get("settlement_id"))), ()):
                if self.last.get(code, ("",))[0] == inst:
                    del self.last[code]


def run(
    bootstrap: str, topic: str, partitions: int, count: int, alerts_topic: str
) -> tuple[float, int]:
    """Process `count` events of `topic` from the beginning; (events/s, alerts produced)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-peer-{time.time_ns()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 20,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    peer = DictPeer()
    seen = alerts = 0
    start: float | None = None
    while seen < count:
        batch = consumer.consume(min(1000, count - seen), 1.0)
        if batch and start is None:
            start = time.perf_counter()
        for msg in batch:
            if msg.error() is not None:
                continue
            seen += 1
            try:
                event = orjson.loads(msg.value() or b"")
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                peer.handle(event)
        for alert in peer.alerts:
            producer.produce(alerts_topic, alert)
        alerts += len(peer.alerts)
        peer.alerts.clear()
        producer.poll(0)
    producer.flush(30)
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    return (seen / elapsed if elapsed else 0.0), alerts
