"""Contract: Contacts, GET /contacts/changes (and contact_changes_head for GET /sync/state)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import orjson
from asyncpg.transaction import Transaction

from crmsync.contacts.service import (
    CHANGES_SCOPE,
    Feed,
    contact_changes_head,
    contact_changes_page,
)
from crmsync.pagination import encode_cursor
from tests.conftest import Account, assert_problem
from tests.contacts.test_upsert import contact, post


async def pull(
    client: httpx.AsyncClient, account: Account, cursor: str | None = None, limit: int = 50
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    r = await client.get("/contacts/changes", params=params, headers=account.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# A contact written straight into the table, in a transaction the test holds open.
INSERT_CONTACT = (
    "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ($1, $2, $2)"
    " RETURNING id::text"
)


async def pull_all(
    client: httpx.AsyncClient, account: Account, cursor: str | None = None, limit: int = 50
) -> tuple[list[dict[str, Any]], str]:
    """Follow next_cursor while has_more; (items, the cursor to resume from)."""
    items: list[dict[str, Any]] = []
    for _ in range(1000):  # a cursor that stops moving fails here rather than hanging
        body = await pull(client, account, cursor, limit)
        items += body["items"]
        assert body["next_cursor"]
        if not body["has_more"]:
            return items, body["next_cursor"]
        assert body["next_cursor"] != cursor
        cursor = body["next_cursor"]
    raise AssertionError("the feed never ended")


async def add_contacts(client: httpx.AsyncClient, user: Account, n: int) -> list[str]:
    """Creates n contacts one by one; their ids, in creation order."""
    return [
        (await post(client, user, contact(f"N{i}", f"(415) 555-01{i:02d}"))).json()["contact"]["id"]
        for i in range(n)
    ]


async def test_page_is_ignored_on_the_changes_feed_and_a_repeated_parameter_counts_last(
    client: httpx.AsyncClient, user: Account
) -> None:
    """mobile.md, Conventions: the feed has no page mode (`page` is ignored, with a cursor
    too), and a parameter given twice counts as its last value."""
    await add_contacts(client, user, 3)
    first = await pull(client, user, limit=2)
    for params in (
        [("limit", "2"), ("page", "2")],
        [("limit", "200"), ("limit", "2")],
        [("page", "3"), ("limit", "2")],
    ):
        r = await client.get("/contacts/changes", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        assert r.json()["items"] == first["items"] and r.json()["limit"] == 2, params
    params = [("limit", "2"), ("page", "2"), ("cursor", first["next_cursor"])]
    r = await client.get("/contacts/changes", params=params, headers=user.headers)
    assert r.json() == await pull(client, user, first["next_cursor"], limit=2)


async def test_empty_feed_answers_a_cursor_meaning_the_beginning(
    client: httpx.AsyncClient, user: Account
) -> None:
    body = await pull(client, user)
    assert body == {
        "items": [],
        "limit": 50,
        "next_cursor": body["next_cursor"],
        "has_more": False,
        "restarted": False,
    }
    assert isinstance(body["next_cursor"], str) and body["next_cursor"]
    created = (await post(client, user, contact())).json()["contact"]
    later = await pull(client, user, body["next_cursor"])
    assert later["items"] == [created]


async def test_following_next_cursor_returns_each_change_once_oldest_first(
    client: httpx.AsyncClient, user: Account
) -> None:
    ids = await add_contacts(client, user, 5)
    first = await pull(client, user, limit=2)
    assert first["has_more"] is True and len(first["items"]) == 2 and first["limit"] == 2
    items, cursor = await pull_all(client, user, limit=2)
    assert [c["id"] for c in items] == ids
    resumed = await pull(client, user, cursor)
    assert (resumed["items"], resumed["has_more"], resumed["next_cursor"]) == ([], False, cursor)


async def test_a_page_that_ends_the_feed_exactly_says_has_more_false(
    client: httpx.AsyncClient, user: Account
) -> None:
    ids = await add_contacts(client, user, 4)
    first = await pull(client, user, limit=2)
    second = await pull(client, user, first["next_cursor"], limit=2)
    assert [c["id"] for c in first["items"] + second["items"]] == ids
    assert (first["has_more"], second["has_more"]) == (True, False)
    after = await pull(client, user, second["next_cursor"], limit=2)
    assert (after["items"], after["has_more"], after["next_cursor"]) == (
        [],
        False,
        second["next_cursor"],
    )


async def test_changed_and_deleted_contacts_reappear_once_at_their_latest_state(
    client: httpx.AsyncClient, user: Account
) -> None:
    a = (await post(client, user, contact("A", "(415) 555-0101"))).json()["contact"]
    b = (await post(client, user, contact("B", "(415) 555-0102"))).json()["contact"]
    _, cursor = await pull_all(client, user)
    await client.put(f"/contacts/{a['id']}", json={"name": "A1"}, headers=user.headers)
    await client.put(f"/contacts/{a['id']}", json={"name": "A2"}, headers=user.headers)
    await client.delete(f"/contacts/{b['id']}", headers=user.headers)
    items, _ = await pull_all(client, user, cursor)
    assert [(c["id"], c["name"], c["deleted"]) for c in items] == [
        (a["id"], "A2", False),
        (b["id"], "B", True),
    ]
    # From the beginning: each contact once, in the order of its latest change.
    everything, _ = await pull_all(client, user)
    assert [c["id"] for c in everything] == [a["id"], b["id"]]


@asynccontextmanager
async def early_and_late(
    database_url: str,
) -> AsyncIterator[tuple[asyncpg.Connection, Transaction, asyncpg.Connection]]:
    """Two sessions: `early` has begun a transaction and taken its transaction id, so
    whatever `late` does next gets the later id."""
    early = await asyncpg.connect(database_url)
    late = await asyncpg.connect(database_url)
    try:
        early_tx = early.transaction()
        await early_tx.start()
        await early.execute("SELECT pg_current_xact_id()")
        yield early, early_tx, late
    finally:
        await early.close()
        await late.close()


async def test_a_change_committed_during_a_pull_is_never_missed(
    client: httpx.AsyncClient, user: Account, database_url: str
) -> None:
    async with early_and_late(database_url) as (early, early_tx, late):
        late_tx = late.transaction()
        await late_tx.start()
        late_id = await late.fetchval(INSERT_CONTACT, "Late", "+14155550102")
        early_id = await early.fetchval(INSERT_CONTACT, "Early", "+14155550101")
        await late_tx.commit()  # the later-started transaction commits first

        during = await pull(client, user)
        assert late_id not in {c["id"] for c in during["items"]}

        await early_tx.commit()
        items, cursor = await pull_all(client, user, during["next_cursor"])
        assert sorted(c["id"] for c in items) == sorted([early_id, late_id])
        assert (await pull(client, user, cursor))["items"] == []


async def test_an_empty_cursor_is_from_the_beginning(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('A', $1, $1)",
        "+14155550101",
    )
    r = await client.get("/contacts/changes?cursor=&limit=200", headers=user.headers)
    assert r.status_code == 200, r.text
    assert [c["name"] for c in r.json()["items"]] == ["A"]


async def test_garbage_or_foreign_cursor_is_400(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    for garbage in ("garbage", "A" * 2001):
        r = await client.get("/contacts/changes", params={"cursor": garbage}, headers=user.headers)
        assert_problem(r, 400, "bad_request")
    await conn.executemany(
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ($1, $2, $2)",
        [("A", "+14155550101"), ("B", "+14155550102")],
    )
    listing = (await client.get("/contacts?limit=1", headers=user.headers)).json()
    r = await client.get(
        "/contacts/changes", params={"cursor": listing["next_cursor"]}, headers=user.headers
    )
    assert_problem(r, 400, "bad_request")
    for limit in (0, 201):
        r = await client.get(f"/contacts/changes?limit={limit}", headers=user.headers)
        assert_problem(r, 422, "validation_error")


async def test_head_is_none_without_contacts_then_the_end_of_the_feed(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    feed: Feed = client.app.state.changes_feed  # type: ignore[attr-defined]
    assert await contact_changes_head(conn, feed=feed) is None
    a = (await post(client, user, contact("A", "(415) 555-0101"))).json()["contact"]
    head = await contact_changes_head(conn, feed=feed)
    assert head is not None
    page = await contact_changes_page(conn, cursor=head, limit=10, feed=feed)
    assert (page.items_json, page.has_more, page.next_cursor) == (b"[]", False, head)
    await client.put(f"/contacts/{a['id']}", json={"name": "A1"}, headers=user.headers)
    items, _ = await pull_all(client, user, head)
    assert [c["name"] for c in items] == ["A1"]


async def test_head_after_several_writes_is_past_all_of_them(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    feed: Feed = client.app.state.changes_feed  # type: ignore[attr-defined]
    await add_contacts(client, user, 3)
    head = await contact_changes_head(conn, feed=feed)
    assert head is not None
    page = await contact_changes_page(conn, cursor=head, limit=10, feed=feed)
    assert (page.items_json, page.has_more) == (b"[]", False)


async def test_head_never_passes_a_change_still_being_committed(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection, database_url: str
) -> None:
    feed: Feed = client.app.state.changes_feed  # type: ignore[attr-defined]
    async with early_and_late(database_url) as (early, early_tx, late):
        async with late.transaction():
            await late.fetchval(INSERT_CONTACT, "Late", "+14155550102")
        head = await contact_changes_head(conn, feed=feed)
        assert head is not None
        early_id = await early.fetchval(INSERT_CONTACT, "Early", "+14155550101")
        await early_tx.commit()
        items, _ = await pull_all(client, user, head)
        assert early_id in {c["id"] for c in items}


async def test_a_cursor_from_another_cluster_or_restore_pulls_again_from_the_beginning(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """A backup restored into another PostgreSQL cluster (a new machine): a device's cursor
    from the old one may lie past the positions the new cluster writes at, and would skip
    those changes for good. Restored into the same cluster, the rows are back at positions
    before the cursors handed out since, and a device would never learn what the restore
    undid. A cursor names its origin (cluster, and contacts table, which a restore makes
    anew); from another one, the pull starts again from the beginning."""
    feed: Feed = client.app.state.changes_feed  # type: ignore[attr-defined]
    cluster = str(await conn.fetchval("SELECT system_identifier FROM pg_control_system()"))
    table = str(await conn.fetchval("SELECT 'contacts'::regclass::oid"))
    assert feed.origin == f"{cluster}/{table}"
    ids = await add_contacts(client, user, 3)
    far = str(2**40)  # a position this cluster has not reached

    def cursor(*values: str) -> str:
        return encode_cursor(feed.key, CHANGES_SCOPE, list(values))

    cases = [
        (cursor(feed.origin, far, "0"), []),
        (cursor(cluster, far, "0"), []),  # made before origins named the table: honoured
        (cursor(far, "0"), []),  # made before cursors named the cluster: honoured
        (cursor(f"{cluster}7/{table}", far, "0"), ids),  # another cluster
        (cursor(f"{cluster}/{int(table) + 1}", far, "0"), ids),  # restored: a new table
        (cursor(f"{cluster}7", far, "0"), ids),  # another cluster, before origins
    ]
    for made, expected in cases:
        first = await pull(client, user, made)
        assert first["restarted"] is bool(expected)  # the app's sign to upload again
        items, resume = await pull_all(client, user, made)
        assert [c["id"] for c in items] == expected
        assert (await pull(client, user, resume))["restarted"] is False
    assert (await pull(client, user, resume))["items"] == []  # the new cursor is this origin's


async def test_once_the_contacts_were_restored_cursors_that_name_no_table_restart_too(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """Cursors made before origins named the contacts table (the cluster alone, or
    nothing) are honoured only where no backup was ever restored: a phone that last
    pulled before this version would otherwise never learn what a restore undid."""
    feed: Feed = client.app.state.changes_feed  # type: ignore[attr-defined]
    assert not feed.restored
    ids = await add_contacts(client, user, 3)
    cluster, far = feed.origin.partition("/")[0], str(2**40)
    restored = dataclasses.replace(feed, restored=True)
    for values, restarts in (
        ([cluster, far, "0"], True),
        ([far, "0"], True),
        ([feed.origin, far, "0"], False),  # made since: its origin says it all
    ):
        made = encode_cursor(feed.key, CHANGES_SCOPE, values)
        page = await contact_changes_page(conn, cursor=made, limit=50, feed=restored)
        assert page.restarted is restarts
        assert len(orjson.loads(page.items_json)) == (len(ids) if restarts else 0)


async def test_the_feed_pages_by_50_when_no_limit_is_given(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """Contract, Pagination: `limit` defaults to 50."""
    await conn.executemany(
        INSERT_CONTACT.removesuffix(" RETURNING id::text"),
        [(f"C{i:02d}", f"+1415555{i:04d}") for i in range(51)],
    )
    r = await client.get("/contacts/changes", headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["limit"], len(body["items"]), body["has_more"]) == (50, 50, True)
    rest = await pull(client, user, body["next_cursor"])
    assert ([c["name"] for c in rest["items"]], rest["has_more"]) == (["C50"], False)
