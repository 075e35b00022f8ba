"""Contract: Sync, GET /sync and GET /sync/state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import orjson

from tests.calls.test_list import walk
from tests.calls.test_upload import call, upload
from tests.conftest import Account, MakeUser, assert_problem


async def add_records(conn: asyncpg.Connection, user_id: str, count: int, *, at: str) -> None:
    """`count` sync records of one user, all created at the same instant."""
    await conn.execute(
        """INSERT INTO sync_audit (user_id, kind, synced_calls, created_at)
           SELECT $1, 'calls', g, $2::text::timestamptz FROM generate_series(1, $3) g""",
        uuid.UUID(user_id),
        at,
        count,
    )


async def test_a_record_shows_its_counts_kind_and_details_of_counts_only(
    client: httpx.AsyncClient, user: Account
) -> None:
    r = await upload(
        client, user, [call(0), call(0), call(1, direction="x")], **{"X-Device-Id": "p8"}
    )
    [record] = (await client.get("/sync", headers=user.headers)).json()["items"]
    assert set(record) == {
        "id",
        "user_id",
        "synced_contacts",
        "synced_calls",
        "created_at",
        "kind",
        "details",
        "device_id",
        "elapsed_ms",
    }
    assert record["id"] == r.json()["sync_id"] and record["user_id"] == user.id
    assert (record["kind"], record["synced_contacts"], record["synced_calls"]) == ("calls", 0, 1)
    assert record["created_at"].endswith("Z")
    # The contract: "details is an object of counts" (a client may model it as ints).
    assert record["details"] == {"inserted": 1, "duplicates": 1, "rejected": 1}
    assert record["device_id"] == "p8" and record["elapsed_ms"] >= 0
    without = await upload(client, user, [call(2)])
    newest = (await client.get("/sync", headers=user.headers)).json()["items"][0]
    assert newest["id"] == without.json()["sync_id"] and newest["device_id"] is None


async def test_records_newest_first_then_by_id_and_non_admins_see_only_their_own(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    other = await make_user()
    await add_records(conn, user.id, 2, at="2026-11-01T10:00:00Z")
    await add_records(conn, user.id, 3, at="2026-11-02T10:00:00Z")
    await add_records(conn, other.id, 2, at="2026-11-03T10:00:00Z")
    mine = await walk(client, user, "/sync", limit=2)
    assert [r["user_id"] for r in mine] == [user.id] * 5
    assert [r["created_at"][:10] for r in mine] == ["2026-11-02"] * 3 + ["2026-11-01"] * 2
    for same_time in (mine[:3], mine[3:]):
        ids = [r["id"] for r in same_time]
        assert ids == sorted(ids, reverse=True)
    named = await walk(client, user, "/sync", user_id=user.id)
    assert [r["id"] for r in named] == [r["id"] for r in mine]
    r = await client.get("/sync", params={"user_id": other.id}, headers=user.headers)
    assert_problem(r, 403, "forbidden")
    page = (await client.get("/sync", params={"page": 1, "limit": 2}, headers=user.headers)).json()
    assert page["total"] == 5 and len(page["items"]) == 2 and page["next_cursor"]


async def test_admins_see_everyones_records_or_one_users(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: asyncpg.Connection
) -> None:
    await add_records(conn, user.id, 2, at="2026-11-01T10:00:00Z")
    await add_records(conn, admin.id, 1, at="2026-11-02T10:00:00Z")
    every = await walk(client, admin, "/sync", limit=1)
    assert [r["user_id"] for r in every] == [admin.id, user.id, user.id]
    users = await walk(client, admin, "/sync", limit=1, user_id=user.id)
    assert [r["id"] for r in users] == [r["id"] for r in every[1:]]
    first = (await client.get("/sync", params={"limit": 1}, headers=admin.headers)).json()
    r = await client.get(
        "/sync",
        params={"limit": 1, "cursor": first["next_cursor"], "user_id": user.id},
        headers=admin.headers,
    )
    assert_problem(r, 400, "bad_request")  # the cursor was made without the filter


async def test_sync_lists_need_a_token_and_a_sane_user_id(
    client: httpx.AsyncClient, user: Account
) -> None:
    assert_problem(await client.get("/sync"), 401, "unauthenticated")
    assert_problem(await client.get("/sync/state"), 401, "unauthenticated")
    r = await client.get("/sync", params={"user_id": "nope"}, headers=user.headers)
    assert_problem(r, 422, "validation_error")


async def test_state_tells_where_the_next_upload_and_pull_start(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    empty = (await client.get("/sync/state", headers=user.headers)).json()
    assert set(empty) == {"server_time", "last_call_timestamp", "last_sync_at", "contacts_cursor"}
    assert empty["last_call_timestamp"] is None and empty["last_sync_at"] is None
    assert empty["contacts_cursor"] is None
    server_time = datetime.fromisoformat(empty["server_time"].replace("Z", "+00:00"))
    assert before <= server_time <= datetime.now(UTC) + timedelta(seconds=1)

    other = await make_user()
    await upload(client, user, [call(3), call(1)])
    first_sync_at = await conn.fetchval("SELECT api_time(max(created_at)) FROM sync_audit")
    await upload(client, user, [call(2)])  # the last upload, not the first, is the state's
    await upload(client, other, [call(9)])  # another user's newer call does not count
    synced_at = await conn.fetchval(
        "SELECT api_time(max(created_at)) FROM sync_audit WHERE user_id = $1", uuid.UUID(user.id)
    )
    assert synced_at != first_sync_at
    await conn.execute(
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('C', '+14155550150', '+14155550150')"
    )
    answer = await client.get("/sync/state", headers=user.headers)
    state = answer.json()
    assert answer.content == orjson.dumps(state)  # compact, like every answer
    assert state["last_call_timestamp"] == "2026-11-04T14:03:00.000000Z"
    assert state["last_sync_at"] == synced_at
    assert isinstance(state["contacts_cursor"], str) and state["contacts_cursor"]
    # The cursor is the head of the changes feed: nothing follows it yet.
    pulled = await client.get(
        "/contacts/changes", params={"cursor": state["contacts_cursor"]}, headers=user.headers
    )
    assert pulled.status_code == 200, pulled.text
    assert pulled.json()["items"] == [] and pulled.json()["has_more"] is False
