"""The OpenAPI document describes every endpoint fully and docs/openapi.json is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from crmsync import openapi
from tests.conftest import api_routes

DOC = Path(__file__).parent.parent / "docs" / "openapi.json"


def test_docs_openapi_json_is_up_to_date() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "crmsync.openapi"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(generated) == json.loads(DOC.read_text()), "run `make openapi`"


async def test_every_operation_is_described(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    missing = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            if not op.get("summary") or not op.get("tags"):
                missing.append(f"{where}: summary/tags")
            responses = op["responses"]
            ok = [s for s in responses if s.startswith("2")]
            if not ok:
                missing.append(f"{where}: no success answer")
            for status in ok:
                json_answer = responses[status].get("content", {}).get("application/json", {})
                if status != "204" and path != "/metrics" and not json_answer.get("schema"):
                    missing.append(f"{where}: {status} has no JSON schema")
            problems = [s for s in responses if s[0] in "45"]
            for status in problems:
                if "application/problem+json" not in responses[status].get("content", {}):
                    missing.append(f"{where}: {status} is not problem+json")
            if "500" not in responses:
                missing.append(f"{where}: no 500 problem")
            if method in ("post", "put", "patch") and path not in ("/auth/logout",):
                body = op.get("requestBody", {}).get("content", {}).get("application/json")
                if body is None:
                    missing.append(f"{where}: no request schema")
    assert not missing, "\n".join(missing)
    assert "HTTPValidationError" not in json.dumps(spec)


async def test_every_route_of_the_app_is_in_the_document(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    documented = {(m.upper(), path) for path, item in spec["paths"].items() for m in item}
    served = {
        (method, route.path_format)
        for route in api_routes(client.app)  # type: ignore[attr-defined]
        for method in route.methods - {"HEAD"}
    }
    assert served - documented == set()
    assert len(served) >= 23


def test_a_model_named_problem_cannot_shadow_the_problem_json_schema() -> None:
    # It once did: the calls' item errors were a model named Problem, and the document's
    # Problem schema replaced it, so POST /calls' 200 described its errors as problem+json.
    class Problem(BaseModel):
        loc: list[str]

    app = FastAPI()

    @app.get("/x", response_model=Problem)
    def x() -> Problem:
        return Problem(loc=[])

    with pytest.raises(RuntimeError, match="clashes"):
        openapi.build(app)


async def test_rejected_items_errors_are_described_as_item_problems(
    client: httpx.AsyncClient,
) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("RejectedItem", "ContactResultOut"):
        errors = json.dumps(schemas[name]["properties"]["errors"])
        assert "#/components/schemas/ItemProblem" in errors, name
    assert set(schemas["ItemProblem"]["properties"]) == {"loc", "msg", "type"}


async def test_codes_and_headers_are_described_where_they_differ(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    login = paths["/auth/login"]["post"]["responses"]
    assert login["401"]["description"].startswith("`invalid_credentials`")
    assert login["403"]["description"].startswith("`https_required`")
    assert paths["/auth/me"]["get"]["responses"]["401"]["description"].startswith(
        "`unauthenticated`"
    )
    assert "Retry-After" in login["429"]["headers"]
    for path, item in paths.items():
        for method, op in item.items():
            assert "Retry-After" in op["responses"]["503"].get("headers", {}), (method, path)
    contact = paths["/contacts/{contact_id}"]
    for method in ("get", "put"):
        assert "ETag" in contact[method]["responses"]["200"]["headers"], method


async def test_an_upload_answer_describes_idempotent_replayed(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/calls", "/contacts/batch", "/sync"):
        headers = paths[path]["post"]["responses"]["200"]["headers"]
        assert headers["Idempotent-Replayed"]["schema"]["enum"] == ["true"], path
