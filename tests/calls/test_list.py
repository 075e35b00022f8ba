"""Contract: Call logs, GET /calls and GET /calls/{contact_id}."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from crmsync.calls import service
from crmsync.pagination import PageRequest
from crmsync.sync.service import sync_list
from tests.calls.test_upload import add_contact, call, upload
from tests.conftest import Account, MakeUser, assert_problem


async def walk(client: httpx.AsyncClient, account: Account, path: str, **params: Any) -> list[Any]:
    """Every item, following next_cursor from the first page."""
    items: list[Any] = []
    body = (await client.get(path, params=params, headers=account.headers)).json()
    items += body["items"]
    while body["next_cursor"]:
        body = (
            await client.get(
                path, params={**params, "cursor": body["next_cursor"]}, headers=account.headers
            )
        ).json()
        items += body["items"]
    return items


async def test_calls_are_listed_newest_first_with_the_contacts_name(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    carla = await add_contact(conn, "+14155550150", name="Carla")
    batch = [call(0, phone_raw="(415) 555-0150"), call(2, phone_raw="*123#"), call(1)]
    await upload(client, user, batch)
    body = (await client.get("/calls", headers=user.headers)).json()
    assert (body["page"], body["total"], body["next_cursor"], body["limit"]) == (
        None,
        None,
        None,
        50,
    )
    items = body["items"]
    assert [i["timestamp"] for i in items] == [
        "2026-11-04T14:02:00.000000Z",
        "2026-11-04T14:01:00.000000Z",
        "2026-11-04T14:00:00.000000Z",
    ]
    assert set(items[0]) == {
        "id",
        "user_id",
        "contact_id",
        "contact_name",
        "phone_raw",
        "phone_normalized",
        "direction",
        "duration_seconds",
        "timestamp",
    }
    assert items[0]["phone_raw"] == "*123#" and items[0]["phone_normalized"] is None
    assert items[0]["contact_id"] is None and items[0]["contact_name"] is None
    assert (items[2]["contact_id"], items[2]["contact_name"]) == (carla, "Carla")
    assert items[2]["user_id"] == user.id and items[2]["duration_seconds"] == 60
    await conn.execute("UPDATE contacts SET name = 'Carla Dias'")
    renamed = (await client.get("/calls", headers=user.headers)).json()["items"][2]
    assert renamed["contact_name"] == "Carla Dias"  # the contact's current name


async def test_calls_at_the_same_time_are_ordered_by_id_desc_and_walked_once(
    client: httpx.AsyncClient, user: Account
) -> None:
    same_time = [call(0, phone_raw=f"+1415555{i:04d}") for i in range(7)]
    await upload(client, user, [*same_time, call(1), call(-1)])
    every = (await client.get("/calls", headers=user.headers)).json()["items"]
    ids = [c["id"] for c in every[1:8]]
    assert ids == sorted(ids, reverse=True)
    assert [c["id"] for c in await walk(client, user, "/calls", limit=2)] == [
        c["id"] for c in every
    ]
    page2 = (
        await client.get("/calls", params={"page": 2, "limit": 3}, headers=user.headers)
    ).json()
    assert page2["total"] == 9 and [c["id"] for c in page2["items"]] == [
        c["id"] for c in every[3:6]
    ]


async def test_a_cursor_keeps_the_microsecond_of_the_row_it_stopped_at(
    client: httpx.AsyncClient, user: Account
) -> None:
    # Neighbours a microsecond apart, one on a whole second: a cursor that rounded or
    # dropped the fraction would skip or repeat a call.
    stamps = [
        "2026-11-04T14:00:00.000001Z",
        "2026-11-04T14:00:00.000000Z",
        "2026-11-04T13:59:59.999999Z",
        "2026-11-04T13:59:59.999998Z",
    ]
    batch = [call(i, timestamp=t, phone_raw=f"+1415555{i:04d}") for i, t in enumerate(stamps)]
    assert (await upload(client, user, batch)).status_code == 200
    assert [c["timestamp"] for c in await walk(client, user, "/calls", limit=1)] == stamps


async def test_filters_user_contact_direction_since_inclusive_until_exclusive(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: asyncpg.Connection
) -> None:
    carla = await add_contact(conn, "+14155550150", name="Carla")
    await upload(
        client,
        admin,
        [
            call(0, phone_raw="+14155550150"),
            call(1, direction="incoming", phone_raw="+14155550150"),
            call(2, user_id=user.id),
            call(3, direction="missed", user_id=user.id),
            call(4, direction="missed"),
        ],
    )

    async def minutes(**params: Any) -> list[int]:
        items = await walk(client, user, "/calls", limit=2, **params)
        return [int(c["timestamp"][14:16]) for c in items]

    assert await minutes() == [4, 3, 2, 1, 0]
    assert await minutes(user_id=user.id) == [3, 2]
    assert await minutes(user_id=admin.id) == [4, 1, 0]
    assert await minutes(contact_id=carla) == [1, 0]
    assert await minutes(direction="missed") == [4, 3]
    assert await minutes(since="2026-11-04T14:01:00Z") == [4, 3, 2, 1]
    assert await minutes(until="2026-11-04T14:03:00Z") == [2, 1, 0]
    assert await minutes(since="2026-11-04T16:01:00+02:00", until="2026-11-04T14:03:00Z") == [
        2,
        1,
    ]
    assert await minutes(user_id=admin.id, direction="missed", since="2026-11-04T14:04:00Z") == [4]
    assert await minutes(user_id=str(uuid.uuid4())) == []
    total = (
        await client.get("/calls", params={"page": 1, "direction": "missed"}, headers=user.headers)
    ).json()["total"]
    assert total == 2


async def test_a_cursor_only_follows_the_filters_it_was_made_with(
    client: httpx.AsyncClient, user: Account
) -> None:
    await upload(
        client, user, [call(i, direction="missed" if i % 2 else "incoming") for i in range(6)]
    )
    first = (
        await client.get("/calls", params={"limit": 1, "direction": "missed"}, headers=user.headers)
    ).json()
    for other in ({}, {"direction": "incoming"}, {"direction": "missed", "user_id": user.id}):
        r = await client.get(
            "/calls",
            params={"limit": 1, "cursor": first["next_cursor"], **other},
            headers=user.headers,
        )
        assert_problem(r, 400, "bad_request")
    r = await client.get(
        f"/calls/{uuid.uuid4()}",
        params={"limit": 1, "cursor": first["next_cursor"]},
        headers=user.headers,
    )
    assert_problem(r, 400, "bad_request")


async def test_a_cursor_is_bound_to_its_time_window_and_its_contact(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    carla = await add_contact(conn, "+14155550150", name="Carla")
    bruno = await add_contact(conn, "+14155550160", name="Bruno")
    phones = ["+14155550150"] * 3 + ["+14155550160"] * 3
    await upload(client, user, [call(i, phone_raw=phone) for i, phone in enumerate(phones)])

    async def next_cursor(path: str, **params: Any) -> str:
        body = (await client.get(path, params={"limit": 1, **params}, headers=user.headers)).json()
        assert body["next_cursor"], body
        return str(body["next_cursor"])

    for made_with, used_with in (
        ({"since": "2026-11-04T14:01:00Z"}, {"since": "2026-11-04T14:00:00Z"}),
        ({"since": "2026-11-04T14:01:00Z"}, {}),
        ({"until": "2026-11-04T14:05:00Z"}, {"until": "2026-11-04T14:04:00Z"}),
        ({"contact_id": carla}, {"contact_id": bruno}),
    ):
        cursor = await next_cursor("/calls", **made_with)
        r = await client.get(
            "/calls", params={"limit": 1, "cursor": cursor, **used_with}, headers=user.headers
        )
        assert_problem(r, 400, "bad_request")
    cursor = await next_cursor(f"/calls/{carla}")
    r = await client.get(
        f"/calls/{bruno}", params={"limit": 1, "cursor": cursor}, headers=user.headers
    )
    assert_problem(r, 400, "bad_request")
    # The same instant in another offset is the same filter: the cursor follows on.
    cursor = await next_cursor("/calls", since="2026-11-04T14:01:00Z")
    r = await client.get(
        "/calls",
        params={"limit": 1, "cursor": cursor, "since": "2026-11-04T15:01:00+01:00"},
        headers=user.headers,
    )
    assert r.status_code == 200, r.text
    assert [c["timestamp"] for c in r.json()["items"]] == ["2026-11-04T14:04:00.000000Z"]


@pytest.mark.parametrize(
    "params",
    [
        {"direction": "sideways"},
        {"since": "2026-11-04T14:00:00"},
        {"since": "0001-01-01T00:00:00+01:00"},  # year 0 in UTC
        {"until": "9999-12-31T23:30:00-01:00"},  # year 10000 in UTC
        {"until": "yesterday"},
        {"user_id": "nope"},
        {"contact_id": "nope"},
        {"limit": 201},
    ],
)
async def test_bad_filters_are_422(
    client: httpx.AsyncClient, user: Account, params: dict[str, Any]
) -> None:
    assert_problem(
        await client.get("/calls", params=params, headers=user.headers), 422, "validation_error"
    )


async def test_an_offset_whose_plus_arrived_as_a_space_says_so(
    client: httpx.AsyncClient, user: Account
) -> None:
    """curl or a hand-built URL sends +01:00 unencoded, and a query string reads '+' as a
    space: the 422 says to send %2B instead of only that the time is not RFC 3339."""
    r = await client.get("/calls?since=2026-11-02T09:00:00+01:00", headers=user.headers)
    (error,) = assert_problem(r, 422, "validation_error")["errors"]
    assert error["loc"] == ["query", "since"] and "%2B" in error["msg"]
    r = await client.get("/calls?since=2026-11-02T09:00:00%2B01:00", headers=user.headers)
    assert r.status_code == 200, r.text


async def test_lists_need_a_token(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/calls"), 401, "unauthenticated")
    assert_problem(await client.get(f"/calls/{uuid.uuid4()}"), 401, "unauthenticated")
    assert_problem(await client.post("/calls", json=[call(0)]), 401, "unauthenticated")


async def test_every_user_reads_every_call(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    other = await make_user()
    await upload(client, other, [call(0)])
    assert len((await client.get("/calls", headers=user.headers)).json()["items"]) == 1


async def test_one_contacts_history_newest_first_and_404_for_an_unknown_contact(
    client: httpx.AsyncClient, user: Account, admin: Account, conn: asyncpg.Connection
) -> None:
    carla = await add_contact(conn, "+14155550150", name="Carla")
    empty = await add_contact(conn, "+14155550160", name="Nobody called")
    await upload(client, user, [call(0, phone_raw="+14155550150"), call(1)])
    await upload(client, admin, [call(2, phone_raw="(415) 555-0150")])
    history = await walk(client, user, f"/calls/{carla}", limit=1)
    assert [(c["timestamp"][14:16], c["user_id"]) for c in history] == [
        ("02", admin.id),
        ("00", user.id),
    ]
    paged = (await client.get(f"/calls/{carla}?page=1", headers=user.headers)).json()
    assert paged["total"] == 2 and paged["next_cursor"] is None
    none = (await client.get(f"/calls/{empty}", headers=user.headers)).json()
    assert none["items"] == [] and none["next_cursor"] is None
    await conn.execute("UPDATE contacts SET deleted = true WHERE id = $1", uuid.UUID(carla))
    kept = (await client.get(f"/calls/{carla}", headers=user.headers)).json()["items"]
    assert len(kept) == 2  # a tombstone keeps its calls
    for unknown in (str(uuid.uuid4()), "not-a-uuid"):
        r = await client.get(f"/calls/{unknown}", headers=user.headers)
        assert_problem(r, 404, "not_found")
        r = await client.get(f"/calls/{unknown}", params={"page": 3}, headers=user.headers)
        assert_problem(r, 404, "not_found")


async def test_a_deleted_contact_without_calls_has_an_empty_history_not_404(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    gone = await add_contact(conn, "+14155550160", name="Gone", deleted=True)
    for params in ({}, {"page": 1}):
        r = await client.get(f"/calls/{gone}", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        assert (r.json()["items"], r.json()["next_cursor"]) == ([], None)


class Explaining:
    """The real connection, with an EXPLAIN of every list statement run on it first."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        plan = await self.conn.fetch(f"EXPLAIN {sql}", *args)
        self.plans.append("\n".join(row[0] for row in plan))
        return await self.conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: object) -> object:
        return await self.conn.fetchval(sql, *args)


