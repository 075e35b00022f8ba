"""Operations: one JSON log line per request, and no secret in any log line."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from crmsync.observability import JsonFormatter, redact
from tests.conftest import Account


class JsonLog:
    """What the server writes to stderr: every record, formatted as it is emitted."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


@pytest.fixture
def log() -> Iterator[JsonLog]:
    captured = JsonLog()
    root = logging.getLogger()
    level = root.level
    root.addHandler(captured.handler)
    root.setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        root.removeHandler(captured.handler)
        root.setLevel(level)


async def test_one_json_access_line_per_request(
    client: httpx.AsyncClient, user: Account, log: JsonLog
) -> None:
    r = await client.get(
        "/auth/me",
        headers={**user.headers, "X-Request-ID": "req-42", "X-Device-ID": "Zoë's pixel".encode()},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    access = [json.loads(line) for line in log.lines() if '"crmsync.access"' in line]
    assert len(access) == 1
    entry = access[0]
    assert entry["time"].endswith("Z") and entry["level"] == "info"
    assert entry["request_id"] == "req-42"
    assert (entry["method"], entry["route"], entry["status"]) == ("GET", "/auth/me", 200)
    assert entry["user_id"] == user.id and entry["device_id"] == "Zoë's pixel"
    assert isinstance(entry["duration_ms"], float)
    assert entry["path"] == "/auth/me"
    # The path without its query string (a search's q may be a customer's name or number).
    r = await client.get(f"/contacts/{user.id}", headers=user.headers)  # no such contact
    assert r.status_code == 404
    await client.get("/contacts/search?q=Ana%20Lima", headers=user.headers)
    access = [json.loads(line) for line in log.lines() if '"crmsync.access"' in line]
    assert [(e["path"], e["route"]) for e in access[1:]] == [
        (f"/contacts/{user.id}", "/contacts/{contact_id}"),
        ("/contacts/search", "/contacts/search"),
    ]
    server = [json.loads(line) for line in log.lines()]
    assert [e for e in server if "Ana" in str(e) and e["logger"] != "httpx"] == []  # test client
    # A request id in UTF-8 is logged as its text and echoed as the very bytes sent.
    sent = "réq-43 ✓".encode()
    r = await client.get("/healthz", headers={"X-Request-ID": sent})
    assert dict(r.headers.raw)[b"x-request-id"] == sent
    last = [json.loads(line) for line in log.lines() if '"crmsync.access"' in line][-1]
    assert (last["path"], last["request_id"]) == ("/healthz", "réq-43 ✓")


async def test_errors_are_logged_as_json_with_the_request_id(
    client: httpx.AsyncClient, log: JsonLog
) -> None:
    app = client.app  # type: ignore[attr-defined]

    @app.get("/_log_boom_for_test")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    try:
        r = await client.get("/_log_boom_for_test", headers={"X-Request-ID": "boom-1"})
        assert r.status_code == 500
    finally:
        app.router.routes.pop()
    entries = [json.loads(line) for line in log.lines()]
    error = next(e for e in entries if e["level"] == "error")
    assert error["request_id"] == "boom-1" and "kaboom" in error["exc"]
    assert any(e.get("status") == 500 and e["request_id"] == "boom-1" for e in entries)


async def test_no_password_token_or_hash_in_any_log_line(
    client: httpx.AsyncClient,
    admin: Account,
    conn: asyncpg.Connection,
    log: JsonLog,
) -> None:
    new_password = "n3w-user-pa55word"
    r = await client.post(
        "/users",
        json={"name": "New", "email": "new@example.com", "password": new_password},
        headers=admin.headers,
    )
    assert r.status_code == 201, r.text
    login = await client.post(
        "/auth/login", json={"email": "new@example.com", "password": new_password}
    )
    token = login.json()["token"]
    wrong = "wr0ng-pa55word-guess"
    assert (
        await client.post("/auth/login", json={"email": "new@example.com", "password": wrong})
    ).status_code == 401
    short = "short"
    assert (
        await client.post(
            "/users",
            json={"name": "X", "email": "x@example.com", "password": short},
            headers=admin.headers,
        )
    ).status_code == 422
    forged = token[:-4] + "AAAA"
    for bad in (forged, "not-a-token"):
        r = await client.get("/auth/me", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401
    assert (await client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})).is_success
    assert (await client.post("/auth/logout", headers=admin.headers)).status_code == 204

    hashes = [row[0] for row in await conn.fetch("SELECT password_hash FROM users")]
    secrets = [new_password, wrong, token, forged, admin.token, admin.password, *hashes]
    logged = log.lines()
    assert len([line for line in logged if '"crmsync.access"' in line]) >= 7
    for line in logged:
        for secret in secrets:
            assert secret not in line, line


async def test_the_log_formatter_redacts_messages_and_tracebacks(
    client: httpx.AsyncClient, user: Account, log: JsonLog
) -> None:
    """The safety net is wired into every line: a token or a hash in a message or in an
    exception's text (a bug that formats one into an error) is written as [redacted]."""
    app = client.app  # type: ignore[attr-defined]
    bcrypt = "$2b$12$" + "b" * 53

    @app.get("/_log_secret_for_test")
    async def leak() -> None:
        logging.getLogger("crmsync.test").warning("hash %s", bcrypt)
        raise RuntimeError(f"token {user.token}")

    try:
        assert (await client.get("/_log_secret_for_test")).status_code == 500
    finally:
        app.router.routes.pop()
    written = log.stream.getvalue()
    assert user.token not in written and bcrypt not in written
    entries = [json.loads(line) for line in log.lines()]
    assert any(e["msg"] == "hash [redacted]" for e in entries)
    assert any("RuntimeError: token [redacted]" in e.get("exc", "") for e in entries)


def test_redaction_net_catches_tokens_and_hashes_in_messages() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXBhcnQ"
    bcrypt = "$2b$12$" + "a" * 53
    assert redact(f"bad {jwt} and {bcrypt}!") == "bad [redacted] and [redacted]!"
    assert redact("plain message") == "plain message"


def test_a_warning_carries_its_exception_in_one_line_an_error_its_traceback() -> None:
    """While the database is down asyncpg's pool logs warnings with the exception it will
    retry: one line each, so that "Traceback" in the log still means a bug."""
    formatter = JsonFormatter()

    def logged(level: int) -> dict[str, str]:
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except ConnectionRefusedError:
            record = logging.getLogger("asyncpg.pool").makeRecord(
                "asyncpg.pool", level, __file__, 1, "Failed to restore", (), sys.exc_info()
            )
        entry: dict[str, str] = json.loads(formatter.format(record))
        return entry

    warning = logged(logging.WARNING)
    assert warning["exc"] == "ConnectionRefusedError: [Errno 111] Connect call failed"
    error = logged(logging.ERROR)
    assert error["exc"].startswith("Traceback (most recent call last):")
    assert error["exc"].endswith("ConnectionRefusedError: [Errno 111] Connect call failed")
