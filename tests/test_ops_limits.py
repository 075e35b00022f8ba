"""Operations: a statement_timeout guards every query on the server's connections,
requests get connections first come, first served, an upload takes one only once its
body is in, and sign-ins take only a few."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import tracemalloc
import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from crmsync import db
from crmsync.auth import service as auth_service
from tests.calls.test_upload import call
from tests.conftest import (
    Account,
    assert_problem,
    every_place_taken,
    free_port,
    make_app,
    make_settings,
    serving,
)


async def test_statement_timeout_cancels_a_long_query(database_url: str) -> None:
    pool = await db.create_pool(database_url, make_settings(database_url, statement_timeout_ms=200))
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "200ms"
            # A transaction left open (a stuck request) ends after a minute, its locks freed.
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
            started = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
                await conn.fetchval("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 4  # 0.2 s, not the 5 s asked for
            assert await conn.fetchval("SELECT 1") == 1  # the connection stays usable
    finally:
        await pool.close()


async def test_requests_run_read_committed_whatever_the_servers_default(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The request SQL counts on READ COMMITTED (a conflicting writer's row is waited for and
    then seen, not a serialization error): a DBA's default of REPEATABLE READ or
    SERIALIZABLE for the database does not change it."""
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(
        f'ALTER DATABASE "{database}" SET default_transaction_isolation = serializable'
    )
    try:
        pool = await db.create_pool(database_url, make_settings(database_url))
        try:
            async with pool.acquire() as pooled, pooled.transaction():
                assert await pooled.fetchval("SHOW transaction_isolation") == "read committed"
        finally:
            await pool.close()
        outside = await asyncpg.connect(database_url)  # the setting took
        try:
            assert await outside.fetchval("SHOW transaction_isolation") == "serializable"
        finally:
            await outside.close()
    finally:
        await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_isolation')


def test_statement_timeout_0_is_no_limit_on_the_client_either() -> None:
    """0 is PostgreSQL's "no limit": asyncpg's own timeout must not cap statements then; else
    it stays past the server's, so the server's cancel is what a slow statement meets."""
    assert db.command_timeout(0) is None
    assert db.command_timeout(30_000) == 35
    assert db.command_timeout(200) == 10


async def test_requests_get_connections_in_arrival_order(database_url: str) -> None:
    settings = make_settings(database_url, pool_min_size=1, pool_max_size=1)
    pool = await db.create_pool(database_url, settings)
    state = SimpleNamespace(pool=pool, pool_gate=asyncio.Semaphore(1))
    request: Any = SimpleNamespace(app=SimpleNamespace(state=state))
    order: list[str] = []

    async def use(name: str, hold: asyncio.Event | None = None) -> None:
        connections = db.request_connection(request)
        conn = await anext(connections)
        order.append(name)
        await conn.fetchval("SELECT 1")
        if hold is not None:
            await hold.wait()
        await connections.aclose()

    try:
        release = asyncio.Event()
        first = asyncio.create_task(use("first", release))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(use("waiting"))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.sleep(0)  # the connection is being given back...
        late = asyncio.create_task(use("late"))  # ...when a new request arrives
        await asyncio.gather(first, waiting, late)
        assert order == ["first", "waiting", "late"]
    finally:
        await pool.close()


async def test_a_pool_smaller_than_the_default_minimum_still_opens(database_url: str) -> None:
    """CRMSYNC_POOL_MAX_SIZE=1 alone is a valid setting: the minimum follows it down."""
    pool = await db.create_pool(database_url, make_settings(database_url, pool_max_size=1))
    try:
        assert pool.get_max_size() == 1
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("path", ["/calls", "/contacts/batch", "/sync"])
async def test_an_upload_holds_no_connection_while_its_body_arrives(
    database_url: str, user: Account, path: str
) -> None:
    """A phone on a slow network sends a large upload for seconds. Until the body is in, it
    holds no pooled connection and no open transaction, so on a pool of one every other
    request still answers at once (it used to wait for the upload, then time out: 503)."""
    payload = {
        "/calls": [call()],
        "/contacts/batch": [{"name": "Slow", "phone_raw": "+14155550123"}],
        "/sync": {"contacts": [], "calls": [call()]},
    }[path]
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {user.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = free_port()
    app = make_app(database_url, pool_min_size=1, pool_max_size=1)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None)
    with serving(config), socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(head + body[:5])
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3) as other:
            r = await other.get("/contacts", headers=user.headers)
            assert r.status_code == 200, r.text
        slow.sendall(body[5:])
        answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


