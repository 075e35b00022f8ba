"""Dependency aliases, so that a route's signature reads like what it needs.

Every dependency is `async def`: FastAPI runs a plain `def` one in a worker thread, a
thread hop on every request."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import Depends, Header, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.types import Scope

from crmsync.auth.service import AuthedUser, authenticate, signed_claims
from crmsync.config import Settings
from crmsync.db import Connection, request_connection, request_transaction, upload_transaction
from crmsync.errors import BadRequest, Forbidden, Unauthenticated
from crmsync.pagination import DEFAULT_LIMIT, MAX_LIMIT, MAX_PAGE, PageRequest

# Statements on Conn commit one by one: reads, single-statement writes, and sign-in,
# whose failure count must be committed although the request fails (auth.service.login
# opens a transaction of its own for it). A contact's PUT runs its one statement again
# after a deadlock, which only works outside a transaction: it must stay on Conn. Tx is
# the request's one transaction, committed before the answer leaves; domain code never
# commits on it.
Conn = Annotated[Connection, Depends(request_connection, scope="function")]
Tx = Annotated[Connection, Depends(request_transaction, scope="function")]
# POST /calls: Tx when the upload has an Idempotency-Key, else no transaction for the one
# statement it then is (db.upload_transaction).
UploadTx = Annotated[Connection, Depends(upload_transaction, scope="function")]


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


AppSettings = Annotated[Settings, Depends(get_settings)]


async def raw_body(request: Request) -> bytes:
    """An upload's body, read before any other dependency takes a database connection: a
    phone on a slow network would otherwise hold a pooled connection, in an open
    transaction, for as long as its body took to arrive. Name it first in a signature.
    (Route has already checked that the token is one this server signed.)"""
    return await request.body()


RawBody = Annotated[bytes, Depends(raw_body)]

# Upload headers (POST /contacts/batch, /calls, /sync)
IdempotencyKey = Annotated[
    str | None,
    Header(
        description="1..200 characters; a repeat with the same body gets the first answer",
        json_schema_extra={"minLength": 1, "maxLength": 200},
    ),
]


async def device_id(
    request: Request,
    x_device_id: Annotated[  # read here for the OpenAPI document only
        str | None, Header(description="Stable per-install id, kept on the sync record")
    ] = None,
) -> str | None:
    """As RequestContext read it for the access log: UTF-8, the first 200 characters."""
    device: str | None = request.state.device_id
    return device


DeviceId = Annotated[str | None, Depends(device_id)]


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


async def current_user(request: Request, conn: Conn, settings: AppSettings) -> AuthedUser:
    token = bearer_token(request)
    if token is None:
        raise Unauthenticated("Missing bearer token")
    user = await authenticate(conn, token, secret=settings.secret)
    request.state.user_id = str(user.id)
    return user


CurrentUser = Annotated[AuthedUser, Depends(current_user)]


async def admin_user(user: CurrentUser) -> AuthedUser:
    if not user.is_admin:
        raise Forbidden("Admins only")
    return user


AdminUser = Annotated[AuthedUser, Depends(admin_user)]


async def metrics_reader(request: Request, settings: AppSettings) -> None:
    """GET /metrics, behind a bearer token as every endpoint but login, health and docs:
    CRMSYNC_METRICS_TOKEN (Prometheus' static one), else a signed-in admin's. The static
    one is checked without the database, so a scrape still answers while it is down (and
    crmsync_database_up says so); so is a token's signature, so a wrong token is 401 then,
    not 503."""
    given, token = bearer_token(request), settings.metrics_token
    if given is None:
        raise Unauthenticated("Missing bearer token")
    if token is not None and hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        return
    signed_claims(given, settings.secret)
    if not (await _caller(request)).is_admin:
        raise Forbidden("Metrics are for admins and the metrics token")


async def _caller(request: Request) -> AuthedUser:
    """current_user outside FastAPI's dependencies, on a connection of its own."""
    async with contextlib.asynccontextmanager(request_connection)(request) as conn:
        return await current_user(request, conn, request.app.state.settings)


async def page_request(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    page: Annotated[
        int | None, Query(ge=1, le=MAX_PAGE, description="1-based page number (page mode)")
    ] = None,
    cursor: Annotated[
        str | None, Query(description="next_cursor of a previous answer (a bad one: 400)")
    ] = None,
) -> PageRequest:
    if page is not None and cursor is not None:
        raise BadRequest("Give either page or cursor, not both")
    key: bytes = request.app.state.cursor_key
    return PageRequest(limit=limit, page=page, cursor=cursor, key=key)


Page = Annotated[PageRequest, Depends(page_request)]


class JSONBytes(Response):
    """An answer whose JSON PostgreSQL already built."""

    media_type = "application/json"


class StrictJSONRequest(Request):
    """Parses a body as strict JSON: NaN, Infinity, a BOM or a lone surrogate is malformed
    JSON (400 bad_request), as in the batch endpoints, where Python's json module accepts
    them and validation would answer 422."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())  # JSONDecodeError: FastAPI's 400
        return self._json

    async def is_malformed(self) -> bool:
        """Whether the body is there and no JSON (an empty one is a missing body: a 422)."""
        if not await self.body():
            return False
        try:
            await self.json()
        except orjson.JSONDecodeError:
            return True
        return False


# Every body is JSON whatever its Content-Type says (none, text/plain, a form type): one
# rule for every endpoint, as for the uploads, which read their bytes themselves. FastAPI
# would read a body typed otherwise as bytes, and answer a puzzling 422. (Its strictness
# guards cookie sessions from cross-site forms; a bearer token is never sent by a browser
# on its own.)
_JSON_TYPE = (b"content-type", b"application/json")


def _drop_empty_query_values(scope: Scope) -> None:
    """`?user_id=&since=&limit=`, as the contract writes its filters: an empty value is the
    parameter left out (no filter, the default), not a 422 for an empty UUID or number."""
    query: bytes = scope["query_string"]
    if query:
        parts = query.split(b"&")
        kept = [part for part in parts if part.partition(b"=")[2]]
        if len(kept) < len(parts):
            scope["query_string"] = b"&".join(kept)


def _needs(dependant: Dependant, dependency: Callable[..., Any]) -> bool:
    return any(d.call is dependency or _needs(d, dependency) for d in dependant.dependencies)


class Route(APIRoute):
    """Every crmsync route: bodies read as JSON, parsed by StrictJSONRequest, and on a route
    that needs a token only once the token is one this server signed (checked without the
    database; current_user checks the rest). So a stranger's megabytes are never read, and
    a signed-out app sending a malformed body learns 401, not 400.

    FastAPI parses a body before it solves the dependencies that check the token in the
    database (revoked, its user deleted) and the caller's role. So on a route with a
    model body, a malformed one is answered here, after those checks: 401, then 403 on an
    admin's route, then 400. (The uploads parse their bodies in the handler.)"""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs_token = _needs(self.dependant, current_user)
        needs_admin = _needs(self.dependant, admin_user)
        parses_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            _drop_empty_query_values(request.scope)
            if request.method in ("GET", "DELETE"):
                return await handler(request)
            if needs_token:
                token = bearer_token(request)
                if token is None:
                    raise Unauthenticated("Missing bearer token")
                signed_claims(token, request.app.state.settings.secret)
            scope = request.scope
            scope["headers"] = [
                *(h for h in scope["headers"] if h[0] != b"content-type"),
                _JSON_TYPE,
            ]
            json_request = StrictJSONRequest(scope, request.receive)
            if needs_token and parses_body and await json_request.is_malformed():
                user = await _caller(json_request)
                if needs_admin:
                    await admin_user(user)
                raise BadRequest("Malformed JSON body")
            return await handler(json_request)

        return strict
