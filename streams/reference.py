"""Reference data at run time: the catalog, published to its compacted topic and cached in Redis.

The compacted topic is the record; Redis is the cache every worker reads. Publishing bumps a
version counter; workers poll it (one GET every few seconds) and swap in a new `Catalog` when it
changes, so a catalog update needs no restart.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import redis.asyncio as aioredis

from detectors.catalog import (
    Catalog,
    Institution,
    Product,
    load_catalog,
    product_from_dict,
)
from streams.output import OutputProducer
from topics import names

log = logging.getLogger("tracewatch.reference")

# A hash replaced at once (and, given a second key, its version raised), in one script: a
# reader never sees it half written. A script rather than MULTI: redis-py's asyncio cluster
# client cannot close cleanly after a transaction. ARGV: field, value pairs.
_REPLACE_HASH = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if #KEYS > 1 then return redis.call('INCR', KEYS[2]) end
return 0
"""


async def _replace_hash(
    client: aioredis.Redis, key: str, entries: dict[str, bytes], version_key: str | None = None
) -> None:
    args = [x for pair in entries.items() for x in pair]
    keys = [key] if version_key is None else [key, version_key]
    await client.eval(_REPLACE_HASH, len(keys), *keys, *args)


def _product_json(p: Product) -> bytes:
    return orjson.dumps(
        {
            "product": p.product,
            "name": p.name,
            "prefixes": list(p.prefixes),
            "gtins": list(p.gtins),
            "pack_size": p.pack_size,
            "code_required": p.code_required,
            "price_cap": p.price_cap,
        }
    )


class CatalogCache:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        # one hash tag: replaced and versioned in one transaction, in one Redis Cluster slot
        self._hash = f"{prefix}:{{catalog}}"
        self._version_key = f"{prefix}:{{catalog}}:version"
        self._version: bytes | str | None = None
        self.catalog = Catalog()
        self.ready = asyncio.Event()  # set by the first refresh: ingest waits for it

    def current(self) -> Catalog:
        return self.catalog

    async def publish(self, catalog: Catalog, producer: OutputProducer | None = None) -> None:
        """Write the catalog to Redis (replacing it) and, given a producer, to its topic."""
        entries = {p.product: _product_json(p) for p in catalog.products()}
        await _replace_hash(self._client, self._hash, entries, self._version_key)
        if producer is not None:
            for product, value in entries.items():
                producer.produce(names.CATALOG.name, value, product)
            await producer.flush()

    async def size(self) -> int:
        """Products in the catalog published now."""
        return int(await self._client.hlen(self._hash))

    async def publish_file(self, path: str, producer: OutputProducer | None = None) -> Catalog:
        catalog = load_catalog(path)
        await self.publish(catalog, producer)
        return catalog

    async def refresh(self) -> bool:
        """Reload if the published version changed; True when a new catalog was swapped in."""
        version = await self._client.get(self._version_key)
        if self.ready.is_set() and version == self._version:
            return False
        raw = await self._client.hgetall(self._hash)
        products = []
        for product, value in raw.items():
            try:
                products.append(product_from_dict(orjson.loads(value), f"redis {self._hash}"))
            except (ValueError, orjson.JSONDecodeError) as exc:
                log.error("catalog entry %r unusable, skipped: %s", product, exc)
        self.catalog = Catalog(products)
        self._version = version
        self.ready.set()
        log.info("catalog version %s: %d products", version, len(self.catalog))
        return True


class InstitutionRegistry:
    """Institutions (name, kind, region) in one Redis hash, for the API's inspector scopes.
    `tracewatch institutions FILE` replaces it; no rule reads it."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self._hash = f"{prefix}:institutions"

    async def publish(self, institutions: list[Institution]) -> None:
        entries = {
            i.institution: orjson.dumps(
                {"institution": i.institution, "name": i.name, "kind": i.kind, "region": i.region}
            )
            for i in institutions
        }
        await _replace_hash(self._client, self._hash, entries)

    async def get(self, institution: str) -> Institution | None:
        raw = await self._client.hget(self._hash, institution)
        return None if raw is None else _institution(raw)

    async def within(self, scope: str) -> list[Institution]:
        """Every registered institution whose region starts with `scope` (a region prefix)."""
        found = []
        async for _code, raw in self._client.hscan_iter(self._hash, count=10_000):
            entry = _institution(raw)
            if entry.region.startswith(scope):
                found.append(entry)
        return sorted(found, key=lambda i: i.institution)

    async def region_of(self, institution: str) -> str | None:
        raw = await self._client.hget(self._hash, institution)
        if raw is None:
            return None
        region: str = orjson.loads(raw)["region"]
        return region


def _institution(raw: bytes | str) -> Institution:
    obj = orjson.loads(raw)
    return Institution(obj["institution"], obj.get("name") or "", obj["kind"], obj["region"])