@pytest.mark.parametrize("path", ["/calls", "/contacts/batch", "/sync"])
@pytest.mark.parametrize("token", ["", "Bearer forged.token.here", "Bearer {expired}"])
async def test_an_upload_without_a_signed_token_is_refused_with_its_body_unparsed(
    database_url: str, path: str, token: str
) -> None:
    """A stranger sending 16 MiB is answered 401 without its body being parsed or held (it
    was read whole before the token was checked, and held in memory). The answer waits
    until the body is in, read and thrown away, so that a proxy writing it, or a phone,
    reads the 401 rather than a reset connection (middleware._answered_after_body); its
    first bytes alone get no answer."""
    expired, _ = auth_service.issue_token(
        uuid.uuid4(), 0, secret=make_settings(database_url).secret, ttl_seconds=-10
    )
    authorization = token.format(expired=expired)
    size = 16 * 1024 * 1024
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: {authorization}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    rest = b" " * (size - 5)
    port = free_port()
    config = uvicorn.Config(make_app(database_url), host="127.0.0.1", port=port, log_config=None)
    with serving(config), socket.create_connection(("127.0.0.1", port), timeout=5) as stranger:
        tracemalloc.start()  # every thread's: the server's too
        try:
            stranger.sendall(head + b"[{}, ")
            stranger.settimeout(0.3)
            with pytest.raises(TimeoutError):
                stranger.recv(65536)
            stranger.settimeout(5)
            stranger.sendall(rest)
            answer = stranger.recv(65536)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert b'"code":"unauthenticated"' in answer
    assert peak < size // 4, peak  # read in pieces, each thrown away: never the whole body


async def test_a_flood_of_sign_ins_leaves_connections_for_the_rest_of_the_api(
    database_url: str, user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sign-in holds its connection while bcrypt checks the password. At most
    db.LOGIN_SLOTS do at once; the others wait holding none, so on a pool one larger other
    requests still answer (they used to wait for a sign-in to finish, then get a 503)."""
    release, slots_taken = asyncio.Event(), asyncio.Event()
    checking = 0

    async def slow_check(password: str, password_hash: str) -> bool:
        nonlocal checking
        checking += 1
        if checking == db.LOGIN_SLOTS:
            slots_taken.set()
        await release.wait()
        return False

    monkeypatch.setattr(auth_service, "check_password", slow_check)
    app = make_app(database_url, pool_min_size=1, pool_max_size=db.LOGIN_SLOTS + 1)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            guesses = [
                asyncio.create_task(
                    client.post(
                        "/auth/login",
                        json={"email": f"nobody{i}@example.com", "password": "guess-1234"},
                    )
                )
                for i in range(3 * db.LOGIN_SLOTS)
            ]
            try:
                async with asyncio.timeout(5):
                    await slots_taken.wait()
                await asyncio.sleep(0.2)  # time for any other sign-in to take a connection
                assert checking == db.LOGIN_SLOTS
                async with asyncio.timeout(5):
                    r = await client.get("/auth/me", headers=user.headers)
                assert r.status_code == 200, r.text
            finally:
                release.set()
            for answer in await asyncio.gather(*guesses):
                assert_problem(answer, 401, "invalid_credentials")


async def test_a_request_that_waits_too_long_for_a_connection_is_told_the_server_is_busy(
    client: httpx.AsyncClient, user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection in use past the wait: a 503 that says so (the database is up and
    answering the others), not "the database is unavailable"."""
    gate: asyncio.Semaphore = client.app.state.pool_gate  # type: ignore[attr-defined]
    monkeypatch.setattr(db, "ACQUIRE_TIMEOUT_SECONDS", 0.2)
    async with every_place_taken(gate):
        r = await client.get("/auth/me", headers=user.headers)
        body = assert_problem(r, 503, "unavailable")
        assert body["detail"] == "Every database connection is busy; retry shortly"
        assert r.headers["retry-after"] == "5"
    assert (await client.get("/auth/me", headers=user.headers)).status_code == 200
