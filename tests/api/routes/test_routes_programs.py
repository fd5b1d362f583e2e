from __future__ import annotations

import api_seed
import pytest
from api_seed import TestClient

# The shared module-scoped fixtures (a seeded DuckDB file and a TestClient).
client = api_seed.client
seeded = api_seed.seeded


def test_programs_list_active_programs_with_profit_split(client: TestClient) -> None:
    response = client.get("/prop/programs")
    assert response.status_code == 200
    body = response.json()
    assert body["total_count"] == 4
    assert body["has_more"] is False
    two_step, one_step, ftmo, topstep = body["items"]
    assert two_step["name"] == "Two-Step Evaluation 100K"
    assert two_step["price"] == "499.00"
    assert two_step["currency"] == "USD"
    assert two_step["profit_split"] == "0.8"
    assert [p["phase_index"] for p in two_step["phases"]] == [0, 1, 2]
    assert [p["phase_type"] for p in two_step["phases"]] == [0, 0, 1]
    assert two_step["phases"][2]["account_group"] == "REAL"
    assert two_step["phases"][0]["rules"]["profit_target"] == 0.08
    assert one_step["price"] == "299.00"
    assert one_step["profit_split"] is None
    # The FTMO and Topstep presets (docs/presets.md), deal rules included.
    assert ftmo["name"].startswith("FTMO ")
    assert ftmo["phases"][0]["rules"]["trading_day_basis"] == "deals"
    assert ftmo["phases"][0]["rules"]["weekend_close"] == "FRI 22:45"
    assert topstep["phases"][0]["rules"]["max_open_lots"] == 5
    assert topstep["phases"][0]["rules"]["total_loss_mode"] == "trailing_eod"


def test_programs_paginate(client: TestClient) -> None:
    first = client.get("/prop/programs", params={"limit": 1}).json()
    second = client.get("/prop/programs", params={"limit": 1, "offset": 3}).json()
    assert (first["total_count"], first["has_more"]) == (4, True)
    assert (second["total_count"], second["has_more"]) == (4, False)
    assert first["items"][0]["id"] != second["items"][0]["id"]


def test_program_by_id(client: TestClient) -> None:
    body = client.get("/prop/programs/2").json()
    assert body["name"] == "One-Step 50K"
    assert body["phases"][0]["rules"]["total_loss_mode"] == "trailing"


@pytest.mark.parametrize("program_id", ["999", "0", "-1", "abc", str(2**63)])
def test_program_missing_or_invalid_id(client: TestClient, program_id: str) -> None:
    response = client.get(f"/prop/programs/{program_id}")
    assert response.status_code in (404, 422)
    error = response.json()["error"]
    if response.status_code == 404:
        assert error["code"] == "not_found"
    else:
        assert error["code"] == "validation_error"
        assert error["details"]["field"] == "program_id"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"offset": -1}, "offset"),
        ({"limit": "x"}, "limit"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_programs_refuse_bad_query(
    client: TestClient, params: dict[str, object], field: str
) -> None:
    response = client.get("/prop/programs", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == field
