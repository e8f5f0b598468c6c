"""Schemathesis against `/openapi.json`: generated requests (bounded) never get a 500, and every
answer has a status, content type and body the document declares. The API has its case store,
so the case, institution and report routes answer from a real PostgreSQL; requests go as an
institution and as an inspector."""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import Api

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("TRACEWATCH_SCHEMA_EXAMPLES", "30"))


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.mark.parametrize("who", ["P1", "zhejiang"])
def test_generated_requests_get_documented_answers(
    api_with_cases: tuple[Api, str], who: str
) -> None:
    """Every operation in the document, with generated parameters and bodies (schemathesis's
    pytest plugin does not run under this pytest; its strategies are driven directly)."""
    api, _ = api_with_cases
    document = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {api.tokens[who]}"}
    operations = []
    for result in document.get_all_operations():
        assert isinstance(result, Ok), f"the document has an unusable operation: {result.err()}"
        operations.append(result.ok())
    assert len(operations) >= 5
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        run()
