"""Client libraries' repeated complaints, at most once a minute each.

With its broker gone, librdkafka (every confluent-kafka client) and aiokafka (Faust's consumer)
each log a connection error about every 100 ms: ~900 lines in 20 s from one worker, burying
the one line an operator needs. `RepeatFilter` lets the first record of a kind through, counts
the repeats for `window` seconds, and lets the next one through with the count; a kind is the
logger and the message with its digits blanked (ports, node ids, client numbers vary).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

WINDOW_SECONDS = 60.0
_DIGITS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    def __init__(
        self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()  # librdkafka's records come from its clients' threads
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage()))
        now = self._clock()
        with self._lock:
            since, repeats = self._seen.get(kind, (-self._window - 1.0, 0))
            if now - since < self._window:
                self._seen[kind] = (since, repeats + 1)
                return False
            self._seen[kind] = (now, 0)
            if len(self._seen) > 10_000:  # a flood of distinct messages: start over
                self._seen = {kind: (now, 0)}
        if repeats:
            record.msg = f"{record.getMessage()} ({repeats} more like this in the last "
            record.msg += f"{now - since:.0f} s)"
            record.args = None
        return True


_FILTER = RepeatFilter()
LIBRDKAFKA = logging.getLogger("tracewatch.librdkafka")
LIBRDKAFKA.addFilter(_FILTER)


def limit_aiokafka() -> None:
    """The filter on every aiokafka logger (a logger's filter does not see its children's
    records, and aiokafka logs under its module names); call once aiokafka is imported."""
    for name in list(logging.root.manager.loggerDict):
        if name == "aiokafka" or name.startswith("aiokafka."):
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
