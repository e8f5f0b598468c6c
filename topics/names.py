"""Every Kafka topic the pipeline uses: name, key, partitions, cleanup policy.

This module is the topology in data form. The README's diagram is drawn from it, topic creation
(`tracewatch topics`, the embedded broker, test fixtures) reads it, and agents subscribe by it, so
a topic exists in exactly one place.

Partition counts are deliberately generous: librdkafka's built-in cluster keeps at most 5 MiB or
100,000 message sets per partition and silently drops the oldest beyond that, so more partitions
(and lz4) keep a demo or test stream whole on the embedded broker; on real Kafka they are the unit
of parallelism (one worker owns a partition at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PREFIX = os.environ.get("TRACEWATCH_TOPIC_PREFIX", "tracewatch")


def _partitions(variable: str, default: int) -> int:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise SystemExit(f"{variable}={raw!r}: a partition count, 1 to 10000 (default {default})")
    return int(raw)


# The unit of parallelism: a worker owns a partition at a time. 16 suit one machine and the
# embedded broker; at national scale the README advises 256. Checked against the topics at start
# (`harness.services.check_layout`): a count changed under existing topics or state is refused.
# The input topic's count is also the number of watermark lanes (`detectors.event_time.LANES`).
INPUT_PARTITIONS = _partitions("TRACEWATCH_INPUT_PARTITIONS", 16)
STAGE_PARTITIONS = _partitions("TRACEWATCH_STAGE_PARTITIONS", 16)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    key: str
    cleanup_policy: str  # "delete" or "compact"
    doc: str


def _t(suffix: str, partitions: int, key: str, doc: str, cleanup: str = "delete") -> TopicSpec:
    return TopicSpec(f"{PREFIX}-{suffix}", partitions, key, cleanup, doc)


EVENTS = _t(
    "events",
    INPUT_PARTITIONS,
    "institution",
    "Input: contract events from POS/HIS systems (JSON).",
)
BY_LEDGER = _t(
    "by-ledger",
    STAGE_PARTITIONS,
    "partition of institution|product",
    "Packed repartition: line and stock records for the per-(institution, product) ledger.",
)
BY_CODE = _t(
    "by-code",
    STAGE_PARTITIONS,
    "partition of normalised code",
    "Packed repartition: code records for the per-code lifecycle.",
)
VERDICT_PARTS = _t(
    "verdict-parts",
    STAGE_PARTITIONS,
    "partition of institution|settlement event_id",
    "Internal: the gate's head and each stage's rules per settlement line, joined into verdicts.",
)
ALERTS = _t("alerts", 8, "alert_id", "Output: alerts for inspectors' tools (JSON).")
VERDICTS = _t(
    "verdicts", 8, "institution|settlement_id", "Output: one verdict per settlement (JSON)."
)
DEAD_LETTERS = _t(
    "dead-letters", 4, "source topic/partition/offset", "Bad input with the reason (JSON)."
)
CATALOG = _t("catalog", 1, "product", "Reference: product catalog (JSON lines).", "compact")
INSTITUTIONS = _t(
    "institutions", 1, "institution", "Reference: institutions (JSON lines).", "compact"
)

APP_ID = os.environ.get("TRACEWATCH_APP_ID", f"{PREFIX}-worker")
STAGES = ("ingest", "ledger", "code", "verdict")


def group_of(stage: str) -> str:
    """The consumer group of one stage's data-plane consumers (`streams.consumer`): a group per
    stage, so one stage's rebalance never pauses another."""
    return f"{APP_ID}-{stage}"


# Faust's leader-election topic; librdkafka's built-in cluster has no topic admin API, so every
# topic Faust would declare itself must be created up front.
ASSIGNOR_LEADER = TopicSpec(
    f"{APP_ID}-__assignor-__leader", 1, "-", "delete", "Faust internal: leader election."
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    EVENTS,
    BY_LEDGER,
    BY_CODE,
    VERDICT_PARTS,
    ALERTS,
    VERDICTS,
    DEAD_LETTERS,
    CATALOG,
    INSTITUTIONS,
    ASSIGNOR_LEADER,
)


def all_topics(prefix: str) -> tuple[TopicSpec, ...]:
    """The same topology under another prefix (one isolated pipeline per test, say); the app id
    follows the prefix as it does by default, unless TRACEWATCH_APP_ID overrides it."""
    app_id = os.environ.get("TRACEWATCH_APP_ID", f"{prefix}-worker")
    renamed = []
    for spec in ALL_TOPICS:
        if spec is ASSIGNOR_LEADER:
            name = f"{app_id}-__assignor-__leader"
        else:
            name = prefix + spec.name[len(PREFIX) :]
        renamed.append(TopicSpec(name, spec.partitions, spec.key, spec.cleanup_policy, spec.doc))
    return tuple(renamed)
