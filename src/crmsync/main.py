"""The application: lifespan, routers, error handlers, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from crmsync import __version__, balance, db, openapi
from crmsync.auth import service as auth_service
from crmsync.auth.routes import router as auth_router
from crmsync.calls import service as calls_service
from crmsync.calls.routes import router as calls_router
from crmsync.config import SUPERVISOR_ENV, WORKERS_DIR_ENV, Settings
from crmsync.contacts import service as contacts_service
from crmsync.contacts.routes import router as contacts_router
from crmsync.deps import metrics_reader
from crmsync.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NoSuchRoute,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
)
from crmsync.middleware import BodyLimit, GzipWhenAsked, HeadAsGet, HttpsGuard, Peers
from crmsync.observability import RequestContext, metrics_response, sample_pool
from crmsync.sync import service as sync_service
from crmsync.sync.routes import router as sync_router
from crmsync.users.routes import router as users_router

log = logging.getLogger(__name__)

# Maintenance rounds: one at start-up, then every few seconds, so that the row_counts
# deltas a page-mode total sums stay few even under saturating uploads (hundreds a second);
# every round also relinks the calls that raced a contact written in the last seconds
# (calls.service.QUICK_RELINK_WINDOW). Every RELINK_EVERY-th round (a minute) relinks in
# full (calls.service.RELINK_WINDOW), and every PRUNE_EVERY-th (an hour) prunes; start-up
# does both, so a server that never runs an hour still prunes.
ROUND_INTERVAL_SECONDS = 5
RELINK_EVERY = 12
PRUNE_EVERY = 720

# Fold the deltas the count triggers append into one row per name (and, for calls, per
# user and direction); nothing to do (and no write) when each has one row. Rows a
# concurrent transaction appends are not in this statement's snapshot: they stay, and
# still count.
COMPACT_ROW_COUNTS = """
WITH folded AS (
    DELETE FROM row_counts
    WHERE EXISTS (SELECT FROM row_counts GROUP BY name, user_id, direction HAVING count(*) > 1)
    RETURNING name, user_id, direction, n
)
INSERT INTO row_counts (name, user_id, direction, n)
SELECT name, user_id, direction, sum(n) FROM folded GROUP BY name, user_id, direction"""

DESCRIPTION = """Contacts and call logs of a team's Android phones, synced to one shared
phone book. Every error is RFC 9457 problem+json with a stable `code`.
See docs/mobile.md for the sync algorithm."""


def problem(error: ApiError) -> Response:
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status,
        media_type="application/problem+json",
        headers=error.headers,
    )


def _pydantic_errors(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if exc.status == 503:  # busy or briefly unavailable: not a bug
        log.warning("unavailable: %s", exc.detail)
    elif exc.status >= 500:
        log.error("server error: %s", exc.detail)
    return problem(exc)


async def on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = _pydantic_errors(exc.errors())
    if any(e["type"] == "json_invalid" for e in errors):
        return problem(BadRequest("Malformed JSON body"))
    if errors and all(e["loc"][:1] == ["path"] for e in errors):
        return problem(NotFound("No such resource"))  # a malformed id is an unknown id
    # A malformed id beside a bad body: the body's errors alone, the 422 a well-formed
    # unknown id with that body gets (bodies are validated before ids are looked up).
    return problem(ValidationFailed([e for e in errors if e["loc"][:1] != ["path"]]))


def _allowed_methods(request: Request) -> str:
    """Every method some route answers at this path, for a 405's Allow (RFC 9110). Starlette's
    own names only the first route matching the path (`/contacts`: GET, not POST)."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]
    if "GET" in allowed:
        allowed.insert(1, "HEAD")  # middleware.HeadAsGet
    return ", ".join(allowed)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ApiError):
        return problem(exc.__cause__)
    if exc.status_code == 404:
        return problem(NoSuchRoute("No such route: check the path (a trailing slash is another)"))
    if exc.status_code == 405:
        error: ApiError = MethodNotAllowed(f"{request.method} is not allowed here")
        error.headers["Allow"] = _allowed_methods(request)
        return problem(error)
    if exc.status_code == 400:
        return problem(BadRequest(str(exc.detail)))
    error = ApiError(str(exc.detail))
    error.status = exc.status_code  # type: ignore[misc]
    return problem(error)


