"""Settings of `tracewatch api`, besides the worker's (`streams.settings`: Kafka, Redis, prefix).

| variable | default | meaning |
|---|---|---|
| `TRACEWATCH_API_HOST` | `127.0.0.1` | Address the API listens on (`0.0.0.0` in a container). |
| `TRACEWATCH_API_PORT` | `8080` | Its port. |
| `TRACEWATCH_API_WORKERS` | `1` | Processes serving the port (uvicorn workers sharing one socket); one per core the API may use. |
| `TRACEWATCH_API_MAX_BODY_BYTES` | `8388608` | Largest request body (8 MiB); beyond it 413. |
| `TRACEWATCH_API_MAX_EVENTS` | `1000` | Most events in one `POST /v1/events`; beyond it 413. |
| `TRACEWATCH_API_RATE` | `50` | Requests per second one token may make, on average (per API process). |
| `TRACEWATCH_API_BURST` | `200` | Requests one token may make at once above that rate; then 429. |
| `TRACEWATCH_API_DELIVERY_TIMEOUT_MS` | `5000` | How long the gateway waits for the broker to confirm an event before it answers 503. |
| `TRACEWATCH_API_TOKEN_CACHE_SECONDS` | `2` | How long a process trusts a token it looked up: a revocation takes effect within it. |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from streams.settings import Settings, _env_float, _env_int


@dataclass(frozen=True, slots=True)
class ApiSettings:
    base: Settings = field(default_factory=Settings)
    host: str = field(default_factory=lambda: os.environ.get("TRACEWATCH_API_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _env_int("TRACEWATCH_API_PORT", 8080))
    workers: int = field(default_factory=lambda: max(1, _env_int("TRACEWATCH_API_WORKERS", 1)))
    max_body_bytes: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_API_MAX_BODY_BYTES", 8 * 1024 * 1024)
    )
    max_events: int = field(default_factory=lambda: _env_int("TRACEWATCH_API_MAX_EVENTS", 1000))
    rate: float = field(default_factory=lambda: _env_float("TRACEWATCH_API_RATE", 50.0))
    burst: float = field(default_factory=lambda: _env_float("TRACEWATCH_API_BURST", 200.0))
    delivery_timeout_ms: int = field(
        default_factory=lambda: _env_int("TRACEWATCH_API_DELIVERY_TIMEOUT_MS", 5000)
    )
    token_cache_seconds: float = field(
        default_factory=lambda: _env_float("TRACEWATCH_API_TOKEN_CACHE_SECONDS", 2.0)
    )
