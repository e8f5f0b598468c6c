"""The case store on a real PostgreSQL: migrations, the workflow the database enforces, the
audit trail, concurrent moves, filters and pages, bulk moves, and what the stream's messages do."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from cases import workflow
from cases.schema import MigrationError, migrate, migrations
from cases.store import CaseConflict, CaseFilter, CaseNotFound, CaseStore, MoveRefused
from tests.cases.conftest import alert, record, with_store


def _audit(url: str, alert_id: str) -> list[tuple[str, str | None, str | None]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT action, from_status, to_status FROM case_audit WHERE alert_id = %s ORDER BY id",
            (alert_id,),
        ).fetchall()
    return [(a, f, t) for a, f, t in rows]


def test_migrations_apply_from_empty_once_and_refuse_an_edited_file(database: str) -> None:
    with psycopg.connect(database) as conn:
        assert migrate(conn) == []  # the fixture applied them
        version, name, _sql = migrations()[0]
        conn.execute("UPDATE schema_migrations SET sha256 = 'x' WHERE version = %s", (version,))
        conn.commit()
        with pytest.raises(MigrationError, match=name):
            migrate(conn)


def test_the_database_and_the_code_agree_on_the_workflow(database: str) -> None:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT from_status, to_status, reason_required FROM case_transitions"
        ).fetchall()
    assert {(f, t): r for f, t, r in rows} == workflow.TRANSITIONS


def test_moves_the_workflow_allows_and_refuses(database: str) -> None:
    record(database, alert(1), alert(2))
    a, b = f"{1:024x}", f"{2:024x}"

    async def body(store: CaseStore) -> None:
        with pytest.raises(MoveRefused, match="needs a reason"):
            await store.move(a, "seen", "insp1", None)
        with pytest.raises(MoveRefused, match="not allowed"):
            await store.move(a, "escalated", "insp1", "skip ahead")
        moved = await store.move(a, "investigating", "insp1", None)  # no reason needed
        assert moved["status"] == "investigating" and moved["version"] == 2
        with pytest.raises(MoveRefused, match="closure reason"):
            await store.move(a, "closed", "insp1", "done")
        with pytest.raises(MoveRefused):
            await store.move(a, "closed", "insp1", "done", closure="made_up")
        with pytest.raises(MoveRefused):  # `other` needs a comment
            await store.move(a, "closed", "insp1", "done", closure="other")
        with pytest.raises(MoveRefused):  # at most 500 characters
            await store.move(a, "closed", "insp1", "done", closure="other", comment="x" * 501)
        with pytest.raises(MoveRefused):  # a duplicate names the case it duplicates
            await store.move(
                a, "closed", "insp1", "dup", closure="duplicate", duplicate_of="f" * 24
            )
        closed = await store.move(
            a, "closed", "insp1", "same box as the other", closure="duplicate", duplicate_of=b
        )
        assert closed["status"] == "closed" and closed["closure_reason"] == "duplicate"
        with pytest.raises(MoveRefused, match="reopens"):  # closed by a person: final
            await store.move(a, "new", "insp1", "reopen")
        with pytest.raises(CaseNotFound):
            await store.move("0" * 24, "seen", "insp1", "x")
        case = await store.get(a)
        assert [e["action"] for e in case["audit"]] == ["opened", "transition", "transition"]
        assert case["audit"][-1]["detail"] == {"closure_reason": "duplicate", "duplicate_of": b}

    with_store(database, body)


def test_status_and_audit_cannot_be_changed_behind_the_workflow(database: str) -> None:
    record(database, alert(1))
    with psycopg.connect(database) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="case_transition"):
            conn.execute("UPDATE cases SET status = 'escalated'")
        conn.rollback()
        for statement in ("UPDATE case_audit SET actor = 'x'", "DELETE FROM case_audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
            conn.rollback()


def test_two_inspectors_cannot_both_move_one_case(database: str) -> None:
    record(database, alert(1))
    a = f"{1:024x}"

    async def body(store: CaseStore) -> None:
        seen = (await store.get(a))["version"]
        results = await asyncio.gather(
            store.move(a, "closed", "insp1", "scanner", closure="scanner_fault", version=seen),
            store.move(a, "investigating", "insp2", None, version=seen),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["CaseConflict", "dict"]
        with pytest.raises(CaseConflict):
            await store.assign(a, "insp3", "lead", version=seen)
        assert len((await store.get(a))["audit"]) == 2  # opened + the one move that won

    with_store(database, body)


def test_withdrawals_close_and_a_raised_alert_reopens_only_what_the_stream_closed(
    database: str,
) -> None:
    a, b = alert(1), alert(2)
    withdrawn = {**a, "status": "withdrawn", "evidence": {"why": "the earlier sale was returned"}}
    record(database, a, b, withdrawn)

    async def body(store: CaseStore) -> None:
        case = await store.get(a["alert_id"])  # type: ignore[arg-type]
        assert (case["status"], case["closure_reason"], case["withdrawn"]) == (
            "closed",
            "withdrawn",
            True,
        )
        assert case["standing"]["evidence"] == {"line_no": 1}  # the standing message kept
        await store.move(b["alert_id"], "closed", "insp", "fraud", closure="confirmed_fraud")  # type: ignore[arg-type]

    with_store(database, body)
    record(database, a, {**b, "status": "withdrawn"}, b)  # a raised again; b withdrawn, raised
    assert _audit(database, a["alert_id"])[-1] == ("transition", "closed", "new")  # type: ignore[arg-type]
    assert _audit(database, b["alert_id"]) == [  # type: ignore[arg-type]
        ("opened", None, "new"),
        ("transition", "new", "closed"),
    ]
    with psycopg.connect(database) as conn:
        status: dict[str, str] = dict(conn.execute("SELECT alert_id, status FROM cases").fetchall())
    assert status == {a["alert_id"]: "new", b["alert_id"]: "closed"}  # a person's closure stands


def test_lists_filter_and_page_newest_first(database: str) -> None:
    record(database, *(alert(n, institution="P1" if n % 2 else "P2") for n in range(1, 8)))
    record(database, alert(9, institution="H9"), region="110101")

    async def body(store: CaseStore) -> None:
        got, cursor, pages = [], None, 0
        while True:
            rows, cursor = await store.search(CaseFilter(region="330000"), limit=3, after=cursor)
            got += rows
            pages += 1
            if cursor is None:
                break
        assert pages == 3 and len(got) == 7
        assert [r["detected_at"] for r in got] == sorted(
            (r["detected_at"] for r in got), reverse=True
        )
        mine, _ = await store.search(CaseFilter(institution="P2"))
        assert {r["institution"] for r in mine} == {"P2"} and len(mine) == 3
        with pytest.raises(MoveRefused, match="cursor"):
            await store.search(CaseFilter(), after="not-a-cursor")

    with_store(database, body)


def test_a_bulk_close_moves_every_case_it_selects_with_an_audit_entry_each(database: str) -> None:
    record(database, *(alert(n, rule="INVALID_CODE") for n in range(1, 5)), alert(5))
    first = f"{1:024x}"

    async def body(store: CaseStore) -> None:
        await store.move(first, "closed", "insp", "fraud", closure="confirmed_fraud")
        moved = await store.move_all(
            CaseFilter(rule="INVALID_CODE", institution="P1"),
            "closed",
            "insp",
            "the scanner at counter 2 was faulty",
            closure="scanner_fault",
        )
        assert sorted(moved) == [f"{n:024x}" for n in range(2, 5)]  # the closed one stays
        with pytest.raises(MoveRefused, match="needs a reason"):
            await store.move_all(CaseFilter(rule="DUPLICATE_SALE"), "seen", "insp", None)
        assert (await store.get(f"{5:024x}"))["status"] == "new"  # nothing half done

    with_store(database, body)
    for n in range(2, 5):
        assert _audit(database, f"{n:024x}") == [
            ("opened", None, "new"),
            ("transition", "new", "closed"),
        ]
