"""Contract: Contacts, PUT /contacts/{id} and DELETE /contacts/{id} (owner or admin,
If-Match, phone_taken, soft delete)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from crmsync.contacts import service as contacts_service
from tests.conftest import Account, MakeUser, assert_problem, make_app
from tests.contacts.test_upsert import at, contact, post

UNKNOWN = "7d1c4a52-8f7e-4b0a-9a43-1f0f4b7f2d11"


async def create(client: httpx.AsyncClient, account: Account, **fields: Any) -> dict[str, Any]:
    r = await post(client, account, contact(**fields))
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()["contact"]
    return created


async def put(
    client: httpx.AsyncClient, account: Account, contact_id: str, body: Any, **headers: str
) -> httpx.Response:
    return await client.put(
        f"/contacts/{contact_id}", json=body, headers={**account.headers, **headers}
    )


async def delete(
    client: httpx.AsyncClient, account: Account, contact_id: str, **headers: str
) -> httpx.Response:
    return await client.delete(f"/contacts/{contact_id}", headers={**account.headers, **headers})


async def etag_of(client: httpx.AsyncClient, account: Account, contact_id: str) -> str:
    return (await client.get(f"/contacts/{contact_id}", headers=account.headers)).headers["etag"]


async def test_owner_changes_name_and_phone_and_gets_a_new_etag(
    client: httpx.AsyncClient, user: Account
) -> None:
    c = await create(client, user, created_at=at(0))
    before = await etag_of(client, user, c["id"])
    r = await put(client, user, c["id"], {"name": "Bruno Costa", "phone_raw": "+1 415 555 0999"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["name"], body["phone_raw"], body["phone_normalized"]) == (
        c["id"],
        "Bruno Costa",
        "+1 415 555 0999",
        "+14155550999",
    )
    assert body["created_at"] == c["created_at"] and body["updated_at"] > c["updated_at"]
    assert r.headers["etag"] != before
    assert r.headers["etag"] == await etag_of(client, user, c["id"])


async def test_a_contact_stored_with_a_local_only_number_stays_editable(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """Stored before local-only numbers were refused (migration 0012 keeps such contacts):
    its own number sent again is no change, any other unreadable one is still a 422, and
    a full number fixes it."""
    contact_id = await conn.fetchval(
        "INSERT INTO contacts (name, phone_raw, phone_normalized, created_by)"
        " VALUES ('Lou', '555-0150', '+15550150', $1) RETURNING id",
        uuid.UUID(user.id),
    )
    r = await put(client, user, str(contact_id), {"name": "Lou Local", "phone_raw": "555-0150"})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["phone_normalized"]) == ("Lou Local", "+15550150")
    for other in ("5550150", "555-0151"):
        r = await put(client, user, str(contact_id), {"phone_raw": other})
        assert_problem(r, 422, "validation_error")
    r = await put(client, user, str(contact_id), {"phone_raw": "(303) 555-0150"})
    assert (r.status_code, r.json()["phone_normalized"]) == (200, "+13035550150")


async def test_a_number_read_with_its_hint_keeps_it_when_sent_again_and_a_new_one_takes_one(
    client: httpx.AsyncClient, user: Account
) -> None:
    """A French number spelled the French way, made with its E.164 hint on a US server: an
    app sending the whole contact back (a new name, the same phone_raw, no hint) must not
    move it to the US reading of that spelling (+10472103030), and a new national spelling
    from abroad is read with its hint, as POST reads it."""
    c = await create(client, user, phone="04 72 10 30 30", phone_normalized="+33472103030")
    assert c["phone_normalized"] == "+33472103030"
    r = await put(client, user, c["id"], {"name": "Sophie Martin", "phone_raw": "04 72 10 30 30"})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["phone_normalized"]) == ("Sophie Martin", "+33472103030")
    found = await client.get("/contacts/lookup?phone=%2B33472103030", headers=user.headers)
    assert found.json()["id"] == c["id"]
    # The contact's own spelling with the contact's own name: no change, the same ETag.
    same = await put(
        client, user, c["id"], {"name": "Sophie Martin", "phone_raw": "04 72 10 30 30"}
    )
    assert same.headers["etag"] == r.headers["etag"]

    # A hint without a phone_raw changes nothing.
    alone = await put(client, user, c["id"], {"phone_normalized": "+442079460958"})
    assert (alone.json()["phone_normalized"], alone.headers["etag"]) == (
        "+33472103030",
        r.headers["etag"],
    )

    london = {"phone_raw": "020 7946 0958", "phone_normalized": "+442079460958"}
    r = await put(client, user, c["id"], london)
    assert (r.status_code, r.json()["phone_normalized"]) == (200, "+442079460958"), r.text
    # A hint that is not the spelling's number counts for nothing: phone_raw decides.
    r = await put(
        client, user, c["id"], {"phone_raw": "(415) 555-0177", "phone_normalized": "+442079460958"}
    )
    assert (r.status_code, r.json()["phone_normalized"]) == (200, "+14155550177"), r.text


async def test_a_blank_phone_raw_in_a_put_leaves_the_number_and_the_spelling_to_the_hint(
    client: httpx.AsyncClient, user: Account
) -> None:
    """As in POST: the hint is the number and is kept as phone_raw (it stored the blank)."""
    c = await create(client, user, phone="(415) 555-0161")
    for blank, hint, number in (
        ("   ", "+1 415 555 0162", "+14155550162"),
        ("", "+14155550163", "+14155550163"),
    ):
        r = await put(client, user, c["id"], {"phone_raw": blank, "phone_normalized": hint})
        assert r.status_code == 200, r.text
        assert (r.json()["phone_raw"], r.json()["phone_normalized"]) == (hint, number)
    assert_problem(await put(client, user, c["id"], {"phone_raw": " "}), 422, "validation_error")


async def test_the_contacts_own_spelling_read_under_another_region_is_no_other_contacts_number(
    client: httpx.AsyncClient, user: Account, database_url: str
) -> None:
    """A contact made on a server whose default region was GB: "(415) 555-0199" is
    +444155550199 there. Under US it reads +14155550199, another contact's number; sent
    back unchanged with a new name, it is still no change of number, not a 409."""
    app = make_app(database_url, default_region="GB")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as gb:
            nine = await create(gb, user, name="Nine", phone="(415) 555-0199")
    assert nine["phone_normalized"] == "+444155550199"
    await create(client, user, name="Other", phone="+1 415 555 0199")
    r = await put(client, user, nine["id"], {"name": "Nine N", "phone_raw": "(415) 555-0199"})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["phone_normalized"]) == ("Nine N", "+444155550199")


async def test_a_put_of_the_contacts_own_spelling_answers_what_it_wrote_when_another_put_races_it(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, database_url: str
) -> None:
    """Last write wins, without If-Match: a PUT sending the contact's spelling back, as the
    other PUT moves the contact to another number, is ordered before or after that one, and
    answers the spelling it wrote. It decided "no change" from a read made before the other
    PUT committed and its write after: it answered 200 with the other's number, and a
    colleague's phone was left with the number it had just replaced."""
    c = await create(client, user, phone="(415) 555-0161")
    contact_id, own, other = uuid.UUID(c["id"]), c["phone_raw"], "(415) 555-0162"

    async def put_number(connection: Any, phone_raw: str) -> dict[str, Any]:
        version = await contacts_service.contact_update(
            connection,
            contact_id,
            name=None,
            phone_raw=phone_raw,
            user_id=uuid.UUID(user.id),
            is_admin=False,
            if_match=None,
            region="US",
        )
        got: dict[str, Any] = orjson.loads(version.json)
        return got

    class OtherPutCommitsAfterTheFirstStatement:
        """The PUT's connection; the other PUT runs, and commits, on another connection as
        soon as this one's first statement is answered."""

        def __init__(self, inner: asyncpg.Connection) -> None:
            self.inner = inner
            self.raced = False

        async def _race(self, result: Any) -> Any:
            if not self.raced:
                self.raced = True
                racer = await asyncpg.connect(database_url)
                try:
                    assert (await put_number(racer, other))["phone_raw"] == other
                finally:
                    await racer.close()
            return result

        async def fetchval(self, *args: Any) -> Any:
            return await self._race(await self.inner.fetchval(*args))

        async def fetchrow(self, *args: Any) -> Any:
            return await self._race(await self.inner.fetchrow(*args))

        def is_in_transaction(self) -> bool:
            return self.inner.is_in_transaction()

    answered = await put_number(OtherPutCommitsAfterTheFirstStatement(conn), own)
    assert answered["phone_raw"] == own  # it was the first write; the other one came after
    now = await client.get(f"/contacts/{c['id']}", headers=user.headers)
    assert now.json()["phone_raw"] == other


