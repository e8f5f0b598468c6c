"""API tokens: who is calling, and what they may see.

A token is shown once, when it is made (`tracewatch tokens add`), and stored only as its SHA-256
in one Redis hash (`{prefix}:api:tokens`: digest -> JSON grant), so neither Redis nor a log ever
holds one. Two roles:
- `institution`: submits and reads the data of one institution (its `fixmedins_code`);
- `inspector`: reads every institution whose region code starts with its scope (a province
  330000 covers 33xxxx, a city 330100 covers 3301xx); submits nothing.

Rate limits are token buckets per token, in each API process (N processes behind a balancer
allow N times the rate); what a token may do is looked up per request, cached for a couple of
seconds, so a revocation takes effect within `TRACEWATCH_API_TOKEN_CACHE_SECONDS`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass

import orjson
import redis.asyncio as aioredis

from detectors.catalog import region_scope

TOKEN_PREFIX = "tw_"
INSTITUTION = "institution"
INSPECTOR = "inspector"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token may do. `id` names it in lists and revocations; the token itself is
    nowhere."""

    id: str
    role: str
    name: str
    institution: str | None = None
    region: str | None = None
    created_at: float = 0.0
    revoked: bool = False

    def may_read(self, institution: str, region: str | None) -> bool:
        """`region`: the institution's region code (None when the registry does not list it,
        which keeps it out of every inspector's scope)."""
        if self.role == INSTITUTION:
            return institution == self.institution
        return (
            region is not None
            and self.region is not None
            and region.startswith(region_scope(self.region))
        )


class TokenStore:
    def __init__(self, client: aioredis.Redis, prefix: str, cache_seconds: float = 2.0) -> None:
        self._client = client
        self._hash = f"{prefix}:api:tokens"
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Grant | None]] = {}

    async def add(
        self,
        role: str,
        name: str,
        institution: str | None = None,
        region: str | None = None,
    ) -> tuple[str, Grant]:
        """A new token and its grant; the token is returned once and never stored."""
        if role == INSTITUTION and not institution:
            raise ValueError("an institution token needs the institution's code")
        if role == INSPECTOR and not (region and len(region) == 6 and region.isdigit()):
            raise ValueError("an inspector token needs a 6-digit region code, e.g. 330100")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        grant = Grant(
            id=secrets.token_hex(6),
            role=role,
            name=name,
            institution=institution if role == INSTITUTION else None,
            region=region if role == INSPECTOR else None,
            created_at=round(time.time(), 3),
        )
        await self._client.hset(self._hash, token_digest(token), orjson.dumps(asdict(grant)))
        return token, grant

    async def grants(self) -> list[tuple[str, Grant]]:
        raw = await self._client.hgetall(self._hash)
        found = [(_text(digest), Grant(**orjson.loads(v))) for digest, v in raw.items()]
        return sorted(found, key=lambda pair: pair[1].created_at)

    async def revoke(self, grant_id: str) -> bool:
        for digest, grant in await self.grants():
            if grant.id == grant_id:
                revoked = Grant(**{**asdict(grant), "revoked": True})
                await self._client.hset(self._hash, digest, orjson.dumps(asdict(revoked)))
                return True
        return False

    async def lookup(self, token: str) -> Grant | None:
        """The grant of a live token, None for an unknown or revoked one."""
        digest = token_digest(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self._client.hget(self._hash, digest)
        grant = Grant(**orjson.loads(raw)) if raw is not None else None
        if grant is not None and grant.revoked:
            grant = None
        if len(self._cache) > 100_000:  # bounded: random tokens must not grow it for ever
            self._cache.clear()
        self._cache[digest] = (now + self._cache_seconds, grant)
        return grant


class RateLimiter:
    """A token bucket per grant: `rate` requests a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = max(1.0, burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may go; else the seconds until it may."""
        if self._rate <= 0:
            return 0.0
        now = time.monotonic()
        level, at = self._buckets.get(key, (self._burst, now))
        level = min(self._burst, level + (now - at) * self._rate)
        if level < 1.0:
            self._buckets[key] = (level, now)
            return (1.0 - level) / self._rate
        self._buckets[key] = (level - 1.0, now)
        return 0.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
