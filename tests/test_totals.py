"""Page mode's exact `total` of GET /contacts and GET /calls (also of one user's calls, or
one direction's: migration 0011) and of GET /sync (everyone's or one user's: migration
0015) comes from the deltas the row_counts triggers append (migration 0002), not from
counting the tables: it must equal count(*) after every kind of write, and survive
compaction, TRUNCATE and the migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from unittest import mock

import asyncpg
import httpx
import pytest

from crmsync import db, main
from crmsync.db import MAINTENANCE_LOCK_ID
from crmsync.main import maintain
from tests.calls.test_upload import call
from tests.conftest import Account, MakeUser, make_settings

DIRECTIONS = ("incoming", "outgoing", "missed")


async def assert_totals_exact(
    client: httpx.AsyncClient, account: Account, conn: asyncpg.Connection
) -> None:
    live = await conn.fetchval("SELECT count(*) FROM contacts WHERE NOT deleted")
    calls = await conn.fetchval("SELECT count(*) FROM call_logs")
    for path, expected in (("/contacts", live), ("/calls", calls)):
        for page in (1, 1000):  # a row's count, and the count past the end
            r = await client.get(path, params={"page": page}, headers=account.headers)
            assert r.status_code == 200
            assert r.json()["total"] == expected, (path, page)
    pairs = await conn.fetch(
        """SELECT u.id, d, (SELECT count(*) FROM call_logs l WHERE l.user_id = u.id AND l.direction = d)
           FROM users u, unnest(ARRAY['incoming', 'outgoing', 'missed']) d"""
    )
    by_user: dict[str, int] = {}
    by_direction: dict[str, int] = {}
    for user_id, direction, n in pairs:
        by_user[str(user_id)] = by_user.get(str(user_id), 0) + n
        by_direction[direction] = by_direction.get(direction, 0) + n
        both = {"user_id": str(user_id), "direction": direction}
        for page in (1, 1000):
            r = await client.get("/calls", params={**both, "page": page}, headers=account.headers)
            assert r.json()["total"] == n, (both, page)
    for filters, expected in [
        *[({"user_id": u}, n) for u, n in by_user.items()],
        *[({"direction": d}, n) for d, n in by_direction.items()],
    ]:
        r = await client.get("/calls", params={**filters, "page": 1}, headers=account.headers)
        assert r.json()["total"] == expected, filters
    records = dict(
        await conn.fetch(
            "SELECT u.id::text, (SELECT count(*) FROM sync_audit s WHERE s.user_id = u.id) "
            "FROM users u"
        )
    )
    scopes = [({"user_id": u}, n) for u, n in records.items()] if account.is_admin else []
    scopes.append(({}, sum(records.values()) if account.is_admin else records[account.id]))
    for filters, expected in scopes:
        for page in (1, 1000):
            r = await client.get("/sync", params={**filters, "page": page}, headers=account.headers)
            assert r.status_code == 200
            assert r.json()["total"] == expected, (filters, page)


def contact(i: int, created_at: str = "2025-01-01T00:00:00Z") -> dict[str, str]:
    return {"name": f"Person {i}", "phone_raw": f"+1 415 555 {i:04d}", "created_at": created_at}


async def test_totals_follow_every_write(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    h = user.headers
    await assert_totals_exact(client, user, conn)  # empty: 0, not null
    batch = [contact(i) for i in range(5)] + [contact(0, "2020-01-01T00:00:00Z")]
    assert (await client.post("/contacts/batch", json=batch, headers=h)).status_code == 200
    await assert_totals_exact(client, user, conn)  # created, and replaced within the batch
    r = await client.post("/contacts", json=contact(9), headers=h)
    assert r.status_code == 201
    created = r.json()["contact"]["id"]
    assert (await client.post("/contacts", json=contact(9), headers=h)).status_code == 200
    await assert_totals_exact(client, user, conn)  # existing: no change
    assert (await client.delete(f"/contacts/{created}", headers=h)).status_code == 204
    await assert_totals_exact(client, user, conn)  # deleted
    assert (await client.post("/contacts", json=contact(9), headers=h)).status_code == 201
    await assert_totals_exact(client, user, conn)  # revived
    calls = [call(i, direction=DIRECTIONS[i % 3]) for i in range(20)]
    assert (await client.post("/calls", json=calls, headers=h)).json()["inserted"] == 20
    assert (await client.post("/calls", json=calls, headers=h)).json()["duplicates"] == 20
    await assert_totals_exact(client, user, conn)
    # Nothing moves a call to another user or direction; should anything ever, the
    # totals follow.
    await conn.execute(
        "UPDATE call_logs SET direction = 'missed', duration_seconds = 0 WHERE ctid IN "
        "(SELECT ctid FROM call_logs WHERE direction = 'incoming' LIMIT 2)"
    )
    await assert_totals_exact(client, user, conn)
    await conn.execute(
        "DELETE FROM call_logs WHERE duration_seconds = 60 AND ctid IN "
        "(SELECT ctid FROM call_logs LIMIT 3)"
    )
    await assert_totals_exact(client, user, conn)

    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 3  # batch, calls twice
    await conn.execute("DELETE FROM sync_audit WHERE ctid IN (SELECT ctid FROM sync_audit LIMIT 1)")
    await assert_totals_exact(client, user, conn)

    assert await maintain(conn, prune=True, idempotency_ttl_days=8, login_window_seconds=900)
    # one row for the contacts, one for each direction of the user's calls, one for the
    # user's sync records
    assert await conn.fetchval("SELECT count(*) FROM row_counts") == 5
    await assert_totals_exact(client, user, conn)


async def test_one_upload_of_several_users_calls_counts_each_users_own(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: asyncpg.Connection
) -> None:
    batch = [call(i, direction=DIRECTIONS[i % 3], user_id=user.id) for i in range(7)]
    batch += [call(100 + i, direction="missed") for i in range(4)]  # the admin's own
    r = await client.post("/calls", json=batch, headers=admin.headers)
    assert r.json()["inserted"] == 11
    await assert_totals_exact(client, admin, conn)
    r = await client.get("/calls", params={"page": 1, "user_id": user.id}, headers=user.headers)
    assert r.json()["total"] == 7
    # The upload's one sync record is the admin's. Nothing moves a record to another user;
    # should anything ever, the totals follow.
    await client.post("/calls", json=[call(200)], headers=user.headers)
    await conn.execute("UPDATE sync_audit SET user_id = $1", uuid.UUID(user.id))
    await assert_totals_exact(client, admin, conn)
    await assert_totals_exact(client, user, conn)


async def test_a_rolled_back_write_counts_nothing(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    tx = conn.transaction()
    await tx.start()
    await conn.execute(
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('X', '1', '+1')"
    )
    await tx.rollback()
    await assert_totals_exact(client, user, conn)


async def test_truncate_zeroes_the_totals(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await client.post("/contacts/batch", json=[contact(1)], headers=user.headers)
    await client.post("/calls", json=[call(1)], headers=user.headers)
    await conn.execute("TRUNCATE call_logs, contacts")
    await assert_totals_exact(client, user, conn)
    assert (await client.get("/sync?page=1", headers=user.headers)).json()["total"] == 2
    await conn.execute("TRUNCATE sync_audit")
    await assert_totals_exact(client, user, conn)


async def test_a_contact_written_as_a_tombstone_is_not_counted(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        """INSERT INTO contacts (name, phone_raw, phone_normalized, deleted)
           VALUES ('Gone', '1', '+14155550001', true), ('Here', '2', '+14155550002', false)"""
    )
    await assert_totals_exact(client, user, conn)


async def test_truncating_one_table_keeps_the_other_tables_total(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await client.post("/contacts/batch", json=[contact(1), contact(2)], headers=user.headers)
    await client.post("/calls", json=[call(1), call(2), call(3)], headers=user.headers)
    await conn.execute("TRUNCATE call_logs")
    await assert_totals_exact(client, user, conn)
    assert (await client.get("/contacts?page=1", headers=user.headers)).json()["total"] == 2
    await client.post("/calls", json=[call(1)], headers=user.headers)
    await conn.execute("TRUNCATE contacts")
    await assert_totals_exact(client, user, conn)
    assert (await client.get("/calls?page=1", headers=user.headers)).json()["total"] == 1


async def test_the_migration_counts_rows_already_there(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    url = await make_database("crmsync_row_counts_backfill")
    db.migrate(url)
    db.migrate(url, "0001")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO contacts (name, phone_raw, phone_normalized, deleted)
               SELECT 'N', i::text, '+1415555' || i, i % 3 = 0 FROM generate_series(1, 30) i;
               INSERT INTO users (name, email, password_hash) VALUES ('U', 'u@x.io', 'x');
               INSERT INTO call_logs (user_id, direction, duration_seconds, "timestamp")
               SELECT (SELECT id FROM users), (ARRAY['missed', 'incoming'])[1 + i % 2], 0,
                      now() - i * interval '1 minute'
               FROM generate_series(1, 7) i;
               INSERT INTO sync_audit (user_id, kind)
               SELECT (SELECT id FROM users), 'calls' FROM generate_series(1, 4)"""
        )
        db.migrate(url)
        totals = dict(await conn.fetch("SELECT name, sum(n)::bigint FROM row_counts GROUP BY name"))
        assert totals == {"contacts": 20, "calls": 7, "sync": 4}
        kept = "SELECT direction, n FROM row_counts WHERE name = 'calls' ORDER BY direction"
        assert await conn.fetch(kept) == [("incoming", 4), ("missed", 3)]
        user_id = await conn.fetchval("SELECT id FROM users")
        for name in ("calls", "sync"):
            assert user_id == await conn.fetchval(
                "SELECT DISTINCT user_id FROM row_counts WHERE name = $1", name
            )
        db.migrate(url, "0010")  # back to one row of all the calls
        await conn.execute(
            'INSERT INTO call_logs (user_id, direction, duration_seconds, "timestamp") '
            "VALUES ($1, 'outgoing', 1, now())",
            user_id,
        )
        assert await conn.fetch(
            "SELECT name, sum(n)::bigint FROM row_counts GROUP BY name ORDER BY name"
        ) == [
            ("calls", 8),
            ("contacts", 20),
        ]
    finally:
        await conn.close()


