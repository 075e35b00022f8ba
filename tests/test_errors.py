"""Contract: Conventions (errors) and Operations (health, docs)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY
from starlette.types import Message

from crmsync import db, middleware
from crmsync.deps import Tx, raw_body
from crmsync.middleware import MAX_HEAD_BYTES, SMALL_BODY_BYTES, UPLOADS, ProblemHttpProtocol
from tests.conftest import Account, api_routes, assert_problem, free_port, make_app, serving


async def test_unknown_route_and_wrong_method_are_problems(
    client: httpx.AsyncClient, user: Account
) -> None:
    # Its own code: `not_found` tells the app a contact is gone (and its copy may go).
    assert_problem(await client.get("/nope"), 404, "no_such_route")
    assert_problem(await client.put("/auth/login", json={}), 405, "method_not_allowed")
    # A trailing slash is another path: no 307 to a URL made of the Host header
    for method, path in (("GET", "/contacts/"), ("POST", "/calls/"), ("GET", "/healthz/")):
        r = await client.request(method, path, headers={**user.headers, "Host": "evil.example"})
        assert_problem(r, 404, "no_such_route")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/auth/login", "POST"),
        ("TRACE", "/contacts", "GET, HEAD, POST"),  # two routes share the path
        ("POST", "/users/x", "PATCH, DELETE"),
        ("PATCH", "/calls", "GET, HEAD, POST"),
    ],
)
async def test_a_wrong_method_answers_every_allowed_one(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    r = await client.request(method, path)
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allow


async def test_head_answers_wherever_get_does_with_its_headers_and_no_body(
    client: httpx.AsyncClient, user: Account
) -> None:
    for path, headers in [("/healthz", {}), ("/contacts", user.headers)]:
        get = await client.get(path, headers=headers)
        head = await client.head(path, headers=headers)
        assert (head.status_code, head.content) == (200, b"")
        for name in ("content-type", "content-length"):
            assert head.headers[name] == get.headers[name]
    r = await client.head("/contacts")  # the GET's 401, without its body
    assert (r.status_code, r.content) == (401, b"")
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"] == "Bearer"
    assert (await client.head("/auth/login")).status_code == 405  # no GET there
    counted = REGISTRY.get_sample_value(
        "crmsync_http_requests_total", {"method": "HEAD", "route": "/contacts", "status": "200"}
    )
    assert counted is not None and counted >= 1  # under its route, not "unmatched"


async def test_body_over_limit_is_413_before_it_is_parsed(
    client: httpx.AsyncClient, user: Account
) -> None:
    big = b"[" + b"1," * (9 * 1024 * 1024) + b"1]"
    r = await client.post("/auth/login", content=big, headers={"content-type": "application/json"})
    assert_problem(r, 413, "payload_too_large")
    assert r.headers["connection"] == "close"
    # Answered before routing, and still counted under its route, not "unmatched"
    counted = REGISTRY.get_sample_value(
        "crmsync_http_requests_total", {"method": "POST", "route": "/auth/login", "status": "413"}
    )
    assert counted is not None and counted >= 1
    r = await client.post("/contacts", content=b"{}", headers={"content-encoding": "br"})
    assert_problem(r, 415, "unsupported_media_type")
    assert r.headers["connection"] == "close"
    counted = REGISTRY.get_sample_value(
        "crmsync_http_requests_total", {"method": "POST", "route": "/contacts", "status": "415"}
    )
    assert counted is not None and counted >= 1


async def test_streamed_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b" " * (1024 * 1024)

    r = await client.post(
        "/auth/login", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(r, 413, "payload_too_large")


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len((await client.get("/healthz")).headers["x-request-id"]) == 32


async def test_answers_are_stored_in_no_cache_and_not_sniffed(
    client: httpx.AsyncClient, user: Account
) -> None:
    """The phone book is people's data: no HTTP cache (OkHttp's on a phone's disk, a
    proxy's) keeps an answer, and no browser reads JSON as anything else."""
    made = await client.post(
        "/contacts", json={"name": "C", "phone_raw": "+14155550123"}, headers=user.headers
    )
    answers = [
        made,
        await client.get("/contacts", headers=user.headers),
        await client.get(f"/contacts/{made.json()['contact']['id']}", headers=user.headers),
        await client.get("/contacts"),  # a problem too
        await client.post("/auth/login", json={"email": user.email, "password": user.password}),
    ]
    for r in answers:
        assert r.headers.get_list("cache-control") == ["no-store"], r.request.url
        assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("sent", ["r" * 129, "req\x1b[2Jforged"])
