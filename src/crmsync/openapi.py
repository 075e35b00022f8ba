"""The OpenAPI document: FastAPI's, plus what FastAPI cannot know about our errors.

Every operation gets its problem+json answers (RFC 9457, with the contract's `code`s),
the bearer scheme where a token is needed, and no trace of FastAPI's own 422 schema.
`python -m crmsync.openapi` prints it (`make openapi` writes docs/openapi.json).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from crmsync.middleware import BODY_IDLE_TIMEOUT

PUBLIC = {("post", "/auth/login"), ("get", "/healthz"), ("get", "/readyz")}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details. Switch on `code`, never on `detail`.",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "example": "about:blank"},
        "title": {"type": "string", "example": "Unprocessable Content"},
        "status": {"type": "integer", "example": 422},
        "detail": {"type": "string", "example": "Request validation failed"},
        "code": {"type": "string", "example": "validation_error"},
        "errors": {
            "type": "array",
            "description": "422 only: what failed, where",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
        "contact": {
            "$ref": "#/components/schemas/ContactOut",
            "description": "409 phone_taken only: the contact that has the number",
        },
    },
}

ERRORS: dict[str, tuple[str, str]] = {
    "400": ("bad_request", "Malformed JSON, a bad cursor, or page together with cursor"),
    "401": (
        "unauthenticated",
        "Missing, malformed, expired, revoked or forged token; deleted user",
    ),
    "403": ("forbidden", "Signed in but not allowed; or https_required for plain HTTP"),
    "404": ("not_found", "Unknown id (a malformed id counts as unknown)"),
    "408": (
        "request_timeout",
        f"The body stopped arriving for {BODY_IDLE_TIMEOUT:g} s; the connection is closed."
        " Resend the request",
    ),
    "413": ("payload_too_large", "Body over the size limit, or a batch over its item limit"),
    "415": ("unsupported_media_type", "A Content-Encoding other than gzip (or none)"),
    "422": ("validation_error", "Body or query fails validation; `errors` says where"),
    "429": ("too_many_attempts", "Too many failed logins; wait Retry-After seconds"),
    "500": ("internal_error", "A server bug, logged with the answer's X-Request-ID"),
    "503": (
        "unavailable",
        "The database is unreachable, restarting or out of connections, or a concurrent write"
        " made PostgreSQL roll this one back; retry with backoff (uploads: the same"
        " Idempotency-Key)",
    ),
}


# Where a status means something else on one operation than everywhere else.
OPERATION_ERRORS: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("post", "/auth/login"): {
        "401": ("invalid_credentials", "Unknown email or wrong password (one answer for both)"),
        "403": ("https_required", "Plain HTTP where HTTPS is enforced"),
    },
    ("get", "/readyz"): {"403": ("https_required", "Plain HTTP where HTTPS is enforced")},
    ("get", "/metrics"): {
        "401": ("unauthenticated", "Neither the metrics token nor a valid user token"),
        "403": ("forbidden", "A user who is not an admin; or https_required"),
    },
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}


# On an upload's answer (the operations taking an Idempotency-Key)
IDEMPOTENT_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the answer stored for an earlier request with the "
        "same Idempotency-Key and body: nothing was stored now (absent otherwise)",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def problem_answer(description: str) -> dict[str, Any]:
    """An error answer for a route's `responses`: problem+json, as every error is."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {"application/problem+json": {"schema": schema}}}


def _problem(status: str, method: str, path: str) -> dict[str, Any]:
    code, text = OPERATION_ERRORS.get((method, path), {}).get(status) or ERRORS[status]
    answer = problem_answer(f"`{code}`: {text}")
    if status in ("429", "503"):
        answer["headers"] = RETRY_AFTER
    return answer


def _statuses(method: str, path: str, operation: dict[str, Any]) -> list[str]:
    statuses = ["500", "503"]
    if (method, path) not in PUBLIC:
        statuses += ["401", "403"]
    elif "403" in OPERATION_ERRORS.get((method, path), {}):
        statuses.append("403")
    if "{" in path:
        statuses.append("404")
    params = operation.get("parameters", [])
    if "requestBody" in operation or any(p.get("in") == "query" for p in params):
        statuses += ["400", "422"]
    if "requestBody" in operation:
        statuses += ["408", "413", "415"]
    if (method, path) == ("post", "/auth/login"):
        statuses += ["401", "429"]
    return statuses


def build(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if "Problem" in schemas:  # it would describe every error answer, all of them wrong
        raise RuntimeError("a model named Problem clashes with the problem+json schema")
    schemas["Problem"] = PROBLEM_SCHEMA
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            statuses = _statuses(method, path, operation)
            if "422" not in statuses:
                responses.pop("422", None)  # a malformed path id answers 404 here
            for status in statuses:
                existing = responses.get(status)
                problem = _problem(status, method, path)
                if existing is None or "HTTPValidationError" in json.dumps(existing):
                    responses[status] = problem
                else:
                    existing["content"] = problem["content"]
                    if "headers" in problem:
                        existing["headers"] = problem["headers"]
            params = operation.get("parameters", [])
            if (
                any(p.get("name", "").lower() == "idempotency-key" for p in params)
                and "200" in responses
            ):
                responses["200"].setdefault("headers", {}).update(IDEMPOTENT_REPLAYED)
            if (method, path) not in PUBLIC:
                operation["security"] = [{"bearer": []}]
    return spec


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def main() -> None:
    from crmsync.config import Settings
    from crmsync.main import create_app

    app = create_app(Settings(database_url="postgresql://unused/unused", jwt_secret="x" * 32))
    print(json.dumps(app.openapi(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
