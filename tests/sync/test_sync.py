"""Contract: Sync, POST /sync (one round trip: contacts, calls, a changes pull)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from crmsync.contacts.service import CHANGES_SCOPE, Feed
from crmsync.pagination import encode_cursor
from crmsync.sync.schemas import SyncOut
from tests.calls.test_upload import call
from tests.conftest import Account, assert_problem, make_app


def contact(i: int, **fields: Any) -> dict[str, Any]:
    return {"name": f"Contact {i}", "phone_raw": f"(415) 555-{i:04d}", **fields}


async def sync(
    client: httpx.AsyncClient, account: Account, body: Any, **headers: str
) -> httpx.Response:
    return await client.post("/sync", json=body, headers={**account.headers, **headers})


async def counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM contacts) AS contacts,"
        " (SELECT count(*) FROM call_logs) AS calls, (SELECT count(*) FROM sync_audit) AS syncs"
    )
    assert row is not None
    return row["contacts"], row["calls"], row["syncs"]


async def test_one_round_trip_stores_contacts_and_calls_and_writes_one_sync_record(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    body = {
        "contacts": [contact(150), contact(151), {"name": "Typo", "phone_raw": "abc"}],
        "calls": [
            call(0, phone_raw="+1 415 555 0150"),  # its contact arrives in this same request
            call(1, phone_raw="*123#"),
            call(1, phone_raw="*123#"),
            call(2, direction="sideways"),
        ],
    }
    r = await sync(client, user, body, **{"X-Device-Id": "pixel-8"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"sync_id", "contacts", "calls", "changes"}
    SyncOut.model_validate(answer, strict=False)  # what the OpenAPI document describes
    assert [c["result"] for c in answer["contacts"]] == ["created", "created", "rejected"]
    assert [c["index"] for c in answer["contacts"]] == [0, 1, 2]
    assert answer["contacts"][2]["errors"][0]["loc"][:3] == ["body", "contacts", 2]
    calls = answer["calls"]
    assert (calls["inserted"], calls["duplicates"]) == (2, 1)
    assert calls["rejected"][0]["index"] == 3
    assert calls["rejected"][0]["errors"][0]["loc"] == ["body", "calls", 3, "direction"]
    assert set(answer["changes"]) == {"items", "next_cursor", "has_more", "restarted"}
    assert isinstance(answer["changes"]["next_cursor"], str)

    carla = answer["contacts"][0]["contact"]["id"]
    linked = await conn.fetchval(
        "SELECT contact_id FROM call_logs WHERE phone_raw = '+1 415 555 0150'"
    )
    assert str(linked) == carla
    assert await counts(conn) == (2, 2, 1)
    record = await conn.fetchrow("SELECT * FROM sync_audit")
    assert str(record["id"]) == answer["sync_id"] and str(record["user_id"]) == user.id
    assert (record["kind"], record["synced_contacts"], record["synced_calls"]) == ("sync", 2, 2)
    details = json.loads(record["details"])
    assert details == {
        "created": 2,
        "replaced": 0,
        "existing": 0,
        "rejected": 1,
        "inserted": 2,
        "duplicates": 1,
        "rejected_calls": 1,
    }
    assert record["device_id"] == "pixel-8" and record["elapsed_ms"] >= 0


async def test_the_sync_record_keeps_the_first_200_characters_of_the_device_id(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    device = "d" * 199 + "!" + "cut-off"
    assert (await sync(client, user, {}, **{"X-Device-Id": device})).status_code == 200
    kept = await conn.fetchval("SELECT device_id FROM sync_audit")
    assert kept == device[:200]


async def test_synced_contacts_counts_created_and_replaced_not_existing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await sync(client, user, {"contacts": [contact(1), contact(2)]})
    r = await sync(
        client,
        user,
        {
            "contacts": [
                contact(1),  # existing: no created_at
                contact(2, name="Older", created_at="2001-01-01T00:00:00Z"),  # replaced
                contact(3),  # created
            ]
        },
    )
    assert [c["result"] for c in r.json()["contacts"]] == ["existing", "replaced", "created"]
    record = await conn.fetchrow(
        "SELECT synced_contacts, details FROM sync_audit WHERE id = $1",
        uuid.UUID(r.json()["sync_id"]),
    )
    assert record["synced_contacts"] == 2
    details = json.loads(record["details"])
    assert (details["created"], details["replaced"], details["existing"]) == (1, 1, 1)


async def test_an_empty_sync_only_pulls_and_still_writes_its_record(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO contacts (name, phone_raw, phone_normalized)"
        " VALUES ('C', '+14155550150', '+14155550150')"
    )
    for body in (
        {},
        {"contacts": [], "calls": [], "cursor": None},
        {"contacts": None, "calls": None},
    ):
        answer = (await sync(client, user, body)).json()
        assert answer["contacts"] == []
        assert answer["calls"] == {"inserted": 0, "duplicates": 0, "rejected": []}
        assert [c["phone_normalized"] for c in answer["changes"]["items"]] == ["+14155550150"]
        assert answer["changes"]["has_more"] is False
    assert await counts(conn) == (1, 0, 3)


async def test_changes_after_the_cursor_at_most_200_and_none_missed(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        """INSERT INTO contacts (name, phone_raw, phone_normalized)
           SELECT 'c' || g, '+1415555' || lpad(g::text, 4, '0'), '+1415555' || lpad(g::text, 4, '0')
           FROM generate_series(1, 250) g"""
    )
    first = (await sync(client, user, {})).json()["changes"]
    assert len(first["items"]) == 200 and first["has_more"] is True
    second = (await sync(client, user, {"cursor": first["next_cursor"]})).json()["changes"]
    assert len(second["items"]) == 50 and second["has_more"] is False
    seen = [c["id"] for c in first["items"] + second["items"]]
    assert len(set(seen)) == 250
    # This request's own writes are pulled now or by the next pull from its next_cursor.
    own = await sync(client, user, {"contacts": [contact(9001)], "cursor": second["next_cursor"]})
    new_id = own.json()["contacts"][0]["contact"]["id"]
    pulled = [c["id"] for c in own.json()["changes"]["items"]]
    later = await client.get(
        "/contacts/changes",
        params={"cursor": own.json()["changes"]["next_cursor"]},
        headers=user.headers,
    )
    assert later.status_code == 200, later.text
    pulled += [c["id"] for c in later.json()["items"]]
    assert new_id in pulled


async def test_an_empty_cursor_pulls_from_the_beginning(
    client: httpx.AsyncClient, user: Account
) -> None:
    assert (await sync(client, user, {"contacts": [contact(1)]})).status_code == 200
    r = await sync(client, user, {"cursor": ""})
    assert r.status_code == 200, r.text
    assert len(r.json()["changes"]["items"]) == 1


async def test_a_bad_cursor_is_400_and_stores_nothing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    r = await sync(client, user, {"contacts": [contact(1)], "calls": [call(0)], "cursor": "junk"})
    assert_problem(r, 400, "bad_request")
    assert await counts(conn) == (0, 0, 0)


@pytest.mark.parametrize(
    "body",
    [
        [],
        "sync",
        {"contacts": {"name": "x"}},
        {"calls": "none"},
        {"calls": 5},
        {"cursor": 5},
    ],
)
async def test_a_malformed_sync_body_is_422_and_stores_nothing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, body: Any
) -> None:
    full = body if not isinstance(body, dict) else {"contacts": [contact(1)], **body}
    assert_problem(await sync(client, user, full), 422, "validation_error")
    assert await counts(conn) == (0, 0, 0)


async def test_batches_over_their_limits_are_413_and_store_nothing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    too_many_contacts = {"contacts": [contact(i) for i in range(1001)], "calls": [call(0)]}
    assert_problem(await sync(client, user, too_many_contacts), 413, "payload_too_large")
    too_many_calls = {"contacts": [contact(1)], "calls": [call(i) for i in range(5001)]}
    assert_problem(await sync(client, user, too_many_calls), 413, "payload_too_large")
    assert await counts(conn) == (0, 0, 0)


async def test_a_sync_of_1000_contacts_is_stored(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    r = await sync(client, user, {"contacts": [contact(i) for i in range(1000)]})
    assert r.status_code == 200, r.text
    assert {c["result"] for c in r.json()["contacts"]} == {"created"}
    assert await counts(conn) == (1000, 0, 1)


async def test_times_with_offsets_beyond_16_hours_are_stored(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    far = "2026-10-02T07:59:00+23:59"  # RFC 3339 allows it; PostgreSQL's text input does not
    body = {"contacts": [contact(1, created_at=far)], "calls": [call(0, timestamp=far)]}
    r = await sync(client, user, body)
    assert r.status_code == 200, r.text
    assert await counts(conn) == (1, 1, 1)


async def test_a_non_admin_naming_another_user_is_403_and_nothing_is_stored(
    client: httpx.AsyncClient, user: Account, admin: Account, conn: asyncpg.Connection
) -> None:
    body = {"contacts": [contact(1)], "calls": [call(0, user_id=admin.id)]}
    assert_problem(await sync(client, user, body), 403, "forbidden")
    assert await counts(conn) == (0, 0, 0)


async def test_an_admin_syncs_calls_of_another_user(
    client: httpx.AsyncClient, user: Account, admin: Account, conn: asyncpg.Connection
) -> None:
    body = {"calls": [call(0, user_id=user.id), call(1, user_id=str(uuid.uuid4()))]}
    r = await sync(client, admin, body)
    assert r.status_code == 200, r.text
    calls = r.json()["calls"]
    assert calls["inserted"] == 1 and [x["index"] for x in calls["rejected"]] == [1], calls
    assert calls["rejected"][0]["errors"][0]["loc"] == ["body", "calls", 1, "user_id"]
    assert str(await conn.fetchval("SELECT user_id FROM call_logs")) == user.id
    record = await conn.fetchrow("SELECT user_id, synced_calls FROM sync_audit")
    assert record is not None
    assert (str(record["user_id"]), record["synced_calls"]) == (admin.id, 1)


async def test_a_sync_reads_numbers_in_the_default_region(
    database_url: str, user: Account, conn: asyncpg.Connection
) -> None:
    """CRMSYNC_DEFAULT_REGION=GB: national spellings in a sync's contacts and calls are UK
    numbers, and the call is linked to the contact of the same request."""
    app = make_app(database_url, default_region="GB")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as gb:
            body = {
                "contacts": [{"name": "Lena", "phone_raw": "020 7946 0958"}],
                "calls": [call(0, phone_raw="020 7946 0958")],
            }
            r = await sync(gb, user, body)
    assert r.status_code == 200, r.text
    lena = r.json()["contacts"][0]["contact"]
    assert lena["phone_normalized"] == "+442079460958"
    row = await conn.fetchrow("SELECT phone_normalized, contact_id::text FROM call_logs")
    assert row is not None
    assert tuple(row) == ("+442079460958", lena["id"])


async def test_same_idempotency_key_returns_the_first_answer_and_writes_nothing_more(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    body = {"contacts": [contact(1)], "calls": [call(0), call(1)]}
    first = await sync(client, user, body, **{"Idempotency-Key": "sync-1"})
    again = await sync(client, user, body, **{"Idempotency-Key": "sync-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"  # its changes are as of then
    assert await counts(conn) == (1, 2, 1)
    other = await sync(client, user, {"calls": [call(5)]}, **{"Idempotency-Key": "sync-1"})
    assert_problem(other, 422, "validation_error")
    assert await counts(conn) == (1, 2, 1)


async def test_a_database_error_stores_none_of_the_request(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        """CREATE FUNCTION test_sync_fail() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.duration_seconds = 4242 THEN RAISE EXCEPTION 'boom'; END IF;
               RETURN NEW;
           END $$"""
    )
    await conn.execute(
        "CREATE TRIGGER test_sync_fail BEFORE INSERT ON call_logs"
        " FOR EACH ROW EXECUTE FUNCTION test_sync_fail()"
    )
    try:
        body = {"contacts": [contact(1)], "calls": [call(0), call(1, duration_seconds=4242)]}
        r = await sync(client, user, body)
        assert r.status_code >= 500
        assert r.headers["content-type"].startswith("application/problem+json")
        assert await counts(conn) == (0, 0, 0)
    finally:
        await conn.execute("DROP TRIGGER test_sync_fail ON call_logs")
        await conn.execute("DROP FUNCTION test_sync_fail()")


async def test_a_cursor_from_before_a_restore_restarts_the_changes_of_post_sync_too(
    client: httpx.AsyncClient, user: Account
) -> None:
    """POST /sync's `changes` says `restarted: true` as GET /contacts/changes does, for a
    cursor made elsewhere (another cluster, or before a restore): the app's sign to run
    its recovery."""
    feed: Feed = client.app.state.changes_feed  # type: ignore[attr-defined]
    cluster, _, table = feed.origin.partition("/")
    elsewhere = encode_cursor(feed.key, CHANGES_SCOPE, [f"{cluster}/{int(table) + 1}", "0", "0"])
    await sync(client, user, {"contacts": [contact(1)]})
    changes = (await sync(client, user, {"cursor": elsewhere})).json()["changes"]
    assert changes["restarted"] is True and len(changes["items"]) == 1
    again = (await sync(client, user, {"cursor": changes["next_cursor"]})).json()["changes"]
    assert (again["restarted"], again["items"]) == (False, [])