async def test_keyset_list_queries_are_served_by_an_index_in_their_order(
    conn: asyncpg.Connection,
) -> None:
    users = [
        r["id"]
        for r in await conn.fetch(
            """INSERT INTO users (name, email, password_hash)
               SELECT 'u' || g, 'u' || g || '@example.com', 'x' FROM generate_series(1, 50) g
               RETURNING id"""
        )
    ]
    await conn.execute(
        """INSERT INTO contacts (name, phone_raw, phone_normalized)
           SELECT 'c' || g, '+1415555' || lpad(g::text, 4, '0'), '+1415555' || lpad(g::text, 4, '0')
           FROM generate_series(1, 2000) g"""
    )
    await conn.execute(
        """WITH cs AS (SELECT array_agg(id ORDER BY phone_normalized) AS ids FROM contacts)
           INSERT INTO call_logs (user_id, contact_id, phone_raw, phone_normalized, direction,
                                  duration_seconds, "timestamp")
           SELECT ($1::uuid[])[1 + g % 50], cs.ids[1 + g % 2000],
                  '+1415555' || lpad((1 + g % 2000)::text, 4, '0'),
                  '+1415555' || lpad((1 + g % 2000)::text, 4, '0'),
                  (ARRAY['incoming', 'outgoing', 'missed'])[1 + g % 3], g % 600,
                  timestamptz '2026-11-01' - g * interval '1 minute'
           FROM generate_series(1, 200000) g, cs""",
        users,
    )
    await conn.execute(
        """INSERT INTO sync_audit (user_id, kind, created_at)
           SELECT ($1::uuid[])[1 + g % 50], 'calls', timestamptz '2026-11-01' - g * interval '1 s'
           FROM generate_series(1, 20000) g""",
        users,
    )
    await conn.execute("ANALYZE call_logs, contacts, sync_audit")
    contact = await conn.fetchval("SELECT id FROM contacts ORDER BY phone_normalized LIMIT 1")
    since = await conn.fetchval("SELECT timestamptz '2026-10-01'")
    until = await conn.fetchval("SELECT timestamptz '2026-10-20'")
    filters: list[dict[str, Any]] = [
        {},
        {"user_id": users[0]},
        {"contact_id": contact},
        {"direction": "missed"},
        {"since": since},
        {"until": until},
        {"since": since, "until": until},
        {"user_id": users[1], "direction": "incoming", "since": since, "until": until},
        {"user_id": users[0], "contact_id": contact},
        {"contact_id": contact, "since": since},
    ]
    key = b"k" * 32
    plans: dict[str, list[str]] = {}

    async def explain(label: str, run: Any) -> None:
        """EXPLAIN the first page and the page after it (the keyset condition)."""
        explaining = Explaining(conn)
        cursor = orjson.loads(await run(explaining, PageRequest(10, None, None, key)))[
            "next_cursor"
        ]
        assert cursor, label
        await run(explaining, PageRequest(10, None, cursor, key))
        plans[label] = explaining.plans

    for f in filters:
        await explain(
            f"calls {sorted(f)}",
            lambda c, p, f=f: service.call_list(c, p, **f),
        )
    await explain("contact", lambda c, p: service.call_list_of_contact(c, contact, p))
    await explain("sync", lambda c, p: sync_list(c, p, user_id=None))
    await explain("sync user", lambda c, p: sync_list(c, p, user_id=users[3]))
    assert len(plans) == len(filters) + 3
    for label, pair in plans.items():
        for plan in pair:
            assert "Seq Scan on call_logs" not in plan, (label, plan)
            assert "Seq Scan on sync_audit" not in plan, (label, plan)
            if label != "calls ['contact_id', 'user_id']":  # may AND two indexes' bitmaps
                # The index gives the order, so a page costs O(limit) at any depth: no
                # full sort; at most an incremental one that orders the ids of calls with
                # the same timestamp (a user's calls come from uq_call_logs_dedupe, which
                # is ordered by user and time).
                assert "Sort  (" not in plan.replace("Incremental Sort  (", ""), (label, plan)
                if "Incremental Sort" in plan:
                    assert 'Presorted Key: l."timestamp"' in plan, (label, plan)
    # Page mode picks a page's keys from the index alone first (not joining contacts,
    # whose unused join would still make every row's contact_id be read from the table),
    # then looks those rows up by pk_call_logs ("timestamp", id), from either end of the
    # 4,000 pages of 50.
    await conn.execute("VACUUM call_logs")  # the visibility map an index-only scan needs
    for number in (2, 1500, 3990):
        explaining = Explaining(conn)
        await service.call_list(explaining, PageRequest(50, number, None, key))
        (plan,) = explaining.plans
        assert "Seq Scan on call_logs" not in plan, (number, plan)
        assert "Index Only Scan" in plan and "using pk_call_logs" in plan, (number, plan)
        assert 'Index Cond: (("timestamp" = ' in plan, (number, plan)
    # Filtered pages: the exact total of a user's or a direction's calls is kept in
    # row_counts (migration 0011); other filters count in an index alone.
    for number, filters, counted_by in (
        (2, {"user_id": users[2]}, "on row_counts"),
        (70, {"user_id": users[2]}, "on row_counts"),
        (2, {"direction": "missed"}, "on row_counts"),
        (2, {"user_id": users[2], "direction": "missed"}, "on row_counts"),
        (2, {"user_id": users[2], "since": since}, "Index Only Scan using uq_call_logs_dedupe"),
    ):
        explaining = Explaining(conn)
        await service.call_list(explaining, PageRequest(50, number, None, key), **filters)
        (plan,) = explaining.plans
        assert "Seq Scan on call_logs" not in plan, (number, filters, plan)
        assert counted_by in plan, (number, filters, plan)
    uses = {label: " ".join(pair) for label, pair in plans.items()}
    assert "uq_call_logs_dedupe" in uses["calls ['user_id']"]
    assert "ix_call_logs_contact" in uses["calls ['contact_id']"]
    assert "ix_call_logs_contact" in uses["contact"]
    assert "Index Scan Backward using pk_call_logs" in uses["calls []"]  # ("timestamp", id)
    assert "pk_call_logs" in uses["calls ['since', 'until']"]
    assert "ix_sync_audit_user" in uses["sync user"]
    assert "ix_sync_audit_created" in uses["sync"]
