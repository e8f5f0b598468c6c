"""`tracewatch api`: the HTTP surface for POS/HIS systems and inspectors.

- `POST /v1/events`: ingest gateway. Validated by the contract's parser, produced to the input
  topic keyed by institution, answered per event once the broker confirmed it.
- `POST /v1/settlements/check`: the verdict the stream would give a settlement now (事前提醒),
  from the workers' current state, recording nothing (`detectors.precheck`).
- `GET /v1/codes/{code}`: a box's history from any spelling of its code (追溯).
- `GET /healthz`, `GET /readyz`, `GET /metrics`; `/openapi.json` and `/docs`.

Stateless apart from Kafka and Redis: run as many processes as needed behind a balancer.
(No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run
time, and the dependencies are local to `create_app`.)
"""

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
import psycopg
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from api import cases as cases_api
from api import metrics
from api.auth import INSPECTOR, INSTITUTION, Grant, RateLimiter, TokenStore
from api.config import ApiSettings
from api.gateway import EventGateway
from api.nhsa import is_nhsa, to_contract
from api.reads import StateReader, code_history, submitted_key
from api.schemas import (
    CheckAnswer,
    CodeHistory,
    ErrorBody,
    EventsAnswer,
    Health,
    events_body,
    settlement_body,
)
from cases.schema import migrate
from cases.store import CaseStore
from detectors.codes import classify
from streams import gc_tuning
from streams.redis_state import connect, is_cluster
from streams.reference import CatalogCache, InstitutionRegistry
from topics import names
from topics.records import BOUNDS, Event, InvalidEvent, event_from_dict

log = logging.getLogger("tracewatch.api")

