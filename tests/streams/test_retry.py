"""The retry policy: outages are waited out, a message that fails alone twice is skipped."""

from __future__ import annotations

import asyncio
import os

import redis
import redis.exceptions

from streams.output import OutputError
from streams.retry import is_transient, run_batch


class Flaky:
    """A batch function over ints: `poison` always fails; the first `outages` calls fail as a
    Redis outage does."""

    def __init__(self, poison: set[int], outages: int = 0) -> None:
        self.poison = poison
        self.outages = outages
        self.done: list[int] = []
        self.calls = 0

    async def __call__(self, batch: list[int]) -> None:
        self.calls += 1
        if self.outages:
            self.outages -= 1
            raise redis.exceptions.ConnectionError("Redis is away")
        bad = self.poison.intersection(batch)
        if bad:
            raise ValueError(f"cannot handle {min(bad)}")
        self.done.extend(batch)


def _run(fn: Flaky, batch: list[int]) -> list[tuple[int, str]]:
    skipped: list[tuple[int, str]] = []

    async def skip(message: int, error: BaseException) -> None:
        skipped.append((message, repr(error)))

    asyncio.run(run_batch("test", fn, batch, skip, first_delay=0.001))
    return skipped


def test_an_outage_is_retried_until_it_ends_and_nothing_is_skipped() -> None:
    fn = Flaky(poison=set(), outages=6)
    assert _run(fn, [1, 2, 3]) == []
    assert fn.done == [1, 2, 3] and fn.calls == 7


def test_a_message_that_fails_alone_twice_is_skipped_and_the_rest_goes_on() -> None:
    fn = Flaky(poison={3, 5})
    skipped = _run(fn, [1, 2, 3, 4, 5, 6])
    assert [m for m, _ in skipped] == [3, 5]
    assert "cannot handle 3" in skipped[0][1]
    assert fn.done == [1, 2, 4, 6], "good messages processed once each, in order"


def test_an_outage_while_messages_go_one_by_one_skips_nothing_more() -> None:
    fn = Flaky(poison={2})
    calls: list[int] = []
    original = fn.__call__

    async def outage_after_split(batch: list[int]) -> None:
        calls.append(len(batch))
        if len(calls) == 3:  # first call alone: Redis goes away once
            raise redis.exceptions.ConnectionError("Redis is away")
        await original(batch)

    skipped: list[int] = []

    async def skip(message: int, error: BaseException) -> None:
        skipped.append(message)

    asyncio.run(run_batch("test", outage_after_split, [1, 2, 3], skip, first_delay=0.001))
    assert skipped == [2] and fn.done == [1, 3]


def test_what_counts_as_an_outage() -> None:
    assert is_transient(redis.exceptions.ConnectionError())
    assert is_transient(OutputError("timed out"))
    assert not is_transient(OutputError("message too large", permanent=True))
    assert not is_transient(ValueError())


def _raised_in(filename: str, exc: Exception) -> BaseException:
    """`exc` as raised by code compiled from `filename` (its frame carries that name)."""
    code = compile("raise exc", filename, "exec")
    try:
        exec(code, {"exc": exc})
    except Exception as raised:
        return raised
    raise AssertionError("not raised")


def test_a_redis_connection_broken_under_the_client_is_an_outage() -> None:
    """redis-py's asyncio connection code leaks AttributeError/TypeError/RuntimeError when it
    writes on a connection a failover closed; the same errors from anywhere else are data's."""
    connection = os.path.join(os.path.dirname(redis.__file__), "asyncio", "connection.py")
    for exc in (
        AttributeError("'NoneType' object has no attribute 'writelines'"),
        TypeError("'NoneType' object is not callable"),
        RuntimeError("unable to perform operation on <TCPTransport closed=True>"),
    ):
        assert is_transient(_raised_in(connection, exc))
        assert not is_transient(_raised_in(__file__, type(exc)(*exc.args)))
    assert not is_transient(_raised_in(connection, ValueError("a parse error")))
