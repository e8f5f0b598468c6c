"""The inspectors' side over HTTP: the case list (`/v1/cases`: list, one case, moves, bulk
moves, assignment), institution profiles (`/v1/institutions/{id}`) and the monthly supervision
report (`/v1/reports/supervision`). Inspector tokens, each within its region scope (a case's
region is its institution's, from the registry); an institution token reads its own profile
only. The store and the workflow are `cases/`, enforced by the database; profiles and reports
are `supervision/`. Without `DATABASE_URL` the routes answer 503 and say so.

(No `from __future__ import annotations`: the routes are made inside `register`, and FastAPI
must see their `Depends(grant_of)` as objects, not as names to look up in the module.)"""

import datetime
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Body, Depends, FastAPI, Query, Request, Response
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from api.auth import INSTITUTION, Grant
from cases import workflow
from cases.store import CaseError, CaseFilter, CaseStore, Deadlines
from detectors.catalog import region_scope
from streams.redis_state import ActivityReader
from streams.settings import Settings
from supervision.figures import Period, PeriodError
from supervision.profile import institution_profile
from supervision.report import report_csv, supervision_report
from topics import names

Status = Literal["new", "seen", "investigating", "escalated", "closed"]
Closure = Literal[
    "confirmed_fraud",
    "process_error",
    "scanner_fault",
    "upload_error",
    "duplicate",
    "withdrawn",
    "other",
]


class CaseSummary(BaseModel):
    alert_id: str
    rule: str
    severity: str
    institution: str
    region: str | None
    product: str | None
    code: str | None
    settlement_id: str | None
    occurred_at: datetime.datetime
    detected_at: datetime.datetime
    opened_at: datetime.datetime
    status: Status
    withdrawn: bool
    closure_reason: Closure | None
    assignee: str | None
    version: int = Field(description="send it back with a move: refused if the case moved since")
    updated_at: datetime.datetime
    closed_at: datetime.datetime | None


class CaseList(BaseModel):
    cases: list[CaseSummary]
    next: str | None = Field(description="`after` for the next page; null on the last")


class AuditEntry(BaseModel):
    at: datetime.datetime
    actor: str
    action: Literal["opened", "transition", "assign"]
    from_status: str | None
    to_status: str | None
    reason: str | None
    detail: dict[str, Any] | None


class CaseDetail(CaseSummary):
    alert: dict[str, Any] = Field(description="the alert's last message (docs/contract.md, 5)")
    standing: dict[str, Any] | None = Field(description="its last standing message")
    closure_comment: str | None
    duplicate_of: str | None
    audit: list[AuditEntry]
    code_history: dict[str, Any] | None = Field(
        description="the box's history (as GET /v1/codes/{code}), when the alert names a code"
    )


class Move(BaseModel):
    to: Status
    reason: str | None = Field(None, description="required for every move but to investigating")
    closure_reason: Closure | None = Field(None, description="required to close")
    comment: str | None = Field(None, max_length=workflow.COMMENT_MAX)
    duplicate_of: str | None = Field(None, description="closing as duplicate: the other case")
    version: int | None = Field(None, description="the version seen: refused if it moved since")


class Selection(BaseModel):
    rule: str | None = None
    severity: str | None = None
    status: Status | None = None
    institution: str | None = None
    region: str | None = None
    product: str | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None


class BulkMove(BaseModel):
    where: Selection
    to: Status
    reason: str | None = None
    closure_reason: Closure | None = None
    comment: str | None = Field(None, max_length=workflow.COMMENT_MAX)


class BulkResult(BaseModel):
    moved: int
    alert_ids: list[str]


class Assignment(BaseModel):
    assignee: str | None
    version: int | None = None


class RiskFactor(BaseModel):
    factor: str
    value: Any
    points: float
    max: float
    explanation: str


class Risk(BaseModel):
    score: float = Field(description="0-100: the sum of the factors (supervision/risk.py)")
    grade: Literal["low", "medium", "high"]
    factors: list[RiskFactor]
    rank_in_region: int
    institutions_in_region: int
    formula: str


class InstitutionProfile(BaseModel):
    institution: str
    name: str | None
    kind: str | None
    region: str | None
    registered: bool
    period: dict[str, str]
    activity: dict[str, float | None] = Field(
        description="counted by the stream: events, settlements, required_lines, "
        "scanned_lines, packs, codes, scans, scan_rate, code_collection_rate"
    )
    alerts: dict[str, Any]
    confirmed_cases: int
    oversold_units: float
    open_cases: dict[str, Any]
    resolution: dict[str, Any]
    risk: Risk
    prices: list[dict[str, Any]]
    daily: list[dict[str, Any]]