async def test_unfiltered_totals_are_read_from_row_counts(
    client: httpx.AsyncClient, admin: Account, user: Account, conn: asyncpg.Connection
) -> None:
    # What makes the other tests here bite: the totals are the kept ones, not a count(*).
    await conn.execute(
        "INSERT INTO row_counts (name, n, user_id, direction) VALUES "
        "('calls', 1000, NULL, NULL), ('contacts', 7, NULL, NULL), ('calls', 5, $1, 'missed'), "
        "('sync', 3, $1, NULL), ('sync', 40, $2, NULL)",
        user.id,
        uuid.uuid4(),
    )
    h = user.headers
    assert (await client.get("/calls?page=1", headers=h)).json()["total"] == 1005
    assert (await client.get("/contacts?page=1", headers=h)).json()["total"] == 7
    assert (await client.get("/sync?page=1", headers=h)).json()["total"] == 3  # the user's
    r = await client.get("/sync?page=1", headers=admin.headers)
    assert r.json()["total"] == 43  # everyone's
    r = await client.get("/sync", params={"page": 1, "user_id": user.id}, headers=admin.headers)
    assert r.json()["total"] == 3
    for filters in ({"user_id": user.id}, {"direction": "missed"}):
        r = await client.get("/calls", params={"page": 1, **filters}, headers=h)
        assert r.json()["total"] == 5, filters
    # Other filters count their own rows.
    r = await client.get("/calls", params={"page": 1, "since": "2020-01-01T00:00:00Z"}, headers=h)
    assert r.json()["total"] == 0


