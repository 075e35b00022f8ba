"""Contract: Pagination, on the users list (every list shares the one helper)."""

from __future__ import annotations

import base64

import asyncpg
import httpx
import orjson
import pytest
from pydantic import BaseModel

from crmsync.auth.schemas import UserOut
from crmsync.auth.service import USER
from crmsync.calls.schemas import CallOut, CallPage
from crmsync.calls.service import CALL
from crmsync.contacts.schemas import ContactOut, ContactPage
from crmsync.contacts.service import CONTACT
from crmsync.errors import BadRequest
from crmsync.pagination import Shape, decode_cursor, encode_cursor
from crmsync.sync.schemas import SyncPage, SyncRecordOut
from crmsync.sync.service import SYNC
from crmsync.users.schemas import UserPage
from tests.calls.test_upload import call
from tests.conftest import Account, MakeUser, assert_problem


async def test_page_mode_total_also_past_the_end(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    for _ in range(4):
        await make_user()
    h = admin.headers
    first = (await client.get("/users", params={"page": 1, "limit": 2}, headers=h)).json()
    assert first["total"] == 5 and len(first["items"]) == 2 and first["next_cursor"]
    last = (await client.get("/users", params={"page": 3, "limit": 2}, headers=h)).json()
    assert last["total"] == 5 and len(last["items"]) == 1 and last["next_cursor"] is None
    past = (await client.get("/users", params={"page": 9, "limit": 2}, headers=h)).json()
    assert past == {"items": [], "page": 9, "limit": 2, "total": 5, "next_cursor": None}


async def test_an_exactly_full_last_page_has_no_next_cursor(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    for _ in range(3):
        await make_user()
    h = admin.headers
    last = (await client.get("/users", params={"page": 2, "limit": 2}, headers=h)).json()
    assert (len(last["items"]), last["next_cursor"]) == (2, None)
    whole = (await client.get("/users", params={"limit": 4}, headers=h)).json()
    assert (len(whole["items"]), whole["next_cursor"]) == (4, None)


async def test_next_cursor_from_a_page_walks_the_rest_once(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    for _ in range(6):
        await make_user()
    h = admin.headers
    every = [
        u["id"]
        for u in (await client.get("/users", params={"limit": 200}, headers=h)).json()["items"]
    ]
    page2 = (await client.get("/users", params={"page": 2, "limit": 2}, headers=h)).json()
    seen = [u["id"] for u in page2["items"]]
    cursor = page2["next_cursor"]
    while cursor:
        body = (await client.get("/users", params={"limit": 2, "cursor": cursor}, headers=h)).json()
        seen += [u["id"] for u in body["items"]]
        cursor = body["next_cursor"]
    assert seen == every[2:]


async def test_cursor_walk_is_stable_while_rows_are_inserted(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    for _ in range(3):
        await make_user()
    h = admin.headers
    body = (await client.get("/users", params={"limit": 2}, headers=h)).json()
    seen = [u["id"] for u in body["items"]]
    added = [(await make_user()).id for _ in range(2)]  # newer: sort after every seen row
    while body["next_cursor"]:
        body = (
            await client.get(
                "/users", params={"limit": 2, "cursor": body["next_cursor"]}, headers=h
            )
        ).json()
        seen += [u["id"] for u in body["items"]]
    assert len(seen) == len(set(seen)) == 6 and seen[-2:] == added


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": "x"},
        {"page": 0},
        {"page": 10**9 + 1},
        {"page": 10**20},
    ],
)
async def test_bad_limit_or_page_is_422(
    client: httpx.AsyncClient, admin: Account, params: dict[str, object]
) -> None:
    assert_problem(
        await client.get("/users", params=params, headers=admin.headers), 422, "validation_error"
    )


@pytest.mark.parametrize(
    ("path", "query"),
    [("/users", {}), ("/contacts", {}), ("/contacts/search", {"q": "ann"}), ("/calls", {})],
)
async def test_the_last_allowed_page_is_an_empty_page(
    client: httpx.AsyncClient, admin: Account, path: str, query: dict[str, str]
) -> None:
    params = {**query, "page": 10**9, "limit": 200}
    r = await client.get(path, params=params, headers=admin.headers)
    assert r.status_code == 200, r.text
    assert (r.json()["items"], r.json()["next_cursor"]) == ([], None)


@pytest.mark.parametrize("path", ["/contacts", "/calls", "/sync"])
async def test_every_page_is_its_slice_of_the_whole_list_from_either_end(
    client: httpx.AsyncClient, admin: Account, path: str
) -> None:
    # These lists have a kept total: pages in the second half are found from the far end.
    h = admin.headers
    contacts = [{"name": f"Paged {i}", "phone_raw": f"+1 907-555-{i:04d}"} for i in range(8)]
    r = await client.post("/contacts/batch", json=contacts, headers=h)
    gone = r.json()["results"][3]["contact"]["id"]
    assert (await client.delete(f"/contacts/{gone}", headers=h)).status_code == 204
    calls = [
        {"direction": "incoming", "duration_seconds": 1, "timestamp": f"2026-11-05T10:0{i}:00Z"}
        for i in range(7)
    ]
    calls.append({**calls[0], "direction": "outgoing"})  # same time: the ids break the tie
    assert (await client.post("/calls", json=calls, headers=h)).status_code == 200
    for one in calls[:6]:  # a sync record each
        assert (await client.post("/calls", json=[one], headers=h)).status_code == 200
    whole = (await client.get(path, params={"limit": 200}, headers=h)).json()["items"]
    total = len(whole)
    assert total == {"/contacts": 7, "/calls": 8, "/sync": 8}[path]
    for limit in (1, 2, 3, 4, 6, 7, 8):
        pages = -(-total // limit)
        for number in range(1, pages + 2):
            r = await client.get(path, params={"page": number, "limit": limit}, headers=h)
            body = r.json()
            expected = whole[(number - 1) * limit : number * limit]
            assert body["items"] == expected, (limit, number)
            assert body["total"] == total
            assert (body["next_cursor"] is None) == (number >= pages), (limit, number)
            if body["next_cursor"]:
                rest = await client.get(
                    path, params={"limit": 200, "cursor": body["next_cursor"]}, headers=h
                )
                assert rest.json()["items"] == whole[number * limit :]


async def test_a_cursor_walk_is_stable_while_rows_are_inserted_before_it(
    client: httpx.AsyncClient, user: Account
) -> None:
    """Keyset, not an offset in disguise: rows that sort before the walk's position, added
    mid-walk, neither shift it (a repeated row) nor are they visited."""
    h = user.headers
    for i in range(6):
        r = await client.post(
            "/contacts", json={"name": f"M{i}", "phone_raw": f"+1415555020{i}"}, headers=h
        )
        assert r.status_code == 201
    body = (await client.get("/contacts", params={"limit": 2}, headers=h)).json()
    seen = [c["name"] for c in body["items"]]
    for i in range(3):  # "A..." sorts before every "M..."
        r = await client.post(
            "/contacts", json={"name": f"A{i}", "phone_raw": f"+1415555030{i}"}, headers=h
        )
        assert r.status_code == 201
    while body["next_cursor"]:
        params = {"limit": 2, "cursor": body["next_cursor"]}
        body = (await client.get("/contacts", params=params, headers=h)).json()
        seen += [c["name"] for c in body["items"]]
    assert seen == [f"M{i}" for i in range(6)]


@pytest.mark.parametrize(
    "path", ["/users", "/contacts", "/contacts/search?q=abc", "/calls", "/calls/{contact}", "/sync"]
)
async def test_page_with_cursor_is_400_on_every_list(
    client: httpx.AsyncClient, admin: Account, path: str
) -> None:
    contact = await client.post(
        "/contacts", json={"name": "C", "phone_raw": "+14155550100"}, headers=admin.headers
    )
    path = path.format(contact=contact.json()["contact"]["id"])
    r = await client.get(path, params={"page": 1, "cursor": "abc"}, headers=admin.headers)
    assert_problem(r, 400, "bad_request")


@pytest.mark.parametrize(
    ("path", "model", "item"),
    [
        ("/users", UserPage, UserOut),
        ("/contacts", ContactPage, ContactOut),
        ("/contacts/search", ContactPage, ContactOut),
        ("/calls", CallPage, CallOut),
        ("/calls/{contact}", CallPage, CallOut),
        ("/sync", SyncPage, SyncRecordOut),
    ],
)
async def test_every_list_answers_what_the_openapi_document_describes(
    client: httpx.AsyncClient,
    admin: Account,
    make_user: MakeUser,
    path: str,
    model: type[BaseModel],
    item: type[BaseModel],
) -> None:
    """paginate writes the bytes itself: each key of a page and of its items, in both
    modes, is the one the list's response model documents, and validates against it."""
    await make_user()
    h = admin.headers
    contact = await client.post(
        "/contacts", json={"name": "Phil", "phone_raw": "+14155550100"}, headers=h
    )
    calls = [call(0, phone_raw="+14155550100"), call(1, phone_raw="+14155550100")]
    assert (await client.post("/calls", json=calls, headers=h)).status_code == 200
    await client.post(
        "/contacts", json={"name": "Philippa", "phone_raw": "+14155550101"}, headers=h
    )
    await client.post("/calls", json=[call(2)], headers=h)
    path = path.format(contact=contact.json()["contact"]["id"])
    for mode in ({"page": 1}, {}):
        query = {**mode, "limit": 1, **({"q": "phi"} if path.endswith("search") else {})}
        r = await client.get(path, params=query, headers=h)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer) == set(model.model_fields)
        assert len(answer["items"]) == 1 and set(answer["items"][0]) == set(item.model_fields)
        assert answer["next_cursor"]
        model.model_validate(answer, strict=False)


async def test_page_with_cursor_and_garbage_cursors_are_400(
    client: httpx.AsyncClient, admin: Account
) -> None:
    h = admin.headers
    r = await client.get("/users", params={"page": 1, "cursor": "abc"}, headers=h)
    assert_problem(r, 400, "bad_request")
    for garbage in ("abc", "!!!", base64.urlsafe_b64encode(b"x" * 40).decode(), "A" * 2001):
        r = await client.get("/users", params={"cursor": garbage}, headers=h)
        assert_problem(r, 400, "bad_request")  # a cursor too long to be one of ours too


async def test_an_empty_cursor_is_no_cursor(client: httpx.AsyncClient, admin: Account) -> None:
    """`?cursor=&limit=` (the contract's own spelling) is the first page, in cursor mode
    or, beside `page`, in page mode."""
    h = admin.headers
    first = await client.get("/users", params={"limit": 1}, headers=h)
    r = await client.get("/users", params={"limit": 1, "cursor": ""}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["items"] == first.json()["items"]
    assert r.json()["page"] is None
    r = await client.get("/users", params={"page": 1, "cursor": ""}, headers=h)
    assert (r.status_code, r.json()["page"]) == (200, 1)


@pytest.mark.parametrize(
    "query",
    [
        "/calls?user_id=&contact_id=&direction=&since=&until=&limit=1",
        "/contacts/changes?cursor=&limit=",
        "/sync?user_id=",
        "/contacts?page=&cursor=&limit=",
        "/users?page=&limit",
    ],
)
async def test_an_empty_query_value_is_the_parameter_left_out(
    client: httpx.AsyncClient, admin: Account, query: str
) -> None:
    """The contract writes its filters as `?user_id=&since=`: a client that fills in the
    ones it has and leaves the others empty gets what leaving them out gets."""
    path, _, params = query.partition("?")
    filled = "&".join(p for p in params.split("&") if p.partition("=")[2])
    r = await client.get(query, headers=admin.headers)
    assert r.status_code == 200, r.text
    assert r.json() == (await client.get(f"{path}?{filled}", headers=admin.headers)).json() | {
        "next_cursor": r.json()["next_cursor"]  # a new changes cursor per answer is fine
    }


async def test_a_query_value_ending_in_equals_signs_is_kept(
    client: httpx.AsyncClient, admin: Account
) -> None:
    """Only an empty value is dropped, not one that ends like base64 padding."""
    r = await client.get("/contacts/search?q=ab==", headers=admin.headers)
    assert r.status_code == 200, r.text
    r = await client.get("/contacts/search?q=", headers=admin.headers)
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", "q"]


def test_cursor_is_tamper_proof_and_bound_to_its_listing() -> None:
    key = b"k" * 32
    cursor = encode_cursor(key, "users", ["2026-01-01 00:00:00+00", "x"])
    assert decode_cursor(key, "users", cursor, 2) == ["2026-01-01 00:00:00+00", "x"]
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[-3] ^= 1
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad, scope in ((tampered, "users"), (cursor, "contacts"), (cursor, "users|other-filter")):
        with pytest.raises(BadRequest):
            decode_cursor(key, scope, bad, 2)
    with pytest.raises(BadRequest):
        decode_cursor(b"other" * 8, "users", cursor, 2)


def test_a_signed_cursor_with_another_number_of_sort_keys_is_a_bad_request() -> None:
    """A cursor of this listing's scope and key, but with more or fewer values than its
    sort keys (made by a server whose listing had other keys): a 400, not a 500."""
    key = b"k" * 32
    cursor = encode_cursor(key, "users", ["2026-01-01 00:00:00+00", "x"])
    assert decode_cursor(key, "users", cursor, (3, 2)) == ["2026-01-01 00:00:00+00", "x"]
    for size in (1, 3, (3, 4)):
        with pytest.raises(BadRequest):
            decode_cursor(key, "users", cursor, size)


@pytest.mark.parametrize(
    ("shape", "from_sql"),
    [
        (CONTACT, "FROM contacts c"),
        (CALL, "FROM call_logs l LEFT JOIN contacts c ON c.id = l.contact_id"),
        (USER, "FROM users u"),
        (SYNC, "FROM sync_audit s"),
    ],
)
async def test_a_listed_item_is_the_same_json_as_the_single_item(
    conn: asyncpg.Connection, user: Account, shape: Shape, from_sql: str
) -> None:
    """Lists build items with orjson from columns, single rows in PostgreSQL: both must
    give the same bytes (compact, no spaces), nulls, escapes, nested objects and
    whole-second times included."""
    odd = 'Zoë "Q" \\ O\'Brien\t\u2028 日本'
    await conn.execute(
        """WITH c AS (
               INSERT INTO contacts (name, phone_raw, phone_normalized, created_by, created_at)
               VALUES ($1, '+1 415 555 0100', '+14155550100', $2, '2026-11-02T10:00:00Z'),
                      ('Plain', '+1 415 555 0101', '+14155550101', NULL, now())
               RETURNING id, phone_normalized)
           INSERT INTO call_logs (user_id, contact_id, phone_raw, phone_normalized,
                                  direction, duration_seconds, "timestamp")
           SELECT $2, id, NULL, phone_normalized, 'missed', 0, '2026-11-02T10:00:00Z' FROM c
           UNION ALL SELECT $2, NULL, $1, NULL, 'incoming', 61, now()""",
        odd,
        user.id,
    )
    await conn.execute(
        """INSERT INTO users (name, email, password_hash, is_admin, created_at)
           VALUES ($1, 'odd@example.com', 'not-a-hash', true, '2026-11-02T10:00:00Z')""",
        odd,
    )
    await conn.execute(
        """INSERT INTO sync_audit (user_id, kind, details)
           VALUES ($1, 'sync', $2::jsonb), ($1, 'calls', '{}')""",
        user.id,
        orjson.dumps({"device_id": odd, "n": [1, 2.5, None], "x": {"y": True}}).decode(),
    )
    order = f"ORDER BY {shape.fields[0][1]}"  # the id
    singles = [
        r[0] for r in await conn.fetch(f"SELECT {shape.object_sql}::text {from_sql} {order}")
    ]
    listed = shape.dumps(await conn.fetch(f"SELECT {shape.columns_sql} {from_sql} {order}"))
    assert len(singles) >= 2
    assert listed.decode() == "[" + ",".join(singles) + "]"