class SupervisionReport(BaseModel):
    region: str
    scope: str
    month: str
    period: dict[str, str]
    generated_at: str
    deadline_days: int
    kinds: list[dict[str, Any]]
    total: dict[str, Any]
    rules: list[dict[str, Any]]
    overdue: list[dict[str, Any]]
    top_risk: list[dict[str, Any]]
    prices: list[dict[str, Any]]
    regions: list[dict[str, Any]] | None = None


def register(
    app: FastAPI,
    grant_of: Callable[..., Awaitable[Grant]],
    respond: Callable[..., Response],
    error: Callable[[int, str, str], Exception],
    unavailable: Callable[[str], Exception],
    errors: dict[int | str, dict[str, Any]],
    history: Callable[[str], Awaitable[dict[str, Any] | None]],
) -> None:
    """Add the case routes to `app`; `app.state.cases` holds the store (None: not configured)."""

    def store_of(request: Request) -> CaseStore:
        store: CaseStore | None = getattr(request.app.state, "cases", None)
        if store is None:
            raise error(
                503,
                "no_case_store",
                "the case store is not configured: start the API with DATABASE_URL set",
            )
        return store

    def inspector(grant: Grant) -> str:
        if grant.role == INSTITUTION or grant.region is None:
            raise error(403, "forbidden", "cases are for inspector tokens")
        return region_scope(grant.region)

    def within(scope: str, region: str | None) -> str:
        """The narrower of the token's scope and the region asked for."""
        if region is None:
            return scope
        if not region_scope(region).startswith(scope):
            raise error(403, "out_of_region", f"region {region} is outside this token's scope")
        return region_scope(region)

    async def guarded(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except CaseError as exc:
            raise error(exc.status, type(exc).__name__, str(exc)) from None
        except (psycopg.OperationalError, PoolTimeout):
            raise unavailable("the case store") from None

    def actor(grant: Grant) -> str:
        return f"{grant.name or grant.id} ({grant.id})"

    responses = {**errors, 404: errors[403], 409: errors[403], 422: errors[403]}

    @app.get(
        "/v1/cases",
        response_model=CaseList,
        responses=responses,
        summary="Cases newest first, filtered, a page at a time",
        tags=["cases"],
    )
    async def list_cases(
        request: Request,
        grant: Annotated[Grant, Depends(grant_of)],
        rule: str | None = None,
        severity: str | None = None,
        status: Status | None = None,
        institution: str | None = None,
        region: str | None = None,
        product: str | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        open_only: Annotated[bool, Query(alias="open")] = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        after: str | None = None,
    ) -> Response:
        """Within the token's region scope; `after` is the previous page's `next` (keyset
        pagination: stable while new cases arrive)."""
        scope = within(inspector(grant), region)
        where = CaseFilter(
            rule, severity, status, institution, scope, product, since, until, open_only
        )
        rows, cursor = await guarded(store_of(request).search(where, limit, after))
        return respond({"cases": rows, "next": cursor})

    async def scoped_case(request: Request, grant: Grant, alert_id: str) -> dict[str, Any]:
        scope = inspector(grant)
        case: dict[str, Any] = await guarded(store_of(request).get(alert_id))
        if not (case["region"] or "").startswith(scope) or case["region"] is None:
            raise error(404, "CaseNotFound", f"no case {alert_id} in this token's scope")
        return case

    @app.get(
        "/v1/cases/{alert_id}",
        response_model=CaseDetail,
        responses=responses,
        summary="One case: its alert, the events it cites, the code's history, the audit trail",
        tags=["cases"],
    )
    async def get_case(
        alert_id: str, request: Request, grant: Annotated[Grant, Depends(grant_of)]
    ) -> Response:
        case = await scoped_case(request, grant, alert_id)
        case["code_history"] = None
        if case["code"]:
            try:
                case["code_history"] = await history(case["code"])
            except RedisError:
                raise unavailable("Redis") from None
        return respond(case)

    @app.post(
        "/v1/cases/{alert_id}/transitions",
        response_model=CaseSummary,
        responses=responses,
        summary="Move a case (new -> seen -> investigating -> escalated -> closed)",
        tags=["cases"],
    )
    async def move_case(
        alert_id: str,
        move: Annotated[Move, Body()],
        request: Request,
        grant: Annotated[Grant, Depends(grant_of)],
    ) -> Response:
        """409 if `version` is given and the case moved since; 422 if the workflow refuses
        the move (the answer says why)."""
        await scoped_case(request, grant, alert_id)
        row = await guarded(
            store_of(request).move(
                alert_id,
                move.to,
                actor(grant),
                move.reason,
                move.closure_reason,
                move.comment,
                move.version,
                move.duplicate_of,
            )
        )
        return respond(row)

    @app.post(
        "/v1/cases/transitions",
        response_model=BulkResult,
        responses=responses,
        summary="Move every case a filter selects, within the token's scope (audited each)",
        tags=["cases"],
    )
    async def move_cases(
        bulk: Annotated[BulkMove, Body()],
        request: Request,
        grant: Annotated[Grant, Depends(grant_of)],
    ) -> Response:
        """E.g. close every INVALID_CODE of one institution's faulty scanner. Cases that may
        not make the move (closed already) are left as they are; all or nothing otherwise."""
        w = bulk.where
        scope = within(inspector(grant), w.region)
        where = CaseFilter(
            w.rule, w.severity, w.status, w.institution, scope, w.product, w.since, w.until
        )
        moved = await guarded(
            store_of(request).move_all(
                where, bulk.to, actor(grant), bulk.reason, bulk.closure_reason, bulk.comment
            )
        )
        return respond({"moved": len(moved), "alert_ids": moved})

    @app.put(
        "/v1/cases/{alert_id}/assignee",
        response_model=CaseSummary,
        responses=responses,
        summary="Assign a case to an inspector (null: unassign)",
        tags=["cases"],
    )
    async def assign_case(
        alert_id: str,
        assignment: Annotated[Assignment, Body()],
        request: Request,
        grant: Annotated[Grant, Depends(grant_of)],
    ) -> Response:
        await scoped_case(request, grant, alert_id)
        row = await guarded(
            store_of(request).assign(
                alert_id, assignment.assignee, actor(grant), assignment.version
            )
        )
        return respond(row)

    settings = Settings()
    deadlines = Deadlines.parse(settings.lead_deadline_days, settings.lead_deadlines)

    def reader_of(request: Request) -> ActivityReader:
        svc = request.app.state.services
        return ActivityReader(svc.redis, svc.prefix, names.EVENTS.partitions)

    async def sourced(call: Awaitable[Any]) -> Any:
        try:
            return await guarded(call)
        except RedisError:
            raise unavailable("Redis") from None

    @app.get(
        "/v1/institutions/{institution}",
        response_model=InstitutionProfile,
        responses={**responses, 422: errors[403]},
        summary="An institution's profile and risk score over a period (信用画像)",
        tags=["supervision"],
    )
    async def get_institution(
        institution: str,
        request: Request,
        grant: Annotated[Grant, Depends(grant_of)],
        since: Annotated[str | None, Query(description="first day, YYYY-MM-DD")] = None,
        until: Annotated[
            str | None, Query(description="last day, YYYY-MM-DD; default today")
        ] = None,
    ) -> Response:
        """Events, scan and code collection rates, alerts per 10,000 scans by rule, confirmed
        and open cases, oversold units, prices against the region's, and the risk score with
        the factors that make it up and its rank in the institution's region. Default period:
        the last 30 days. An institution token reads its own; an inspector those of its
        region scope."""
        try:
            period = Period.days(since, until, datetime.date.today())
        except PeriodError as exc:
            raise error(422, "bad_period", str(exc)) from None
        registry = request.app.state.services.registry
        if grant.role == INSTITUTION:
            if institution != grant.institution:
                raise error(
                    403, "forbidden_institution", f"this token reads {grant.institution!r} only"
                )
        else:
            scope = inspector(grant)
            entry = await sourced(registry.get(institution))
            if entry is None or not entry.region.startswith(scope):
                raise error(
                    404, "not_found", f"no institution {institution!r} in this token's scope"
                )
        store = store_of(request)  # after the grant: a stranger learns nothing, not even 503
        profile = await sourced(
            institution_profile(institution, period, reader_of(request), registry, store, deadlines)
        )
        return respond(profile)

    @app.get(
        "/v1/reports/supervision",
        response_model=SupervisionReport,
        responses={
            **responses,
            200: {
                "content": {"text/csv": {"schema": {"type": "string"}}},
                "description": "the report (JSON), or its main table (format=csv)",
            },
        },
        summary="The monthly supervision report of a region",
        tags=["supervision"],
    )
    async def get_report(
        request: Request,
        grant: Annotated[Grant, Depends(grant_of)],
        region: Annotated[str, Query(pattern=r"^[0-9]{6}$", description="6-digit region code")],
        month: Annotated[str, Query(pattern=r"^[0-9]{4}-[0-9]{2}$", description="YYYY-MM")],
        by_region: bool = False,
        format: Literal["json", "csv"] = "json",
    ) -> Response:
        """Institutions by kind (active, with alerts, with confirmed problems), cases opened,
        closed and still open, by rule, leads past the deadline, the institutions ranked by
        risk score, the price spread per product; `by_region`: a row per region code too.
        Inspectors only, for a region within their scope."""
        within(inspector(grant), region)
        try:
            Period.month(month)
        except PeriodError as exc:
            raise error(422, "bad_period", str(exc)) from None
        report = await sourced(
            supervision_report(
                region,
                month,
                reader_of(request),
                request.app.state.services.registry,
                store_of(request),
                deadlines,
                by_region,
            )
        )
        if format == "csv":
            return Response(report_csv(report), media_type="text/csv; charset=utf-8")
        return respond(report)
