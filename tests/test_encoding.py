"""Contract: Conventions, JSON in and out: a request body whatever its Content-Type and
Content-Encoding say, and answers gzipped for clients that ask."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Account, assert_problem, make_app, make_settings


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8"],
)
async def test_a_body_is_json_whatever_its_content_type_says(
    client: httpx.AsyncClient, user: Account, content_type: str | None
) -> None:
    """The same on every endpoint: the uploads read their bytes themselves, the others
    through FastAPI, which would take a body typed otherwise for bytes (a puzzling 422)."""
    headers = dict(user.headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps({"name": "Typed", "phone_raw": "+14155550123"}).encode()
    r = await client.post("/contacts", content=body, headers=headers)
    assert r.status_code == 201, r.text
    r = await client.put(
        f"/contacts/{r.json()['contact']['id']}", content=b'{"name": "T2"}', headers=headers
    )
    assert (r.status_code, r.json()["name"]) == (200, "T2")
    login = json.dumps({"email": user.email, "password": user.password}).encode()
    r = await client.post("/auth/login", content=login, headers=headers)
    assert r.status_code == 200, r.text
    r = await client.post("/contacts", content=b'{"name": ', headers=headers)
    assert_problem(r, 400, "bad_request")


def _gzip(value: object) -> bytes:
    return gzip.compress(json.dumps(value).encode())


async def test_a_gzip_body_is_inflated_on_every_endpoint(
    client: httpx.AsyncClient, user: Account
) -> None:
    headers = {**user.headers, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    r = await client.post(
        "/contacts", content=_gzip({"name": "Zip", "phone_raw": "+14155550123"}), headers=headers
    )
    assert r.status_code == 201, r.text
    calls = [
        {
            "direction": "missed",
            "duration_seconds": 0,
            "timestamp": f"2026-01-01T00:00:{s:02}Z",
            "phone_raw": "+14155550123",
        }
        for s in range(50)
    ]
    packed = _gzip(calls)
    # In chunks of 7 bytes: gzip's header split over chunks too.
    r = await client.post("/calls", content=_pieces(packed, 7), headers=headers)
    assert (r.status_code, r.json()["inserted"]) == (200, 50), r.text
    r = await client.post("/calls", content=packed, headers={**headers, "Content-Encoding": "GZIP"})
    assert (r.status_code, r.json()["duplicates"]) == (200, 50), r.text
    r = await client.post("/contacts", content=b"", headers=headers)  # empty: no body at all
    assert_problem(r, 422, "validation_error")


async def test_x_gzip_is_gzip(client: httpx.AsyncClient, user: Account) -> None:
    # RFC 9110 8.4.1.3: a recipient SHOULD take "x-gzip" as "gzip".
    headers = {**user.headers, "Content-Encoding": "x-gzip"}
    r = await client.post(
        "/contacts", content=_gzip({"name": "X", "phone_raw": "+14155550123"}), headers=headers
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not gzip at all", "not gzip"),
        (_gzip({"name": "Cut", "phone_raw": "+14155550123"})[:-6], "cut short"),
        (_gzip({"name": "More", "phone_raw": "+14155550123"}) + b"trailing", "bytes after it"),
    ],
)
async def test_a_malformed_gzip_body_is_a_400(
    client: httpx.AsyncClient, user: Account, conn: Any, body: bytes, why: str
) -> None:
    headers = {**user.headers, "Content-Encoding": "gzip"}
    for path in ("/contacts", "/contacts/batch"):
        r = await client.post(path, content=body, headers=headers)
        assert_problem(r, 400, "bad_request")
        assert r.json()["detail"] == "Malformed gzip body", why
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0


async def test_a_gzip_body_inflating_past_the_limit_is_a_413(
    database_url: str, user: Account
) -> None:
    """The limit bounds what a body inflates to: a small gzip bomb is refused as it inflates."""
    app = make_app(database_url, max_body_bytes=1024)
    bomb = gzip.compress(b"[" + b" " * 100_000 + b"]")
    fits = gzip.compress(b'{"email": "a@b.c", "password": "x"}'.ljust(1024))
    assert len(bomb) < 1024
    headers = {**user.headers, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path in ("/auth/login", "/calls"):
                assert_problem(
                    await client.post(path, content=bomb, headers=headers), 413, "payload_too_large"
                )
            r = await client.post("/calls", content=_pieces(bomb, 64), headers=headers)
            assert_problem(r, 413, "payload_too_large")
            r = await client.post("/auth/login", content=fits, headers=headers)
            assert_problem(r, 401, "invalid_credentials")


async def test_the_inflated_limit_is_exact_to_the_byte_however_the_body_arrives(
    database_url: str,
) -> None:
    """A gzip body inflating to the limit is read; one byte more is a 413, whether the body
    arrives in one piece, a byte at a time or in chunks."""
    app = make_app(database_url, max_body_bytes=1024)
    login = b'{"email": "a@b.c", "password": "x"}'
    fits, over = gzip.compress(login.ljust(1024)), gzip.compress(login.ljust(1025))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for size in (len(over), 1, 7, 64):
                r = await client.post("/auth/login", content=_pieces(fits, size), headers=headers)
                assert_problem(r, 401, "invalid_credentials")
                r = await client.post("/auth/login", content=_pieces(over, size), headers=headers)
                assert_problem(r, 413, "payload_too_large")


async def test_a_gzip_bomb_is_never_inflated_past_the_limit(
    database_url: str, user: Account
) -> None:
    """64 KiB that inflate to 64 MiB, under a limit of 1 MiB: refused with at most the limit
    inflated, sent in one piece or in chunks (a bound of 0 bytes, which zlib reads as "no
    bound", must never be asked for once the limit is reached)."""
    app = make_app(database_url, max_body_bytes=1024 * 1024)
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")
    assert len(bomb) < 1024 * 1024
    headers = {**user.headers, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for content in (bomb, _pieces(bomb, 16 * 1024)):
                tracemalloc.start()
                try:
                    r = await client.post("/calls", content=content, headers=headers)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                assert_problem(r, 413, "payload_too_large")
                assert peak < 8 * 1024 * 1024, peak


def _pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    """`body` as a phone's upload arrives: in chunks of `size` bytes."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), size):
            yield body[start : start + size]

    return chunks()


async def test_another_content_encoding_is_a_415_naming_gzip(
    client: httpx.AsyncClient, user: Account
) -> None:
    headers = {**user.headers, "Content-Encoding": "br"}
    r = await client.post("/contacts", content=b"\x0b\x02\x80{}\x03", headers=headers)
    body = assert_problem(r, 415, "unsupported_media_type")
    assert r.headers["accept-encoding"] == "gzip"
    assert "'br'" in body["detail"]
    assert (await client.get("/contacts", headers=headers)).status_code == 200  # no body there
    # identity is no encoding at all (RFC 9110 8.4.1): the body as it is
    identity = {**user.headers, "Content-Encoding": "identity"}
    body_json = {"name": "Plain", "phone_raw": "+14155550124"}
    r = await client.post("/contacts", json=body_json, headers=identity)
    assert r.status_code == 201, r.text


async def test_answers_of_a_kilobyte_and_more_are_gzipped_for_clients_that_ask(
    client: httpx.AsyncClient, user: Account
) -> None:
    batch = [{"name": f"Contact {i}", "phone_raw": f"+1415555{i:04d}"} for i in range(50)]
    r = await client.post("/contacts/batch", json=batch, headers=user.headers)
    assert r.status_code == 200, r.text
    plain = await client.get("/contacts", headers={**user.headers, "Accept-Encoding": "identity"})
    packed = await client.get("/contacts", headers={**user.headers, "Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in packed.headers["vary"]
    assert int(packed.headers["content-length"]) * 3 < int(plain.headers["content-length"])
    assert packed.json() == plain.json()  # httpx inflates it
    head = await client.head("/contacts", headers={**user.headers, "Accept-Encoding": "gzip"})
    assert (head.content, head.headers["content-length"]) == (b"", packed.headers["content-length"])
    small = await client.get("/auth/me", headers={**user.headers, "Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers  # under 1 KiB: not worth it
    error = await client.get("/contacts", headers={"Accept-Encoding": "gzip"})
    assert_problem(error, 401, "unauthenticated")
    for refusing in ("gzip;q=0", "br, gzip; q=0.0", "deflate", "identity, *;q=0", "gzip;q=abc"):
        r = await client.get("/contacts", headers={**user.headers, "Accept-Encoding": refusing})
        assert "content-encoding" not in r.headers, refusing
    for asking in ("br;q=1.0, gzip;q=0.5", "x-gzip", "deflate, gzip;q=1", "GZIP", "Gzip;Q=1"):
        r = await client.get("/contacts", headers={**user.headers, "Accept-Encoding": asking})
        assert r.headers["content-encoding"] == "gzip", asking
    two = [*user.headers.items(), ("Accept-Encoding", "br"), ("Accept-Encoding", "gzip")]
    assert (await client.get("/contacts", headers=two)).headers["content-encoding"] == "gzip"


def test_the_body_limit_is_16_mib_by_default() -> None:
    """The contract's default size limit (uploads of 5,000 calls are a few MiB)."""
    assert make_settings("postgresql://unused/unused").max_body_bytes == 16 * 1024 * 1024


async def test_an_upload_of_more_json_values_than_its_items_may_hold_is_a_413_unparsed(
    client: httpx.AsyncClient, user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 MiB of `{},` gzips to 16 KB and would parse into 5.6 million dicts (2 GB) before
    the item limit could count them; one item of a million keys likewise. Both are refused
    before parsing. A batch within its limits whose strings are full of commas and colons
    is not."""
    parsed: list[int] = []
    loads = orjson.loads
    monkeypatch.setattr(orjson, "loads", lambda body: parsed.append(len(body)) or loads(body))
    headers = {**user.headers, "Content-Encoding": "gzip"}
    size = 16 * 1024 * 1024 - 100  # room for /sync's wrapper
    dicts = b"[" + b"{}," * ((size - 2) // 3 - 1) + b"{}]"
    keys = b"[{" + b",".join(b'"k%d":0' % i for i in range(1_000_000)) + b"}]"
    strings = b"[" + b'"",' * ((size - 2) // 3 - 1) + b'""]'  # each string a value too
    for path, body in (
        ("/calls", dicts),
        ("/calls", strings),
        ("/contacts/batch", dicts),
        ("/sync", b'{"calls": ' + dicts + b"}"),
        ("/calls", keys),
    ):
        r = await client.post(path, content=gzip.compress(body), headers=headers)
        detail = assert_problem(r, 413, "payload_too_large")["detail"]
        assert detail.startswith("More JSON values than"), detail
    assert parsed == []
    names = [{"name": f"{i}" + ",:" * 90, "phone_raw": f"+1415555{i:04d}"} for i in range(1000)]
    r = await client.post("/contacts/batch", content=_gzip(names), headers=headers)
    assert r.status_code == 200, r.text
    assert {item["result"] for item in r.json()["results"]} == {"created"}
    assert parsed