# The database cannot serve this request now, through no fault of the request: unreachable
# or gone mid-request, out of resources (class 53: connections, memory, disk), stopped or
# cancelled by its operator or a timeout (class 57: shutdown, starting up, statement
# timeout), failing below PostgreSQL (class 58: I/O), or read-only for writes (25006: a hot
# standby, or a primary being demoted in a failover). asyncpg's InternalClientError is a
# pooled connection whose backend was ended while idle, picked up as the news arrived.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.PostgresSystemError,
)


async def on_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable: %r", exc)
    return problem(ServiceUnavailable("The database is unavailable; retry shortly", retry_after=5))


async def on_rolled_back(request: Request, exc: Exception) -> Response:
    """PostgreSQL ended the request's transaction to break a deadlock or a serialization
    conflict with another writer: nothing of it was stored, and a retry will succeed."""
    log.warning("transaction rolled back by PostgreSQL: %r", exc)
    return problem(
        ServiceUnavailable(
            "A concurrent write conflicted with this one; nothing was stored; retry",
            retry_after=1,
        )
    )


async def maintain(
    conn: db.Connection,
    *,
    prune: bool,
    idempotency_ttl_days: int,
    login_window_seconds: int,
    sync_record_retention_days: int | None = None,
    full_relink: bool = True,
) -> bool:
    """One maintenance round, in one transaction; False when another process (worker or
    machine) is running one: every process starts a round on its own timer, and they take
    turns, never two at once. A pruning round then deletes what has expired, in batches
    that commit one by one (db.delete_in_batches), after the round's transaction: a
    backlog never rolls back the round, and the round's locks are not held while it goes."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", db.MAINTENANCE_LOCK_ID):
            return False
        await conn.execute(COMPACT_ROW_COUNTS)
        linked = await calls_service.call_relink(conn, full=full_relink)
        if linked:
            log.info("maintenance linked %d calls to contacts created while they uploaded", linked)
    if prune:
        await auth_service.auth_prune(conn, login_window_seconds=login_window_seconds)
        await db.delete_in_batches(
            conn,
            "idempotency_keys",
            "t.created_at < now() - make_interval(days => $1)",
            idempotency_ttl_days,
            oldest_first="t.created_at",
        )
        if sync_record_retention_days is not None:
            await sync_service.sync_record_prune(conn, retention_days=sync_record_retention_days)
    return True


async def _maintenance(pool: db.Pool, settings: Settings) -> None:
    rounds = 0
    while True:
        try:
            async with pool.acquire() as conn:
                await maintain(
                    conn,
                    full_relink=rounds % RELINK_EVERY == 0,
                    prune=rounds % PRUNE_EVERY == 0,
                    idempotency_ttl_days=settings.idempotency_ttl_days,
                    login_window_seconds=settings.login_window_seconds,
                    sync_record_retention_days=settings.sync_record_retention_days,
                )
        except _UNAVAILABLE as exc:  # one line per round while the database is away
            log.warning("maintenance skipped, database unavailable: %r", exc)
        except Exception:
            log.exception("maintenance failed")
        rounds += 1
        await asyncio.sleep(ROUND_INTERVAL_SECONDS)


_PR_SET_PDEATHSIG = 1


def exit_with_the_supervisor() -> None:
    """In a worker of `crmsync serve --workers N`: ask Linux for a SIGTERM (a graceful
    stop) when the supervisor dies, even by kill -9. Orphaned workers went on serving the
    port, with no one left to watch the embedded PostgreSQL, and a new `serve` could not
    bind it."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or 0)
    if not supervisor or supervisor == os.getpid() or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _tune_gc() -> None:
    """What start-up made (modules, routes, schemas) lives as long as the process: freeze
    it out of the collector's sight, and collect the young generation every 50,000
    allocations rather than every 700. Under load this is ~20% more requests per second
    and a shorter latency tail (GET /auth/me, one worker, wrk -c32)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


# How long a starting worker waits for the database; see _open_pool.
STARTUP_WAIT_SECONDS = 30.0


async def _open_pool(
    url: str, settings: Settings, cursor_key: bytes
) -> tuple[db.Pool, contacts_service.Feed]:
    """The worker's pool, and the changes feed's identity read through it. A worker started
    while the database is away (uvicorn replaces one that died, an OOM kill took PostgreSQL
    too, a failover) waits for it, up to STARTUP_WAIT_SECONDS: uvicorn's supervisor takes a
    worker that fails to start for a broken app and stops the whole server (`serve` then
    exits 3, see cli._Supervisor)."""
    deadline = time.monotonic() + STARTUP_WAIT_SECONDS
    while True:
        try:
            pool = await db.create_pool(url, settings)
            try:
                async with pool.acquire() as conn:
                    return pool, await contacts_service.contact_feed(conn, cursor_key)
            except BaseException:
                pool.terminate()
                raise
        except _UNAVAILABLE as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("starting: database unavailable, trying again in 1 s: %r", exc)
            await asyncio.sleep(1)


def create_app(settings: Settings | None = None, *, maintenance: bool = True) -> FastAPI:
    """The app; `maintenance=False` leaves the maintenance rounds to the caller (tests run
    `maintain` themselves, at the moment they mean to)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        exit_with_the_supervisor()  # also while waiting for the database
        url = await asyncio.to_thread(db.database_url, settings)
        app.state.pool, app.state.changes_feed = await _open_pool(
            url, settings, app.state.cursor_key
        )
        app.state.probe = db.DatabaseProbe(url)
        app.state.pool_gate = asyncio.Semaphore(settings.pool_max_size)
        app.state.login_gate = asyncio.Semaphore(db.LOGIN_SLOTS)
        background = [asyncio.create_task(sample_pool(app.state.pool, app.state.probe))]
        if maintenance:
            background.append(asyncio.create_task(_maintenance(app.state.pool, settings)))
        if workers_dir := os.environ.get(WORKERS_DIR_ENV):
            background.append(asyncio.create_task(balance.keep_balanced(Path(workers_dir))))
        _tune_gc()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await app.state.probe.close()
            await app.state.pool.close()

    app = FastAPI(
        title="crmsync",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # `/contacts/` is an unknown path (404 problem), not an empty 307 to a URL built
        # from the Host header that OkHttp would follow, body and all.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.cursor_key = hashlib.sha256(b"cursor:" + settings.secret.encode()).digest()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for unavailable in _UNAVAILABLE:
        app.add_exception_handler(unavailable, on_unavailable)
    app.add_exception_handler(asyncpg.TransactionRollbackError, on_rolled_back)

    # Answers of 1 KiB and more gzipped for clients that ask (OkHttp always does, and
    # unpacks them itself): a page of 50 contacts goes from 15 to 3 KB for ~0.1 ms of CPU.
    # Behind nginx or Caddy, which compress too, they pass as they are.
    app.add_middleware(GzipWhenAsked, minimum_size=1024, compresslevel=4)
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        HttpsGuard, peers=Peers(settings.trusted_proxies), require_https=settings.require_https
    )
    app.add_middleware(RequestContext)

    @app.get("/healthz", tags=["operations"], summary="The process is running")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="The database answers",
        response_model=dict[str, str],
        responses={503: {"description": "The database does not answer"}},
    )
    async def readyz(request: Request) -> Response:
        # Within 1.5 s, whatever the database does: a frozen one (a hung host, a stopped
        # process) never answers, and a load balancer needs its answer now.
        probe: db.DatabaseProbe = request.app.state.probe
        if not await probe.answers(within=1.5):
            return problem(ServiceUnavailable("The database does not answer", retry_after=5))
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        description="`Authorization: Bearer <CRMSYNC_METRICS_TOKEN>` (for Prometheus), or "
        "a signed-in admin's token.",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        dependencies=[Depends(metrics_reader)],
    )
    def metrics(request: Request) -> Response:
        return metrics_response(request)

    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(contacts_router)
    app.include_router(calls_router)
    app.include_router(sync_router)
    openapi.install(app)
    return app
