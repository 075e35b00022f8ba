"""Contract: Users (admin only)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import asyncpg
import httpx
import pytest

from tests.conftest import Account, MakeUser, assert_problem


async def test_admin_creates_user_who_can_log_in(client: httpx.AsyncClient, admin: Account) -> None:
    r = await client.post(
        "/users",
        json={"name": "Bo", "email": "bo@example.com", "password": "long-enough"},
        headers=admin.headers,
    )
    assert r.status_code == 201
    body = r.json()
    assert body["is_admin"] is False and body["email"] == "bo@example.com"
    assert set(body) == {"id", "name", "email", "is_admin", "created_at", "updated_at"}
    login = await client.post(
        "/auth/login", json={"email": "BO@example.com", "password": "long-enough"}
    )
    assert login.status_code == 200


async def test_is_admin_null_is_like_absent_a_plain_user(
    client: httpx.AsyncClient, admin: Account
) -> None:
    # Optional fields accept an explicit null everywhere (Kotlin serializers send them).
    body = {"name": "Cy", "email": "cy@example.com", "password": "long-enough", "is_admin": None}
    r = await client.post("/users", json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    assert r.json()["is_admin"] is False


async def test_password_is_stored_as_bcrypt_hash(
    client: httpx.AsyncClient, admin: Account, conn: object
) -> None:
    await client.post(
        "/users",
        json={"name": "Cy", "email": "cy@example.com", "password": "plain-text-pw"},
        headers=admin.headers,
    )
    stored = await conn.fetchval("SELECT password_hash FROM users WHERE email = 'cy@example.com'")  # type: ignore[attr-defined]
    assert stored.startswith("$2b$") and "plain-text-pw" not in stored


def test_default_bcrypt_cost_is_12() -> None:
    from crmsync.config import Settings

    assert Settings(database_url="postgresql://x/y").bcrypt_rounds == 12


async def test_duplicate_email_in_other_case_is_409(
    client: httpx.AsyncClient, admin: Account
) -> None:
    payload = {"name": "D", "email": "dup@example.com", "password": "long-enough"}
    assert (await client.post("/users", json=payload, headers=admin.headers)).status_code == 201
    payload["email"] = "DUP@Example.com"
    assert_problem(
        await client.post("/users", json=payload, headers=admin.headers), 409, "email_taken"
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "E", "email": "e@example.com", "password": "short"},
        {"name": "E", "email": "not-an-email", "password": "long-enough"},
        {"name": "", "email": "e@example.com", "password": "long-enough"},
        {"name": "\u200b\u200e", "email": "e@example.com", "password": "long-enough"},
        {"name": "x" * 201, "email": "e@example.com", "password": "long-enough"},
        {"name": "E\x00", "email": "e@example.com", "password": "long-enough"},
        {"email": "e@example.com", "password": "long-enough"},
        {"name": "E", "email": "e@example.com", "password": "é" * 40},
        {"name": "E", "email": "e@example.com", "password": "long-enough", "is_admin": "maybe"},
        {"name": "E", "email": "e@example.com", "password": "long-enough", "is_admin": 1},
        {"name": "E", "email": "e@example.com", "password": "long-enough", "is_admin": "true"},
    ],
)
async def test_bad_user_bodies_are_422(
    client: httpx.AsyncClient, admin: Account, payload: dict[str, object], conn: object
) -> None:
    r = await client.post("/users", json=payload, headers=admin.headers)
    assert_problem(r, 422, "validation_error")
    assert r.json()["errors"]
    assert await conn.fetchval("SELECT count(*) FROM users") == 1  # type: ignore[attr-defined]


async def test_list_is_ordered_by_created_at_and_hides_deleted(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    others = [await make_user() for _ in range(3)]
    await client.delete(f"/users/{others[1].id}", headers=admin.headers)
    r = await client.get("/users", params={"page": 1}, headers=admin.headers)
    body = r.json()
    assert [u["id"] for u in body["items"]] == [admin.id, others[0].id, others[2].id]
    assert body["total"] == 3 and body["page"] == 1 and body["next_cursor"] is None


async def test_list_cursor_walks_every_user_once(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    for _ in range(4):
        await make_user()
    seen: list[str] = []
    r = await client.get("/users", params={"limit": 2}, headers=admin.headers)
    while True:
        body = r.json()
        assert body["page"] is None and body["total"] is None
        seen += [u["id"] for u in body["items"]]
        assert len(seen) <= 5, "the cursor went round again"
        if body["next_cursor"] is None:
            break
        r = await client.get(
            "/users", params={"limit": 2, "cursor": body["next_cursor"]}, headers=admin.headers
        )
    assert len(seen) == 5 == len(set(seen))


async def test_patch_changes_fields_and_password(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    r = await client.patch(
        f"/users/{user.id}",
        json={"name": "Renamed", "is_admin": True, "password": "new-password"},
        headers=admin.headers,
    )
    assert r.status_code == 200
    assert r.json()["name"] == "Renamed" and r.json()["is_admin"] is True
    old = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert old.status_code == 401
    new = await client.post("/auth/login", json={"email": user.email, "password": "new-password"})
    assert new.status_code == 200
    r = await client.patch(f"/users/{user.id}", json={"name": "x\x00"}, headers=admin.headers)
    assert_problem(r, 422, "validation_error")
    for flag in (0, "false", "no"):  # true or false only
        r = await client.patch(f"/users/{user.id}", json={"is_admin": flag}, headers=admin.headers)
        assert_problem(r, 422, "validation_error")
    fresh = {"Authorization": f"Bearer {new.json()['token']}"}
    assert (await client.get("/auth/me", headers=fresh)).json()["is_admin"] is True


@pytest.mark.parametrize(
    "body", [{"name": "Renamed"}, {"email": "moved@example.com"}, {"password": "new-password"}]
)
async def test_a_patch_without_is_admin_keeps_the_admin_right(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser, body: dict[str, str]
) -> None:
    """Only the fields sent change: an admin renamed is still an admin."""
    other = await make_user(is_admin=True)
    r = await client.patch(f"/users/{other.id}", json=body, headers=admin.headers)
    assert r.status_code == 200, r.text
    assert r.json()["is_admin"] is True
    sign_in = {"email": other.email, "password": other.password, **body}
    sign_in.pop("name", None)
    token = (await client.post("/auth/login", json=sign_in)).json()["token"]
    me = await client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["is_admin"] is True
    assert (await client.get("/users", headers={"Authorization": f"Bearer {token}"})).is_success


async def test_patch_to_taken_email_is_409(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    r = await client.patch(
        f"/users/{user.id}", json={"email": admin.email.upper()}, headers=admin.headers
    )
    assert_problem(r, 409, "email_taken")


async def test_patch_unknown_or_bad_id_is_404(client: httpx.AsyncClient, admin: Account) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_problem(
        await client.patch(f"/users/{unknown}", json={}, headers=admin.headers), 404, "not_found"
    )
    assert_problem(
        await client.patch("/users/not-a-uuid", json={}, headers=admin.headers), 404, "not_found"
    )
    # with a bad body, a malformed id answers exactly as an unknown one: the body's errors only
    bad = {"email": "not-an-email"}
    r_unknown = await client.patch(f"/users/{unknown}", json=bad, headers=admin.headers)
    r_malformed = await client.patch("/users/not-a-uuid", json=bad, headers=admin.headers)
    assert_problem(r_unknown, 422, "validation_error")
    assert r_malformed.status_code == 422
    assert r_malformed.json() == r_unknown.json()


async def test_delete_rules(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: object
) -> None:
    assert_problem(
        await client.delete(f"/users/{admin.id}", headers=admin.headers), 409, "cannot_delete_self"
    )
    assert (await client.delete(f"/users/{user.id}", headers=admin.headers)).status_code == 204
    assert_problem(
        await client.delete(f"/users/{user.id}", headers=admin.headers), 404, "not_found"
    )
    # the row stays (its data stays linked); the email is free again
    assert await conn.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id) == 1  # type: ignore[attr-defined]
    r = await client.post(
        "/users",
        json={"name": "Again", "email": user.email, "password": "long-enough"},
        headers=admin.headers,
    )
    assert r.status_code == 201 and r.json()["id"] != user.id


async def test_a_deleted_users_contacts_calls_and_sync_records_stay(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    h = user.headers
    contact = {"name": "Kept", "phone_raw": "+14155550111"}
    call = {"direction": "incoming", "duration_seconds": 5, "timestamp": "2026-11-05T10:00:00Z"}
    assert (await client.post("/contacts", json=contact, headers=h)).status_code == 201
    assert (await client.post("/calls", json=[call], headers=h)).status_code == 200
    assert (await client.delete(f"/users/{user.id}", headers=admin.headers)).status_code == 204
    a = admin.headers
    [kept] = (await client.get("/contacts", headers=a)).json()["items"]
    assert (kept["name"], kept["created_by"], kept["deleted"]) == ("Kept", user.id, False)
    calls = (await client.get("/calls", params={"user_id": user.id}, headers=a)).json()
    assert [c["user_id"] for c in calls["items"]] == [user.id]
    records = (await client.get("/sync", params={"user_id": user.id}, headers=a)).json()
    assert {r["kind"] for r in records["items"]} == {"calls"}


async def test_deleting_an_unknown_or_malformed_user_id_is_404(
    client: httpx.AsyncClient, admin: Account
) -> None:
    for user_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        r = await client.delete(f"/users/{user_id}", headers=admin.headers)
        assert_problem(r, 404, "not_found")


async def test_non_admin_gets_403_on_every_users_endpoint(
    client: httpx.AsyncClient, user: Account, admin: Account
) -> None:
    h = user.headers
    assert_problem(await client.get("/users", headers=h), 403, "forbidden")
    r = await client.post(
        "/users", json={"name": "X", "email": "x@example.com", "password": "long-enough"}, headers=h
    )
    assert_problem(r, 403, "forbidden")
    assert_problem(
        await client.patch(f"/users/{admin.id}", json={"name": "X"}, headers=h), 403, "forbidden"
    )
    assert_problem(await client.delete(f"/users/{admin.id}", headers=h), 403, "forbidden")
    assert_problem(await client.get("/users"), 401, "unauthenticated")


async def test_admin_creates_an_admin_when_asked(client: httpx.AsyncClient, admin: Account) -> None:
    payload = {"name": "Al", "email": "al@example.com", "password": "long-enough", "is_admin": True}
    r = await client.post("/users", json=payload, headers=admin.headers)
    assert r.status_code == 201 and r.json()["is_admin"] is True, r.text
    login = await client.post(
        "/auth/login", json={"email": "al@example.com", "password": "long-enough"}
    )
    token = login.json()["token"]
    listed = await client.get("/users", headers={"Authorization": f"Bearer {token}"})
    assert listed.status_code == 200, listed.text


@pytest.mark.parametrize(
    ("password", "status"),
    [("1234567", 422), ("12345678", 201), ("p" * 72, 201), ("p" * 73, 422), ("é" * 36, 201)],
)
async def test_password_is_8_characters_to_72_bytes(
    client: httpx.AsyncClient, admin: Account, password: str, status: int
) -> None:
    payload = {"name": "P", "email": "p@example.com", "password": password}
    r = await client.post("/users", json=payload, headers=admin.headers)
    assert r.status_code == status, r.text


async def test_patch_of_a_deleted_user_is_404_and_changes_nothing(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: object
) -> None:
    assert (await client.delete(f"/users/{user.id}", headers=admin.headers)).status_code == 204
    r = await client.patch(f"/users/{user.id}", json={"is_admin": True}, headers=admin.headers)
    assert_problem(r, 404, "not_found")
    assert await conn.fetchval("SELECT is_admin FROM users WHERE id = $1", user.id) is False  # type: ignore[attr-defined]


async def test_patch_moves_updated_at_and_keeps_created_at(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    before = (await client.get("/auth/me", headers=user.headers)).json()
    r = await client.patch(f"/users/{user.id}", json={"name": "Renamed"}, headers=admin.headers)
    after = r.json()
    assert after["created_at"] == before["created_at"]
    updated = [datetime.fromisoformat(u["updated_at"]) for u in (before, after)]
    assert updated[1] > updated[0]


async def test_a_patch_that_changes_nothing_leaves_updated_at(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    before = (await client.get("/auth/me", headers=user.headers)).json()
    same = {"name": before["name"], "email": before["email"], "is_admin": before["is_admin"]}
    for body in ({}, {"name": None}, same):
        r = await client.patch(f"/users/{user.id}", json=body, headers=admin.headers)
        assert r.status_code == 200, r.text
        assert r.json() == before, body
    # A password is never compared: setting one is a change (it signs the user out).
    r = await client.patch(
        f"/users/{user.id}", json={"password": user.password}, headers=admin.headers
    )
    moved = [datetime.fromisoformat(u["updated_at"]) for u in (before, r.json())]
    assert moved[1] > moved[0]


async def test_patch_changes_the_email_used_to_sign_in(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    r = await client.patch(
        f"/users/{user.id}", json={"email": "new@example.com"}, headers=admin.headers
    )
    assert r.status_code == 200 and r.json()["email"] == "new@example.com", r.text
    login = {"email": "new@example.com", "password": user.password}
    assert (await client.post("/auth/login", json=login)).status_code == 200


async def test_list_orders_by_created_at_then_id_not_by_id_alone(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser, conn: object
) -> None:
    others = sorted([(await make_user()).id for _ in range(4)])
    # The lower the id, the newer the user; the two oldest share one created_at. Emails
    # run against id order, so that only id breaks the tie.
    ages = ["1 day", "2 days", "3 days", "3 days"]
    for i, (user_id, age) in enumerate(zip(others, ages, strict=True)):
        await conn.execute(  # type: ignore[attr-defined]
            "UPDATE users SET created_at = date_trunc('day', now()) - $2::text::interval,"
            " email = $3 WHERE id = $1",
            user_id,
            age,
            f"{9 - i}@example.com",
        )
    for params in ({"page": 1}, {"limit": 2}):
        seen: list[str] = []
        body = (await client.get("/users", params=params, headers=admin.headers)).json()
        seen += [u["id"] for u in body["items"]]
        while body["next_cursor"]:
            cursor = {"limit": 2, "cursor": body["next_cursor"]}
            body = (await client.get("/users", params=cursor, headers=admin.headers)).json()
            seen += [u["id"] for u in body["items"]]
        assert seen == [others[2], others[3], others[1], others[0], admin.id], params


@pytest.mark.parametrize(
    "body",
    [
        {"password": "short"},
        {"name": ""},
        {"name": "\u3164"},
        {"email": "not-an-email"},
        {"is_admin": "yes"},
        [],
    ],
)
async def test_bad_patches_are_422_and_change_nothing(
    client: httpx.AsyncClient, admin: Account, user: Account, body: object
) -> None:
    before = (await client.get("/auth/me", headers=user.headers)).json()
    r = await client.patch(f"/users/{user.id}", json=body, headers=admin.headers)
    assert_problem(r, 422, "validation_error")
    assert (await client.get("/auth/me", headers=user.headers)).json() == before


async def test_the_last_admin_cannot_be_demoted(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser
) -> None:
    """Nobody could manage users through the API any more (only `crmsync reset-password
    --admin` on the server would help)."""
    mine = f"/users/{admin.id}"
    r = await client.patch(mine, json={"is_admin": False}, headers=admin.headers)
    body = assert_problem(r, 409, "last_admin")
    assert "no admin" in body["detail"]
    assert (await client.get("/users", headers=admin.headers)).status_code == 200  # still one
    other = await make_user(is_admin=True)
    r = await client.patch(mine, json={"is_admin": False}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["is_admin"] is False
    r = await client.patch(f"/users/{other.id}", json={"is_admin": False}, headers=other.headers)
    assert_problem(r, 409, "last_admin")
    # the rule is only about admins: other changes of the last admin, and of users, go through
    r = await client.patch(
        f"/users/{other.id}", json={"name": "Still admin"}, headers=other.headers
    )
    assert r.status_code == 200 and r.json()["is_admin"] is True
    r = await client.patch(mine, json={"is_admin": False}, headers=other.headers)
    assert r.status_code == 200


async def test_two_admins_deleting_each_other_at_once_leave_one(
    database_url: str, make_user: MakeUser
) -> None:
    """Each request checked that its admin was live before its delete; the deletes race.
    The second must see the first's result and refuse, not leave no admin at all."""
    from crmsync.errors import LastAdmin
    from crmsync.users.service import user_delete

    h, i = (
        uuid.UUID((await make_user(is_admin=True)).id),
        uuid.UUID((await make_user(is_admin=True)).id),
    )
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        tx = first.transaction()
        await tx.start()
        await user_delete(first, i, actor_id=h)
        racing = asyncio.create_task(user_delete(second, h, actor_id=i))
        await asyncio.sleep(0.3)
        assert not racing.done()  # waits for the first's lock on the admins' rows
        await tx.commit()
        with pytest.raises(LastAdmin):
            await racing
        live = await second.fetch("SELECT id FROM users WHERE is_admin AND deleted_at IS NULL")
        assert [r["id"] for r in live] == [h]
    finally:
        await first.close()
        await second.close()


async def test_patch_answers_the_whole_user_and_may_take_a_deleted_users_email(
    client: httpx.AsyncClient, admin: Account, user: Account, make_user: MakeUser
) -> None:
    """Contract: PATCH /users/{id} answers 200 with the user object (never a password or
    hash), and 409 `email_taken` is for an email another *live* user has: a deleted user's
    email is free again, in any case."""
    gone = await make_user()
    assert (await client.delete(f"/users/{gone.id}", headers=admin.headers)).status_code == 204
    r = await client.patch(
        f"/users/{user.id}",
        json={"email": gone.email.upper(), "password": "another-password"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "name", "email", "is_admin", "created_at", "updated_at"}
    assert (body["id"], body["email"].lower(), body["is_admin"]) == (
        user.id,
        gone.email.lower(),
        False,
    )
    login = await client.post(
        "/auth/login", json={"email": gone.email, "password": "another-password"}
    )
    assert login.status_code == 200, login.text
    assert login.json()["user"] == body
