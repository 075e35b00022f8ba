"""Contract: Call logs, POST /calls."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.requests import Request

from crmsync.calls.service import INSERT_SQL
from crmsync.db import upload_transaction
from crmsync.idempotency import Answer, fingerprint, idempotent
from crmsync.main import maintain
from tests.conftest import Account, MakeUser, assert_problem, insert_sort_keys, make_app

T0 = datetime(2026, 11, 4, 14, 0, tzinfo=UTC)


def call(i: int = 0, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "direction": "outgoing",
        "duration_seconds": 60,
        "timestamp": (T0 + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
        "phone_raw": f"(415) 555-{i % 10000:04d}",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


async def add_contact(
    conn: asyncpg.Connection, phone: str, *, name: str = "Bruno", deleted: bool = False
) -> str:
    contact_id = await conn.fetchval(
        "INSERT INTO contacts (name, phone_raw, phone_normalized, deleted)"
        " VALUES ($1, $2, $2, $3) RETURNING id::text",
        name,
        phone,
        deleted,
    )
    return str(contact_id)


async def upload(
    client: httpx.AsyncClient, account: Account, body: Any, **headers: str
) -> httpx.Response:
    return await client.post("/calls", json=body, headers={**account.headers, **headers})


async def test_upload_stores_calls_and_one_sync_record_with_its_counts(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    r = await upload(client, user, [call(0), call(1), call(2)], **{"X-Device-Id": "pixel-8"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"sync_id", "inserted", "duplicates", "rejected"}
    assert (body["inserted"], body["duplicates"], body["rejected"]) == (3, 0, [])
    rows = await conn.fetch("SELECT * FROM call_logs ORDER BY timestamp")
    assert [str(r["user_id"]) for r in rows] == [user.id] * 3
    assert rows[0]["phone_raw"] == "(415) 555-0000"
    assert rows[0]["phone_normalized"] == "+14155550000"
    assert rows[0]["timestamp"] == T0 and rows[0]["direction"] == "outgoing"
    record = await conn.fetchrow("SELECT * FROM sync_audit")
    assert str(record["id"]) == body["sync_id"] and str(record["user_id"]) == user.id
    assert record["kind"] == "calls"
    assert (record["synced_contacts"], record["synced_calls"]) == (0, 3)
    details = json.loads(record["details"])
    assert details["inserted"] == 3 and details["duplicates"] == 0 and details["rejected"] == 0
    assert set(details) == {"inserted", "duplicates", "rejected"}
    assert record["device_id"] == "pixel-8" and record["elapsed_ms"] > 0


async def test_the_sync_record_keeps_the_first_200_characters_of_the_device_id(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    device = "d" * 199 + "!" + "cut-off"
    assert (await upload(client, user, [call(0)], **{"X-Device-Id": device})).status_code == 200
    kept = await conn.fetchval("SELECT device_id FROM sync_audit")
    assert kept == device[:200]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("Zoë's Pixel 8 · Ж".encode(), "Zoë's Pixel 8 · Ж"),  # UTF-8, as a phone sends it
        (b"Zo\xeb", "Zoë"),  # no UTF-8: read as Latin-1, as HTTP defines header bytes
        (b"", None),  # an empty header names no device
    ],
)
async def test_the_sync_record_keeps_a_device_id_as_the_phone_wrote_it(
    client: httpx.AsyncClient,
    user: Account,
    conn: asyncpg.Connection,
    sent: bytes,
    kept: str | None,
) -> None:
    r = await client.post("/calls", json=[call(0)], headers={**user.headers, "X-Device-Id": sent})
    assert r.status_code == 200, r.text
    assert await conn.fetchval("SELECT device_id FROM sync_audit") == kept


async def test_call_and_sync_record_ids_are_time_ordered_uuid_v7(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """Inserts write the rightmost page of the primary key (migration 0003): ids are
    UUID version 7 whose first 48 bits are the insert's Unix milliseconds."""
    before = datetime.now(UTC)
    first = await upload(client, user, [call(0), call(1)])
    await asyncio.sleep(0.01)
    second = await upload(client, user, [call(2)])
    after = datetime.now(UTC)
    ids = [
        uuid.UUID(str(r["id"]))
        for r in await conn.fetch("SELECT id FROM call_logs ORDER BY timestamp")
    ]
    sync_ids = [uuid.UUID(r.json()["sync_id"]) for r in (first, second)]
    for u in [*ids, *sync_ids]:
        assert (u.version, u.variant) == (7, uuid.RFC_4122), u
        ms = u.int >> 80
        assert before.timestamp() * 1000 - 1 <= ms <= after.timestamp() * 1000 + 1, u
    assert len(set(ids)) == 3
    assert max(ids[:2]) < ids[2] and sync_ids[0] < sync_ids[1]


async def test_reuploading_the_same_batch_inserts_nothing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [call(i) for i in range(5)]
    assert (await upload(client, user, batch)).json()["inserted"] == 5
    again = (await upload(client, user, batch)).json()
    assert (again["inserted"], again["duplicates"]) == (0, 5)
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 5
    counts = await conn.fetch("SELECT synced_calls FROM sync_audit ORDER BY created_at, id")
    assert sorted(r["synced_calls"] for r in counts) == [0, 5]


