"""Property-based API testing from the OpenAPI schema (schemathesis).

Every route, with generated parameters and bodies, as a customer with a session:
no answer may be a server error, and every answer is one the schema documents
(status code, content type, and a body valid against its model, so the bodies
built as dicts in ``api/serialize.py`` cannot drift from ``api/models.py``
unseen). The app runs in process over each store backend with the demo data (a
real DuckDB file, a fresh database on a real PostgreSQL server), the purchase
routes included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pg_support import BACKENDS, fresh_database
from purchase_seed import Shop, make_shop
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.core.config import ApiSettings
from api.main import create_app

#: No server error, and every answer as the schema says: a documented status, its
#: content type and a body valid against its model (responses are typed once).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module", params=BACKENDS)
def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shop]:
    if request.param == "duckdb":
        made = make_shop(tmp_path_factory.mktemp("schema") / "shop.duckdb")
        try:
            yield made
        finally:
            made.conn.close()
        return
    with fresh_database(request.getfixturevalue("pg_server")) as url:
        made = make_shop(url)
        try:
            yield made
        finally:
            made.conn.close()


@pytest.fixture(scope="module")
def api_schema(shop: Shop) -> schemathesis.schemas.BaseSchema:
    app = create_app(
        settings=ApiSettings(db=shop.path, cache_sync_interval_s=0),
        conn=shop.conn,
        phases=shop.engine,
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_routes_answer_as_the_schema_says(
    api_schema: schemathesis.schemas.BaseSchema, shop: Shop
) -> None:
    # schemathesis' own pytest plugin does not run under pytest 9 here, so each
    # operation's case strategy is driven by hypothesis directly.
    headers = {"Authorization": f"Bearer {shop.alice}"}
    operations = [
        result.ok()  # type: ignore[union-attr]  # Err would raise: a bad schema fails
        for result in api_schema.get_all_operations()
    ]
    assert len(operations) >= 15  # every route of api.md is in the schema

    for operation in operations:

        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        check()