CATALOG_REFRESH_SECONDS = 5.0
RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"{what} is not reachable; nothing was recorded - retry after {RETRY_AFTER_SECONDS} s",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@dataclass(slots=True)
class Services:
    """What the routes use; made at start-up (`lifespan`)."""

    redis: aioredis.Redis
    prefix: str
    tokens: TokenStore
    limiter: RateLimiter
    gateway: EventGateway
    catalog: CatalogCache
    registry: InstitutionRegistry
    reader: StateReader


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no token, or an unknown or revoked one"},
    403: {"model": ErrorBody, "description": "the token may not do this"},
    413: {"model": ErrorBody, "description": "body or batch too large"},
    429: {"model": ErrorBody, "description": "rate limit of the token; see Retry-After"},
    503: {"model": ErrorBody, "description": "broker or Redis unreachable; see Retry-After"},
}


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    base = settings.base

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = connect(base.redis_url)
        if is_cluster(client):
            # the slot map before requests use it concurrently (see streams.app); Redis down:
            # the first request tries
            with contextlib.suppress(RedisError, OSError):
                await client.initialize()
        gateway = EventGateway(base.require_kafka(), settings.delivery_timeout_ms)
        catalog = CatalogCache(client, base.redis_prefix)
        app.state.services = Services(
            redis=client,
            prefix=base.redis_prefix,
            tokens=TokenStore(client, base.redis_prefix, settings.token_cache_seconds),
            limiter=RateLimiter(settings.rate, settings.burst),
            gateway=gateway,
            catalog=catalog,
            registry=InstitutionRegistry(client, base.redis_prefix),
            reader=StateReader(client, base),
        )
        refresher = asyncio.create_task(_refresh_catalog(catalog))
        case_pool = await _open_case_store(app)
        try:
            yield
        finally:
            if case_pool is not None:
                await case_pool.close()
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await asyncio.to_thread(gateway.close)
            await client.aclose()

    app = FastAPI(
        title="tracewatch",
        version="1",
        summary="Drug traceability codes (药品追溯码): ingest, pre-settlement check, code history",
        lifespan=lifespan,
    )
    app.add_middleware(metrics.MetricsMiddleware)
    bearer = HTTPBearer(auto_error=False, description="an API token (`tracewatch tokens add`)")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return _json({"error": exc.error, "detail": exc.detail}, exc.status, exc.headers)

    def services(request: Request) -> Services:
        svc: Services = request.app.state.services
        return svc

    async def grant_of(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Grant:
        if credentials is None:
            raise ApiError(
                401,
                "unauthorized",
                "send an API token: Authorization: Bearer <token> (`tracewatch tokens add`)",
                {"WWW-Authenticate": "Bearer"},
            )
        svc = services(request)
        try:
            grant = await svc.tokens.lookup(credentials.credentials)
        except RedisError:
            raise _unavailable("Redis") from None
        if grant is None:
            raise ApiError(
                401,
                "unauthorized",
                "the token is unknown or revoked: ask the operator for a new one",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        wait = svc.limiter.take(grant.id)
        if wait:
            raise ApiError(
                429,
                "rate_limited",
                f"this token is over its rate of {settings.rate:g} requests/s; slow down",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return grant

    async def body_of(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(f"the body is {declared} bytes, at most {limit} are accepted")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"the body is over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=EventsAnswer,
        responses={
            **_ERRORS,
            **{
                status: {
                    "model": ErrorBody | EventsAnswer,
                    "description": f"{_ERRORS.get(status, {}).get('description', 'no event valid')}"
                    "; with per-event results when the events were read",
                }
                for status in (400, 403, 503)
            },
        },
        openapi_extra=events_body(settings.max_events),
        summary="Submit events (contract format or NHSA fields), answered once the broker has them",
        tags=["ingest"],
    )
    async def post_events(request: Request, grant: Annotated[Grant, Depends(grant_of)]) -> Response:
        """A JSON array, or JSON lines, of up to `TRACEWATCH_API_MAX_EVENTS` events of the
        token's institution. Per event: `accepted` (on the input topic, confirmed by the
        broker), `duplicate` (this `(institution, event_id)` was accepted before with the same
        content: a safe retry) or `rejected` with the reason ingest would give. 202 when any
        event was accepted or was a duplicate; 400 when all were invalid, 403 when all were of
        another institution; 503 (with Retry-After) when the broker or Redis is down, with the
        events already confirmed marked `accepted` - retry the request as it was."""
        if grant.role != INSTITUTION:
            raise ApiError(403, "forbidden", "inspector tokens cannot submit events")
        svc = services(request)
        items = _split_events(await body_of(request))
        if len(items) > settings.max_events:
            raise _too_large(
                f"{len(items)} events in one request, at most {settings.max_events}: split it"
            )
        results: list[dict[str, Any]] = []
        parsed: list[tuple[int, Event, bytes]] = []
        for index, item in enumerate(items):
            result, event, value = _parse_item(index, item, grant)
            results.append(result)
            if event is not None and value is not None:
                parsed.append((index, event, value))
        try:
            await _submit(svc, base.seen_ttl_days, parsed, results)
        except RedisError:
            raise _unavailable("Redis") from None
        counts = {s: sum(1 for r in results if r["status"] == s) for s in _STATUSES}
        for status, count in counts.items():
            if count:
                metrics.EVENTS.labels(status).inc(count)
        body = {**{s: counts[s] for s in ("accepted", "duplicate", "rejected")}, "results": results}
        if counts["unavailable"]:
            body["error"] = "unavailable"
            body["detail"] = (
                f"the broker did not confirm {counts['unavailable']} events; nothing of them "
                f"was recorded - retry the request after {RETRY_AFTER_SECONDS} s"
            )
            return _json(body, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)})
        if counts["accepted"] or counts["duplicate"] or not results:
            return _json(body, 202)
        forbidden = all(r.get("reason") == "forbidden_institution" for r in results)
        return _json(body, 403 if forbidden else 400)

    @app.post(
        "/v1/settlements/check",
        response_model=CheckAnswer,
        responses={
            **_ERRORS,
            400: {"model": ErrorBody, "description": "not one JSON object"},
            422: {
                "model": ErrorBody,
                "description": "not a valid settlement (the reason ingest would give)",
            },
        },
        openapi_extra=settlement_body(),
        summary="The verdict the stream would give this settlement now; records nothing",
        tags=["settlement"],
    )
    async def check_settlement(
        request: Request, grant: Annotated[Grant, Depends(grant_of)]
    ) -> Response:
        """A `settlement` in the contract's format (or an NHSA 2207 record), before it is
        settled. The answer is the verdict the stream would give it from its current state -
        per line ok/rejected with the rules - and for each rejection what the cashier can act
        on. Nothing is recorded: submit the settlement through `POST /v1/events` as usual."""
        svc = services(request)
        raw = await body_of(request)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ApiError(400, "not_json", "the body must be one JSON object") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "not_object", "the body must be one JSON object")
        if is_nhsa(obj):
            obj = to_contract(obj)
        try:
            event = event_from_dict(obj)
        except InvalidEvent as exc:
            raise ApiError(422, exc.reason, exc.detail) from None
        if event.type != "settlement":
            raise ApiError(
                422, "not_a_settlement", f"only a settlement is checked, not {event.type}"
            )
        await _authorise_read(svc, grant, event.institution)
        if not svc.catalog.ready.is_set():
            raise _unavailable("the catalog (Redis)")
        try:
            checked, submitted = await svc.reader.check(event, svc.catalog.current())
        except RedisError:
            raise _unavailable("Redis") from None
        verdict = checked.verdict
        lines = [
            {**line, "evidence": checked.evidence.get(line["line_no"], [])}
            for line in verdict["lines"]
        ]
        return _json(
            {
                **verdict,
                "lines": lines,
                "already_submitted": submitted,
                "recorded": False,
            }
        )

    @app.get(
        "/v1/codes/{code}",
        response_model=CodeHistory,
        responses={**_ERRORS, 422: {"model": ErrorBody}},
        summary="A box's history from any spelling of its trace code",
        tags=["trace"],
    )
    async def get_code(
        code: str, request: Request, grant: Annotated[Grant, Depends(grant_of)]
    ) -> Response:
        """Receipts, departures, dispenses and returns of the box, with institution, time and
        event ids, and the summary NHSA's own query gives (no sale / one sale / sold more than
        once). Any spelling that normalises to the code works: with or without GS1 brackets
        or the FNC1 separator, a 20-digit code with spaces. An institution sees its own
        entries (and the summary); an inspector sees all of them."""
        svc = services(request)
        scan = classify(code)
        if scan.key is None:
            raise ApiError(
                422, "not_a_code", f"{code[:64]!r} is not a well-formed trace code ({scan.error})"
            )
        try:
            states = await svc.reader.code_states([scan.key])
        except RedisError:
            raise _unavailable("Redis") from None
        viewer = grant.institution if grant.role == INSTITUTION else None
        return _json(code_history(scan.key, states.get(scan.key), viewer))

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Response:
        """The process is up (liveness): no dependency is asked."""
        return _json({"status": "ok"})

    @app.get(
        "/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["operations"]
    )
    async def readyz(request: Request) -> Response:
        """Redis and the broker answer (readiness): a balancer sends no traffic before."""
        svc = services(request)
        try:
            redis_ok = bool(await asyncio.wait_for(svc.redis.ping(), 2))
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        broker_ok = await asyncio.to_thread(svc.gateway.ready, names.EVENTS.name)
        ok = redis_ok and broker_ok
        body = {
            "status": "ok" if ok else "unavailable",
            "checks": {"redis": redis_ok, "broker": broker_ok},
        }
        return _json(body, 200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def history(code: str) -> dict[str, Any] | None:
        reader: StateReader = app.state.services.reader
        states = await reader.code_states([code])
        return code_history(code, states.get(code), None)

    cases_api.register(app, grant_of, _json, ApiError, _unavailable, _ERRORS, history)
    return app


async def _open_case_store(app: FastAPI) -> AsyncConnectionPool | None:
    """The case store when `DATABASE_URL` is set: its schema migrated (when the database
    answers now; else the sink does it) and a pool the case routes share."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        app.state.cases = None
        return None

    def migrated() -> None:
        with psycopg.connect(url, connect_timeout=5) as conn:
            migrate(conn)

    try:
        await asyncio.to_thread(migrated)
    except psycopg.OperationalError as exc:
        log.warning("case store not reachable at start (%s): the case routes answer 503", exc)
    pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False, timeout=5)
    await pool.open(wait=False)
    app.state.cases = CaseStore(pool)
    return pool


_STATUSES = ("accepted", "duplicate", "rejected", "unavailable")


def _too_large(detail: str) -> ApiError:
    return ApiError(413, "body_too_large", detail)


def _split_events(body: bytes) -> list[Any]:
    """A JSON array, or JSON lines (one object per line; a single object is one line). A line
    that is not JSON is kept as bytes and rejected on its own: the rest of the batch goes on."""
    text = body.strip()
    if text.startswith(b"["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "not_json", f"the body is not a valid JSON array ({exc})") from None
        if not isinstance(items, list):
            raise ApiError(400, "not_json", "the body must be a JSON array or JSON lines")
        return items
    found: list[Any] = []
    for line in text.split(b"\n"):
        if not line.strip():
            continue
        try:
            found.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            found.append(bytes(line))
    if not found:
        raise ApiError(400, "empty", "no events in the body: send a JSON array or JSON lines")
    return found


def _parse_item(
    index: int, item: Any, grant: Grant
) -> tuple[dict[str, Any], Event | None, bytes | None]:
    """One event of a request: its result so far, and the event and the bytes to produce."""
    event_id = item.get("event_id", item.get("fixmedins_bchno")) if isinstance(item, dict) else None
    result: dict[str, Any] = {
        "index": index,
        "event_id": event_id if isinstance(event_id, str) else None,
        "status": "rejected",
    }
    if isinstance(item, bytes):
        return {**result, "reason": "not_json", "detail": "the line is not valid JSON"}, None, None
    if not isinstance(item, dict):
        return (
            {**result, "reason": "not_object", "detail": "an event must be a JSON object"},
            None,
            None,
        )
    obj = to_contract(item) if is_nhsa(item) else item
    try:
        value = orjson.dumps(obj)
        if len(value) > BOUNDS.event_bytes:
            raise InvalidEvent(
                "too_large", f"the event is {len(value)} bytes, at most {BOUNDS.event_bytes}"
            )
        event = event_from_dict(obj)
    except InvalidEvent as exc:
        return {**result, "reason": exc.reason, "detail": exc.detail}, None, None
    except (TypeError, orjson.JSONEncodeError) as exc:
        return {**result, "reason": "bad_field", "detail": str(exc)[:200]}, None, None
    result["event_id"] = event.event_id
    if event.institution != grant.institution:
        detail = (
            f"event of {event.institution!r} refused: this token submits for "
            f"{grant.institution!r} only"
        )
        return {**result, "reason": "forbidden_institution", "detail": detail}, None, None
    return result, event, value


async def _submit(
    svc: Services,
    ttl_days: int,
    parsed: list[tuple[int, Event, bytes]],
    results: list[dict[str, Any]],
) -> None:
    """Drop what was accepted before (same digest: duplicate; other: conflicting), produce the
    rest, and remember each once the broker confirmed it."""
    if not parsed:
        return
    prefix = svc.prefix
    pipe = svc.redis.pipeline(transaction=False)
    for _i, event, _v in parsed:
        pipe.get(submitted_key(prefix, event.key))
    before = await pipe.execute()
    taken: dict[str, str] = {}
    sending: list[tuple[int, Event, bytes]] = []
    for (index, event, value), known in zip(parsed, before, strict=True):
        first = known.decode() if known is not None else taken.get(event.key)
        if first is None:
            taken[event.key] = event.digest
            sending.append((index, event, value))
        elif first == event.digest:
            results[index]["status"] = "duplicate"
        else:
            results[index].update(
                reason="conflicting_resubmission",
                detail=f"event {event.event_id!r} was accepted before with other content; "
                "the first stands - send a correction under a new event_id",
            )
    if not sending:
        return
    started = time.perf_counter()
    errors = await svc.gateway.send(
        names.EVENTS.name, [(event.institution, value) for _i, event, value in sending]
    )
    metrics.DELIVERY.observe(time.perf_counter() - started)
    pipe = svc.redis.pipeline(transaction=False)
    ttl = max(1, ttl_days) * 86400
    for (index, event, _v), error in zip(sending, errors, strict=True):
        if error is None:
            results[index]["status"] = "accepted"
            pipe.set(submitted_key(prefix, event.key), event.digest, ex=ttl, nx=True)
        else:
            results[index].update(status="unavailable", reason="broker", detail=error[:200])
    failed = [e for e in errors if e is not None]
    if failed:  # one line per request, not per event: an outage would flood the log
        log.warning(
            "%d of %d events not confirmed by the broker: %s", len(failed), len(errors), failed[0]
        )
    try:
        await pipe.execute()
    except RedisError:
        # On the topic already: a retry is produced again and the worker's own filter drops it.
        log.warning("accepted events could not be marked in Redis; a retry will be re-sent")


async def _authorise_read(svc: Services, grant: Grant, institution: str) -> None:
    if grant.role == INSTITUTION:
        if institution != grant.institution:
            raise ApiError(
                403,
                "forbidden_institution",
                f"this token reads {grant.institution!r} only, not {institution!r}",
            )
        return
    if grant.role == INSPECTOR:
        try:
            region = await svc.registry.region_of(institution)
        except RedisError:
            raise _unavailable("Redis") from None
        if grant.may_read(institution, region):
            return
        where = f"region {region}" if region else "no region the registry knows"
        raise ApiError(
            403,
            "out_of_region",
            f"{institution!r} is in {where}, outside this token's region {grant.region}",
        )
    raise ApiError(403, "forbidden", f"role {grant.role!r} may not read")


async def _refresh_catalog(catalog: CatalogCache) -> None:
    tuned = False
    while True:
        try:
            swapped = await catalog.refresh()
            if swapped and not tuned:
                # A check allocates much and frees it all (streams.gc_tuning); frozen once the
                # catalog is in, full collections no longer walk it: one cost a 60,000-event
                # bench's API ~20 ms of pause.
                gc_tuning.tune()
                tuned = True
        except (RedisError, OSError) as exc:
            log.warning("catalog refresh failed (%s); keeping the one loaded", exc)
        await asyncio.sleep(CATALOG_REFRESH_SECONDS)
