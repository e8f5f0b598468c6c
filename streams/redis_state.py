"""Redis adapters: per-key stage state, applied-id windows, the resubmission filter.

Layout (every key of one stage partition shares a hash tag, so one Lua call touches one Redis
Cluster slot):

    {prefix}:{<S><p>}:gen          partition generation (INCR by each new owner)
    {prefix}:{<S><p>}:s:<bucket>   hash: state key (stage's `field`) -> state (stage's `pack`)
    {prefix}:{<S><p>}:ap:<day>     set: record ids applied that day (TTL = applied window)
    {prefix}:{<S><p>}:wm           hash: lane -> "first,second" latest own times (event time)
    {prefix}:{<S><p>}:due:<lane>   sorted set: `<bucket>|<field>` by the event time it waits for
    {prefix}:{<S><p>}:pos          the offset after the last message whose effects are saved
    {prefix}:{<S><p>}:hold         code stage: the oldest message whose records were still held
                                   unapplied (`streams.alignment`): a new owner reads from here
    {prefix}:{E<p>}:seen:<day>     hash: idempotency key -> content digest, seen at ingest
    {prefix}:{E<p>}:ix:<day>       hash: index of events/settlements for voids and cancellations
    {prefix}:{E<p>}:receivers      set: institutions that record codes on what they receive
    {prefix}:{E<p>}:own            hash: institution -> own time (latest occurred_at)
    {prefix}:{E<p>}:tops           hash: lane -> the two latest [own time, institution]
    {prefix}:{E<p>}:pos            the offset after the last input message whose effects are saved
    {prefix}:{E<p>}:count:<day>    hash: institution -> events accepted that day (the quota)
    {prefix}:{E<p>}:act:<YYYYMM>:<institution>    hash: `DD` -> the day's counters
                                   (`detectors.activity.FIELDS`, comma-joined)
    {prefix}:{E<p>}:price:<YYYYMM>:<institution>  hash: product -> "lines,low,high,total" fen

A batch costs two round trips per stage partition: `load` (states + which records are already
applied + the keys due by the watermark) and `save` (new states + applied ids + watermark + due
index, in one Lua script that first checks the writer still holds the partition's generation - a
worker that lost the partition in a rebalance gets `PartitionLost` and writes nothing). The load
script reads the due keys' buckets by name (same hash tag, so the same Cluster slot).

State and position move together: every save also raises the partition's `pos` in the same
script, so a Redis that loses its last writes (`appendfsync everysec` loses up to a second) loses
the position with the state. A batch that starts past `pos` finds the gap, and the processor
reads the missing messages back from Kafka before it goes on (`streams.processors`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import hiredis
import orjson
import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from detectors.activity import FIELDS as ACTIVITY_FIELDS
from detectors.activity import ActivityBatch, PriceFigures
from detectors.event_time import NEVER
from detectors.pipeline import partition_of
from detectors.stage import State

_DAY = 86400

# Lua helpers shared by the scripts: one multi-key command per hash or set and batch, never
# one command per field - a batch of 1,000 records took ~37 Redis commands per event one at a
# time. Arguments go in chunks: Redis's Lua stack holds a few thousand values.
_BULK = """
local CHUNK = 1000
local function each_chunk(list, fn)
  for c = 1, #list, CHUNK do fn(c, math.min(c + CHUNK - 1, #list)) end
