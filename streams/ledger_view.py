"""The inspector's view of the 进销存 ledger: per institution and product, expected stock, units
dispensed without any recorded purchase, the last count. Served by
`tracewatch ledger INSTITUTION [PRODUCT]` (the worker's web server carries no data: it has no
authentication; data reads belong to the authenticated API).

Reads Redis directly - the stage's own state, never a copy - so it is as fresh as the last batch.
Without a product it looks up every catalog product of the institution in one pipelined round trip.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from detectors.ledger import describe
from detectors.pipeline import LEDGER_PART
from detectors.routing import ledger_key
from streams.codecs import JsonCodec
from streams.redis_state import read_states
from streams.reference import CatalogCache
from streams.settings import Settings
from topics import names


async def ledger_figures(
    client: aioredis.Redis, settings: Settings, institution: str, product: str | None = None
) -> list[dict[str, Any]]:
    if product is not None:
        products = [product]
    else:
        cache = CatalogCache(client, settings.redis_prefix)
        await cache.refresh()
        products = sorted(p.product for p in cache.current().products())
    keys = [ledger_key(institution, p) for p in products]
    states = await read_states(
        client,
        settings.redis_prefix,
        LEDGER_PART,
        settings.state_buckets,
        names.BY_LEDGER.partitions,
        keys,
        JsonCodec(),
    )
    return [describe(key, states[key]) for key in keys if key in states]
