"""Prometheus metrics of the worker. Base units, `_total` counters, histograms for latency, and
no per-code or per-institution labels (their cardinality would sink Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("tracewatch_events_total", "Input events accepted, by type", ["type"])
RESUBMISSIONS = Counter(
    "tracewatch_resubmissions_total", "Exact resubmissions dropped by (institution, event_id)"
)
DEAD_LETTERS = Counter(
    "tracewatch_dead_letters_total", "Input messages sent to the dead-letter topic", ["reason"]
)
ALERTS = Counter("tracewatch_alerts_total", "Alerts produced", ["rule"])
WITHDRAWALS = Counter(
    "tracewatch_alert_withdrawals_total",
    "Alerts withdrawn because data that arrived later explains them away",
    ["rule"],
)
VERDICTS = Counter("tracewatch_verdicts_total", "Settlement verdicts produced", ["verdict"])
RECORDS = Counter(
    "tracewatch_stage_records_total",
    "Records applied by a stage (redeliveries excluded)",
    ["stage"],
)
REDELIVERED = Counter(
    "tracewatch_stage_records_skipped_total",
    "Records skipped because already applied (redelivery after crash or rebalance)",
    ["stage"],
)
PARTITIONS_LOST = Counter(
    "tracewatch_partition_lost_total", "Batches dropped because another worker owns the partition"
)
STATE_GAPS = Counter(
    "tracewatch_state_gaps_total",
    "Batches that found their partition's saved position behind them (Redis lost writes) and "
    "read the gap back from Kafka",
    ["stage"],
)
ALIGN_HELD = Gauge(
    "tracewatch_align_held_records",
    "Records a stage holds until every input partition has been routed past them",
    ["stage"],
)
ALIGN_REREAD = Counter(
    "tracewatch_align_reread_messages_total",
    "Stage messages read back on taking over a partition, whose records the previous owner "
    "held unapplied when it stopped",
    ["stage"],
)
ALIGN_LATE = Counter(
    "tracewatch_align_late_records_total",
    "Records that reached the code stage after a record stamped later was applied (input "
    "timestamps out of order, or a wait that timed out): applied out of input order",
)
ALIGN_TIMED_OUT = Counter(
    "tracewatch_align_timed_out_records_total",
    "Records applied because they were held TRACEWATCH_ALIGN_WAIT_SECONDS while an input "
    "partition was not routed past them (nobody owned it, or it stalled)",
)
PRODUCERS_REPLACED = Counter(
    "tracewatch_producers_replaced_total",
    "Output producers replaced after a fatal error (the idempotent producer's fatal state)",
)
BATCH_RETRIES = Counter(
    "tracewatch_batch_retries_total", "Batches retried after a Redis or Kafka error", ["stage"]
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_SECONDS = Histogram(
    "tracewatch_batch_duration_seconds",
    "Time to process one batch, outputs flushed and state saved",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
PHASE_SECONDS = Histogram(
    "tracewatch_batch_phase_seconds",
    "Time of one phase of a batch: load (Redis), apply (detectors), flush (Kafka), save (Redis)",
    ["stage", "phase"],
    buckets=_LATENCY_BUCKETS,
)
PROCESSING_LATENCY = Histogram(
    "tracewatch_processing_latency_seconds",
    "From the input message's Kafka timestamp to the end of its batch at a stage",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
EVENT_LAG = Histogram(
    "tracewatch_event_lag_seconds",
    "Processing time minus event time (occurred_at): how late institutions upload",
    buckets=(1, 10, 60, 300, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400),
)
UNRESOLVED = Counter(
    "tracewatch_unresolved_references_total",
    "Voids and cancellations naming an event or settlement ingest does not remember",
    ["type"],
)
FIRED = Counter(
    "tracewatch_parked_checks_fired_total",
    "Checks parked in event time (NO_PROVENANCE grace) run when the watermark passed them",
    ["stage"],
)
WATERMARK = Counter(
    "tracewatch_watermark_advance_seconds_total",
    "Event time the ingest watermark has advanced by: flat while traffic flows means a stall",
)
ASSIGNED = Gauge(
    "tracewatch_assigned_partitions",
    "Partitions of each input topic this worker holds: zero everywhere means it is not working",
    ["topic"],
)
CONSUMER_ERRORS = Counter(
    "tracewatch_consumer_errors_total",
    "Errors a data-plane consumer reported (a broker away, a partition moving); it recovers",
    ["stage"],
)
CONSUMER_LAG_SECONDS = Gauge(
    "tracewatch_consumer_lag_seconds",
    "How old the last message this worker finished on each topic was while more waited behind "
    "it (0 when caught up; the worst of its partitions): growing means the workers fall behind",
    ["topic"],
)
CONSUMER_LAG = Gauge(
    "tracewatch_consumer_lag_messages",
    "Messages of each topic written but not yet processed by this worker (its partitions, as of "
    "its last batch on each): growing means the workers fall behind",
    ["topic"],
)