async def test_an_overlong_or_unprintable_request_id_is_replaced(
    client: httpx.AsyncClient, sent: str
) -> None:
    """It goes into every log line of the request: no terminal escapes, no megabyte ids."""
    r = await client.get("/healthz", headers={"X-Request-ID": sent})
    made = r.headers["x-request-id"]
    assert made != sent and len(made) == 32 and made.isalnum()
    edge = "r" * 128
    assert (await client.get("/healthz", headers={"X-Request-ID": edge})).headers[
        "x-request-id"
    ] == edge


async def test_unexpected_error_is_a_plain_500_problem(client: httpx.AsyncClient) -> None:
    app = client.app  # type: ignore[attr-defined]

    @app.get("/_boom_for_test")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    try:
        r = await client.get("/_boom_for_test")
        body = assert_problem(r, 500, "internal_error")
        assert "secret internals" not in r.text and "Traceback" not in r.text
        assert body["detail"]
        assert len(r.headers["x-request-id"]) == 32  # what the logs name it by
    finally:
        app.router.routes.pop()


async def test_an_error_after_the_answer_began_ends_it_and_is_logged_not_raised(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer whose body fails midway (its status and headers already sent) cannot
    become a 500 problem: it is logged with the request id, and the server is handed no
    second start (uvicorn raises on one, and logs its own traceback)."""
    app = client.app  # type: ignore[attr-defined]

    @app.get("/_fails_midway_for_test")
    async def midway() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"partial": '
            raise RuntimeError("secret internals")

        return StreamingResponse(chunks(), media_type="application/json")

    # The server's side, as uvicorn keeps it: a second start is an error it raises.
    sent: list[Message] = []
    disconnected = asyncio.Event()

    async def receive() -> Message:
        if not sent and not disconnected.is_set():
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and sent:
            raise RuntimeError("Unexpected ASGI message 'http.response.start' sent")
        sent.append(message)

    path = "/_fails_midway_for_test"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},  # no disconnect listener
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"api")],
        "client": ("127.0.0.1", 4321),
        "server": ("api", 80),
    }
    try:
        with caplog.at_level(logging.ERROR, logger="crmsync.errors"):
            await app(scope, receive, send)  # nothing raised to the server
    finally:
        app.router.routes.pop()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (sent[0]["status"], sent[1]["body"]) == (200, b'{"partial": ')
    assert [rec.getMessage() for rec in caplog.records if rec.name == "crmsync.errors"] == [
        "unhandled error"
    ]


async def test_problems_have_the_type_about_blank(client: httpx.AsyncClient, user: Account) -> None:
    """RFC 9457 4.2.1: no type of our own, so "about:blank" (docs/mobile.md shows it), from
    the exception handlers and from the ASGI layers alike."""
    answers = [
        await client.get("/nope"),
        await client.get("/auth/me"),
        await client.get("/users", headers=user.headers),
        await client.post("/auth/login", json={}),
        await client.post("/auth/login", content=b"x" * (SMALL_BODY_BYTES + 1)),
    ]
    assert [r.status_code for r in answers] == [404, 401, 403, 422, 413]
    for r in answers:
        assert r.json()["type"] == "about:blank", r.text


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200


async def test_openapi_describes_endpoints(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/auth/login" in spec["paths"] and "/users/{user_id}" in spec["paths"]
    assert (await client.get("/docs")).status_code == 200


async def test_body_of_exactly_the_size_limit_is_read(database_url: str) -> None:
    app = make_app(database_url, max_body_bytes=1024)
    exact = b'{"email": "a@b.c", "password": "x"}'.ljust(1024)

    async def streamed(body: bytes):  # type: ignore[no-untyped-def]
        yield body

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"content-type": "application/json"}
            for content in (exact, streamed(exact)):
                r = await client.post("/auth/login", content=content, headers=headers)
                assert_problem(r, 401, "invalid_credentials")
            r = await client.post("/auth/login", content=exact + b" ", headers=headers)
            assert_problem(r, 413, "payload_too_large")
            r = await client.post("/auth/login", content=streamed(exact + b" "), headers=headers)
            assert_problem(r, 413, "payload_too_large")


# Every route whose JSON body FastAPI parses itself (the uploads read theirs).
BODY_ROUTES = [
    ("POST", "/auth/login"),
    ("POST", "/contacts"),
    ("PUT", "/contacts/{contact}"),
    ("POST", "/users"),
    ("PATCH", "/users/{me}"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_bodies_other_than_uploads_are_at_most_64_kib_inflated_too(
    client: httpx.AsyncClient, admin: Account, method: str, path: str
) -> None:
    """These routes parse their JSON into Python objects before the token is checked: a
    16 KB gzip inflating to 16 MiB of `[{},...]` cost a stranger's request 500 MB. A body
    of these routes is a few hundred bytes; past SMALL_BODY_BYTES it is a 413, unread."""
    made = await client.post(
        "/contacts", json={"name": "C", "phone_raw": "+14155550123"}, headers=admin.headers
    )
    url = path.format(contact=made.json()["contact"]["id"], me=admin.id)
    bomb = b"[" + b"{}," * ((16 * 1024 * 1024 - 4) // 3) + b"{}]"  # just under 16 MiB
    small = b'{"name": "' + b"n" * (SMALL_BODY_BYTES - 20) + b'"}'
    for body, encoding, status in (
        (gzip.compress(bomb), "gzip", 413),
        (b" " * (SMALL_BODY_BYTES + 1), "identity", 413),
        (small.ljust(SMALL_BODY_BYTES), "identity", 422),  # read, then refused as too long
    ):
        headers = {**admin.headers, "Content-Type": "application/json"}
        headers["Content-Encoding"] = encoding
        r = await client.request(method, url, content=body, headers=headers)
        assert r.status_code == status, (len(body), encoding, r.text[:200])
    # An upload may still be as large as the setting allows (16 MiB by default).
    calls = [
        {
            "direction": "incoming",
            "duration_seconds": 1,
            "timestamp": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
            "phone_raw": "+14155550123" + " " * 200,
        }
        for i in range(3000)
    ]
    r = await client.post("/calls", json=calls, headers=admin.headers)
    assert r.status_code == 200 and r.json()["inserted"] == 3000, r.text[:300]
    assert len(json.dumps(calls)) > 10 * SMALL_BODY_BYTES


@pytest.mark.parametrize(
    "body",
    [b"NaN", b'{"name": NaN}', b'{"name": "x", "is_admin": Infinity}', b'{"name": -Infinity}'],
)
@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_nan_and_infinity_are_malformed_json_on_every_body(
    client: httpx.AsyncClient, admin: Account, method: str, path: str, body: bytes
) -> None:
    # Not JSON (RFC 8259), though Python's json module reads them: 400, as on the batches.
    made = await client.post(
        "/contacts", json={"name": "C", "phone_raw": "+14155550123"}, headers=admin.headers
    )
    url = path.format(contact=made.json()["contact"]["id"], me=admin.id)
    headers = {**admin.headers, "Content-Type": "application/json"}
    r = await client.request(method, url, content=body, headers=headers)
    assert_problem(r, 400, "bad_request")


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def served_protocol() -> Iterator[int]:
    """crmsync's HTTP protocol in a real uvicorn, before an application that answers 200."""
    port = free_port()
    config = uvicorn.Config(
        _hello, host="127.0.0.1", port=port, http=ProblemHttpProtocol, log_config=None
    )
    with serving(config):
        yield port


def _exchange(port: int, request: bytes, answers: int = 1) -> bytes:
    """What the server sends back, read until it closes or has sent `answers` answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        with contextlib.suppress(ConnectionResetError):  # refused before all was sent
            conn.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while answer.count(b"HTTP/1.1 ") < answers and (chunk := conn.recv(65536)):
                answer += chunk
    return answer


def test_a_request_head_over_the_limit_is_refused_unread(served_protocol: int) -> None:
    # httptools buffers a head of any size: 200 MiB of headers cost the process 200 MiB.
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n"
    answer = _exchange(served_protocol, huge)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-type: application/problem+json" in head.lower()
    assert b"\r\ncache-control: no-store\r\n" in head.lower()  # as on every answer
    assert b"\r\nx-content-type-options: nosniff\r\n" in head.lower()
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}(\r\n|$)", head), head
    assert json.loads(body)["code"] == "bad_request"


def test_heads_under_the_limit_pass_also_with_a_body_or_one_after_another(
    served_protocol: int,
) -> None:
    pad = b"X-Pad: " + b"a" * 40_000 + b"\r\n"
    body = b"x" * 200_000  # arrives with its head, in writes larger than the limit
    post = b"POST / HTTP/1.1\r\nHost: x\r\n" + pad + b"Content-Length: %d\r\n\r\n" % len(body)
    get = b"GET / HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n"
    # Pipelined: together more than the limit, each under it.
    answer = _exchange(served_protocol, post + body + get * 3, answers=4)
    assert answer.count(b"HTTP/1.1 200 OK") == 4, answer[:300]
    # One after another on a kept-alive connection, each sent once the last is answered.
    with socket.create_connection(("127.0.0.1", served_protocol), timeout=10) as conn:
        for n in range(4):
            conn.sendall(get)
            answer = b""
            # Until the end of its chunked body, or the server closes.
            while not answer.endswith(b"\r\n0\r\n\r\n") and (chunk := conn.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK"), (n, answer[:200])
    # The limit itself: one byte over it, sent in one write, is refused.
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
    exact = head.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (MAX_HEAD_BYTES - len(head)))
    assert _exchange(served_protocol, exact).startswith(b"HTTP/1.1 200 OK")
    over = exact.replace(b"X-Pad: ", b"X-Pad: a")
    assert _exchange(served_protocol, over).startswith(b"HTTP/1.1 400 ")


def _read_until_closed(conn: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def _assert_timed_out(
    port: int, head: bytes, body: bytes, within: tuple[float, float] = (0.4, 5)
) -> None:
    """Sends that and stops: 408 `request_timeout` after the bound (patched to 0.5 s, or
    as `within` says), and the connection closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + body)
        started = time.monotonic()
        answer = _read_until_closed(conn)  # ends when the server closes
    assert within[0] < time.monotonic() - started < within[1]
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:300]
    assert b"\r\ncontent-type: application/problem+json\r\n" in head
    assert b"\r\nconnection: close\r\n" in head
    assert json.loads(rest)["code"] == "request_timeout"