async def test_duplicates_inside_one_batch_are_stored_once(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    same_number_other_spelling = call(0, phone_raw="+1 415-555-0000")
    body = (
        await upload(client, user, [call(0), call(1), call(0), same_number_other_spelling])
    ).json()
    assert (body["inserted"], body["duplicates"]) == (2, 2)
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 2


async def test_of_repeats_inside_one_batch_the_first_is_the_one_stored(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # 30 calls, each sent 5 times in other spellings and durations, the repeats shuffled
    # through the batch: the stored copy of each is the one that came first.
    spellings = ["+1 415-555-{n:04d}", "(415) 555-{n:04d}", "415.555.{n:04d}", "4155550{n:03d}"]
    batch = [
        call(n, phone_raw=spellings[(n + r) % 4].format(n=n), duration_seconds=r * 100 + n)
        for r in range(5)
        for n in range(30)
    ]
    random.Random(7).shuffle(batch)
    first: dict[int, tuple[str, int]] = {}
    for item in batch:  # n is the duration's last two digits
        first.setdefault(
            item["duration_seconds"] % 100, (item["phone_raw"], item["duration_seconds"])
        )
    body = (await upload(client, user, batch)).json()
    assert (body["inserted"], body["duplicates"]) == (30, 120)
    rows = await conn.fetch("SELECT phone_raw, duration_seconds FROM call_logs")
    assert {r["duration_seconds"] % 100: tuple(r) for r in rows} == first


async def test_dedupe_key_is_user_number_timestamp_direction(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: asyncpg.Connection
) -> None:
    base = call(0)
    variants = [
        base,
        call(0, direction="incoming"),
        call(0, user_id=user.id),
        call(0, phone_raw="(415) 555-0001"),
        call(0, timestamp="2026-11-04T14:00:00.000001Z"),
        call(0, duration_seconds=61),  # duration is not part of the key
        call(0, timestamp="2026-11-04T16:00:00+02:00"),  # the same instant
    ]
    body = (await upload(client, admin, variants)).json()
    assert (body["inserted"], body["duplicates"]) == (5, 2)


async def test_a_stored_call_is_a_duplicate_only_of_its_own_key(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: asyncpg.Connection
) -> None:
    # The same key parts as above, each against a call stored by an earlier upload (the
    # INSERT drops stored calls before it inserts: a wrong column there loses a call).
    stored = [call(0), call(1, phone_raw=None)]
    assert (await upload(client, admin, stored)).json()["inserted"] == 2
    variants = [
        call(0),
        call(0, direction="incoming"),
        call(0, user_id=user.id),
        call(0, phone_raw="(415) 555-0001"),
        call(0, timestamp="2026-11-04T14:00:00.000001Z"),
        call(0, duration_seconds=61),
        call(0, timestamp="2026-11-04T16:00:00+02:00"),
        call(1, phone_raw=None),  # withheld, stored: a duplicate
        call(1, phone_raw="Private"),  # another spelling of no number: another key
        call(0, phone_raw=None),  # no number at the first call's time: another key
    ]
    body = (await upload(client, admin, variants)).json()
    assert (body["inserted"], body["duplicates"]) == (6, 4)
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 8


async def test_calls_without_a_number_count_as_one_number(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    withheld = [
        call(0, phone_raw=...),
        call(0, phone_raw=None),
        call(0, phone_raw=None, phone_normalized=None),
        call(1, phone_raw=""),
    ]
    body = (await upload(client, user, withheld)).json()
    assert (body["inserted"], body["duplicates"], body["rejected"]) == (2, 2, [])
    rows = await conn.fetch("SELECT phone_raw, phone_normalized, contact_id FROM call_logs")
    assert all(r["phone_normalized"] is None and r["contact_id"] is None for r in rows)


@pytest.mark.parametrize("number", ["911", "*123#", "abc", "12345", "+", "Private", "555-0150"])
async def test_withheld_numbers_and_short_codes_are_stored_not_rejected(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, number: str
) -> None:
    body = (await upload(client, user, [call(0, phone_raw=number)])).json()
    assert (body["inserted"], body["rejected"]) == (1, [])
    row = await conn.fetchrow("SELECT phone_raw, phone_normalized, contact_id FROM call_logs")
    assert (row["phone_raw"], row["phone_normalized"], row["contact_id"]) == (number, None, None)


async def test_only_phone_normalized_sent_is_kept_as_phone_raw_too(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    body = [call(0, phone_raw=..., phone_normalized="+14155550123")]
    assert (await upload(client, user, body)).json()["inserted"] == 1
    row = await conn.fetchrow("SELECT phone_raw, phone_normalized FROM call_logs")
    assert (row["phone_raw"], row["phone_normalized"]) == ("+14155550123", "+14155550123")


async def test_phone_normalized_is_a_hint_never_trusted(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    lying = call(0, phone_raw="(415) 555-0150", phone_normalized="+14155559999")
    junk_hint = call(1, phone_raw=..., phone_normalized="not a number")
    assert (await upload(client, user, [lying, junk_hint])).json()["inserted"] == 2
    rows = await conn.fetch("SELECT phone_raw, phone_normalized FROM call_logs ORDER BY timestamp")
    assert rows[0]["phone_normalized"] == "+14155550150"
    assert (rows[1]["phone_raw"], rows[1]["phone_normalized"]) == ("not a number", None)


async def test_a_hint_does_not_give_a_short_code_a_number_or_a_contact(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add_contact(conn, "+14155550177", name="Hint target")
    hinted = call(0, phone_raw="911", phone_normalized="+14155550177")
    body = (await upload(client, user, [hinted])).json()
    assert body["inserted"] == 1, body
    row = await conn.fetchrow("SELECT phone_raw, phone_normalized, contact_id FROM call_logs")
    assert (row["phone_raw"], row["phone_normalized"], row["contact_id"]) == ("911", None, None)
    body = (await upload(client, user, [call(0, phone_raw="911")])).json()  # the same call
    assert (body["inserted"], body["duplicates"]) == (0, 1), body


async def test_a_hint_reads_a_number_dialled_out_of_another_country_and_links_its_contact(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    contact_id = await add_contact(conn, "+14155550191", name="Abroad")
    dialled = call(0, phone_raw="001 415 555 0191", phone_normalized="+14155550191")
    # A call's spelling may be 256 characters, a number's 64: past that it is no number,
    # with a hint as without.
    spaced = call(1, phone_raw="00" + " " * 60 + "1 415 555 0191", phone_normalized="+14155550191")
    assert (await upload(client, user, [dialled, spaced])).json()["inserted"] == 2
    rows = await conn.fetch(
        "SELECT phone_normalized, contact_id::text FROM call_logs ORDER BY timestamp"
    )
    assert [tuple(r) for r in rows] == [("+14155550191", contact_id), (None, None)]


async def test_an_empty_phone_raw_is_kept_as_sent(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    assert (await upload(client, user, [call(0, phone_raw="")])).json()["inserted"] == 1
    row = await conn.fetchrow("SELECT phone_raw, phone_normalized FROM call_logs")
    assert (row["phone_raw"], row["phone_normalized"]) == ("", None)
    # "" and no number at all are one number for the duplicate rule.
    body = (await upload(client, user, [call(0, phone_raw=...)])).json()
    assert (body["inserted"], body["duplicates"]) == (0, 1), body


async def test_a_blank_phone_raw_is_no_number_for_the_duplicate_rule(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """A blank spelling is stored as "": one withheld call, however blank its number."""
    blanks = [call(0, phone_raw=raw) for raw in ("", " ", "\t", "\u00a0 ", ...)]
    body = (await upload(client, user, blanks)).json()
    assert (body["inserted"], body["duplicates"], body["rejected"]) == (1, 4, []), body
    row = await conn.fetchrow("SELECT phone_raw, phone_normalized FROM call_logs")
    assert (row["phone_raw"], row["phone_normalized"]) == ("", None)
    body = (await upload(client, user, [call(0, phone_raw="  ")])).json()
    assert (body["inserted"], body["duplicates"]) == (0, 1), body


async def test_a_blank_phone_raw_leaves_the_number_to_the_hint(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    body = [call(0, phone_raw="  ", phone_normalized="+1 415 555 0123")]
    assert (await upload(client, user, body)).json()["inserted"] == 1
    row = await conn.fetchrow("SELECT phone_raw, phone_normalized FROM call_logs")
    # ... and the hint is kept as phone_raw, as when phone_raw is not sent at all.
    assert (row["phone_raw"], row["phone_normalized"]) == ("+1 415 555 0123", "+14155550123")


async def test_a_number_spelled_in_more_than_64_characters_is_no_number(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    at_limit = "+1" + " " * 52 + "4155550123"
    over = "+1" + " " * 53 + "4155550124"
    assert (len(at_limit), len(over)) == (64, 65)
    body = (
        await upload(client, user, [call(0, phone_raw=at_limit), call(1, phone_raw=over)])
    ).json()
    assert (body["inserted"], body["rejected"]) == (2, []), body
    rows = await conn.fetch("SELECT phone_raw, phone_normalized FROM call_logs ORDER BY timestamp")
    assert [(r["phone_raw"], r["phone_normalized"]) for r in rows] == [
        (at_limit, "+14155550123"),
        (over, None),
    ]


async def test_a_spelling_of_256_characters_is_kept_and_one_of_257_is_a_rejected_item(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """mobile.md: a phone_raw or phone_normalized longer than 256 characters makes the item
    a rejected item (string_too_long); 256 is kept as sent, as no number."""
    longest = "x" * 256
    kept = [call(0, phone_raw=longest), call(1, phone_raw=..., phone_normalized=longest)]
    body = (await upload(client, user, kept)).json()
    assert (body["inserted"], body["rejected"]) == (2, []), body
    rows = await conn.fetch("SELECT phone_raw, phone_normalized FROM call_logs")
    assert [tuple(r) for r in rows] == [(longest, None), (longest, None)]
    over = "x" * 257
    batch = [call(2, phone_raw=over), call(3, phone_normalized=over), call(4, phone_raw=longest)]
    body = (await upload(client, user, batch)).json()
    assert body["inserted"] == 1, body
    assert [
        (r["index"], r["errors"][0]["loc"][-1], r["errors"][0]["type"]) for r in body["rejected"]
    ] == [
        (0, "phone_raw", "string_too_long"),
        (1, "phone_normalized", "string_too_long"),
    ]


async def test_a_calls_number_is_read_in_the_default_region(
    database_url: str, user: Account, conn: asyncpg.Connection
) -> None:
    """CRMSYNC_DEFAULT_REGION=GB: a call's national spelling is a UK number, linked to the
    contact of that number."""
    lena = await add_contact(conn, "+442079460958", name="Lena")
    app = make_app(database_url, default_region="GB")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as gb:
            batch = [call(0, phone_raw="020 7946 0958"), call(1, phone_raw="(415) 555-0199")]
            body = (await upload(gb, user, batch)).json()
    assert body["inserted"] == 2, body
    rows = await conn.fetch(
        "SELECT phone_normalized, contact_id::text FROM call_logs ORDER BY timestamp"
    )
    assert [tuple(r) for r in rows] == [("+442079460958", lena), ("+444155550199", None)]


async def test_call_without_contact_id_is_linked_to_the_live_contact_of_its_number(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    live = await add_contact(conn, "+14155550150", name="Carla")
    await add_contact(conn, "+14155550160", name="Gone", deleted=True)
    other = await add_contact(conn, "+14155550170", name="Other")
    batch = [
        call(0, phone_raw="(415) 555-0150"),
        call(1, phone_raw=..., phone_normalized="+14155550150"),
        call(2, phone_raw="415.555.0160"),  # its contact is deleted: no link
        call(3, phone_raw="(415) 555-0150", contact_id=other),  # explicit id wins
        call(4, phone_raw="(415) 555-0199"),  # no contact
    ]
    assert (await upload(client, user, batch)).json()["inserted"] == 5
    links = [
        None if r["contact_id"] is None else str(r["contact_id"])
        for r in await conn.fetch("SELECT contact_id FROM call_logs ORDER BY timestamp")
    ]
    assert links == [live, live, None, other, None]


async def test_call_uploaded_before_its_contact_is_linked_when_the_contact_is_created(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    assert (await upload(client, user, [call(0, phone_raw="(415) 555-0150")])).json()[
        "inserted"
    ] == 1
    r = await client.post(
        "/contacts",
        json={"name": "Carla", "phone_raw": "+1 415 555 0150"},
        headers=user.headers,
    )
    assert r.status_code == 201, r.text
    contact_id = r.json()["contact"]["id"]
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == contact_id
    listed = (await client.get(f"/calls/{contact_id}", headers=user.headers)).json()
    assert [c["contact_name"] for c in listed["items"]] == ["Carla"]


async def race(client: httpx.AsyncClient, user: Account, database_url: str, phone: str) -> str:
    """A call uploaded while its contact is being created: neither transaction sees the
    other's row, so the call is stored unlinked. The contact's id."""
    creating = await asyncpg.connect(database_url)
    try:
        tx = creating.transaction()
        await tx.start()  # the contact's transaction: its link UPDATE sees no call yet
        contact_id = await add_contact(creating, phone, name="Carla")
        body = (await upload(client, user, [call(0, phone_raw=phone)])).json()
        assert body["inserted"] == 1  # and the upload does not see the uncommitted contact
        await tx.commit()
    finally:
        await creating.close()
    return contact_id


async def linked(conn: asyncpg.Connection, phone: str) -> str | None:
    found = await conn.fetchval(
        "SELECT contact_id::text FROM call_logs WHERE phone_normalized = $1", phone
    )
    return str(found) if found else None


async def test_a_call_racing_its_contacts_creation_is_linked_by_maintenance(
    client: httpx.AsyncClient,
    user: Account,
    conn: asyncpg.Connection,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    contact_id = await race(client, user, database_url, "+14155550150")
    assert await linked(conn, "+14155550150") is None
    with caplog.at_level(logging.INFO, logger="crmsync.main"):
        assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await linked(conn, "+14155550150") == contact_id
    assert "maintenance linked 1 calls" in caplog.text


async def test_relink_rounds_look_only_at_contacts_written_since_an_hour_before_the_last(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, database_url: str
) -> None:
    """With a mark an hour older than the last round, a round relinks only contacts that
    transactions at or after that mark's xmin wrote; without one, every contact."""
    old = await race(client, user, database_url, "+14155550151")
    await conn.execute(
        "INSERT INTO relink_marks VALUES (now() - interval '2 hours',"
        " pg_snapshot_xmin(pg_current_snapshot())::text::bigint),"
        " (now() - interval '1 minute', 0)"
    )
    new = await race(client, user, database_url, "+14155550152")
    assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await linked(conn, "+14155550151") is None  # written before the window
    assert await linked(conn, "+14155550152") == new
    await conn.execute("DELETE FROM relink_marks")
    assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await linked(conn, "+14155550151") == old


async def test_quick_rounds_link_a_race_of_the_last_seconds_and_leave_the_rest_to_full_ones(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, database_url: str
) -> None:
    """Between the full rounds (every minute), each round (5 s) relinks the contacts written
    since a mark taken 10 s before the previous round: a raced call is linked within seconds."""
    old = await race(client, user, database_url, "+14155550151")
    await conn.execute(
        "INSERT INTO relink_marks SELECT now() - s * interval '1 second',"
        " pg_snapshot_xmin(pg_current_snapshot())::text::bigint FROM unnest('{15, 5}'::int[]) s"
    )
    new = await race(client, user, database_url, "+14155550152")
    assert await maintain(
        conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900, full_relink=False
    )
    assert await linked(conn, "+14155550152") == new
    assert await linked(conn, "+14155550151") is None  # written before the mark's xmin
    await conn.execute("DELETE FROM relink_marks")  # no mark to start from: nothing
    assert await maintain(
        conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900, full_relink=False
    )
    assert await linked(conn, "+14155550151") is None
    assert await maintain(
        conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900, full_relink=True
    )
    assert await linked(conn, "+14155550151") == old


async def test_a_round_relinks_contacts_written_by_the_transaction_that_is_its_marks_xmin(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, database_url: str
) -> None:
    """A mark's xmin is the oldest transaction running when the mark was taken, which may
    commit after it: that transaction's contacts are in the round's window too (>=)."""
    contact_id = await race(client, user, database_url, "+14155550153")
    await conn.execute(
        "INSERT INTO relink_marks SELECT now() - s * interval '1 second', (SELECT change_xid"
        " FROM contacts WHERE phone_normalized = '+14155550153') FROM unnest('{15, 5}'::int[]) s"
    )
    assert await maintain(
        conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900, full_relink=False
    )
    assert await linked(conn, "+14155550153") == contact_id


@pytest.mark.parametrize("full", [True, False])
async def test_a_relink_round_keeps_its_mark_and_prunes_marks_older_than_the_one_it_used(
    conn: asyncpg.Connection, full: bool
) -> None:
    """Quick rounds prune as full ones do: they keep the marks a full round may choose."""
    await conn.execute(
        "INSERT INTO relink_marks SELECT now() - m * interval '1 minute', 1"
        " FROM unnest('{180, 120, 90, 30}'::int[]) m"
    )
    assert await maintain(
        conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900, full_relink=full
    )
    ages = await conn.fetch(
        "SELECT round(extract(epoch FROM now() - taken_at) / 60) AS minutes, snapshot_xmin"
        " FROM relink_marks ORDER BY taken_at"
    )
    assert [(int(a["minutes"]), a["snapshot_xmin"] > 1) for a in ages] == [
        (90, False),
        (30, False),
        (0, True),
    ]


@pytest.mark.parametrize(
    ("marks", "full"),
    [(False, True), (True, True), (True, False)],
    ids=["every contact", "full round from a mark", "quick round from a mark"],
)
async def test_maintenance_never_links_a_call_to_a_deleted_contact(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, marks: bool, full: bool
) -> None:
    if marks:  # xmin 0: every contact counts as written since, by the mark's path
        await conn.execute(
            "INSERT INTO relink_marks SELECT now() - s * interval '1 second', 0"
            " FROM unnest('{7200, 15, 5}'::int[]) s"
        )
    await add_contact(conn, "+14155550160", name="Gone", deleted=True)
    calls = [call(0, phone_raw="415.555.0160"), call(1, phone_raw="415.555.0161")]
    body = (await upload(client, user, calls)).json()
    assert body["inserted"] == 2
    here = await add_contact(conn, "+14155550161", name="Here")  # unlinked until a round
    assert await maintain(
        conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900, full_relink=full
    )
    linked = await conn.fetch("SELECT phone_normalized, contact_id::text FROM call_logs")
    assert dict(linked) == {"+14155550160": None, "+14155550161": here}


async def test_durations_of_0_and_86400_seconds_are_stored(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    body = (
        await upload(client, user, [call(0, duration_seconds=0), call(1, duration_seconds=86400)])
    ).json()
    assert (body["inserted"], body["rejected"]) == (2, []), body
    durations = await conn.fetch("SELECT duration_seconds FROM call_logs ORDER BY 1")
    assert [r[0] for r in durations] == [0, 86400]


BAD_ITEMS: list[tuple[dict[str, Any], str, str]] = [
    (call(0, direction="sideways"), "direction", "literal_error"),
    (call(0, direction=None), "direction", "literal_error"),
    (call(0, duration_seconds=-1), "duration_seconds", "greater_than_equal"),
    (call(0, duration_seconds=86401), "duration_seconds", "less_than_equal"),
    (call(0, duration_seconds=1.5), "duration_seconds", "int_type"),
    (call(0, duration_seconds="60"), "duration_seconds", "int_type"),
    (call(0, duration_seconds=True), "duration_seconds", "int_type"),
    (call(0, duration_seconds=...), "duration_seconds", "missing"),
    (call(0, timestamp=...), "timestamp", "missing"),
    (call(0, timestamp=None), "timestamp", "value_error"),
    (call(0, timestamp="2026-11-04T14:00:00"), "timestamp", "value_error"),
    (call(0, timestamp="2026-11-04"), "timestamp", "value_error"),
    (call(0, timestamp="2026-11-04T14:00Z"), "timestamp", "value_error"),
    (call(0, timestamp="2026-11-04T14:00:00+0200"), "timestamp", "value_error"),
    (call(0, timestamp=1762264800), "timestamp", "value_error"),
    (call(0, timestamp="2026-02-30T10:00:00Z"), "timestamp", "datetime_from_date_parsing"),
    (call(0, contact_id="not-a-uuid"), "contact_id", "uuid_parsing"),
    (call(0, phone_raw=12345), "phone_raw", "string_type"),
    (call(0, phone_raw="x" * 300), "phone_raw", "string_too_long"),
    (call(0, phone_raw="415\x00555"), "phone_raw", "string_pattern_mismatch"),
]


# Each bad item sits between two good ones: the whole-batch check must refuse it too.
@pytest.mark.parametrize(("bad", "field", "error_type"), BAD_ITEMS)
async def test_an_invalid_item_is_rejected_by_index_and_the_rest_stored(
    client: httpx.AsyncClient,
    user: Account,
    conn: asyncpg.Connection,
    bad: dict[str, Any],
    field: str,
    error_type: str,
) -> None:
    r = await upload(client, user, [call(1), bad, call(2)])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["inserted"] == 2 and body["duplicates"] == 0
    [rejected] = body["rejected"]
    assert rejected["index"] == 1
    error = rejected["errors"][0]
    assert set(error) == {"loc", "msg", "type"}
    assert error["loc"] == ["body", 1, field] and error["type"] == error_type, error
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 2
    assert await conn.fetchval("SELECT synced_calls FROM sync_audit") == 2
    details = await conn.fetchval("SELECT details->>'rejected' FROM sync_audit")
    assert details == "1"


async def test_a_timestamp_more_than_five_minutes_ahead_is_rejected(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    soon = (now + timedelta(minutes=4)).isoformat()
    late = (now + timedelta(minutes=6)).isoformat()
    body = (await upload(client, user, [call(0, timestamp=soon), call(1, timestamp=late)])).json()
    assert body["inserted"] == 1
    assert body["rejected"][0]["index"] == 1
    assert body["rejected"][0]["errors"][0]["loc"] == ["body", 1, "timestamp"]


async def test_a_timestamp_outside_the_years_1_to_9999_in_utc_is_rejected(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    edges = ["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00-01:00"]
    body = (await upload(client, user, [call(i, timestamp=t) for i, t in enumerate(edges)])).json()
    assert (body["inserted"], [r["index"] for r in body["rejected"]]) == (1, [0]), body
    stored = await conn.fetchval(
        "SELECT to_char(timestamp, 'YYYY-MM-DD HH24:MI AD') FROM call_logs"
    )
    assert stored == "0001-01-01 01:00 AD"


async def test_every_rfc3339_spelling_of_a_timestamp_is_accepted(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    spellings = [
        "2026-11-04t14:00:00z",  # RFC 3339 allows lower-case T and Z
        "2026-11-04 14:01:00+00:00",  # and a space for the T
        "2026-11-04T16:02:00.123456789+02:00",  # any number of fraction digits
    ]
    body = (await upload(client, user, [call(0, timestamp=t) for t in spellings])).json()
    assert (body["inserted"], body["rejected"]) == (3, []), body
    stored = [r[0] for r in await conn.fetch("SELECT timestamp FROM call_logs ORDER BY 1")]
    assert stored == [
        T0,
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=2, microseconds=123456),
    ]


@pytest.mark.parametrize("with_an_invalid_item", [False, True])
async def test_offsets_beyond_postgresqls_16_hours_are_stored_as_their_instant(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, with_an_invalid_item: bool
) -> None:
    # RFC 3339 allows offsets up to +-23:59; PostgreSQL's text input stops at +-15:59.
    # An invalid item sends the batch through the item-by-item validation.
    spellings = [
        "2026-11-05T13:58:00+23:59",
        "2026-11-03T14:01:00-23:59",
        "2026-11-05T10:26:00+20:24",
    ]
    batch = [call(i, timestamp=t) for i, t in enumerate(spellings)]
    if with_an_invalid_item:
        batch.append(call(9, direction="sideways"))
    body = (await upload(client, user, batch)).json()
    assert (body["inserted"], len(body["rejected"])) == (3, int(with_an_invalid_item)), body
    stored = [r[0] for r in await conn.fetch("SELECT timestamp FROM call_logs ORDER BY 1")]
    assert stored == [T0 - timedelta(minutes=1), T0, T0 + timedelta(minutes=2)]


async def test_every_error_of_an_item_is_reported(client: httpx.AsyncClient, user: Account) -> None:
    bad = {"direction": "sideways", "duration_seconds": -1, "timestamp": "2026-11-04T17:00:00"}
    body = (await upload(client, user, [bad])).json()
    assert body["inserted"] == 0
    fields = [e["loc"][-1] for e in body["rejected"][0]["errors"]]
    assert fields == ["direction", "duration_seconds", "timestamp"]


async def test_unknown_contact_id_is_a_rejected_item(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    known = await add_contact(conn, "+14155550150")
    unknown = str(uuid.uuid4())
    batch = [call(0, contact_id=known), call(1, contact_id=unknown), call(2, contact_id=unknown)]
    body = (await upload(client, user, batch)).json()
    assert body["inserted"] == 1
    assert [r["index"] for r in body["rejected"]] == [1, 2]
    assert body["rejected"][0]["errors"] == [
        {"loc": ["body", 1, "contact_id"], "msg": "Unknown contact", "type": "not_found"}
    ]
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == known


async def test_rejected_items_are_listed_in_index_order(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # An unknown contact_id is found after the items' own validation: still index order.
    unknown = str(uuid.uuid4())
    batch = [call(0, contact_id=unknown), call(1, direction="sideways"), call(2)]
    body = (await upload(client, user, batch)).json()
    assert body["inserted"] == 1
    assert [(r["index"], r["errors"][0]["loc"][-1]) for r in body["rejected"]] == [
        (0, "contact_id"),
        (1, "direction"),
    ]


async def test_a_call_naming_a_deleted_contact_is_stored_in_its_history(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    gone = await add_contact(conn, "+14155550160", name="Gone", deleted=True)
    body = (await upload(client, user, [call(0, contact_id=gone)])).json()
    assert (body["inserted"], body["rejected"]) == (1, []), body
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == gone


async def test_non_admin_naming_another_user_is_403_for_the_whole_request(
    client: httpx.AsyncClient, user: Account, admin: Account, conn: asyncpg.Connection
) -> None:
    r = await upload(client, user, [call(0), call(1, user_id=admin.id)])
    assert_problem(r, 403, "forbidden")
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 0
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0
    own = await upload(client, user, [call(0, user_id=user.id)])
    assert own.json()["inserted"] == 1


async def test_non_admin_naming_another_user_in_an_invalid_item_is_403_too(
    client: httpx.AsyncClient, user: Account, admin: Account, conn: asyncpg.Connection
) -> None:
    invalid = call(1, user_id=admin.id, duration_seconds=-1)
    r = await upload(client, user, [call(0), invalid])
    assert_problem(r, 403, "forbidden")
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0
    not_an_id = call(1, user_id="someone else")  # only a validation error of its item
    body = (await upload(client, user, [call(0), not_an_id])).json()
    assert (body["inserted"], [r["index"] for r in body["rejected"]]) == (1, [1]), body


async def test_non_admin_naming_itself_in_an_invalid_item_gets_that_item_rejected_not_403(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # Its own id (in any spelling of the UUID) names no other user: only the invalid
    # item's own errors count, and the rest of the batch is stored.
    invalid = call(1, user_id=user.id.upper(), duration_seconds=-1)
    r = await upload(client, user, [call(0, user_id=user.id), invalid])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["inserted"], [x["index"] for x in body["rejected"]]) == (1, [1]), body
    assert body["rejected"][0]["errors"][0]["loc"] == ["body", 1, "duration_seconds"]
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1


async def test_admin_uploads_for_another_user_and_unknown_or_deleted_users_are_rejected(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    member = await make_user()
    gone = await make_user()
    await conn.execute("UPDATE users SET deleted_at = now() WHERE id = $1", uuid.UUID(gone.id))
    batch = [
        call(0, user_id=member.id),
        call(1, user_id=gone.id),
        call(2, user_id=str(uuid.uuid4())),
    ]
    body = (await upload(client, admin, batch)).json()
    assert body["inserted"] == 1
    assert [(r["index"], r["errors"][0]["loc"]) for r in body["rejected"]] == [
        (1, ["body", 1, "user_id"]),
        (2, ["body", 2, "user_id"]),
    ]
    assert str(await conn.fetchval("SELECT user_id FROM call_logs")) == member.id
    record = await conn.fetchrow("SELECT user_id, synced_calls FROM sync_audit")
    assert (str(record["user_id"]), record["synced_calls"]) == (admin.id, 1)


@pytest.mark.parametrize("body", [{}, {"direction": "incoming"}, "calls", 5, None, []])
async def test_a_body_that_is_not_a_non_empty_list_is_422(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, body: Any
) -> None:
    r = await client.post("/calls", content=json.dumps(body).encode(), headers=user.headers)
    assert_problem(r, 422, "validation_error")
    for blank in (b"", b" \r\n\t"):  # no body at all, not malformed JSON
        empty = await client.post("/calls", content=blank, headers=user.headers)
        assert_problem(empty, 422, "validation_error")
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 0


async def test_malformed_json_is_400(client: httpx.AsyncClient, user: Account) -> None:
    r = await client.post("/calls", content=b"[{", headers=user.headers)
    assert_problem(r, 400, "bad_request")


async def test_more_than_5000_calls_is_413_and_5000_pass(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [call(i) for i in range(5001)]
    assert_problem(await upload(client, user, batch), 413, "payload_too_large")
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 0
    body = (await upload(client, user, batch[:5000])).json()
    assert body["inserted"] == 5000


async def test_same_idempotency_key_and_body_returns_the_first_answer_and_stores_nothing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [call(0), call(1)]
    first = await upload(client, user, batch, **{"Idempotency-Key": "k-1"})
    again = await upload(client, user, batch, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["inserted"] == 2
    assert (first.headers.get("idempotent-replayed"), again.headers.get("idempotent-replayed")) == (
        None,
        "true",
    )
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1
    other = await upload(client, user, [call(5)], **{"Idempotency-Key": "k-1"})
    assert_problem(other, 422, "validation_error")
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 2
    fresh = await upload(client, user, batch, **{"Idempotency-Key": "k-2"})
    assert fresh.json()["sync_id"] != first.json()["sync_id"]
    assert fresh.json()["duplicates"] == 2


async def test_concurrent_repeats_of_one_idempotency_key_all_get_the_one_first_answer(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # A phone retrying while its first try is still running: the repeats wait for it.
    batch = [call(i) for i in range(50)]
    answers = await asyncio.gather(
        *(upload(client, user, batch, **{"Idempotency-Key": "retry"}) for _ in range(8))
    )
    assert {r.status_code for r in answers} == {200}
    assert len({r.text for r in answers}) == 1
    assert answers[0].json()["inserted"] == 50
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 50


async def test_an_idempotency_key_is_1_to_200_characters(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    longest = "k" * 200
    first = await upload(client, user, [call(0)], **{"Idempotency-Key": longest})
    again = await upload(client, user, [call(0)], **{"Idempotency-Key": longest})
    assert first.status_code == 200 and again.json() == first.json()
    for bad in ("", "k" * 201):
        r = await upload(client, user, [call(1)], **{"Idempotency-Key": bad})
        problem = assert_problem(r, 422, "validation_error")
        assert problem["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 1
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1


async def test_idempotency_keys_are_per_user(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    other = await make_user()
    batch = [call(0)]
    mine = await upload(client, user, batch, **{"Idempotency-Key": "shared"})
    theirs = await upload(client, other, batch, **{"Idempotency-Key": "shared"})
    assert theirs.json()["inserted"] == 1
    assert theirs.json()["sync_id"] != mine.json()["sync_id"]
    again = await upload(client, other, batch, **{"Idempotency-Key": "shared"})
    assert again.json() == theirs.json()  # its own first answer, not the other user's
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 2
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 2


async def test_another_users_upload_under_the_same_idempotency_key_leaves_the_first_answer(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    # Storing the second user's answer must not overwrite the first user's: a retry of the
    # first upload gets its own answer back, not another user's sync_id and counts.
    other = await make_user()
    mine = await upload(client, user, [call(0)], **{"Idempotency-Key": "shared"})
    theirs = await upload(client, other, [call(1), call(2)], **{"Idempotency-Key": "shared"})
    assert (mine.json()["inserted"], theirs.json()["inserted"]) == (1, 2)
    again = await upload(client, user, [call(0)], **{"Idempotency-Key": "shared"})
    assert again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == mine.json()
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 2


async def test_a_key_pruned_between_its_conflict_and_its_read_is_claimed_again(
    user: Account, conn: asyncpg.Connection, database_url: str
) -> None:
    # The hourly prune deletes an expired key's row: if it commits after a retry's INSERT
    # conflicted with that row and before the retry reads it, the retry finds no row. The
    # key has expired, so the request runs as a new one (it was a 500 before).
    user_id = uuid.UUID(user.id)
    await conn.execute(
        """INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, response,
                                         created_at)
           VALUES ($1, 'old', '\\x00', 200, '{"old":true}', now() - interval '9 days')""",
        user_id,
    )

    class PrunedBeforeTheRead:
        """The request's connection, with the real prune run (and committed) on another
        connection just before the request reads the key's row."""

        def __init__(self, inner: asyncpg.Connection) -> None:
            self.inner = inner
            self.pruned = False

        async def fetchval(self, *args: Any) -> Any:
            return await self.inner.fetchval(*args)

        async def fetchrow(self, *args: Any) -> Any:
            if not self.pruned:
                self.pruned = True
                pruner = await asyncpg.connect(database_url)
                try:
                    assert await maintain(
                        pruner, prune=True, idempotency_ttl_days=7, login_window_seconds=900
                    )
                finally:
                    await pruner.close()
            return await self.inner.fetchrow(*args)

        async def execute(self, *args: Any) -> Any:
            return await self.inner.execute(*args)

        def is_in_transaction(self) -> bool:
            return self.inner.is_in_transaction()

    async def produce() -> Answer:
        return 200, b'{"new":true}'

    request = ("POST", "/calls", b"[]")
    wrapped = PrunedBeforeTheRead(conn)
    async with conn.transaction():  # the request's, as db.upload_transaction opens it
        answer = await idempotent(
            wrapped,  # type: ignore[arg-type]
            user_id=user_id,
            key="old",
            request=request,
            produce=produce,
        )
    assert wrapped.pruned
    assert answer == (200, b'{"new":true}')
    stored = await conn.fetchrow(
        "SELECT request_hash, response FROM idempotency_keys WHERE key = 'old'"
    )
    assert (bytes(stored["request_hash"]), bytes(stored["response"])) == (
        fingerprint(*request),
        b'{"new":true}',
    )


async def test_an_idempotency_key_reused_on_another_upload_endpoint_is_422(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    body = [call(0)]
    assert (await upload(client, user, body, **{"Idempotency-Key": "k"})).status_code == 200
    r = await client.post(
        "/contacts/batch", json=body, headers={**user.headers, "Idempotency-Key": "k"}
    )
    reused = {"loc": ["header", "Idempotency-Key"], "type": "idempotency_key_reused"}
    problem = assert_problem(r, 422, "validation_error")  # not the answer of POST /calls
    assert [{k: e[k] for k in reused} for e in problem["errors"]] == [reused]
    r = await upload(client, user, [call(1)], **{"Idempotency-Key": "k"})  # another body
    problem = assert_problem(r, 422, "validation_error")
    assert [{k: e[k] for k in reused} for e in problem["errors"]] == [reused]
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 1


async def assert_failed_and_stored_nothing(r: httpx.Response, conn: asyncpg.Connection) -> None:
    assert r.status_code >= 500
    assert r.headers["content-type"].startswith("application/problem+json")
    for table in ("call_logs", "sync_audit", "idempotency_keys"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


# With a key the upload is a transaction; without one, a single statement.
KEYED = pytest.mark.parametrize("key", [{"Idempotency-Key": "boom"}, {}], ids=["key", "no-key"])


@KEYED
async def test_a_database_error_mid_batch_stores_nothing_and_no_sync_record(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, key: dict[str, str]
) -> None:
    await conn.execute(
        """CREATE FUNCTION test_fail_on_4242() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.duration_seconds = 4242 THEN RAISE EXCEPTION 'boom'; END IF;
               RETURN NEW;
           END $$"""
    )
    await conn.execute(
        "CREATE TRIGGER test_fail_on_4242 BEFORE INSERT ON call_logs"
        " FOR EACH ROW EXECUTE FUNCTION test_fail_on_4242()"
    )
    try:
        batch = [call(i) for i in range(10)] + [call(10, duration_seconds=4242), call(11)]
        r = await upload(client, user, batch, **key)
        await assert_failed_and_stored_nothing(r, conn)
    finally:
        await conn.execute("DROP TRIGGER test_fail_on_4242 ON call_logs")
        await conn.execute("DROP FUNCTION test_fail_on_4242()")
    retry = await upload(client, user, batch, **key)
    assert retry.json()["inserted"] == 12


@pytest.mark.parametrize(
    ("headers", "in_transaction"),
    [([(b"idempotency-key", b"k-1")], True), ([(b"idempotency-key", b"")], True), ([], False)],
)
async def test_an_upload_runs_in_a_transaction_only_with_an_idempotency_key(
    conn: asyncpg.Connection, headers: list[tuple[bytes, bytes]], in_transaction: bool
) -> None:
    # Without a key the upload is one statement: BEGIN and COMMIT would be two round trips
    # of five for nothing.
    steps = upload_transaction(Request({"type": "http", "headers": headers}), conn)
    given = await anext(steps)
    assert given is conn and conn.is_in_transaction() is in_transaction
    with pytest.raises(StopAsyncIteration):
        await anext(steps)
    assert not conn.is_in_transaction()


@KEYED
async def test_a_sync_record_that_cannot_be_written_stores_no_call(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, key: dict[str, str]
) -> None:
    # Without a key the calls and their record are one statement: it fails as a whole.
    await conn.execute(
        """CREATE FUNCTION test_fail_record() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'boom'; END $$"""
    )
    await conn.execute(
        "CREATE TRIGGER test_fail_record BEFORE INSERT ON sync_audit"
        " FOR EACH ROW EXECUTE FUNCTION test_fail_record()"
    )
    try:
        r = await upload(client, user, [call(0), call(1)], **key)
        await assert_failed_and_stored_nothing(r, conn)
    finally:
        await conn.execute("DROP TRIGGER test_fail_record ON sync_audit")
        await conn.execute("DROP FUNCTION test_fail_record()")


@KEYED
async def test_a_batch_of_only_rejected_calls_still_writes_its_sync_record(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, key: dict[str, str]
) -> None:
    r = await upload(client, user, [call(0, direction="sideways"), {}], **key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["inserted"], body["duplicates"]) == (0, 0)
    assert [item["index"] for item in body["rejected"]] == [0, 1]
    record = await conn.fetchrow("SELECT id, synced_calls, details FROM sync_audit")
    assert str(record["id"]) == body["sync_id"] and record["synced_calls"] == 0
    assert json.loads(record["details"]) == {"inserted": 0, "duplicates": 0, "rejected": 2}
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 0


@KEYED
async def test_the_sync_record_counts_duplicates_found_by_the_statement(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, key: dict[str, str]
) -> None:
    await upload(client, user, [call(0), call(1)])
    r = await upload(client, user, [call(0), call(1), call(2), call(2)], **key)
    assert (r.json()["inserted"], r.json()["duplicates"]) == (1, 3)
    details = await conn.fetchval(
        "SELECT details FROM sync_audit WHERE id = $1", uuid.UUID(r.json()["sync_id"])
    )
    assert json.loads(details) == {"inserted": 1, "duplicates": 3, "rejected": 0}


async def test_concurrent_overlapping_uploads_never_store_a_duplicate(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # 20 phones (or retries) upload overlapping windows of one log at once, half reversed.
    batches = []
    for n in range(20):
        window = [call(i) for i in range(n * 10, n * 10 + 60)]
        batches.append(window if n % 2 else window[::-1])
    distinct = len({c["timestamp"] for b in batches for c in b})
    answers = await asyncio.gather(*(upload(client, user, b) for b in batches))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert sum(a.json()["inserted"] for a in answers) == distinct
    assert sum(a.json()["duplicates"] for a in answers) == sum(map(len, batches)) - distinct
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == distinct
    synced = await conn.fetchval("SELECT sum(synced_calls) FROM sync_audit")
    assert synced == distinct


async def test_a_batch_is_inserted_in_the_dedupe_index_order(conn: asyncpg.Connection) -> None:
    # Concurrent uploads of overlapping batches take the dedupe index's keys in one order,
    # so they wait on each other instead of deadlocking: the INSERT sorts its rows by that
    # index's own key before inserting (then request order, so the first of repeats is
    # the one kept). (The test above catches a deadlock only by timing.)
    sort_keys = await insert_sort_keys(conn, INSERT_SQL, "call_logs", "[]")
    index = await conn.fetchval("SELECT pg_get_indexdef('uq_call_logs_dedupe'::regclass)")
    index_keys = index[index.index("(") + 1 : -1]

    def bare(keys: str) -> str:
        return keys.replace("i.", "").replace("(", "").replace(")", "")

    assert bare(sort_keys) == bare(index_keys) + ", n"


def _metric(result: str) -> float:
    value = REGISTRY.get_sample_value("crmsync_calls_uploaded_total", {"result": result})
    return value or 0.0


async def test_uploads_count_results_in_metrics(client: httpx.AsyncClient, user: Account) -> None:
    before = {r: _metric(r) for r in ("inserted", "duplicate", "rejected")}
    await upload(client, user, [call(0), call(0), call(1, direction="x")])
    await upload(client, user, [call(0)], **{"Idempotency-Key": "m"})
    await upload(client, user, [call(0)], **{"Idempotency-Key": "m"})  # a replay counts nothing
    after = {r: _metric(r) - before[r] for r in before}
    assert after == {"inserted": 1, "duplicate": 2, "rejected": 1}


# The database's own guard of call_logs' references (migration 0006): checked once per
# statement, and the referenced rows are never deleted.


async def test_a_call_referring_to_no_user_or_contact_is_refused_by_the_database(
    user: Account, conn: asyncpg.Connection
) -> None:
    contact = await add_contact(conn, "+14155550150")
    insert = """INSERT INTO call_logs (user_id, contact_id, direction, duration_seconds, "timestamp")
                SELECT u, c, 'incoming', 1, now() - i * interval '1 s'
                FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS t(u, c, i)"""
    good = (uuid.UUID(user.id), uuid.UUID(contact))
    for bad in ((uuid.uuid4(), uuid.UUID(contact)), (uuid.UUID(user.id), uuid.uuid4())):
        rows = [good, good, bad]  # one bad row fails the whole statement
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(insert, [r[0] for r in rows], [r[1] for r in rows])
    assert await conn.fetchval("SELECT count(*) FROM call_logs") == 0
    await conn.execute(insert, [good[0]], [good[1]])
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("UPDATE call_logs SET contact_id = $1", uuid.uuid4())
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("UPDATE call_logs SET user_id = $1", uuid.uuid4())
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == contact


async def test_users_and_contacts_are_never_deleted_nor_renumbered(
    user: Account, conn: asyncpg.Connection
) -> None:
    contact = await add_contact(conn, "+14155550150")  # referred to by no call
    for statement in (
        f"DELETE FROM users WHERE id = '{user.id}'",
        f"DELETE FROM contacts WHERE id = '{contact}'",
        f"UPDATE users SET id = gen_random_uuid() WHERE id = '{user.id}'",
        f"UPDATE contacts SET id = gen_random_uuid() WHERE id = '{contact}'",
    ):
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM contacts WHERE id = $1", uuid.UUID(contact))
    await conn.execute("UPDATE contacts SET name = 'Still here' WHERE id = $1", uuid.UUID(contact))


def test_batch_validation_takes_the_same_fields_as_one_call() -> None:
    """A batch is validated at once by a TypedDict of its own (calls.schemas._BatchCallIn),
    one call alone by CallIn: a field added to one only would be dropped by the other path."""
    from crmsync.calls.schemas import CallIn, _BatchCallIn

    assert _BatchCallIn.__required_keys__ == CallIn.__required_keys__
    assert _BatchCallIn.__optional_keys__ == CallIn.__optional_keys__