async def test_one_process_at_a_time_maintains(conn: asyncpg.Connection, database_url: str) -> None:
    await conn.execute("INSERT INTO row_counts VALUES ('calls', 1), ('calls', 2)")
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():  # another worker is in its maintenance round
            await other.fetchval("SELECT pg_advisory_xact_lock($1)", MAINTENANCE_LOCK_ID)
            assert not await maintain(
                conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900
            )
            assert await conn.fetchval("SELECT count(*) FROM row_counts") == 2
    finally:
        await other.close()
    assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await conn.fetch("SELECT name, n FROM row_counts") == [("calls", 3)]


async def test_a_folded_count_is_left_alone(conn: asyncpg.Connection) -> None:
    """A round every few seconds must not rewrite (and leave dead) the folded rows when
    there is nothing to fold."""
    await conn.execute("INSERT INTO row_counts VALUES ('calls', 3), ('contacts', 1)")
    before = await conn.fetch("SELECT ctid, name, n FROM row_counts ORDER BY name")
    assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await conn.fetch("SELECT ctid, name, n FROM row_counts ORDER BY name") == before
    await conn.execute("INSERT INTO row_counts VALUES ('contacts', 2)")
    assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await conn.fetch("SELECT name, n FROM row_counts ORDER BY name") == [
        ("calls", 3),
        ("contacts", 3),
    ]