async def test_admin_may_edit_and_delete_anyones_contact_others_get_403(
    client: httpx.AsyncClient, user: Account, admin: Account, make_user: MakeUser
) -> None:
    c = await create(client, user)
    stranger = await make_user()
    assert_problem(await put(client, stranger, c["id"], {"name": "X"}), 403, "forbidden")
    assert_problem(await delete(client, stranger, c["id"]), 403, "forbidden")
    assert (await put(client, admin, c["id"], {"name": "By admin"})).json()["name"] == "By admin"
    assert (await delete(client, admin, c["id"])).status_code == 204


async def test_a_put_that_changes_nothing_writes_nothing(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    """Same ETag, same updated_at, no new entry in the changes feed: other phones' tags stay
    good. The checks still apply: a stale If-Match is 412, a stranger 403."""
    c = await create(client, user, name="Ana", phone="(415) 555-0123")
    tag = await etag_of(client, user, c["id"])
    head = (await client.get("/sync/state", headers=user.headers)).json()["contacts_cursor"]
    for body in (
        {},
        {"name": None},
        {"name": "Ana"},
        {"name": "Ana", "phone_raw": "(415) 555-0123"},
    ):
        r = await put(client, user, c["id"], body, **{"If-Match": tag})
        assert r.status_code == 200, (body, r.text)
        assert r.json() == c and r.headers["etag"] == tag, body
    changes = await client.get(f"/contacts/changes?cursor={head}", headers=user.headers)
    assert changes.json()["items"] == []
    assert_problem(
        await put(client, user, c["id"], {}, **{"If-Match": '"1"'}), 412, "precondition_failed"
    )
    assert_problem(await put(client, await make_user(), c["id"], {}), 403, "forbidden")
    r = await put(client, user, c["id"], {"phone_raw": "+1 415 555 0123"})  # another spelling
    assert r.status_code == 200 and r.headers["etag"] != tag
    assert r.json()["phone_raw"] == "+1 415 555 0123" and r.json()["updated_at"] > c["updated_at"]


async def test_stale_if_match_is_412_and_nothing_changes(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    c = await create(client, user)
    first = await etag_of(client, user, c["id"])
    r = await put(client, user, c["id"], {"name": "Carla Dias (Acme)"}, **{"If-Match": first})
    assert r.status_code == 200, r.text
    r = await put(client, user, c["id"], {"name": "Carla"}, **{"If-Match": first})
    assert_problem(r, 412, "precondition_failed")
    assert_problem(
        await delete(client, user, c["id"], **{"If-Match": first}), 412, "precondition_failed"
    )
    assert_problem(
        await put(client, user, c["id"], {"name": "Y"}, **{"If-Match": '"junk"'}),
        412,
        "precondition_failed",
    )
    row = await conn.fetchrow("SELECT name, deleted FROM contacts")
    assert (row["name"], row["deleted"]) == ("Carla Dias (Acme)", False)
    current = r.headers.get("etag") or await etag_of(client, user, c["id"])
    assert (await delete(client, user, c["id"], **{"If-Match": current})).status_code == 204


async def test_every_contact_answer_carries_its_etag_for_an_offline_edit(
    client: httpx.AsyncClient, user: Account
) -> None:
    """The ETag of every contact a phone holds, with no GET first: a phone edits offline
    the version it pulled, and a colleague's change made meanwhile is a 412, not lost."""
    created = await create(client, user, name="Carla", phone_raw="(415) 555-0150")
    assert created["etag"] == await etag_of(client, user, created["id"])
    pulled = (await client.get("/contacts/changes", headers=user.headers)).json()["items"]
    assert [c["etag"] for c in pulled] == [created["etag"]]
    r = await put(client, user, created["id"], {"name": "Carla D."})  # from another phone
    assert r.status_code == 200 and r.json()["etag"] == r.headers["etag"] != created["etag"]
    # The phone edits the version it pulled: the change above is not overwritten.
    stale = await put(client, user, created["id"], {"name": "X"}, **{"If-Match": pulled[0]["etag"]})
    assert_problem(stale, 412, "precondition_failed")
    current = r.json()["etag"]
    for path, items in (
        ("/contacts", lambda b: b["items"]),
        ("/contacts?page=1", lambda b: b["items"]),
        ("/contacts/search?q=carla", lambda b: b["items"]),
        ("/contacts/changes", lambda b: b["items"]),
        ("/contacts/lookup?phone=%2B14155550150", lambda b: [b]),
    ):
        body = (await client.get(path, headers=user.headers)).json()
        assert [c["etag"] for c in items(body)] == [current], path
    batch = await client.post(
        "/contacts/batch", json=[contact(phone_raw="(415) 555-0150")], headers=user.headers
    )
    assert batch.json()["results"][0]["contact"]["etag"] == current
    new = contact(phone_raw="(415) 555-0199")
    synced = await client.post("/sync", json={"contacts": [new]}, headers=user.headers)
    assert [c["etag"] for c in synced.json()["changes"]["items"]] == [current]
    stored = synced.json()["contacts"][0]["contact"]
    assert stored["etag"] == await etag_of(client, user, stored["id"])
    other = await create(client, user, phone_raw="(415) 555-0177")
    taken = await put(client, user, other["id"], {"phone_raw": "(415) 555-0150"})
    assert assert_problem(taken, 409, "phone_taken")["contact"]["etag"] == current
    r = await put(client, user, created["id"], {"name": "Carla Dias"}, **{"If-Match": current})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "tag",
    [
        b'"9223372036854775808"',  # one past a bigint
        b'"99999999999999999999999"',
        b'"' + b"9" * 5000 + b'"',  # past Python's int() digit limit
        b'"\xb2"',  # latin-1 superscript two: str.isdigit() says yes
        b'"\xd9\xa3"',  # Arabic-Indic digit three, as UTF-8 bytes
    ],
)
async def test_an_if_match_this_server_never_made_is_412_not_an_error(
    client: httpx.AsyncClient, user: Account, tag: bytes
) -> None:
    c = await create(client, user)
    headers = {**user.headers, "If-Match": tag}  # type: ignore[dict-item]
    r = await client.put(f"/contacts/{c['id']}", json={"name": "Y"}, headers=headers)
    assert_problem(r, 412, "precondition_failed")
    assert_problem(
        await client.delete(f"/contacts/{c['id']}", headers=headers), 412, "precondition_failed"
    )


async def test_if_match_accepts_a_list_and_star(client: httpx.AsyncClient, user: Account) -> None:
    c = await create(client, user)
    tag = await etag_of(client, user, c["id"])
    r = await put(client, user, c["id"], {"name": "A"}, **{"If-Match": f'"1", {tag}'})
    assert r.status_code == 200, r.text
    r = await put(client, user, c["id"], {"name": "B"}, **{"If-Match": "*"})
    assert r.status_code == 200, r.text


async def test_if_match_and_if_none_match_read_every_field_line(
    client: httpx.AsyncClient, user: Account
) -> None:
    """A header sent as two lines (OkHttp's addHeader twice) is one list (RFC 9110 5.3): the
    current tag on the second line matches, as it does on one line."""
    c = await create(client, user)
    path = f"/contacts/{c['id']}"
    tag = await etag_of(client, user, c["id"])
    auth = list(user.headers.items())
    r = await client.get(path, headers=[*auth, ("If-None-Match", '"1"'), ("If-None-Match", tag)])
    assert r.status_code == 304, r.text
    r = await client.put(
        path, json={"name": "A"}, headers=[*auth, ("If-Match", '"1"'), ("If-Match", tag)]
    )
    assert r.status_code == 200, r.text
    r = await client.put(
        path, json={"name": "B"}, headers=[*auth, ("If-Match", '"1"'), ("If-Match", "*")]
    )
    assert r.status_code == 200, r.text
    stale = [*auth, ("If-Match", '"1"'), ("If-Match", tag)]  # tag is A's version's, before B
    assert_problem(await client.delete(path, headers=stale), 412, "precondition_failed")


async def test_without_if_match_the_last_write_wins(
    client: httpx.AsyncClient, user: Account
) -> None:
    c = await create(client, user)
    await put(client, user, c["id"], {"name": "First"})
    r = await put(client, user, c["id"], {"name": "Second"})
    assert r.json()["name"] == "Second"


async def test_phone_another_contact_has_is_409_with_that_contact_deleted_ones_too(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    carla = await create(client, user, name="Carla", phone="(415) 555-0150")
    bruno = await create(client, user, name="Bruno", phone="(415) 555-0123")
    r = await put(client, user, carla["id"], {"phone_raw": "415-555-0123"})
    body = assert_problem(r, 409, "phone_taken")
    assert body["contact"] == bruno
    await delete(client, user, bruno["id"])
    r = await put(client, user, carla["id"], {"phone_raw": "+14155550123"})
    body = assert_problem(r, 409, "phone_taken")
    assert body["contact"]["id"] == bruno["id"] and body["contact"]["deleted"] is True
    assert await conn.fetchval("SELECT phone_normalized FROM contacts WHERE name = 'Carla'") == (
        "+14155550150"
    )
    # Its own number again is no conflict.
    assert (await put(client, user, carla["id"], {"phone_raw": "415 555 0150"})).status_code == 200


async def test_put_validates_like_create(client: httpx.AsyncClient, user: Account) -> None:
    c = await create(client, user)
    for body, field in (
        ({"phone_raw": "abc"}, "phone_raw"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
    ):
        problem = assert_problem(await put(client, user, c["id"], body), 422, "validation_error")
        assert problem["errors"][0]["loc"][:2] == ["body", field]


async def test_put_and_delete_of_unknown_deleted_or_malformed_ids_are_404(
    client: httpx.AsyncClient, user: Account
) -> None:
    c = await create(client, user)
    assert (await delete(client, user, c["id"])).status_code == 204
    for contact_id in (UNKNOWN, c["id"], "nope"):
        assert_problem(await put(client, user, contact_id, {"name": "X"}), 404, "not_found")
        assert_problem(await delete(client, user, contact_id), 404, "not_found")
    # An edit that would change nothing is no way to read a tombstone either.
    for unchanged in ({}, {"name": c["name"]}, {"phone_raw": c["phone_raw"]}):
        assert_problem(await put(client, user, c["id"], unchanged), 404, "not_found")


async def test_delete_is_soft_the_tombstone_keeps_its_calls(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    c = await create(client, user)
    call = {
        "direction": "outgoing",
        "duration_seconds": 3,
        "timestamp": at(0),
        "phone_raw": c["phone_raw"],
    }
    await client.post("/calls", json=[call], headers=user.headers)
    r = await delete(client, user, c["id"])
    assert r.status_code == 204 and r.content == b""
    row = await conn.fetchrow("SELECT deleted FROM contacts WHERE id = $1", c["id"])
    assert row["deleted"] is True
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == c["id"]
    listed = (await client.get("/contacts", headers=user.headers)).json()["items"]
    assert listed == []


async def test_changing_a_number_links_calls_waiting_for_the_new_number(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    c = await create(client, user)
    call = {
        "direction": "incoming",
        "duration_seconds": 3,
        "timestamp": at(0),
        "phone_raw": "(415) 555-0999",
    }
    await client.post("/calls", json=[call], headers=user.headers)
    await put(client, user, c["id"], {"phone_raw": "(415) 555-0999"})
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == c["id"]


async def test_changing_a_number_leaves_calls_linked_to_another_contact_alone(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    office = await create(client, user, name="Office", phone="(415) 555-0150")
    bruno = await create(client, user, name="Bruno", phone="(415) 555-0123")
    call = {
        "direction": "incoming",
        "duration_seconds": 3,
        "timestamp": at(0),
        "phone_raw": "(415) 555-0999",
        "contact_id": office["id"],
    }
    assert (await client.post("/calls", json=[call], headers=user.headers)).json()["inserted"] == 1
    assert (
        await put(client, user, bruno["id"], {"phone_raw": "(415) 555-0999"})
    ).status_code == 200
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == office["id"]


async def test_a_deleted_contact_is_404_to_a_non_owner_and_to_an_admin_with_an_etag(
    client: httpx.AsyncClient, user: Account, admin: Account, make_user: MakeUser
) -> None:
    c = await create(client, user)
    tag = await etag_of(client, user, c["id"])
    assert (await delete(client, user, c["id"])).status_code == 204
    stranger = await make_user()
    assert_problem(await put(client, stranger, c["id"], {"name": "X"}), 404, "not_found")
    assert_problem(await delete(client, stranger, c["id"]), 404, "not_found")
    for r in (
        await put(client, admin, c["id"], {"name": "X"}, **{"If-Match": tag}),
        await delete(client, admin, c["id"], **{"If-Match": tag}),
    ):
        assert_problem(r, 404, "not_found")


async def test_a_stranger_with_a_stale_if_match_gets_403_not_412(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    """Not allowed at all comes first: a 412 would tell the app to pull and retry."""
    c = await create(client, user)
    stale = await etag_of(client, user, c["id"])
    assert (await put(client, user, c["id"], {"name": "Changed"})).status_code == 200
    stranger = await make_user()
    r = await put(client, stranger, c["id"], {"name": "Mine"}, **{"If-Match": stale})
    assert_problem(r, 403, "forbidden")
    assert_problem(await delete(client, stranger, c["id"], **{"If-Match": stale}), 403, "forbidden")


async def test_admin_with_a_stale_if_match_gets_412_not_403(
    client: httpx.AsyncClient, user: Account, admin: Account, conn: asyncpg.Connection
) -> None:
    c = await create(client, user)
    stale = await etag_of(client, user, c["id"])
    assert (await put(client, user, c["id"], {"name": "Changed"})).status_code == 200
    r = await put(client, admin, c["id"], {"name": "By admin"}, **{"If-Match": stale})
    assert_problem(r, 412, "precondition_failed")
    r = await delete(client, admin, c["id"], **{"If-Match": stale})
    assert_problem(r, 412, "precondition_failed")
    row = await conn.fetchrow("SELECT name, deleted FROM contacts")
    assert (row["name"], row["deleted"]) == ("Changed", False)


async def test_a_stale_if_match_with_a_number_another_contact_has_is_412_not_409(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """The changed contact comes first: the app pulls it and redoes its edit on it, rather
    than ask its user about a number on a version that is gone."""
    carla = await create(client, user, name="Carla", phone="(415) 555-0150")
    await create(client, user, name="Bruno", phone="(415) 555-0123")
    stale = await etag_of(client, user, carla["id"])
    assert (await put(client, user, carla["id"], {"name": "Carla Dias"})).status_code == 200
    r = await put(client, user, carla["id"], {"phone_raw": "415-555-0123"}, **{"If-Match": stale})
    assert_problem(r, 412, "precondition_failed")
    row = await conn.fetchrow("SELECT name, phone_normalized FROM contacts WHERE name <> 'Bruno'")
    assert (row["name"], row["phone_normalized"]) == ("Carla Dias", "+14155550150")


async def test_if_match_accepts_the_etag_weakened_by_a_compressing_proxy(
    client: httpx.AsyncClient, user: Account
) -> None:
    c = await create(client, user)
    tag = await etag_of(client, user, c["id"])
    r = await put(client, user, c["id"], {"name": "A"}, **{"If-Match": f"W/{tag}"})
    assert r.status_code == 200, r.text
    tag = r.headers["etag"]
    assert (await delete(client, user, c["id"], **{"If-Match": f"W/{tag}"})).status_code == 204


# Deadlocks between a PUT that gives a contact a new number and a batch that creates that
# number and also names the contact's current one: each holds what the other waits for.
# Played here with a transaction of the test standing in for one side; PostgreSQL ends the
# wait after deadlock_timeout (1 s) by rolling back the side that waited first.

NEW, CURRENT = "+14155550100", "+14155550199"
# Each side looks for a deadlock deadlock_timeout after it began to wait, once, and the one
# that looks first is rolled back: the server's side waits first, but on a loaded machine
# its check can come late. The test's side looks only after 10 s, so it never wins the race.
HOLD_OUT = "SET deadlock_timeout = '10s'"


@pytest.fixture
async def patient_client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A server whose connections look for a deadlock 3 s after they begin to wait, not 1 s:
    the test's side must begin its own wait before that, and a machine busy with other
    test runs took longer than 1 s (the server's check then found no deadlock yet, and
    10 s later the test's side was rolled back instead)."""
    app = make_app(database_url + ("&" if "?" in database_url else "?") + "deadlock_timeout=3s")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


async def wait_for_a_lock_wait(conn: asyncpg.Connection) -> None:
    """Until the request sent just before waits for a lock: within 30 s, room for a machine
    busy with other test runs."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nobody waited for a lock")


async def test_a_put_rolled_back_to_break_a_deadlock_is_run_again(
    patient_client: httpx.AsyncClient, user: Account, database_url: str, conn: asyncpg.Connection
) -> None:
    client = patient_client
    x = await create(client, user, phone=CURRENT)
    other = await asyncpg.connect(database_url)
    await other.execute(HOLD_OUT)
    try:
        async with other.transaction():
            await other.execute(
                "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('N', $1, $1)",
                NEW,
            )
            # The PUT locks x, then waits for this transaction's entry for NEW ...
            putting = asyncio.create_task(put(client, user, x["id"], {"phone_raw": NEW}))
            await wait_for_a_lock_wait(conn)
            # ... and this transaction waits for x: PostgreSQL rolls the PUT back.
            await other.execute("UPDATE contacts SET name = 'T' WHERE id = $1", uuid.UUID(x["id"]))
        # Run again, the PUT finds NEW taken by this transaction's contact.
        r = await putting
    finally:
        await other.close()
    assert_problem(r, 409, "phone_taken")
    assert r.json()["contact"]["phone_normalized"] == NEW
    row = await conn.fetchrow(
        "SELECT name, phone_normalized FROM contacts WHERE id = $1", uuid.UUID(x["id"])
    )
    assert tuple(row) == ("T", CURRENT)


async def test_a_batch_rolled_back_to_break_a_deadlock_is_a_503_to_retry(
    patient_client: httpx.AsyncClient, user: Account, database_url: str, conn: asyncpg.Connection
) -> None:
    client = patient_client
    x = await create(client, user, phone=CURRENT, created_at=at(10))
    batch = [contact("New", NEW), contact("Older", CURRENT, created_at=at(0))]
    other = await asyncpg.connect(database_url)
    await other.execute(HOLD_OUT)
    try:
        async with other.transaction():
            await other.execute("UPDATE contacts SET name = 'T' WHERE id = $1", uuid.UUID(x["id"]))
            # The batch inserts NEW, then waits for x (its older item would replace it) ...
            sending = asyncio.create_task(
                client.post("/contacts/batch", json=batch, headers=user.headers)
            )
            await wait_for_a_lock_wait(conn)
            # ... and this transaction waits for the batch's NEW: the batch is rolled back.
            await other.execute(
                "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('N', $1, $1)",
                NEW,
            )
        r = await sending
    finally:
        await other.close()
    assert_problem(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "1"
    rows = await conn.fetch("SELECT name, phone_normalized FROM contacts ORDER BY phone_normalized")
    assert [tuple(row) for row in rows] == [("N", NEW), ("T", CURRENT)]  # nothing of the batch
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0
    retried = await client.post("/contacts/batch", json=batch, headers=user.headers)
    assert retried.status_code == 200, retried.text


async def racing(
    database_url: str,
    conn: asyncpg.Connection,
    request: Awaitable[httpx.Response],
    sql: str,
    *args: object,
) -> tuple[httpx.Response, Any]:
    """The answer to `request` sent while another transaction, having run `sql` (its value
    returned too), holds a contact's row, and commits once the request waits for it."""
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            value = await other.fetchval(sql, *args)
            sending = asyncio.ensure_future(request)
            await wait_for_a_lock_wait(conn)
        return await sending, value
    finally:
        await other.close()


async def put_while_renamed(
    client: httpx.AsyncClient,
    user: Account,
    database_url: str,
    conn: asyncpg.Connection,
    contact: dict[str, Any],
) -> tuple[httpx.Response, str]:
    """A PUT of the name "New", sent while another transaction gives the contact that same
    name; with the xmin that transaction left on the row."""
    r, xmin = await racing(
        database_url,
        conn,
        put(client, user, contact["id"], {"name": "New"}),
        "UPDATE contacts SET name = 'New' WHERE id = $1 RETURNING xmin::text",
        uuid.UUID(contact["id"]),
    )
    return r, xmin


async def delete_while_taken_over(
    client: httpx.AsyncClient,
    user: Account,
    taker: Account,
    database_url: str,
    conn: asyncpg.Connection,
    contact: dict[str, Any],
) -> httpx.Response:
    """The owner's DELETE, sent while `taker` takes the contact over in another transaction."""
    r, _ = await racing(
        database_url,
        conn,
        delete(client, user, contact["id"]),
        "UPDATE contacts SET created_by = $2 WHERE id = $1",
        uuid.UUID(contact["id"]),
        uuid.UUID(taker.id),
    )
    return r


async def test_a_put_racing_an_identical_change_answers_200(
    client: httpx.AsyncClient, user: Account, database_url: str, conn: asyncpg.Connection
) -> None:
    """The PUT's snapshot has the old name; by the time it may write, a concurrent write
    gave the contact the same name, so it has nothing to write: it looks again, not 404."""
    x = await create(client, user, name="Old")
    r, _ = await put_while_renamed(client, user, database_url, conn, x)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "New"


async def test_a_delete_racing_a_change_of_owner_is_403(
    client: httpx.AsyncClient,
    user: Account,
    make_user: MakeUser,
    database_url: str,
    conn: asyncpg.Connection,
) -> None:
    """An older upload by another user takes the contact over while the owner's DELETE
    waits: the DELETE is refused for what the contact now is (403), not as unknown (404)."""
    x = await create(client, user)
    r = await delete_while_taken_over(client, user, await make_user(), database_url, conn, x)
    assert_problem(r, 403, "forbidden")
    assert (
        await conn.fetchval("SELECT deleted FROM contacts WHERE id = $1", uuid.UUID(x["id"]))
        is False
    )


async def test_a_write_that_loses_every_race_is_a_503_to_retry_and_writes_nothing(
    client: httpx.AsyncClient,
    user: Account,
    make_user: MakeUser,
    database_url: str,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PUT or DELETE is run again each time its row changed under it, but not forever:
    after ATTEMPTS lost races (here one) it answers 503 with Retry-After and writes nothing."""
    monkeypatch.setattr(contacts_service, "ATTEMPTS", 1)
    x = await create(client, user, name="Old")
    y = await create(client, user, name="Old", phone=NEW)
    r, version = await put_while_renamed(client, user, database_url, conn, x)
    assert_problem(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "1"
    # the row as the other transaction left it: the PUT wrote no version of its own
    assert (
        await conn.fetchval("SELECT xmin::text FROM contacts WHERE id = $1", uuid.UUID(x["id"]))
        == version
    )

    r = await delete_while_taken_over(client, user, await make_user(), database_url, conn, y)
    assert_problem(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "1"
    assert (
        await conn.fetchval("SELECT deleted FROM contacts WHERE id = $1", uuid.UUID(y["id"]))
        is False
    )


@pytest.mark.parametrize(
    "body",
    [
        {"phone_raw": ""},
        {"phone_raw": "12345"},
        {"phone_raw": 4155550123},
        {"phone_raw": "(415) 555-0199\x00"},
        {"name": ""},
        {"name": "   "},
        {"name": "\u200b\u2060"},
        {"name": 123},
        {"name": "a\x00b"},
        {"name": "x" * 201},
        [],
        "name",
    ],
)
async def test_bad_edits_are_422_and_change_nothing(
    client: httpx.AsyncClient, user: Account, body: Any
) -> None:
    created = (await post(client, user, contact())).json()["contact"]
    r = await client.put(f"/contacts/{created['id']}", json=body, headers=user.headers)
    assert_problem(r, 422, "validation_error")
    now = (await client.get(f"/contacts/{created['id']}", headers=user.headers)).json()
    assert now == created


async def test_null_fields_of_an_edit_are_left_as_they_are(
    client: httpx.AsyncClient, user: Account
) -> None:
    created = (await post(client, user, contact())).json()["contact"]
    r = await client.put(
        f"/contacts/{created['id']}", json={"name": None, "phone_raw": None}, headers=user.headers
    )
    assert r.status_code == 200 and r.json() == created, r.text


async def test_an_edited_name_is_stored_trimmed_and_the_same_name_with_spaces_is_no_change(
    client: httpx.AsyncClient, user: Account
) -> None:
    c = await create(client, user, name="Bruno")
    r = await put(client, user, c["id"], {"name": "  Carla Dias\t"})
    assert (r.status_code, r.json()["name"]) == (200, "Carla Dias"), r.text
    again = await put(client, user, c["id"], {"name": " Carla Dias "})
    assert (again.json()["name"], again.headers["etag"]) == ("Carla Dias", r.headers["etag"])


async def test_a_number_given_to_another_contact_after_the_put_looked_is_409_with_that_contact(
    client: httpx.AsyncClient, user: Account, database_url: str, conn: asyncpg.Connection
) -> None:
    """Another transaction inserts a contact of the new number and commits while the PUT
    waits for that number's index entry: the PUT's unique violation is the same 409
    phone_taken, with the contact that took the number, and the PUT changes nothing."""
    x = await create(client, user, phone=CURRENT)
    r, taker = await racing(
        database_url,
        conn,
        put(client, user, x["id"], {"phone_raw": NEW}),
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('N', $1, $1)"
        " RETURNING id::text",
        NEW,
    )
    problem = assert_problem(r, 409, "phone_taken")
    assert (problem["contact"]["id"], problem["contact"]["phone_normalized"]) == (taker, NEW)
    now = (await client.get(f"/contacts/{x['id']}", headers=user.headers)).json()
    assert now["phone_normalized"] == CURRENT
