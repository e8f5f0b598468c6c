"""Repeated client-library complaints are let through once per window, with a count."""

from __future__ import annotations

import logging

from streams import log_rate
from streams.log_rate import RepeatFilter


def _record(
    message: str, name: str = "aiokafka.conn", level: int = logging.ERROR
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_repeats_are_counted_and_reported_with_the_next_one_let_through() -> None:
    now = [1000.0]
    limit = RepeatFilter(window=60, clock=lambda: now[0])
    assert limit.filter(_record("Unable connect to node with id 1: [Errno 111] refused"))
    for n in range(5):  # other node ids and ports are the same kind
        now[0] += 1
        assert not limit.filter(_record(f"Unable connect to node with id {n}: [Errno 111] refused"))
    assert limit.filter(_record("Unable to update metadata from [1]"))  # another kind
    assert limit.filter(_record("Unable connect to node with id 1", level=logging.WARNING))
    now[0] += 60
    again = _record("Unable connect to node with id 1: [Errno 111] refused")
    assert limit.filter(again)
    assert again.getMessage().endswith("(5 more like this in the last 65 s)")
    now[0] += 1
    assert not limit.filter(_record("Unable connect to node with id 1: [Errno 111] refused"))


def test_every_aiokafka_logger_gets_the_filter() -> None:
    import aiokafka.conn  # noqa: F401  (its module logger)

    log_rate.limit_aiokafka()
    assert any(isinstance(f, RepeatFilter) for f in logging.getLogger("aiokafka.conn").filters)
    log_rate.limit_aiokafka()  # idempotent
    assert sum(isinstance(f, RepeatFilter) for f in logging.getLogger("aiokafka.conn").filters) == 1