async def test_a_server_folds_the_counts_as_it_starts(
    conn: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers restarted more often than the round interval must still fold: the first
    round runs at start-up, not one interval later."""
    monkeypatch.setattr(main, "ROUND_INTERVAL_SECONDS", 3600)
    await conn.execute("INSERT INTO row_counts VALUES ('calls', 1), ('calls', 2)")
    app = main.create_app(make_settings(database_url))
    async with app.router.lifespan_context(app):
        for _ in range(200):
            if await conn.fetchval("SELECT count(*) FROM row_counts") == 1:
                break
            await asyncio.sleep(0.05)
    assert await conn.fetch("SELECT name, n FROM row_counts") == [("calls", 3)]


async def test_rounds_fold_every_time_relink_every_minute_and_prune_every_hour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rounds: list[tuple[bool, bool]] = []
    retention: set[tuple[int | None, int]] = set()

    async def record(
        conn: object,
        *,
        prune: bool,
        idempotency_ttl_days: int,
        login_window_seconds: int,
        sync_record_retention_days: int | None,
        full_relink: bool,
    ) -> bool:
        rounds.append((full_relink, prune))
        retention.add((sync_record_retention_days, login_window_seconds))
        if len(rounds) == main.PRUNE_EVERY + 1:
            raise asyncio.CancelledError
        return True

    class Pool:
        def acquire(self) -> contextlib.nullcontext[None]:
            return contextlib.nullcontext()

    every = main.ROUND_INTERVAL_SECONDS
    assert (every * main.RELINK_EVERY, every * main.PRUNE_EVERY) == (60, 3600)
    monkeypatch.setattr(main, "maintain", record)
    monkeypatch.setattr(main, "ROUND_INTERVAL_SECONDS", 0)
    settings = make_settings(
        "postgresql://unused/unused", sync_record_retention_days=90, login_window_seconds=1200
    )
    # A round that fails (this stand-in called with other arguments) is logged and the loop
    # goes on: bounded, so that such a failure fails the test instead of filling memory.
    async with asyncio.timeout(20):
        with pytest.raises(asyncio.CancelledError):
            await main._maintenance(Pool(), settings)  # type: ignore[arg-type]
    assert retention == {(90, 1200)}
    relinked = [i for i, (relink, _) in enumerate(rounds) if relink]
    pruned = [i for i, (_, prune) in enumerate(rounds) if prune]
    assert relinked == list(range(0, main.PRUNE_EVERY + 1, main.RELINK_EVERY))
    assert pruned == [0, main.PRUNE_EVERY]


async def test_maintenance_keeps_idempotency_keys_seven_days_and_expired_auth_state_no_longer(
    user: Account, conn: asyncpg.Connection
) -> None:
    """Contract: an Idempotency-Key is kept at least 7 days. Revocations of expired tokens
    and day-old throttle rows can no longer matter and go."""
    await conn.execute(
        """INSERT INTO idempotency_keys (user_id, key, request_hash, created_at) VALUES
             ($1, 'kept', '\\x00', now() - interval '7 days 23 hours'),
             ($1, 'gone', '\\x00', now() - interval '8 days 1 hour')""",
        uuid.UUID(user.id),
    )
    await conn.execute(
        """INSERT INTO revoked_tokens VALUES
             ('00000000-0000-0000-0000-00000000000a', now() + interval '1 minute'),
             ('00000000-0000-0000-0000-00000000000b', now() - interval '1 minute');
           INSERT INTO login_throttle VALUES
             ('recent@example.com', 3, now() - interval '23 hours', NULL),
             ('stale@example.com', 3, now() - interval '25 hours', NULL),
             ('locked@example.com', 5, now() - interval '3 days', now() + interval '1 minute')"""
    )
    assert await maintain(conn, prune=False, idempotency_ttl_days=8, login_window_seconds=900)
    assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 2
    # CRMSYNC_IDEMPOTENCY_TTL_DAYS=30 keeps both; the default 8 only the week-old one
    assert await maintain(conn, prune=True, idempotency_ttl_days=30, login_window_seconds=900)
    assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 2
    assert await maintain(conn, prune=True, idempotency_ttl_days=8, login_window_seconds=900)
    assert [r[0] for r in await conn.fetch("SELECT key FROM idempotency_keys")] == ["kept"]
    assert [str(r[0]) for r in await conn.fetch("SELECT jti FROM revoked_tokens")] == [
        "00000000-0000-0000-0000-00000000000a"
    ]
    throttled = await conn.fetch("SELECT email_key FROM login_throttle ORDER BY 1")
    assert [r[0] for r in throttled] == ["locked@example.com", "recent@example.com"]


async def test_a_round_on_an_unavailable_database_logs_one_line_not_a_traceback(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every 5 s while the database is down or read-only: a warning, not a stack trace."""
    sep = "&" if "?" in database_url else "?"
    app = main.create_app(make_settings(database_url + sep + "default_transaction_read_only=on"))
    with caplog.at_level(logging.WARNING, logger="crmsync.main"):
        async with app.router.lifespan_context(app):
            for _ in range(200):
                if caplog.records:
                    break
                await asyncio.sleep(0.05)
    record = caplog.records[0]
    assert record.getMessage().startswith("maintenance skipped, database unavailable:")
    assert "ReadOnlySQLTransactionError" in record.getMessage()
    assert record.levelno == logging.WARNING and record.exc_info is None


async def test_sync_records_are_kept_forever_or_for_the_retention_set_but_each_users_newest(
    client: httpx.AsyncClient,
    admin: Account,
    user: Account,
    make_user: MakeUser,
    conn: asyncpg.Connection,
) -> None:
    """CRMSYNC_SYNC_RECORD_RETENTION_DAYS: unset, every record stays; set, the older ones go
    but each user's newest, which GET /sync/state answers as last_sync_at. The kept totals
    follow the deletes."""
    await conn.execute(
        """INSERT INTO sync_audit (user_id, kind, created_at)
           SELECT u, 'calls', now() - d * interval '1 day'
           FROM unnest($1::uuid[]) u, unnest(ARRAY[1, 40, 41, 100]) d""",
        [uuid.UUID(admin.id), uuid.UUID(user.id)],
    )
    await conn.execute(  # a user whose every record is old
        "INSERT INTO sync_audit (user_id, kind, created_at) VALUES ($1, 'sync', now() - interval"
        " '50 days'), ($1, 'sync', now() - interval '60 days')",
        uuid.UUID((await make_user()).id),
    )
    state = (await client.get("/sync/state", headers=user.headers)).json()
    assert await maintain(conn, prune=True, idempotency_ttl_days=8, login_window_seconds=900)
    assert await conn.fetchval("SELECT count(*) FROM sync_audit") == 10
    assert await maintain(
        conn,
        prune=True,
        idempotency_ttl_days=8,
        login_window_seconds=900,
        sync_record_retention_days=30,
    )
    left = await conn.fetch(
        "SELECT user_id, round(extract(epoch FROM now() - created_at) / 86400)::int AS days "
        "FROM sync_audit ORDER BY user_id, days"
    )
    by_user: dict[str, list[int]] = {}
    for row in left:
        by_user.setdefault(str(row["user_id"]), []).append(row["days"])
    assert sorted(by_user.values()) == [[1], [1], [50]], by_user
    assert (await client.get("/sync/state", headers=user.headers)).json() == {
        **state,
        "server_time": mock.ANY,
    }
    await assert_totals_exact(client, admin, conn)


async def test_a_backlog_is_deleted_in_batches_each_committed(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO revoked_tokens SELECT gen_random_uuid(), now() - interval '1 hour'"
        " FROM generate_series(1, 7)"
    )
    await conn.execute(
        "INSERT INTO revoked_tokens VALUES (gen_random_uuid(), now() + interval '1 hour')"
    )
    statements: list[str] = []

    def logged(query: asyncpg.connection.LoggedQuery) -> None:
        statements.append(query.query)

    conn.add_query_logger(logged)
    try:
        assert (
            await db.delete_in_batches(conn, "revoked_tokens", "t.expires_at < now()", batch=3) == 7
        )
    finally:
        await asyncio.sleep(0)  # asyncpg calls its loggers soon after, not at once
        conn.remove_query_logger(logged)
    assert len(statements) == 3  # 3 + 3 + 1: the short batch is the last
    assert await conn.fetchval("SELECT count(*) FROM revoked_tokens") == 1


async def test_every_prune_reads_its_rows_through_an_index(
    user: Account, conn: asyncpg.Connection
) -> None:
    """Each batch of the hourly prune finds its rows in an index: a sequential scan would
    read the whole table again per batch, and a spray of made-up emails at the login grows
    login_throttle by a row per attempt (migration 0016 gave it the index it lacked)."""
    await conn.execute(
        """INSERT INTO revoked_tokens
             SELECT gen_random_uuid(), now() + make_interval(mins => i) FROM generate_series(1, 20000) i;
           INSERT INTO login_throttle
             SELECT 'spray' || i || '@example.com', 1, now() - make_interval(secs => i), NULL
             FROM generate_series(1, 20000) i;
           INSERT INTO login_throttle VALUES ('old@example.com', 1, now() - interval '2 days', NULL)"""
    )
    await conn.execute(
        """INSERT INTO idempotency_keys (user_id, key, request_hash, created_at)
             SELECT $1, 'k' || i, '\\x00', now() - make_interval(secs => i)
             FROM generate_series(1, 20000) i;
           INSERT INTO sync_audit (user_id, kind, synced_contacts, synced_calls, details, created_at)
             SELECT $1, 'calls', 0, 0, '{}', now() - make_interval(secs => i)
             FROM generate_series(0, 20000) i""".replace("$1", f"'{user.id}'")
    )
    await conn.execute("ANALYZE revoked_tokens, login_throttle, idempotency_keys, sync_audit")
    statements: list[asyncpg.connection.LoggedQuery] = []
    conn.add_query_logger(statements.append)
    try:
        assert await maintain(
            conn,
            prune=True,
            idempotency_ttl_days=8,
            login_window_seconds=900,
            sync_record_retention_days=8,
        )
    finally:
        await asyncio.sleep(0)
        conn.remove_query_logger(statements.append)
    deletes = [s for s in statements if s.query.startswith("DELETE")]
    tables = {s.query.split()[2] for s in deletes}
    assert tables == {"revoked_tokens", "login_throttle", "idempotency_keys", "sync_audit"}
    assert await conn.fetchval("SELECT count(*) FROM login_throttle") == 20000  # old@ went
    for s in deletes:
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + s.query, *s.args))
        assert "Seq Scan" not in plan, plan
