"""Redis adapters: per-key stage state, applied-id windows, the resubmission filter.

Layout (every key of one stage partition shares a hash tag, so one Lua call touches one Redis
Cluster slot):

    {prefix}:{<S><p>}:gen          partition generation (INCR by each new owner)
    {prefix}:{<S><p>}:s:<bucket>   hash: state key -> orjson state
    {prefix}:{<S><p>}:ap:<day>     set: record ids applied that day (TTL = applied window)
    {prefix}:{E<p>}:seen:<day>     set: `institution|event_id` seen at ingest (TTL = seen window)

A batch costs two round trips per stage partition: `load` (states + which records are already
applied) and `save` (new states + applied ids, in one Lua script that first checks the writer
still holds the partition's generation - a worker that lost the partition in a rebalance gets
`PartitionLost` and writes nothing).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from detectors.stage import State

_DAY = 86400

# KEYS: day sets (newest first). ARGV: ids. Returns 1/0 per id: seen in any of the sets.
_CHECK_IDS = """
local out = {}
for i = 1, #ARGV do
  local hit = 0
  for k = 1, #KEYS do
    if redis.call('SISMEMBER', KEYS[k], ARGV[i]) == 1 then hit = 1; break end
  end
  out[i] = hit
end
return out
"""

# KEYS: today's set. ARGV: ttl seconds, ids...
_ADD_IDS = """
for i = 2, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: applied day sets (n_sets of them), then one bucket hash per field.
# ARGV: n_sets, n_ids, ids..., fields...
# Returns: applied flags (n_ids), then the field values (false when absent).
_LOAD = """
local n_sets = tonumber(ARGV[1])
local n_ids = tonumber(ARGV[2])
local out = {}
for i = 1, n_ids do
  local id = ARGV[2 + i]
  local hit = 0
  for k = 1, n_sets do
    if redis.call('SISMEMBER', KEYS[k], id) == 1 then hit = 1; break end
  end
  out[i] = hit
end
local base = 2 + n_ids
for j = n_sets + 1, #KEYS do
  out[n_ids + j - n_sets] = redis.call('HGET', KEYS[j], ARGV[base + j - n_sets])
end
return out
"""

# KEYS: gen key, today's applied set, then one bucket hash per field.
# ARGV: generation, ttl, n_ids, ids..., then (field, value) pairs; empty value = delete.
_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n_ids = tonumber(ARGV[3])
for i = 1, n_ids do redis.call('SADD', KEYS[2], ARGV[3 + i]) end
if n_ids > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
local base = 3 + n_ids
for j = 3, #KEYS do
  local f = ARGV[base + 2 * (j - 3) + 1]
  local v = ARGV[base + 2 * (j - 3) + 2]
  if v == '' then redis.call('HDEL', KEYS[j], f) else redis.call('HSET', KEYS[j], f, v) end
end
return 1
"""


class PartitionLost(RuntimeError):
    """Another worker now owns the partition: drop the batch, the new owner redoes it."""


def day_number(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // _DAY)


class IdWindow:
    """Ids remembered for `days` days in per-day sets; checking looks at all of them."""

    def __init__(self, client: aioredis.Redis, days: int) -> None:
        self._client = client
        self._days = max(1, days)
        self._check = client.register_script(_CHECK_IDS)
        self._add = client.register_script(_ADD_IDS)

    def day_keys(self, base: str, now: float | None = None) -> list[str]:
        today = day_number(now)
        return [f"{base}:{today - d}" for d in range(self._days)]

    async def check(self, base: str, ids: Sequence[str]) -> list[bool]:
        if not ids:
            return []
        flags = await self._check(keys=self.day_keys(base), args=list(ids))
        return [bool(f) for f in flags]

    async def add(self, base: str, ids: Sequence[str]) -> None:
        if ids:
            await self._add(keys=self.day_keys(base)[:1], args=[self._days * _DAY, *ids])


class SeenFilter:
    """Ingest's resubmission filter, per input partition: `(institution, event_id)` seen."""

    def __init__(self, client: aioredis.Redis, prefix: str, days: int) -> None:
        self._window = IdWindow(client, days)
        self._prefix = prefix

    def _base(self, partition: int) -> str:
        return f"{self._prefix}:{{E{partition}}}:seen"

    async def seen(self, partition: int, keys: Sequence[str]) -> list[bool]:
        return await self._window.check(self._base(partition), keys)

    async def mark(self, partition: int, keys: Sequence[str]) -> None:
        await self._window.add(self._base(partition), keys)


class StageStore:
    """One stage's per-key state in Redis, fenced by partition generation."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        tag: str,
        buckets: int,
        applied_days: int,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self.tag = tag
        self._buckets = buckets
        self._applied_days = max(1, applied_days)
        self._load = client.register_script(_LOAD)
        self._save = client.register_script(_SAVE)
        self.generations: dict[int, str] = {}

    def _base(self, partition: int) -> str:
        return f"{self._prefix}:{{{self.tag}{partition}}}"

    def _bucket(self, partition: int, key: str) -> str:
        return f"{self._base(partition)}:s:{zlib.crc32(key.encode()) % self._buckets}"

    def _applied_keys(self, partition: int) -> list[str]:
        today = day_number()
        return [f"{self._base(partition)}:ap:{today - d}" for d in range(self._applied_days)]

    async def acquire(self, partitions: Iterable[int]) -> None:
        """Take ownership: bump each partition's generation so older owners' writes fail."""
        parts = list(partitions)
        if not parts:
            return
        pipe = self._client.pipeline(transaction=False)
        for p in parts:
            pipe.incr(f"{self._base(p)}:gen")
        for p, gen in zip(parts, await pipe.execute(), strict=True):
            self.generations[p] = str(gen)

    def release(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.generations.pop(p, None)

    async def load(
        self, partition: int, keys: Sequence[str], ids: Sequence[str]
    ) -> tuple[dict[str, State], set[str]]:
        applied_keys = self._applied_keys(partition)
        redis_keys = applied_keys + [self._bucket(partition, k) for k in keys]
        args: list[Any] = [len(applied_keys), len(ids), *ids, *keys]
        reply = await self._load(keys=redis_keys, args=args)
        applied = {rid for rid, flag in zip(ids, reply[: len(ids)], strict=True) if flag}
        state = {
            key: orjson.loads(raw)
            for key, raw in zip(keys, reply[len(ids) :], strict=True)
            if raw is not None
        }
        return state, applied

    async def save(self, partition: int, state: dict[str, State], ids: Sequence[str]) -> None:
        gen = self.generations.get(partition)
        if gen is None:
            raise PartitionLost(f"{self.tag}{partition} is not owned by this worker")
        redis_keys = [f"{self._base(partition)}:gen", self._applied_keys(partition)[0]]
        args: list[Any] = [gen, self._applied_days * _DAY, len(ids), *ids]
        for key, value in state.items():
            redis_keys.append(self._bucket(partition, key))
            args.append(key)
            args.append(orjson.dumps(value) if value else b"")
        if not await self._save(keys=redis_keys, args=args):
            self.generations.pop(partition, None)
            raise PartitionLost(f"{self.tag}{partition} was taken over by another worker")
