"""Reading and moving cases (psycopg 3, async). Every move goes through the database's
`case_transition()`, which checks it, serialises concurrent moves of one case on its row lock
and, given the version the caller saw, refuses a move made after someone else's."""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from detectors.catalog import region_scope


class CaseError(Exception):
    status = 422


class CaseNotFound(CaseError):
    status = 404


class CaseConflict(CaseError):
    status = 409


class MoveRefused(CaseError):
    status = 422


_BY_SQLSTATE: dict[str, type[CaseError]] = {
    "TW404": CaseNotFound,
    "TW409": CaseConflict,
    "TW422": MoveRefused,
    "23514": MoveRefused,  # a CHECK: closure reason, comment length, `other` without comment
    "23503": MoveRefused,  # duplicate_of names no case
}


def _refusal(exc: psycopg.Error) -> CaseError:
    kind = _BY_SQLSTATE.get(exc.sqlstate or "", CaseError)
    message = exc.diag.message_primary or str(exc)
    return kind(message)


@dataclass(frozen=True, slots=True)
class CaseFilter:
    rule: str | None = None
    severity: str | None = None
    status: str | None = None
    institution: str | None = None
    region: str | None = None  # a prefix: 330000 the province, 330100 the city
    product: str | None = None
    since: datetime.datetime | None = None  # detected at or after
    until: datetime.datetime | None = None  # detected before
    open_only: bool = False

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column in ("rule", "severity", "status", "institution", "product"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"c.{column} = %s")
                args.append(value)
        if self.region is not None:
            clauses.append("c.region LIKE %s")
            args.append(region_scope(self.region) + "%")
        if self.since is not None:
            clauses.append("c.detected_at >= %s")
            args.append(self.since)
        if self.until is not None:
            clauses.append("c.detected_at < %s")
            args.append(self.until)
        if self.open_only:
            clauses.append("c.status <> 'closed'")
        return (" AND ".join(clauses) or "true"), args


_LISTED = (
    "c.alert_id, c.rule, c.severity, c.institution, c.region, c.product, c.code, "
    "c.settlement_id, c.occurred_at, c.detected_at, c.opened_at, c.status, c.withdrawn, "
    "c.closure_reason, c.assignee, c.version, c.updated_at, c.closed_at"
)


def _cursor(row: dict[str, Any]) -> str:
    raw = f"{row['detected_at'].isoformat()}|{row['alert_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str) -> tuple[datetime.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, alert_id = raw.split("|", 1)
        return datetime.datetime.fromisoformat(at), alert_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise MoveRefused(f"not a cursor this API gave: {cursor!r}") from exc


class CaseStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def search(
        self, where: CaseFilter, limit: int = 50, after: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first, `limit` at a time; the cursor of the next page (None: the last)."""
        sql, args = where.where()
        if after is not None:
            at, alert_id = _after(after)
            sql += " AND (c.detected_at, c.alert_id) < (%s, %s)"
            args += [at, alert_id]
        query = (
            f"SELECT {_LISTED} FROM cases c WHERE {sql} "
            "ORDER BY c.detected_at DESC, c.alert_id DESC LIMIT %s"
        )
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query.encode(), [*args, limit + 1])
            rows = await cur.fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (_cursor(rows[-1]) if more and rows else None)

    async def get(self, alert_id: str) -> dict[str, Any]:
        """The case, its alert (last message and last standing one) and its audit trail."""
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {_LISTED}, c.alert, c.standing, c.closure_comment, c.duplicate_of "
                "FROM cases c WHERE c.alert_id = %s".encode(),
                [alert_id],
            )
            case = await cur.fetchone()
            if case is None:
                raise CaseNotFound(f"no case {alert_id}")
            await cur.execute(
                "SELECT at, actor, action, from_status, to_status, reason, detail "
                "FROM case_audit WHERE alert_id = %s ORDER BY id",
                [alert_id],
            )
            case["audit"] = await cur.fetchall()
        return case

    async def move(
        self,
        alert_id: str,
        to: str,
        actor: str,
        reason: str | None,
        closure: str | None = None,
        comment: str | None = None,
        version: int | None = None,
        duplicate_of: str | None = None,
    ) -> dict[str, Any]:
        try:
            async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    f"SELECT {_LISTED} FROM case_transition(%s, %s, %s, %s, %s, %s, %s, %s) c".encode(),
                    [alert_id, to, actor, reason, closure, comment, version, duplicate_of],
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise _refusal(exc) from None
        assert row is not None
        return row

    async def move_all(
        self,
        where: CaseFilter,
        to: str,
        actor: str,
        reason: str | None,
        closure: str | None = None,
        comment: str | None = None,
    ) -> list[str]:
        """Move every case the filter selects that may make this move, in one transaction (one
        audit entry each); returns their ids. Cases that may not (closed already, say) stay."""
        sql, args = where.where()
        query = (
            "SELECT m.alert_id FROM ("
            f" SELECT c.alert_id FROM cases c JOIN case_transitions t"
            "   ON t.from_status = c.status AND t.to_status = %s"
            f" WHERE {sql} AND (t.only_if_closure IS NULL"
            "   OR t.only_if_closure = c.closure_reason)"
            " ORDER BY c.alert_id FOR UPDATE OF c) pick,"
            " LATERAL case_transition(pick.alert_id, %s, %s, %s, %s, %s) m"
        )
        try:
            async with self._pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(query.encode(), [to, *args, to, actor, reason, closure, comment])
                return [r[0] for r in await cur.fetchall()]
        except psycopg.Error as exc:
            raise _refusal(exc) from None

    async def assign(
        self, alert_id: str, assignee: str | None, actor: str, version: int | None = None
    ) -> dict[str, Any]:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "UPDATE cases SET assignee = %s, version = version + 1, updated_at = now() "
                "WHERE alert_id = %s AND (%s::integer IS NULL OR version = %s) "
                f"RETURNING {_LISTED.replace('c.', '')}".encode(),
                [assignee, alert_id, version, version],
            )
            row = await cur.fetchone()
            if row is None:
                await cur.execute("SELECT version FROM cases WHERE alert_id = %s", [alert_id])
                found = await cur.fetchone()
                if found is None:
                    raise CaseNotFound(f"no case {alert_id}")
                raise CaseConflict(
                    f"case {alert_id} changed meanwhile: version {found['version']} now, "
                    f"{version} expected"
                )
            await cur.execute(
                "INSERT INTO case_audit (alert_id, actor, action, reason) "
                "VALUES (%s, %s, 'assign', %s)",
                [alert_id, actor, assignee],
            )
        return row

    async def tallies(
        self,
        since: datetime.datetime,
        until: datetime.datetime,
        deadlines: Deadlines,
        region_scope_: str | None = None,
        institutions: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Per (institution, rule), what the profile and the report count of the cases: alerts
        that occurred in [since, until) and still stand, of them confirmed, oversold units;
        cases opened (the alert detected), closed, and opened but still open in the period;
        open now and overdue (open longer than the deadline of the case's region since its
        alert was detected) now; hours from detection to closure."""
        scope_sql = "true"
        args: list[Any] = []
        if region_scope_ is not None:
            scope_sql = "c.region LIKE %s"
            args.append(region_scope_ + "%")
        if institutions is not None:
            scope_sql += " AND c.institution = ANY(%s)"
            args.append(institutions)
        prefixes, days = deadlines.arrays()
        query = f"""
            SELECT c.institution, c.rule,
              count(*) FILTER (WHERE occurred AND NOT c.withdrawn) AS alerts,
              count(*) FILTER (WHERE occurred AND c.closure_reason = 'confirmed_fraud')
                AS confirmed,
              coalesce(sum(GREATEST(0, LEAST(
                  (c.alert->'evidence'->>'units_dispensed')::numeric,
                  -(c.alert->'evidence'->>'expected_stock_after')::numeric)))
                FILTER (WHERE occurred AND NOT c.withdrawn AND c.rule = 'OVERSOLD'), 0)
                AS oversold_units,
              count(*) FILTER (WHERE opened) AS opened,
              count(*) FILTER (WHERE closed) AS closed,
              count(*) FILTER (WHERE opened AND c.status <> 'closed') AS still_open,
              count(*) FILTER (WHERE c.status <> 'closed') AS open_now,
              count(*) FILTER (WHERE c.status <> 'closed'
                               AND c.detected_at < now() - make_interval(days => d.days))
                AS overdue,
              count(*) FILTER (WHERE closed AND c.closure_reason <> 'withdrawn')
                AS resolved,
              coalesce(sum(extract(epoch FROM c.closed_at - c.detected_at) / 3600)
                FILTER (WHERE closed AND c.closure_reason <> 'withdrawn'), 0)
                AS hours_to_resolve
            FROM cases c
            CROSS JOIN LATERAL (SELECT
                c.occurred_at >= %s AND c.occurred_at < %s AS occurred,
                c.detected_at >= %s AND c.detected_at < %s AS opened,
                c.closed_at >= %s AND c.closed_at < %s AS closed) w
            CROSS JOIN LATERAL (SELECT coalesce((
                SELECT t.d FROM unnest(%s::text[], %s::int[]) AS t(p, d)
                WHERE coalesce(c.region, '') LIKE t.p || '%%'
                ORDER BY length(t.p) DESC LIMIT 1), %s) AS days) d
            WHERE {scope_sql}
            GROUP BY c.institution, c.rule
        """
        period = [since, until] * 3
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query.encode(), [*period, prefixes, days, deadlines.default, *args])
            return await cur.fetchall()

    async def open_by_age(self, institution: str) -> dict[str, int]:
        """The institution's open cases now, by days since opened."""
        query = """
            SELECT CASE WHEN age < interval '1 day' THEN 'under_1_day'
                        WHEN age < interval '7 days' THEN '1_to_7_days'
                        WHEN age < interval '30 days' THEN '7_to_30_days'
                        ELSE 'over_30_days' END AS bucket, count(*) AS n
            FROM (SELECT now() - detected_at AS age FROM cases
                  WHERE institution = %s AND status <> 'closed') a
            GROUP BY bucket
        """
        out = dict.fromkeys(("under_1_day", "1_to_7_days", "7_to_30_days", "over_30_days"), 0)
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query.encode(), [institution])
            for row in await cur.fetchall():
                out[row["bucket"]] = int(row["n"])
        return out

    async def overdue(
        self, deadlines: Deadlines, region_scope_: str, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Open cases of the region past their deadline, oldest first."""
        prefixes, days = deadlines.arrays()
        query = """
            SELECT c.alert_id, c.institution, c.region, c.rule, c.severity, c.status,
                   c.detected_at, d.days AS deadline_days
            FROM cases c
            CROSS JOIN LATERAL (SELECT coalesce((
                SELECT t.d FROM unnest(%s::text[], %s::int[]) AS t(p, d)
                WHERE coalesce(c.region, '') LIKE t.p || '%%'
                ORDER BY length(t.p) DESC LIMIT 1), %s) AS days) d
            WHERE c.region LIKE %s AND c.status <> 'closed'
              AND c.detected_at < now() - make_interval(days => d.days)
            ORDER BY c.detected_at, c.alert_id LIMIT %s
        """
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                query.encode(),
                [prefixes, days, deadlines.default, region_scope_ + "%", limit],
            )
            return await cur.fetchall()


@dataclass(frozen=True)
class Deadlines:
    """How long a lead may stay open (直查快办), per region prefix; the longest prefix that
    matches a case's region decides, `default` otherwise."""

    default: int = 14
    by_prefix: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, default: int, text: str) -> Deadlines:
        """`330100=7,33=10`: Hangzhou 7 days, the rest of Zhejiang 10."""
        pairs = []
        for item in filter(None, (x.strip() for x in text.split(","))):
            region, sep, days = item.partition("=")
            if not sep or not region.strip().isdigit() or not days.strip().isdigit():
                raise ValueError(
                    f"TRACEWATCH_LEAD_DEADLINES: {item!r} is not REGION=DAYS (e.g. 330100=7,33=10)"
                )
            pairs.append((region_scope(region.strip().ljust(6, "0")), int(days)))
        return cls(default, tuple(pairs))

    def arrays(self) -> tuple[list[str], list[int]]:
        return [p for p, _ in self.by_prefix], [d for _, d in self.by_prefix]

    def of(self, region: str | None) -> int:
        best: tuple[int, int] | None = None
        for prefix, days in self.by_prefix:
            if (region or "").startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), days)
        return self.default if best is None else best[1]