def test_a_request_head_not_complete_in_time_is_408_and_an_idle_connection_is_closed(
    served_protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a bound, a client trickling its headers (or sending nothing) holds a
    # connection, and the memory and file descriptor behind it, for as long as it likes.
    monkeypatch.setattr(middleware, "HEAD_TIMEOUT", 0.5)
    _assert_timed_out(served_protocol, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"")
    with socket.create_connection(("127.0.0.1", served_protocol), timeout=10) as conn:
        started = time.monotonic()
        assert _read_until_closed(conn) == b""  # nothing sent: closed, nothing answered
    assert 0.4 < time.monotonic() - started < 5


def test_a_slow_head_in_time_and_later_requests_on_the_connection_are_answered(
    served_protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "HEAD_TIMEOUT", 0.8)
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served_protocol), timeout=10) as conn:
        for piece in (get[:10], get[10:20], get[20:]):  # 0.4 s in all: within the bound
            conn.sendall(piece)
            time.sleep(0.2)
        # Each head has its own time, counted from its first byte, not from the connection
        # opening or the first request: well after 0.8 s, the next ones still pass.
        for _ in range(3):
            answer = b""
            while not answer.endswith(b"\r\n0\r\n\r\n") and (chunk := conn.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
            time.sleep(0.5)
            conn.sendall(get)
        # And a later head that stalls gets its 408 as the first did.
        conn.recv(65536)
        conn.sendall(get[:10])
        assert _read_until_closed(conn).startswith(b"HTTP/1.1 408 ")


@pytest.fixture(scope="module")
def served_app(database_url: str) -> Iterator[int]:
    """The whole app in a real uvicorn with crmsync's protocol, as `crmsync serve` runs it."""
    port = free_port()
    config = uvicorn.Config(
        make_app(database_url),
        host="127.0.0.1",
        port=port,
        http=ProblemHttpProtocol,
        log_config=None,
        lifespan="on",
    )
    with serving(config):
        yield port


async def test_a_head_begun_while_the_last_answer_is_awaited_is_not_timed_out(
    served_app: int, user: Account, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pipelining client may begin its next request before the last one is answered;
    # that answer can take a while (here a sign-in held on its account's lock). Its head's
    # time runs from the answer on, and a 408 never cuts into an answer in progress.
    monkeypatch.setattr(middleware, "HEAD_TIMEOUT", 0.3)
    lock = "SELECT pg_advisory_{}($1, hashtext(lower($2)))"
    await conn.execute(lock.format("lock"), db.LOGIN_LOCK_CLASS, user.email)
    body = json.dumps({"email": user.email, "password": user.password}).encode()
    login = (
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as sock:
        sock.sendall(login)
        await asyncio.sleep(0.1)
        sock.sendall(get[:12])  # the next head begun, in a write of its own
        await asyncio.sleep(1.0)  # three head timeouts, the sign-in still waiting
        sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # nothing answered, nothing closed
        await conn.execute(lock.format("unlock"), db.LOGIN_LOCK_CLASS, user.email)
        sock.settimeout(10)
        await asyncio.sleep(0.1)
        sock.sendall(get[12:])
        answer = b""
        while answer.count(b"HTTP/1.1 ") < 2 or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    assert b'"token"' in answer
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer[-300:]


def _post_head(user: Account, length: int, encoding: str = "identity") -> bytes:
    return (
        f"POST /calls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
        f"Content-Type: application/json\r\nContent-Encoding: {encoding}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_body_that_stops_arriving_is_408_and_the_connection_is_closed(
    served_app: int, user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once: the 408 does not wait for the rest of the body as other early answers do
    # (test_an_answer_given_before_the_body_is_read_waits_for_the_rest_of_it), a second pause.
    monkeypatch.setattr(middleware, "BODY_IDLE_TIMEOUT", 1.5)
    once = (1.4, 2.9)
    body = json.dumps(
        [{"direction": "missed", "duration_seconds": 0, "timestamp": "2026-11-04T14:00:00Z"}]
    ).encode()
    _assert_timed_out(served_app, _post_head(user, len(body)), body[:10], once)
    gzipped = gzip.compress(body)  # a gzip body stalls the same way
    _assert_timed_out(served_app, _post_head(user, len(gzipped), "gzip"), gzipped[:10], once)
    monkeypatch.setattr(middleware, "BODY_IDLE_TIMEOUT", 0.5)
    # A body that keeps coming, however slowly, is read to its end: each pause is bounded,
    # not the whole body.
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as conn:
        conn.sendall(_post_head(user, len(body)))
        for i in range(0, len(body), 20):
            time.sleep(0.2)
            conn.sendall(body[i : i + 20])
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    assert b'"inserted":1' in answer


# Run at COMMIT: a deferred constraint trigger ends the backend as the request commits.
_ENDED_AT_COMMIT = """
CREATE FUNCTION pg_temp.end_me() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;
CREATE TEMP TABLE ended (x int);
CREATE CONSTRAINT TRIGGER end_me AFTER INSERT ON ended DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION pg_temp.end_me();
INSERT INTO ended VALUES (1);
"""


@pytest.mark.parametrize(
    "ending",
    ["SELECT pg_terminate_backend(pg_backend_pid())", _ENDED_AT_COMMIT],
    ids=["in-a-statement", "at-commit"],
)
async def test_a_backend_ended_by_the_operator_is_a_503_to_retry(
    client: httpx.AsyncClient, user: Account, conn: Any, ending: str
) -> None:
    """PostgreSQL ending the request's backend (pg_terminate_backend, a fast shutdown, a
    restart: SQLSTATE 57P01) is the database being briefly away, not a server bug."""
    app = client.app  # type: ignore[attr-defined]

    @app.post("/_ended_for_test")
    async def ended(tx: Tx) -> None:
        await tx.execute(
            "INSERT INTO sync_audit (user_id, kind) VALUES ($1, 'calls')", uuid.UUID(user.id)
        )
        await tx.execute(ending)

    try:
        r = await client.post("/_ended_for_test")
    finally:
        app.router.routes.pop()
    assert_problem(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "5"
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0
    assert (await client.get("/auth/me", headers=user.headers)).status_code == 200


async def test_a_database_out_of_connections_is_a_503_to_retry(
    database_url: str, conn: Any
) -> None:
    """PostgreSQL refusing a new connection (max_connections or the role's limit reached:
    SQLSTATE 53300) while the pool reconnects: the database is busy, retry shortly."""
    from urllib.parse import urlsplit, urlunsplit

    await conn.execute("DROP ROLE IF EXISTS crmsync_limited")
    await conn.execute("CREATE ROLE crmsync_limited LOGIN")
    await conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO crmsync_limited")
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    limited = urlunsplit(parts._replace(netloc=f"crmsync_limited@{host}"))
    app = make_app(limited, pool_min_size=1, pool_max_size=1)
    try:
        async with app.router.lifespan_context(app):
            await conn.execute("ALTER ROLE crmsync_limited CONNECTION LIMIT 0")
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = 'crmsync_limited'"
            )
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                login = {"email": "a@example.com", "password": "whatever-123"}
                for _ in range(2):  # the pool's connection was ended, then a new one refused
                    r = await client.post("/auth/login", json=login)
                    assert_problem(r, 503, "unavailable")
                    assert r.headers["Retry-After"] == "5"
                await conn.execute("ALTER ROLE crmsync_limited CONNECTION LIMIT -1")
                r = await client.post("/auth/login", json=login)
                assert_problem(r, 401, "invalid_credentials")
    finally:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = 'crmsync_limited'"
        )
        await conn.execute("DROP OWNED BY crmsync_limited")
        await conn.execute("DROP ROLE crmsync_limited")


async def test_a_read_only_database_answers_reads_and_503s_writes(
    database_url: str, user: Account
) -> None:
    """A hot standby, or a primary being demoted in a failover, refuses writes (SQLSTATE
    25006): reads still answer, a write is a 503 to retry once the new primary is up."""
    sep = "&" if "?" in database_url else "?"
    app = make_app(database_url + sep + "default_transaction_read_only=on")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/contacts", headers=user.headers)).status_code == 200
            r = await client.post(
                "/contacts", json={"name": "C", "phone_raw": "+14155550123"}, headers=user.headers
            )
            assert_problem(r, 503, "unavailable")
            assert r.headers["Retry-After"] == "5"
            r = await client.post("/auth/login", json={"email": user.email, "password": "nope"})
            assert_problem(r, 503, "unavailable")


async def test_a_client_hanging_up_mid_upload_is_a_499_not_a_server_error(
    database_url: str, user: Account, conn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A phone losing its network halfway through its body: nothing stored, no error logged,
    no 5xx counted (the alert rules page on those), an access line with nginx's 499."""
    port = free_port()
    config = uvicorn.Config(make_app(database_url), host="127.0.0.1", port=port, log_config=None)
    before = REGISTRY.get_sample_value(
        "crmsync_http_requests_total", {"method": "POST", "route": "/calls", "status": "499"}
    )
    part = b'[{"direction": "missed", "duration_seconds": 0, "timestamp": "2026-01-01T00:00:00Z"'
    head = (
        f"POST /calls HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {user.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.INFO), serving(config):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as hung_up:
            hung_up.sendall(head + part)
            await asyncio.sleep(0.3)  # the request is authenticated and reading its body
        for _ in range(100):
            lines = [r for r in caplog.records if r.name == "crmsync.access"]
            if lines:
                break
            await asyncio.sleep(0.05)
    [line] = lines
    assert line.fields["status"] == 499 and line.fields["route"] == "/calls"  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    after = REGISTRY.get_sample_value(
        "crmsync_http_requests_total", {"method": "POST", "route": "/calls", "status": "499"}
    )
    assert (after or 0) == (before or 0) + 1
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 0
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0


async def test_a_request_cut_short_by_a_stopping_server_is_a_503_problem(
    database_url: str,
    user: Account,
    conn: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stopping server waits for running requests, then cancels them: uvicorn would then
    answer a plain-text 500 and log a traceback. A phone on a slow network uploading during
    a restart gets a 503 problem instead, and nothing is stored."""
    port = free_port()
    config = uvicorn.Config(
        make_app(database_url),
        host="127.0.0.1",
        port=port,
        log_config=None,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    part = b'[{"direction": "missed", "duration_seconds": 0, "timestamp": "2026-01-01T00:00:00Z"'
    head = (
        f"POST /calls HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {user.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.INFO):
        thread.start()
        while not server.started:
            assert thread.is_alive()
            await asyncio.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(head + part)  # and the rest never comes
            await asyncio.sleep(0.3)
            server.should_exit = True
            answer = b""
            while chunk := await asyncio.to_thread(slow.recv, 65536):
                answer += chunk
        thread.join(10)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 503 Service Unavailable", answer[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in headers.lower()
    assert b"retry-after: 1" in headers.lower()
    assert json.loads(body)["code"] == "unavailable"
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 0
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0


def test_the_upload_limit_names_the_upload_routes(client: httpx.AsyncClient) -> None:
    """middleware.UPLOADS names routes by their paths: a renamed upload route would
    silently fall to the 64 KiB limit. Each is a route the app serves, reading its body
    itself (RawBody), and every route reading its body that way is one of them."""
    app = client.app  # type: ignore[attr-defined]
    raw = {
        (method, route.path)
        for route in api_routes(app)
        for method in route.methods
        if any(d.call is raw_body for d in route.dependant.dependencies)
    }
    assert raw == set(UPLOADS)


def _nothing_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server sends nothing for that long (it is still reading)."""
    conn.settimeout(seconds)
    try:
        return conn.recv(65536) == b""  # b"": closed, which is not "nothing" either
    except TimeoutError:
        return True
    finally:
        conn.settimeout(10)


def _assert_413(answer: bytes) -> None:
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert json.loads(rest)["code"] == "payload_too_large"


def test_an_answer_given_before_the_body_is_read_waits_for_the_rest_of_it(
    served_app: int,
) -> None:
    """Answered (and closed) as soon as its Content-Length told, the connection was reset
    under the client still writing the body: nginx, forwarding such an upload, gave its
    own 502 instead of the 413 (a phone would retry that for ever). So the rest is read,
    and thrown away, first: declared by Content-Length, found too large as it streams, or
    not read at all (a path that takes no body)."""
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as conn:
        conn.sendall(b"POST /no/such/path HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n")
        conn.sendall(b" " * 20_000)
        assert _nothing_within(conn, 0.3)
        conn.sendall(b" " * 30_000)
        head = conn.recv(65536)
        assert head.startswith(b"HTTP/1.1 404 "), head[:200]
        assert b"\r\nconnection: close" not in head.lower()  # the connection stays usable
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
    over = 64 * 1024 + 1  # a sign-in's body limit, plus one
    head = b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as conn:
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % over + b" " * 1000)
        assert _nothing_within(conn, 0.3)
        conn.sendall(b" " * (over - 1000))
        _assert_413(_read_until_closed(conn))
    chunk = b" " * 40_000
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as conn:
        conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)  # 80,000 bytes
        assert _nothing_within(conn, 0.3)
        conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        _assert_413(_read_until_closed(conn))
    bomb = gzip.compress(b" " * 200_000)  # 200 kB inflated
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as conn:
        conn.sendall(head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb))
        conn.sendall(bomb[:-8])  # all but its trailer: past the limit once inflated
        assert _nothing_within(conn, 0.3)
        conn.sendall(bomb[-8:])
        _assert_413(_read_until_closed(conn))


def test_a_body_refused_for_its_size_is_not_awaited_when_unsent_or_beyond_reason(
    served_app: int,
) -> None:
    """A client asking `Expect: 100-continue` has sent nothing: told at once, and nothing
    asks it to send the body. A body declared over twice the upload limit is not read."""
    head = b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    waiting = head + b"Content-Length: 70000\r\nExpect: 100-continue\r\n\r\n"
    answer = _exchange(served_app, waiting)
    assert not answer.startswith(b"HTTP/1.1 100"), answer[:100]
    _assert_413(answer)
    beyond = middleware.DRAIN_FACTOR * 16 * 1024 * 1024 + 1  # the app's default limit
    _assert_413(_exchange(served_app, head + b"Content-Length: %d\r\n\r\n" % beyond))