end
-- values[i] = HMGET of names[i] in keys[i], one HMGET per distinct key
local function hmget_grouped(keys, names)
  local values, groups, order = {}, {}, {}
  for i = 1, #keys do
    local g = groups[keys[i]]
    if g == nil then g = {}; groups[keys[i]] = g; order[#order + 1] = keys[i] end
    g[#g + 1] = i
  end
  for _, key in ipairs(order) do
    local g = groups[key]
    local wanted = {}
    for j = 1, #g do wanted[j] = names[g[j]] end
    each_chunk(wanted, function(a, b)
      local got = redis.call('HMGET', key, unpack(wanted, a, b))
      for j = 1, #got do values[g[a + j - 1]] = got[j] end
    end)
  end
  return values
end
-- the first hit of each name across `keys` (newest first): HMGET per key over the misses
local function hmget_first(keys, names)
  local found = {}
  for i = 1, #names do found[i] = false end
  for k = 1, #keys do
    local missing, at = {}, {}
    for i = 1, #names do
      if not found[i] then missing[#missing + 1] = names[i]; at[#at + 1] = i end
    end
    if #missing == 0 then break end
    each_chunk(missing, function(a, b)
      local got = redis.call('HMGET', keys[k], unpack(missing, a, b))
      for j = 1, #got do if got[j] then found[at[a + j - 1]] = got[j] end end
    end)
  end
  return found
end
local function smismember_any(keys, members)
  local hit = {}
  for i = 1, #members do hit[i] = 0 end
  for k = 1, #keys do
    local missing, at = {}, {}
    for i = 1, #members do
      if hit[i] == 0 then missing[#missing + 1] = members[i]; at[#at + 1] = i end
    end
    if #missing == 0 then break end
    each_chunk(missing, function(a, b)
      local got = redis.call('SMISMEMBER', keys[k], unpack(missing, a, b))
      for j = 1, #got do if got[j] == 1 then hit[at[a + j - 1]] = 1 end end
    end)
  end
  return hit
end
-- one variadic command per key: cmd key <prefix...> items... (items flat, `width` per entry)
local function bulk(cmd, key, items, width, ...)
  local extra = {...}
  local step = CHUNK - CHUNK % width
  for c = 1, #items, step do
    local args = {}
    for _, x in ipairs(extra) do args[#args + 1] = x end
    for i = c, math.min(c + step - 1, #items) do args[#args + 1] = items[i] end
    redis.call(cmd, key, unpack(args))
  end
end
"""

# KEYS: applied day sets (n_sets), one bucket hash per field, the lane tops hash.
# ARGV: n_sets, n_ids, ids..., fields..., n_marks, (lane, effective time) pairs, due limit, base.
# Returns: applied flags (n_ids), field values (false when absent), the stored lane tops as a
# flat lane/"first,second" list, the saved position and hold (false when none), then (lane,
# member, value) triples for the keys due in each
# lane by the effective time given for it: `<base>:due:<lane>` sorted sets.
_LOAD = (
    _BULK
    + """
local n_sets = tonumber(ARGV[1])
local n_ids = tonumber(ARGV[2])
local n_fields = #KEYS - n_sets - 1
local sets, ids = {}, {}
for k = 1, n_sets do sets[k] = KEYS[k] end
for i = 1, n_ids do ids[i] = ARGV[2 + i] end
local out = smismember_any(sets, ids)
local base = 2 + n_ids
local buckets, fields = {}, {}
for j = 1, n_fields do buckets[j] = KEYS[n_sets + j]; fields[j] = ARGV[base + j] end
local values = hmget_grouped(buckets, fields)
for j = 1, n_fields do out[n_ids + j] = values[j] end
local a = base + n_fields
out[#out + 1] = redis.call('HGETALL', KEYS[#KEYS])
local n_marks = tonumber(ARGV[a + 1])
local limit = tonumber(ARGV[a + 2 * n_marks + 2])
local prefix = ARGV[a + 2 * n_marks + 3]
out[#out + 1] = redis.call('GET', prefix .. ':pos')
out[#out + 1] = redis.call('GET', prefix .. ':hold')
for i = 1, n_marks do
  local lane, w = ARGV[a + 2 * i], ARGV[a + 2 * i + 1]
  local due = redis.call('ZRANGEBYSCORE', prefix .. ':due:' .. lane, '-inf', w, 'LIMIT', 0, limit)
  for _, member in ipairs(due) do
    local bucket, field = string.match(member, '^(%d+)|(.*)$')
    out[#out + 1] = lane
    out[#out + 1] = member
    out[#out + 1] = redis.call('HGET', prefix .. ':s:' .. bucket, field)
  end
end
return out
"""
)

# Lane tops are "first,second" (own times of the two latest institutions; '' = none); both
# parts only ever rise.
_MERGE_TOPS = """
local function part(text, n)
  local a, b = string.match(text or '', '^([^,]*),(.*)$')
  local v = tonumber(n == 1 and a or b)
  return v or -1e300
end
local function merge_tops(hash, lane, offered)
  local stored = redis.call('HGET', hash, lane)
  local f = math.max(part(stored, 1), part(offered, 1))
  local s = math.max(part(stored, 2), part(offered, 2))
  local text = (f > -1e300 and string.format('%.17g', f) or '') .. ',' ..
               (s > -1e300 and string.format('%.17g', s) or '')
  if text ~= stored then redis.call('HSET', hash, lane, text) end
end
"""

# A partition's position only rises (a new owner redoing committed batches does not lower it).
_RAISE_POSITION = """
local function raise_position(key, pos)
  if pos == '' then return end
  local stored = tonumber(redis.call('GET', key))
  if stored == nil or tonumber(pos) > stored then redis.call('SET', key, pos) end
end
"""

# KEYS: gen key, today's applied set, lane tops hash, then one bucket hash per field.
# ARGV: generation, ttl, n_ids, ids..., n_lanes, (lane, tops) pairs, base, position ('' = keep),
# field ttl (seconds; 0 = none - needs Redis >= 7.4's HEXPIRE, ignored before), hold ('' =
# keep: the oldest message whose records the stage still holds, `streams.alignment`), then per
# field (field, value ('' = delete), due-index member, due ('' = not due), lane,
# previous lane).
_SAVE = (
    _BULK
    + _MERGE_TOPS
    + _RAISE_POSITION
    + """
-- fenced: a newer owner's generation refuses the write; an older or missing one means Redis lost
-- its last writes (a failover to a replica that lagged, an AOF tail): the owner restores it
local held = tonumber(redis.call('GET', KEYS[1]))
if held ~= tonumber(ARGV[1]) then
  if held ~= nil and held > tonumber(ARGV[1]) then return 0 end
  redis.call('SET', KEYS[1], ARGV[1])
end
local n_ids = tonumber(ARGV[3])
if n_ids > 0 then
  local ids = {}
  for i = 1, n_ids do ids[i] = ARGV[3 + i] end
  bulk('SADD', KEYS[2], ids, 1)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
local n_lanes = tonumber(ARGV[4 + n_ids])
for i = 1, n_lanes do
  merge_tops(KEYS[3], ARGV[3 + n_ids + 2 * i], ARGV[4 + n_ids + 2 * i])
end
local prefix = ARGV[5 + n_ids + 2 * n_lanes]
raise_position(prefix .. ':pos', ARGV[6 + n_ids + 2 * n_lanes])
local field_ttl = tonumber(ARGV[7 + n_ids + 2 * n_lanes])
raise_position(prefix .. ':hold', ARGV[8 + n_ids + 2 * n_lanes])
local base = 8 + n_ids + 2 * n_lanes
-- per bucket: fields to set (pairs) and to delete; per due lane: members to add and remove
local sets, dels, order = {}, {}, {}
local adds, rems = {}, {}
local function list_of(t, key)
  local l = t[key]
  if l == nil then l = {}; t[key] = l end
  return l
end
for j = 4, #KEYS do
  local at = base + 6 * (j - 4)
  local f, v, member = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local due, lane, old = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]
  local key = KEYS[j]
  if sets[key] == nil and dels[key] == nil then order[#order + 1] = key end
  if v == '' then
    local d = list_of(dels, key); d[#d + 1] = f
  else
    local l = list_of(sets, key); l[#l + 1] = f; l[#l + 1] = v
  end
  if old ~= '' and old ~= lane then local r = list_of(rems, old); r[#r + 1] = member end
  if due ~= '' then
    local l = list_of(adds, lane); l[#l + 1] = due; l[#l + 1] = member
  elseif lane ~= '' then
    local r = list_of(rems, lane); r[#r + 1] = member
  end
end
for _, key in ipairs(order) do
  if dels[key] then bulk('HDEL', key, dels[key], 1) end
  local l = sets[key]
  if l then
    bulk('HSET', key, l, 2)
    if field_ttl > 0 then
      local names = {}
      for i = 1, #l, 2 do names[#names + 1] = l[i] end
      each_chunk(names, function(a, b)
        if field_ttl == 0 then return end
        -- Redis < 7.4 has no HEXPIRE: fields then keep no TTL (README)
        local ok = redis.pcall('HEXPIRE', key, field_ttl, 'FIELDS', b - a + 1,
                               unpack(names, a, b))
        if type(ok) == 'table' and ok.err then field_ttl = 0 end
      end)
    end
  end
end
for lane, members in pairs(rems) do bulk('ZREM', prefix .. ':due:' .. lane, members, 1) end
for lane, pairs_ in pairs(adds) do bulk('ZADD', prefix .. ':due:' .. lane, pairs_, 2) end
return 1
"""
)

# Ingest's view of one input partition. KEYS: seen day hashes (n_seen), index day hashes, the
# receivers set, the own-time hash, the lane tops hash, the position, today's counts. ARGV:
# n_seen, n_events, event keys..., n_index, index keys..., institutions...
# Returns: seen digests (false when unseen), index values (false when absent), receiver flags,
# own times (false when unknown) per institution, the lane tops as a flat list, the position,
# then today's count per institution.
_INGEST_LOAD = (
    _BULK
    + """
local n_seen = tonumber(ARGV[1])
local n_events = tonumber(ARGV[2])
local n_index = tonumber(ARGV[3 + n_events])
local ix_first, ix_last = n_seen + 1, #KEYS - 5
local receivers, own, tops = KEYS[#KEYS - 4], KEYS[#KEYS - 3], KEYS[#KEYS - 2]
local seen_keys, index_keys, events, lookups, insts = {}, {}, {}, {}, {}
for k = 1, n_seen do seen_keys[k] = KEYS[k] end
for k = ix_first, ix_last do index_keys[#index_keys + 1] = KEYS[k] end
for i = 1, n_events do events[i] = ARGV[2 + i] end
for i = 1, n_index do lookups[i] = ARGV[3 + n_events + i] end
for i = 4 + n_events + n_index, #ARGV do insts[#insts + 1] = ARGV[i] end
local out = {}
for _, v in ipairs(hmget_first(seen_keys, events)) do out[#out + 1] = v end
for _, v in ipairs(hmget_first(index_keys, lookups)) do out[#out + 1] = v end
local n_insts = #insts
local flags = smismember_any({receivers}, insts)
for i = 1, n_insts do out[#out + 1] = flags[i] end
local owns = hmget_first({own}, insts)
for i = 1, n_insts do out[#out + 1] = owns[i] end
out[#out + 1] = redis.call('HGETALL', tops)
out[#out + 1] = redis.call('GET', KEYS[#KEYS - 1])
local counts = hmget_first({KEYS[#KEYS]}, insts)
for i = 1, n_insts do out[#out + 1] = counts[i] end
return out
"""
)

# KEYS: today's seen hash, today's index hash, receivers set, own-time hash, lane tops hash,
# position, today's counts. ARGV: ttl, position ('' = keep), n_events, (event key, digest)
# pairs, n_index, (index key, value) pairs, n_receivers, receivers..., n_own, (institution,
# time) pairs, n_counts, (institution, accepted) pairs, (lane, tops) pairs...
_INGEST_SAVE = (
    _BULK
    + _RAISE_POSITION
    + """
local ttl = ARGV[1]
raise_position(KEYS[6], ARGV[2])
local at = 3
local function slice(from, count)
  local l = {}
  for i = from + 1, from + count do l[#l + 1] = ARGV[i] end
  return l
end
local n = tonumber(ARGV[at])
if n > 0 then
  bulk('HSET', KEYS[1], slice(at, 2 * n), 2)
  redis.call('EXPIRE', KEYS[1], ttl)
end
at = at + 2 * n + 1
n = tonumber(ARGV[at])
if n > 0 then
  bulk('HSET', KEYS[2], slice(at, 2 * n), 2)
  redis.call('EXPIRE', KEYS[2], ttl)
end
at = at + 2 * n + 1
n = tonumber(ARGV[at])
if n > 0 then bulk('SADD', KEYS[3], slice(at, n), 1) end
at = at + n + 1
n = tonumber(ARGV[at])
if n > 0 then
  local insts = {}
  for i = 1, n do insts[i] = ARGV[at + 2 * i - 1] end
  local stored = hmget_first({KEYS[4]}, insts)
  local rising = {}
  for i = 1, n do
    local t, was = ARGV[at + 2 * i], tonumber(stored[i])
    if was == nil or tonumber(t) > was then
      rising[#rising + 1] = insts[i]; rising[#rising + 1] = t
    end
  end
  if #rising > 0 then bulk('HSET', KEYS[4], rising, 2) end
end
at = at + 2 * n + 1
n = tonumber(ARGV[at])
for i = 1, n do redis.call('HINCRBY', KEYS[7], ARGV[at + 2 * i - 1], ARGV[at + 2 * i]) end
if n > 0 then redis.call('EXPIRE', KEYS[7], 2 * 86400) end
at = at + 2 * n + 1
-- activity: (key, day, counts) triples, each added to its day; the key's TTL is renewed when
-- a day is new (once per institution and day, not per batch)
local activity_ttl = ARGV[at]
at = at + 1
n = tonumber(ARGV[at])
for i = 1, n do
  local key, field, counts = ARGV[at + 3 * i - 2], ARGV[at + 3 * i - 1], ARGV[at + 3 * i]
  local old = redis.call('HGET', key, field)
  if not old then
    redis.call('HSET', key, field, counts)
    redis.call('EXPIRE', key, activity_ttl)
  else
    local sums, j = {}, 0
    for x in string.gmatch(old, '[^,]+') do sums[#sums + 1] = tonumber(x) end
    for x in string.gmatch(counts, '[^,]+') do
      j = j + 1
      sums[j] = (sums[j] or 0) + tonumber(x)
    end
    for k = 1, #sums do sums[k] = string.format('%d', sums[k]) end
    redis.call('HSET', key, field, table.concat(sums, ','))
  end
end
at = at + 3 * n + 1
-- prices: (key, product, "lines,low,high,total") triples, merged
n = tonumber(ARGV[at])
for i = 1, n do
  local key, product = ARGV[at + 3 * i - 2], ARGV[at + 3 * i - 1]
  local new = {}
  for x in string.gmatch(ARGV[at + 3 * i], '[^,]+') do new[#new + 1] = tonumber(x) end
  local old = redis.call('HGET', key, product)
  if old then
    local was = {}
    for x in string.gmatch(old, '[^,]+') do was[#was + 1] = tonumber(x) end
    new = {was[1] + new[1], math.min(was[2], new[2]), math.max(was[3], new[3]), was[4] + new[4]}
  end
  redis.call('HSET', key, product, string.format('%d,%d,%d,%d', new[1], new[2], new[3], new[4]))
  if not old then redis.call('EXPIRE', key, activity_ttl) end
end
at = at + 3 * n
if #ARGV > at then bulk('HSET', KEYS[5], slice(at, #ARGV - at), 2) end
return 1
"""
)


def tops_text(first: float, second: float) -> str:
    """Lane tops as stored and sent: `first,second`, '' for none."""
    return f"{'' if first == NEVER else repr(first)},{'' if second == NEVER else repr(second)}"


def parse_tops(text: bytes | str) -> tuple[float, float]:
    raw = text.decode() if isinstance(text, bytes) else text
    first, _, second = raw.partition(",")
    return (float(first) if first else NEVER, float(second) if second else NEVER)


def merge_tops(
    current: dict[int, tuple[float, float]], lane: int, tops: tuple[float, float]
) -> bool:
    """Raise a lane's tops part by part; True when anything moved."""
    old = current.get(lane, (NEVER, NEVER))
    new = (max(old[0], tops[0]), max(old[1], tops[1]))
    if new != old:
        current[lane] = new
        return True
    return False


class _HiredisPackingConnection(aioredis.Connection):
    """Packs commands with hiredis, as redis-py's synchronous client already does; its asyncio
    client packs them in Python, argument by argument. A stage's save of a 1,000-key batch is
    about 7,000 arguments: packing them was ~8% of a worker's time, five times hiredis's."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        return [hiredis.pack_command(args)]


# `REDIS_URL` naming a Redis Cluster: a seed node or several (comma-separated; the client
# starts if one answers), the client finds the rest.
_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


def cluster_seed(url: str) -> str | None:
    """The plain URL of a seed node when `url` names a Redis Cluster (`redis+cluster://` or
    `rediss+cluster://`), else None. Several seeds, comma-separated (`h1:6379,h2:6379`):
    the first here, the others from `cluster_seeds`."""
    for scheme, plain in _CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            netloc, sep, tail = rest.partition("/")
            user, at, hosts = netloc.rpartition("@")
            return plain + user + at + hosts.split(",")[0] + sep + tail
    return None


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The further seed nodes a cluster URL lists: a client starts if any one answers."""
    netloc = url.split("://", 1)[-1].partition("/")[0].rpartition("@")[2]
    seeds = []
    for host in netloc.split(",")[1:]:
        name, _, port = host.rpartition(":")
        seeds.append((name, int(port)) if name else (host, 6379))
    return seeds


def connect(url: str) -> aioredis.Redis:
    """The asyncio client every part of the project uses (plain TCP gets hiredis packing).

    A cluster URL gets redis-py's cluster client, typed as the single-node one: every command
    the project sends names keys of one slot (or one key), which both clients route alike, and
    the multi-slot reads go through `queue_read_fields`, which splits them by slot."""
    seed = cluster_seed(url)
    if seed is not None:
        more = [ClusterNode(h, p) for h, p in cluster_seeds(url)]
        return cast(aioredis.Redis, RedisCluster.from_url(seed, startup_nodes=more or None))
    if url.startswith("redis://"):
        return aioredis.Redis.from_url(url, connection_class=_HiredisPackingConnection)
    return aioredis.Redis.from_url(url)


def connect_sync(url: str) -> redis.Redis:
    """The synchronous client, for start-up checks that run before an event loop does."""
    seed = cluster_seed(url)
    if seed is not None:
        more = [redis.cluster.ClusterNode(h, p) for h, p in cluster_seeds(url)]  # type: ignore[no-untyped-call]
        client = redis.cluster.RedisCluster.from_url(seed, startup_nodes=more or None)
        return cast(redis.Redis, client)
    return redis.Redis.from_url(url)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class PartitionLost(RuntimeError):
    """Another worker now owns the partition: drop the batch, the new owner redoes it."""


def day_number(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // _DAY)


class IngestLoaded:
    """What ingest knows of one input partition for one batch."""

    __slots__ = ("counts", "index", "own", "position", "receivers", "seen", "tops")

    def __init__(
        self,
        seen: list[str | None],
        index: dict[str, list[Any]],
        receivers: set[str],
        own: dict[str, float],
        tops: dict[int, list[tuple[float, str]]],
        position: int | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.seen = seen  # content digest of each event already seen, None if new
        self.index = index
        self.receivers = receivers
        self.own = own
        self.tops = tops
        self.position = position  # offset after the last input message whose effects are saved
        self.counts = counts or {}  # events accepted today per institution (the quota)


class IngestStore:
    """Ingest's memory per input partition: seen events (with a digest of their content), the
    void/cancel index, receivers, and event time (own time per institution, lane tops).

    The input topic is keyed by institution, so everything an institution sent is in one
    partition and so is everything ingest remembers of it.
    """

    def __init__(
        self, client: aioredis.Redis, prefix: str, days: int, activity_days: int = 400
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._days = max(1, days)
        self._activity_ttl = max(1, activity_days) * _DAY
        self._load = client.register_script(_INGEST_LOAD)
        self._save = client.register_script(_INGEST_SAVE)

    def _base(self, partition: int) -> str:
        return f"{self._prefix}:{{E{partition}}}"

    def _day_keys(self, partition: int, kind: str) -> list[str]:
        today = day_number()
        return [f"{self._base(partition)}:{kind}:{today - d}" for d in range(self._days)]

    def _fixed_keys(self, partition: int) -> list[str]:
        base = self._base(partition)
        return [
            f"{base}:receivers",
            f"{base}:own",
            f"{base}:tops",
            f"{base}:pos",
            f"{base}:count:{day_number()}",
        ]

    def _activity_args(self, partition: int, activity: ActivityBatch | None) -> list[Any]:
        base = self._base(partition)
        args: list[Any] = [self._activity_ttl]
        days = activity.days if activity else {}
        args.append(len(days))
        for (inst, day), counts in days.items():
            args += [f"{base}:act:{day[:6]}:{inst}", day[6:], ",".join(map(str, counts))]
        prices = activity.prices if activity else {}
        args.append(len(prices))
        for (inst, month, product), figures in prices.items():
            args += [f"{base}:price:{month}:{inst}", product, figures.text()]
        return args

    async def position(self, partition: int) -> int | None:
        """The offset after the last input message of `partition` whose effects are saved."""
        raw = await self._client.get(f"{self._base(partition)}:pos")
        return None if raw is None else int(raw)

    async def load(
        self,
        partition: int,
        event_keys: Sequence[str],
        index_keys: Sequence[str],
        institutions: Sequence[str],
    ) -> IngestLoaded:
        keys, args = self.load_command(partition, event_keys, index_keys, institutions)
        reply = await self._load(keys=keys, args=args)
        return self.decode_load(reply, event_keys, index_keys, institutions)

    def queue_load(
        self,
        pipe: Any,
        partition: int,
        event_keys: Sequence[str],
        index_keys: Sequence[str],
        institutions: Sequence[str],
    ) -> None:
        """`load` as one command of the caller's pipeline (`decode_load` reads its reply): a
        reader that needs other keys too pays one round trip. EVALSHA, not the registered
        script, so the pipeline does not ask SCRIPT EXISTS first; on NoScriptError call
        `load_scripts` and send the pipeline again. As a raw command: redis-py's cluster
        pipeline refuses its `evalsha` method, but routes the command by its keys."""
        keys, args = self.load_command(partition, event_keys, index_keys, institutions)
        pipe.execute_command("EVALSHA", self._load.sha, len(keys), *keys, *args)

    async def load_scripts(self) -> None:
        await self._client.script_load(_INGEST_LOAD)

    def load_command(
        self,
        partition: int,
        event_keys: Sequence[str],
        index_keys: Sequence[str],
        institutions: Sequence[str],
    ) -> tuple[list[str], list[Any]]:
        keys = [
            *self._day_keys(partition, "seen"),
            *self._day_keys(partition, "ix"),
            *self._fixed_keys(partition),
        ]
        args: list[Any] = [self._days, len(event_keys), *event_keys, len(index_keys)]
        args += [*index_keys, *institutions]
        return keys, args

    @staticmethod
    def decode_load(
        reply: list[Any],
        event_keys: Sequence[str],
        index_keys: Sequence[str],
        institutions: Sequence[str],
    ) -> IngestLoaded:
        n, m, k = len(event_keys), len(index_keys), len(institutions)
        seen = [d.decode() if d is not None else None for d in reply[:n]]
        index = {
            key: orjson.loads(raw)
            for key, raw in zip(index_keys, reply[n : n + m], strict=True)
            if raw is not None
        }
        flags = reply[n + m : n + m + k]
        receivers = {inst for inst, flag in zip(institutions, flags, strict=True) if flag}
        own = {
            inst: float(ts)
            for inst, ts in zip(institutions, reply[n + m + k : n + m + 2 * k], strict=True)
            if ts is not None
        }
        flat = reply[n + m + 2 * k]
        tops = {
            int(lane): [(float(t), inst) for t, inst in orjson.loads(v)]
            for lane, v in zip(flat[::2], flat[1::2], strict=True)
        }
        position = reply[n + m + 2 * k + 1]
        counts = {
            inst: int(c)
            for inst, c in zip(institutions, reply[n + m + 2 * k + 2 :], strict=True)
            if c is not None
        }
        return IngestLoaded(
            seen, index, receivers, own, tops, None if position is None else int(position), counts
        )

    async def save(
        self,
        partition: int,
        events: dict[str, str],
        index: dict[str, list[Any]],
        receivers: Iterable[str],
        own: dict[str, float] | None = None,
        tops: dict[int, list[tuple[float, str]]] | None = None,
        position: int | None = None,
        accepted: dict[str, int] | None = None,
        activity: ActivityBatch | None = None,
    ) -> None:
        """`events`: idempotency key -> content digest of the events newly seen; `tops`: per
        lane the two latest (own time, institution); `position`: the offset after the batch's
        last message; `accepted`: events accepted per institution, added to today's counts;
        `activity`: what the accepted events add to their institutions' days and prices."""
        keys = [
            self._day_keys(partition, "seen")[0],
            self._day_keys(partition, "ix")[0],
            *self._fixed_keys(partition),
        ]
        args: list[Any] = [self._days * _DAY, "" if position is None else position, len(events)]
        for key, digest in events.items():
            args += [key, digest]
        args.append(len(index))
        for key, value in index.items():
            args += [key, orjson.dumps(value)]
        recv = list(receivers)
        args += [len(recv), *recv]
        own = own or {}
        args.append(len(own))
        for inst, ts in own.items():
            args += [inst, repr(ts)]
        accepted = accepted or {}
        args.append(len(accepted))
        for inst, count in accepted.items():
            args += [inst, count]
        args += self._activity_args(partition, activity)
        for lane, top in (tops or {}).items():
            args += [lane, orjson.dumps(top)]
        await self._save(keys=keys, args=args)


class ActivityReader:
    """Reads what ingest counted (`IngestStore.save`'s activity): per institution its days and
    months, and the prices it charged per product and month. One pipelined round trip per call,
    whatever the number of institutions (Redis Cluster: one per node)."""

    def __init__(self, client: aioredis.Redis, prefix: str, input_partitions: int) -> None:
        self._client = client
        self._prefix = prefix
        self._partitions = input_partitions

    def _key(self, kind: str, month: str, institution: str) -> str:
        p = partition_of(institution, self._partitions)
        return f"{self._prefix}:{{E{p}}}:{kind}:{month}:{institution}"

    async def days(
        self, institutions: Sequence[str], months: Sequence[str]
    ) -> dict[str, dict[str, list[int]]]:
        """Per institution, `YYYYMMDD` -> counters for every day of `months` (`YYYYMM`) with an
        event."""
        pipe = self._client.pipeline(transaction=False)
        for inst in institutions:
            for month in months:
                pipe.hgetall(self._key("act", month, inst))
        replies = iter(await pipe.execute())
        out: dict[str, dict[str, list[int]]] = {}
        for inst in institutions:
            for month in months:
                for day, text in next(replies).items():
                    name = day.decode() if isinstance(day, bytes) else str(day)
                    out.setdefault(inst, {})[month + name] = _counters(text)
        return out

    async def months(
        self, institutions: Sequence[str], months: Sequence[str]
    ) -> dict[str, list[int]]:
        """Per institution, its counters summed over `months` (absent: nothing counted)."""
        out: dict[str, list[int]] = {}
        for inst, days in (await self.days(institutions, months)).items():
            sums = [0] * len(ACTIVITY_FIELDS)
            for counts in days.values():
                for i, n in enumerate(counts):
                    sums[i] += n
            out[inst] = sums
        return out

    async def prices(
        self, institutions: Sequence[str], months: Sequence[str]
    ) -> dict[str, dict[str, PriceFigures]]:
        """Per institution and product, its settlement prices over `months`."""
        pipe = self._client.pipeline(transaction=False)
        for inst in institutions:
            for month in months:
                pipe.hgetall(self._key("price", month, inst))
        replies = iter(await pipe.execute())
        out: dict[str, dict[str, PriceFigures]] = {}
        for inst in institutions:
            for _month in months:
                for product, text in next(replies).items():
                    name = product.decode() if isinstance(product, bytes) else str(product)
                    figures = PriceFigures.parse(text)
                    held = out.setdefault(inst, {})
                    if name in held:
                        held[name].merge(figures)
                    else:
                        held[name] = figures
        return out


def _counters(text: bytes | str) -> list[int]:
    raw = text.decode() if isinstance(text, bytes) else text
    counts = [int(x) for x in raw.split(",")]
    return (counts + [0] * len(ACTIVITY_FIELDS))[: len(ACTIVITY_FIELDS)]


from streams.codecs import Codec  # noqa: E402  (re-exported for callers)


class Loaded:
    """One partition's batch state as `StageStore.load` found it."""

    __slots__ = ("applied", "due", "hold", "position", "state", "tops")

    def __init__(
        self,
        state: dict[str, State],
        applied: set[str],
        tops: dict[int, tuple[float, float]],
        due: dict[str, int],
        position: int | None = None,
        hold: int | None = None,
    ) -> None:
        self.state = state
        self.applied = applied
        self.tops = tops  # the lanes' tops stored for the partition
        self.due = due
        self.position = position  # offset after the last message whose effects are saved
        self.hold = hold  # the oldest message whose records were held unapplied at the save


class StageStore:
    """One stage's per-key state in Redis, fenced by partition generation.

    Besides the states: the partition's watermark (event time, only ever raised) and a sorted set
    of the keys whose state waits for it (`due`), so parked checks are found without a scan.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        tag: str,
        buckets: int,
        applied_days: int,
        codec: Codec,
        due_limit: int = 5000,
        field_ttl_days: int = 0,
    ) -> None:
        """`field_ttl_days`: a key's state expires that long after its last change (per-field
        expiry, Redis >= 7.4; on older servers states do not expire)."""
        self._client = client
        self._prefix = prefix
        self.tag = tag
        self._buckets = buckets
        self._applied_days = max(1, applied_days)
        self._codec = codec
        self._due_limit = due_limit
        self._field_ttl = max(0, field_ttl_days) * _DAY
        self._load = client.register_script(_LOAD)
        self._save = client.register_script(_SAVE)
        self.generations: dict[int, str] = {}

    def _base(self, partition: int) -> str:
        return f"{self._prefix}:{{{self.tag}{partition}}}"

    def _bucket_no(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self._buckets

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
        self,
        partition: int,
        keys: Sequence[str],
        ids: Sequence[str],
        marks: dict[int, float] | None = None,
    ) -> Loaded:
        """States of `keys`, which `ids` are applied, the partition's stored lane tops, and the
        keys due in each lane by the effective time `marks` gives it."""
        base = self._base(partition)
        applied_keys = self._applied_keys(partition)
        redis_keys = [
            *applied_keys,
            *(f"{base}:s:{self._bucket_no(k)}" for k in keys),
            f"{base}:wm",
        ]
        args: list[Any] = [len(applied_keys), len(ids), *ids]
        args += [self._codec.field(k) for k in keys]
        lanes = {lane: ts for lane, ts in (marks or {}).items() if ts > NEVER}
        args.append(len(lanes))
        for lane, ts in lanes.items():
            args += [lane, repr(ts)]
        args += [self._due_limit, base]
        reply = await self._load(keys=redis_keys, args=args)
        n_ids, n_keys = len(ids), len(keys)
        applied = {rid for rid, flag in zip(ids, reply[:n_ids], strict=True) if flag}
        unpack = self._codec.unpack
        state = {
            key: unpack(raw)
            for key, raw in zip(keys, reply[n_ids : n_ids + n_keys], strict=True)
            if raw is not None
        }
        flat = reply[n_ids + n_keys]
        tops = {int(lane): parse_tops(v) for lane, v in zip(flat[::2], flat[1::2], strict=True)}
        position, hold = reply[n_ids + n_keys + 1], reply[n_ids + n_keys + 2]
        due: dict[str, int] = {}  # key -> the lane's index it was found in
        rest = reply[n_ids + n_keys + 3 :]
        for lane, member, raw in zip(rest[::3], rest[1::3], rest[2::3], strict=True):
            key = self._codec.unfield(member.split(b"|", 1)[1])
            due[key] = int(lane)
            if raw is not None and key not in state:
                state[key] = unpack(raw)
        return Loaded(
            state,
            applied,
            tops,
            due,
            None if position is None else int(position),
            None if hold is None else int(hold),
        )

    async def save(
        self,
        partition: int,
        state: dict[str, State],
        ids: Sequence[str],
        tops: dict[int, tuple[float, float]] | None = None,
        previous_lanes: dict[str, int] | None = None,
        position: int | None = None,
        hold: int | None = None,
    ) -> None:
        """Write states, applied ids, raised lane tops and the position (the offset after the
        batch's last message) - if this worker still owns the partition. `previous_lanes`: the
        due lane each key had when loaded, so its entry moves when its lane changes. `hold`:
        the oldest message whose records stay held unapplied (`streams.alignment`), where a new
        owner reads from."""
        gen = self.generations.get(partition)
        if gen is None:
            raise PartitionLost(f"{self.tag}{partition} is not owned by this worker")
        base = self._base(partition)
        redis_keys = [f"{base}:gen", self._applied_keys(partition)[0], f"{base}:wm"]
        args: list[Any] = [gen, self._applied_days * _DAY, len(ids), *ids]
        raised = tops or {}
        args.append(len(raised))
        for lane, (first, second) in raised.items():
            args += [lane, tops_text(first, second)]
        args += [base, "" if position is None else position, self._field_ttl]
        args.append("" if hold is None else hold)
        previous = previous_lanes or {}
        for key, value in state.items():
            bucket = self._bucket_no(key)
            field = self._codec.field(key)
            redis_keys.append(f"{base}:s:{bucket}")
            due = value.get("due") if value else None
            due_lane = value.get("dl", "") if due is not None else ""
            old = previous.get(key)
            args += [
                field,
                self._codec.pack(value) if value else b"",
                str(bucket).encode() + b"|" + field,
                "" if due is None else repr(due),
                due_lane,
                "" if old is None else old,
            ]
        if not await self._save(keys=redis_keys, args=args):
            self.generations.pop(partition, None)
            raise PartitionLost(f"{self.tag}{partition} was taken over by another worker")


async def read_states(
    client: aioredis.Redis,
    prefix: str,
    tag: str,
    buckets: int,
    partitions: int,
    keys: Sequence[str],
    codec: Codec,
) -> dict[str, State]:
    """Read states without owning their partitions (read models, the ledger API): one pipelined
    round trip, never a write."""
    pipe = client.pipeline(transaction=False)
    for hash_key, field in state_fields(prefix, tag, buckets, partitions, keys, codec):
        pipe.hget(hash_key, field)
    return decode_states(keys, await pipe.execute(), codec)


def state_fields(
    prefix: str,
    tag: str,
    buckets: int,
    partitions: int,
    keys: Sequence[str],
    codec: Codec,
) -> list[tuple[str, bytes]]:
    """Where each state of `keys` is stored: (hash, field), in `keys`' order."""
    from detectors.pipeline import partition_of

    found = []
    for key in keys:
        base = f"{prefix}:{{{tag}{partition_of(key, partitions)}}}"
        found.append((f"{base}:s:{zlib.crc32(key.encode()) % buckets}", codec.field(key)))
    return found


# Values of many hash fields and string keys in one reply: a pipeline of N HGETs costs the
# client N replies to read (~25 us each in redis-py), this one. Keys of many slots work on a
# single Redis only (a cluster refuses them, CROSSSLOT): `queue_read_fields` sends one call per
# slot there. KEYS: n hashes, then string keys; ARGV: n, then a field per hash.
READ_FIELDS = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do out[i] = redis.call('HGET', KEYS[i], ARGV[i + 1]) end
for i = n + 1, #KEYS do out[i] = redis.call('GET', KEYS[i]) end
return out
"""


def decode_states(keys: Sequence[str], values: Sequence[Any], codec: Codec) -> dict[str, State]:
    return {key: codec.unpack(raw) for key, raw in zip(keys, values, strict=True) if raw}


def queue_read_fields(
    pipe: Any, sha: str, fields: Sequence[tuple[str, bytes]], strings: Sequence[str], cluster: bool
) -> tuple[int, Callable[[Sequence[Any]], list[Any]]]:
    """Queue `READ_FIELDS` (by `sha`) for hash fields and string keys on `pipe`: one call, or
    on a cluster one per slot. Returns how many replies it queued and how to turn them into the
    values in order (fields', then strings')."""
    if not cluster:
        keys = [*(h for h, _ in fields), *strings]
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, len(fields), *(f for _, f in fields))
        return 1, lambda replies: list(replies[0])
    items: list[tuple[str, bytes | None]] = [*fields, *((s, None) for s in strings)]
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for i, (key, name) in enumerate(items):
        hashes, plain = groups.setdefault(key_slot(key.encode()), ([], []))
        (plain if name is None else hashes).append(i)
    order = [hashes + plain for hashes, plain in groups.values()]
    for (hashes, _plain), at in zip(groups.values(), order, strict=True):
        keys = [items[i][0] for i in at]
        pipe.execute_command(
            "EVALSHA", sha, len(keys), *keys, len(hashes), *(items[i][1] for i in hashes)
        )

    def assemble(replies: Sequence[Any]) -> list[Any]:
        values: list[Any] = [None] * len(items)
        for at, reply in zip(order, replies, strict=True):
            for i, value in zip(at, reply, strict=True):
                values[i] = value
        return values

    return len(order), assemble
