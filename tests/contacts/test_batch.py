"""Contract: Contacts, POST /contacts/batch (and the shared seams: sync record, Idempotency-Key)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
from prometheus_client import REGISTRY

from crmsync.contacts.upsert import UPSERT_SQL, contact_upsert_many
from crmsync.main import maintain
from tests.conftest import Account, MakeUser, assert_problem, insert_sort_keys
from tests.contacts.test_upsert import T0, at, contact, post


async def upload(
    client: httpx.AsyncClient, account: Account, body: Any, **headers: str
) -> httpx.Response:
    return await client.post("/contacts/batch", json=body, headers={**account.headers, **headers})


def uploaded(result: str) -> float:
    return REGISTRY.get_sample_value("crmsync_contacts_uploaded_total", {"result": result}) or 0.0


async def test_batch_answers_results_in_request_order_and_stores_valid_items(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [
        contact("Carla Dias", "(415) 555-0150", created_at=at(0)),
        contact("Alice Moreira", "+1 415 555 0177", created_at=at(5)),
        contact("Typo", "abc"),
        {"name": "No phone"},
        "not an object",
        contact("\u200b\u200e", "+1 415 555 0178"),  # a name that shows nothing
    ]
    r = await upload(client, user, batch, **{"X-Device-Id": "pixel-8"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"sync_id", "results"}
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3, 4, 5]
    assert [x["result"] for x in results] == [
        "created",
        "created",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
    ]
    assert results[5]["errors"][0]["loc"] == ["body", 5, "name"]
    assert results[0]["contact"]["name"] == "Carla Dias"
    assert results[1]["contact"]["phone_normalized"] == "+14155550177"
    assert results[2]["errors"] == [
        {
            "loc": ["body", 2, "phone_raw"],
            "msg": "Not a possible phone number: no number in it",
            "type": "phone",
        }
    ]
    assert results[3]["errors"][0]["loc"] == ["body", 3, "phone_raw"]
    assert results[4]["errors"][0]["loc"] == ["body", 4]
    assert "contact" not in results[2]
    assert r.content == orjson.dumps(body)  # compact: the same bytes as the lists' JSON
    names = await conn.fetch("SELECT name FROM contacts ORDER BY name")
    assert [n["name"] for n in names] == ["Alice Moreira", "Carla Dias"]


async def test_batch_writes_one_sync_record_with_its_counts(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    await post(client, user, contact("Old", "(415) 555-0101", created_at=at(10)))
    await post(client, user, contact("Kept", "(415) 555-0102", created_at=at(0)))
    other = await make_user()
    batch = [
        contact("New", "(415) 555-0100"),
        contact("Older", "(415) 555-0101", created_at=at(0)),
        contact("Newer", "(415) 555-0102", created_at=at(5)),
        contact("Bad", "12345"),
    ]
    r = await upload(client, other, batch, **{"X-Device-Id": "pixel-8"})
    assert [x["result"] for x in r.json()["results"]] == [
        "created",
        "replaced",
        "existing",
        "rejected",
    ]
    records = await conn.fetch("SELECT * FROM sync_audit")
    assert len(records) == 1
    record = records[0]
    assert str(record["id"]) == r.json()["sync_id"] and str(record["user_id"]) == other.id
    assert record["kind"] == "contacts"
    assert (record["synced_contacts"], record["synced_calls"]) == (2, 0)
    details = json.loads(record["details"])
    assert {k: details[k] for k in ("created", "replaced", "existing", "rejected")} == {
        "created": 1,
        "replaced": 1,
        "existing": 1,
        "rejected": 1,
    }
    assert set(details) == {"created", "replaced", "existing", "rejected"}
    assert record["device_id"] == "pixel-8" and record["elapsed_ms"] > 0


async def test_items_of_one_number_in_a_batch_are_resolved_in_request_order(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    phone = "(415) 555-0123"
    batch = [
        contact("A", phone, created_at=at(20)),  # creates
        contact("B", "+14155550123", created_at=at(30)),  # newer: existing
        contact("C", phone, created_at=at(10)),  # older than A: replaces
        contact("D", phone),  # no created_at: existing
        contact("E", phone, created_at=at(10)),  # equal to C: existing
        contact("F", phone, created_at=at(5)),  # older than C: replaces
        contact("G", phone, created_at=at(15)),  # existing
    ]
    r = await upload(client, user, batch)
    results = r.json()["results"]
    assert [x["result"] for x in results] == [
        "created",
        "existing",
        "replaced",
        "existing",
        "existing",
        "replaced",
        "existing",
    ]
    # Every item answers the number's contact as the batch leaves it.
    assert {x["contact"]["name"] for x in results} == {"F"}
    rows = await conn.fetch("SELECT name, created_at FROM contacts")
    assert [(x["name"], x["created_at"].isoformat()) for x in rows] == [
        ("F", "2026-10-01T08:05:00+00:00")
    ]


async def test_same_number_items_meet_an_existing_contact_by_the_same_rule(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await post(client, user, contact("Stored", created_at=at(10)))
    batch = [contact("A"), contact("B", created_at=at(12)), contact("C", created_at=at(8))]
    results = (await upload(client, user, batch)).json()["results"]
    assert [x["result"] for x in results] == ["existing", "existing", "replaced"]
    assert await conn.fetchval("SELECT name FROM contacts") == "C"


async def test_of_two_items_with_the_oldest_equal_time_the_first_wins(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """An equal time is not strictly older: the later item is `existing`, and its data is
    not what the batch stores, for a new number and for one a contact has."""
    tie = [contact("First", created_at=at(5)), contact("Second", "+14155550123", created_at=at(5))]
    results = (await upload(client, user, tie)).json()["results"]
    assert [(x["result"], x["contact"]["name"]) for x in results] == [
        ("created", "First"),
        ("existing", "First"),
    ]
    await conn.execute("TRUNCATE contacts CASCADE")
    await post(client, user, contact("Stored", created_at=at(10)))
    results = (await upload(client, user, tie)).json()["results"]
    assert [(x["result"], x["contact"]["name"]) for x in results] == [
        ("replaced", "First"),
        ("existing", "First"),
    ]
    assert await conn.fetchval("SELECT name FROM contacts") == "First"
    # 25 items tied at the oldest time among 25 newer ones: still the first of them (a sort
    # without the request order as its last key would pick any).
    await conn.execute("TRUNCATE contacts CASCADE")
    many = [contact(f"N{i}", created_at=at(5 + i % 2)) for i in range(50)]
    results = (await upload(client, user, many)).json()["results"]
    assert [x["result"] for x in results] == ["created"] + ["existing"] * 49
    assert {x["contact"]["name"] for x in results} == {"N0"}
    assert await conn.fetchval("SELECT name FROM contacts") == "N0"


async def test_first_item_without_created_at_creates_with_server_time_later_older_replaces(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    results = (await upload(client, user, [contact("A"), contact("B", created_at=at(0))])).json()
    assert [x["result"] for x in results["results"]] == ["created", "replaced"]
    assert await conn.fetchval("SELECT name FROM contacts") == "B"


async def test_batch_revives_a_deleted_contact_as_created(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    first = (await post(client, user, contact("Old"))).json()["contact"]
    await client.delete(f"/contacts/{first['id']}", headers=user.headers)
    results = (await upload(client, user, [contact("New", created_at=at(99))])).json()["results"]
    assert results[0]["result"] == "created"
    assert results[0]["contact"]["id"] == first["id"]
    assert results[0]["contact"]["deleted"] is False


async def test_batch_of_only_rejected_items_stores_nothing_and_still_records_the_sync(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    r = await upload(client, user, [contact(phone="abc"), contact(name="")])
    assert r.status_code == 200, r.text
    assert [x["result"] for x in r.json()["results"]] == ["rejected", "rejected"]
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0
    assert await conn.fetchval("SELECT synced_contacts FROM sync_audit") == 0


async def test_a_batch_of_only_rejected_items_answers_in_request_order_and_counts_none_stored(
    client: httpx.AsyncClient, user: Account
) -> None:
    # A number that is none is found after the items' own validation: its rejection is
    # still answered at its index when no item is left to store, and the sync record
    # counts nothing but the rejections.
    batch = [contact(phone="abc"), contact(name=""), contact("Short", phone="12")]
    r = await upload(client, user, batch)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["index"], x["result"], x["errors"][0]["loc"]) for x in results] == [
        (0, "rejected", ["body", 0, "phone_raw"]),
        (1, "rejected", ["body", 1, "name"]),
        (2, "rejected", ["body", 2, "phone_raw"]),
    ]
    [record] = (await client.get("/sync", headers=user.headers)).json()["items"]
    assert record["synced_contacts"] == 0
    assert record["details"] == {"created": 0, "replaced": 0, "existing": 0, "rejected": 3}


async def test_batch_over_1000_items_is_413_and_empty_batch_is_422(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    many = [contact(phone=f"(415) 555-{i:04d}") for i in range(1001)]
    assert_problem(await upload(client, user, many), 413, "payload_too_large")
    assert_problem(await upload(client, user, []), 422, "validation_error")
    assert_problem(await upload(client, user, {"name": "x"}), 422, "validation_error")
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0


async def test_batch_of_1000_items_is_accepted(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    many = [contact(f"N{i}", phone=f"(415) 555-{i:04d}") for i in range(1000)]
    r = await upload(client, user, many)
    assert r.status_code == 200, r.text
    assert {x["result"] for x in r.json()["results"]} == {"created"}
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 1000


async def test_idempotency_key_replays_the_first_answer_and_stores_nothing_new(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [contact("A", created_at=at(5))]
    first = await upload(client, user, batch, **{"Idempotency-Key": "k-1"})
    again = await upload(client, user, batch, **{"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.content == first.content
    assert (first.headers.get("idempotent-replayed"), again.headers.get("idempotent-replayed")) == (
        None,
        "true",
    )
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1
    other_body = await upload(client, user, [contact("B")], **{"Idempotency-Key": "k-1"})
    assert_problem(other_body, 422, "validation_error")
    fresh = await upload(client, user, batch, **{"Idempotency-Key": "k-2"})
    assert fresh.json()["results"][0]["result"] == "existing"


async def test_batch_counts_results_in_metrics(client: httpx.AsyncClient, user: Account) -> None:
    before = {k: uploaded(k) for k in ("created", "existing", "rejected")}
    await upload(client, user, [contact(), contact(), contact(phone="abc")])
    after = {k: uploaded(k) for k in ("created", "existing", "rejected")}
    assert {k: after[k] - before[k] for k in after} == {"created": 1, "existing": 1, "rejected": 1}


async def test_upsert_many_service_nests_error_locations_under_the_callers_loc(
    user: Account, conn: asyncpg.Connection
) -> None:
    import uuid

    async with conn.transaction():
        batch = await contact_upsert_many(
            conn,
            [contact(), 7],
            user_id=uuid.UUID(user.id),
            region="US",
            loc=("body", "contacts"),
        )
    results = json.loads(batch.results_json)
    assert results[0]["result"] == "created"
    assert results[1]["errors"][0]["loc"] == ["body", "contacts", 1]
    assert batch.counts == {"created": 1, "replaced": 0, "existing": 0, "rejected": 1}


async def test_batch_rejects_future_or_offsetless_times_and_keeps_the_rest(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    future = (datetime.now(UTC) + timedelta(minutes=6)).isoformat()
    batch = [
        contact("Future", "(415) 555-0101", created_at=future),
        contact("Naive", "(415) 555-0102", created_at="2026-10-01T08:00:00"),
        contact("Fine", "(415) 555-0103", created_at=at(0)),
    ]
    results = (await upload(client, user, batch)).json()["results"]
    assert [x["result"] for x in results] == ["rejected", "rejected", "created"]
    assert results[0]["errors"][0]["loc"] == ["body", 0, "created_at"]
    assert results[1]["errors"][0]["loc"] == ["body", 1, "created_at"]
    assert await conn.fetchval("SELECT array_agg(name) FROM contacts") == ["Fine"]


async def test_batch_stores_created_at_with_an_offset_beyond_16_hours_as_its_instant(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # RFC 3339 allows offsets up to +-23:59; PostgreSQL's text input stops at +-15:59.
    batch = [
        contact("East", "(415) 555-0101", created_at="2026-10-02T07:59:00+23:59"),
        contact("West", "(415) 555-0102", created_at="2026-09-30T08:01:00-23:59"),
    ]
    results = (await upload(client, user, batch)).json()["results"]
    assert [x["contact"]["created_at"] for x in results] == ["2026-10-01T08:00:00.000000Z"] * 2
    assert await conn.fetchval("SELECT array_agg(DISTINCT created_at) FROM contacts") == [T0]


async def test_concurrent_batches_of_the_same_numbers_in_opposite_orders_both_succeed(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [contact(f"N{i}", f"(415) 555-{i:04d}", created_at=at(i)) for i in range(300)]
    older = [{**c, "created_at": at(-1)} for c in reversed(batch)]
    answers = await asyncio.gather(*(upload(client, user, b) for b in (batch, older, batch, older)))
    assert [r.status_code for r in answers] == [200] * 4, [r.text[:200] for r in answers]
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 300
    oldest = T0 - timedelta(minutes=1)
    assert await conn.fetchval("SELECT count(*) FROM contacts WHERE created_at <> $1", oldest) == 0


async def test_a_batch_is_upserted_in_number_order(conn: asyncpg.Connection) -> None:
    # What keeps the test above from deadlocking, without relying on its timing: the upsert
    # takes the batch's numbers (uq_contacts_phone_normalized's key) in one order, so
    # concurrent batches lock them in one order. The rows reach the INSERT sorted by number.
    sort_keys = await insert_sort_keys(
        conn, UPSERT_SQL, "contacts", "[]", "00000000-0000-0000-0000-000000000000", False
    )
    assert sort_keys.split(", ")[0].split(".")[-1] == "phone", sort_keys


async def test_the_oldest_of_several_older_items_replaces_an_existing_contact(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await post(client, user, contact("Stored", created_at=at(10)))
    batch = [
        contact("B", created_at=at(8)),
        contact("C", created_at=at(5)),
        contact("D", created_at=at(7)),
    ]
    results = (await upload(client, user, batch)).json()["results"]
    assert [x["result"] for x in results] == ["replaced", "replaced", "existing"]
    assert {(x["contact"]["name"], x["contact"]["created_at"]) for x in results} == {
        ("C", "2026-10-01T08:05:00.000000Z")
    }
    row = await conn.fetchrow("SELECT name, created_at FROM contacts")
    assert (row["name"], row["created_at"]) == ("C", T0 + timedelta(minutes=5))


async def test_idempotency_key_is_kept_at_least_seven_days_through_maintenance(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [contact("A", created_at=at(5))]
    first = await upload(client, user, batch, **{"Idempotency-Key": "week-old"})
    await conn.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '7 days 23 hours'"
    )
    assert await maintain(conn, prune=True, idempotency_ttl_days=8, login_window_seconds=900)
    again = await upload(client, user, batch, **{"Idempotency-Key": "week-old"})
    assert again.content == first.content
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1


async def test_a_failure_mid_way_stores_none_of_the_batch(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # The batch's first statement creates the new numbers; its second, replacing an older
    # contact's row, fails: the created contacts and the sync record go with it.
    await conn.execute(
        """CREATE FUNCTION test_batch_fail() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.name = 'boom' THEN RAISE EXCEPTION 'boom'; END IF;
               RETURN NEW;
           END $$"""
    )
    await conn.execute(
        "CREATE TRIGGER test_batch_fail BEFORE UPDATE ON contacts"
        " FOR EACH ROW EXECUTE FUNCTION test_batch_fail()"
    )
    try:
        kept = (await post(client, user, contact("Kept", "+14155550150", created_at=at(10)))).json()
        batch = [
            contact("New", "+14155550177"),
            contact("boom", "+14155550150", created_at=at(0)),  # older: replaces "Kept"
        ]
        r = await upload(client, user, batch)
        assert r.status_code >= 500
        assert r.headers["content-type"].startswith("application/problem+json")
        rows = await conn.fetch("SELECT id::text, name FROM contacts")
        assert [tuple(row) for row in rows] == [(kept["contact"]["id"], "Kept")]
        assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0
    finally:
        await conn.execute("DROP TRIGGER test_batch_fail ON contacts")
        await conn.execute("DROP FUNCTION test_batch_fail()")
