"""The migrations build exactly what tables.py describes, and can be undone and redone."""

from __future__ import annotations

import asyncio
import logging
import uuid
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from crmsync import db
from crmsync.tables import metadata
from tests.test_cli import CRMSYNC, clean_env


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection)
    with warnings.catch_warnings():
        # Alembic cannot compare expression indexes and says so; their names still count.
        warnings.simplefilter("ignore")
        return list(compare_metadata(context, metadata))


async def test_migrated_schema_matches_tables_py(database_url: str) -> None:
    engine = db.engine(database_url)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(_diff)
    finally:
        await engine.dispose()
    assert diff == []


async def test_downgrade_and_upgrade_again(make_database: Callable[[str], Awaitable[str]]) -> None:
    url = await make_database("crmsync_migration_roundtrip")
    db.migrate(url)
    db.migrate(url, "base")
    db.migrate(url)


async def test_servers_started_together_on_a_new_database_migrate_it_once(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    """Several `crmsync serve` (machines behind a load balancer) started at once: one applies
    the migrations under an advisory lock, the others wait for it and find nothing to do."""
    url = await make_database("crmsync_migration_race")
    env = clean_env(CRMSYNC_DATABASE_URL=url)
    starting = [
        await asyncio.create_subprocess_exec(
            CRMSYNC, "migrate", env=env, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    for process in starting:
        _, stderr = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, stderr.decode()
    conn = await asyncpg.connect(url)
    try:
        versions = await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    assert [v["version_num"] for v in versions] == [
        ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()
    ]


async def test_time_ordered_ids_are_native_uuidv7_where_postgresql_has_it(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    """Migration 0004: PostgreSQL 18+ makes ids with its own uuidv7(), older servers with
    the portable SQL of 0003; undoing 0004 brings the portable body back."""
    url = await make_database("crmsync_migration_uuidv7")
    db.migrate(url)
    conn = await asyncpg.connect(url)
    try:
        body = "SELECT prosrc FROM pg_proc WHERE proname = 'time_ordered_uuid'"
        native = int(await conn.fetchval("SHOW server_version_num")) >= 180000
        assert ("uuidv7()" in await conn.fetchval(body)) == native
        db.migrate(url, "0003")
        assert "gen_random_uuid()" in await conn.fetchval(body)
        assert (await conn.fetchval("SELECT time_ordered_uuid()")).version == 7
    finally:
        await conn.close()


async def test_0009_moves_device_id_and_elapsed_ms_out_of_details_and_back(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    url = await make_database("crmsync_migration_0009")
    db.migrate(url)
    db.migrate(url, "0008")
    conn = await asyncpg.connect(url)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (name, email, password_hash) VALUES ('U', 'u@x.io', 'h') RETURNING id"
        )
        written = '{"inserted": 3, "elapsed_ms": 4.5, "device_id": "pixel-8"}'
        await conn.execute(
            "INSERT INTO sync_audit (user_id, kind, details) VALUES ($1, 'calls', $2::jsonb),"
            " ($1, 'calls', '{\"inserted\": 1}')",
            user,
            written,
        )
        # Not ORDER BY id: ids made in one millisecond are in random order before PostgreSQL 18.
        rows = "SELECT details::text, device_id, elapsed_ms FROM sync_audit ORDER BY details::text DESC"
        db.migrate(url)  # 0009
        assert [tuple(r) for r in await conn.fetch(rows)] == [
            ('{"inserted": 3}', "pixel-8", 4.5),
            ('{"inserted": 1}', None, None),
        ]
        db.migrate(url, "0008")
        details = await conn.fetchval(
            "SELECT details FROM sync_audit WHERE details ->> 'inserted' = '3'"
        )
        assert orjson.loads(details) == orjson.loads(written)
    finally:
        await conn.close()


async def test_0010_keys_calls_by_time_and_back_keeping_every_call(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    url = await make_database("crmsync_migration_0010")
    db.migrate(url)
    db.migrate(url, "0009")
    conn = await asyncpg.connect(url)
    key = """SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'pk_call_logs'"""
    indexes = (
        "SELECT array_agg(indexname::text ORDER BY 1) FROM pg_indexes WHERE tablename = 'call_logs'"
    )
    try:
        user = await conn.fetchval(
            "INSERT INTO users (name, email, password_hash) VALUES ('U', 'u@x.io', 'h') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO call_logs (user_id, phone_raw, direction, duration_seconds, timestamp)"
            " SELECT $1, g::text, 'missed', 0, timestamptz '2026-01-01' + g * interval '1 s'"
            " FROM generate_series(1, 500) g",
            user,
        )
        calls = "SELECT array_agg((id, timestamp)::text ORDER BY id) FROM call_logs"
        before = await conn.fetchval(calls)
        assert await conn.fetchval(key) == "PRIMARY KEY (id)"
        db.migrate(url)  # 0010
        assert await conn.fetchval(key) == 'PRIMARY KEY ("timestamp", id)'
        assert "ix_call_logs_timestamp" not in await conn.fetchval(indexes)
        assert await conn.fetchval(calls) == before
        db.migrate(url, "0009")
        assert await conn.fetchval(key) == "PRIMARY KEY (id)"
        assert "ix_call_logs_timestamp" in await conn.fetchval(indexes)
        assert await conn.fetchval(calls) == before
    finally:
        await conn.close()


# What compare_metadata does not look at: check constraints' conditions, column defaults
# and index definitions. tables.py is built into a scratch database and both catalogs read.
SCHEMA_TEXT = """
SELECT 'check ' || conrelid::regclass || '.' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE contype = 'c' AND connamespace = 'public'::regnamespace
UNION ALL
SELECT 'default ' || table_name || '.' || column_name || ' ' || column_default
FROM information_schema.columns WHERE table_schema = 'public' AND column_default IS NOT NULL
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes
WHERE schemaname = 'public' AND tablename <> 'alembic_version'
ORDER BY 1"""


async def _schema_text(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [row[0] for row in await conn.fetch(SCHEMA_TEXT)]
    finally:
        await conn.close()


async def test_tables_py_has_the_migrations_checks_defaults_and_indexes(
    database_url: str, make_database: Callable[[str], Awaitable[str]]
) -> None:
    url = await make_database("crmsync_tables_py")
    engine = db.engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE EXTENSION pg_trgm"))
            await connection.execute(
                text(
                    "CREATE FUNCTION time_ordered_uuid() RETURNS uuid LANGUAGE sql"
                    " AS 'SELECT gen_random_uuid()'"
                )
            )
            await connection.run_sync(metadata.create_all)
    finally:
        await engine.dispose()
    described = await _schema_text(url)
    assert {line.split()[0] for line in described} == {"check", "default", "index"}
    assert await _schema_text(database_url) == described


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        ("INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ('', '1', '+1')", "name"),
        (
            "INSERT INTO contacts (name, phone_raw, phone_normalized)"
            " VALUES (repeat('n', 201), '1', '+1')",
            "name",
        ),
        (
            'INSERT INTO call_logs (user_id, direction, duration_seconds, "timestamp")'
            " VALUES ($1, 'outgoing', -1, now())",
            "duration",
        ),
        (
            'INSERT INTO call_logs (user_id, direction, duration_seconds, "timestamp")'
            " VALUES ($1, 'outgoing', 86401, now())",
            "duration",
        ),
        (
            'INSERT INTO call_logs (user_id, direction, duration_seconds, "timestamp")'
            " VALUES ($1, 'forwarded', 1, now())",
            "direction",
        ),
        ("INSERT INTO sync_audit (user_id, kind) VALUES ($1, 'other')", "kind"),
        ("INSERT INTO row_counts VALUES ('users', 1)", "name"),
    ],
)
async def test_the_database_itself_refuses_values_outside_the_contract(
    conn: asyncpg.Connection, statement: str, why: str
) -> None:
    """Names 1..200 characters, durations 0..86400 s, the three directions, the three
    sync record kinds: checked by the schema too, whatever writes the row."""
    user_id = await conn.fetchval(
        "INSERT INTO users (name, email, password_hash) VALUES ('U', 'u@example.com', 'x')"
        " RETURNING id"
    )
    args = [user_id] if "$1" in statement else []
    with pytest.raises(asyncpg.CheckViolationError, match=why):
        await conn.execute(statement, *args)
    edge = [
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES (repeat('n', 200), '1', '+1')",
        'INSERT INTO call_logs (user_id, direction, duration_seconds, "timestamp")'
        " VALUES ($1, 'missed', 86400, now())",
    ]
    await conn.execute(edge[0])
    await conn.execute(edge[1], user_id)


def test_migration_scripts_split_into_every_statement() -> None:
    """A statement without a final semicolon still runs; a $$ body is one statement; an
    empty one is none."""
    script = """CREATE TABLE a (x int);
CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    RETURN 1;
END $$;
;
SELECT 1"""
    assert db.sql_statements(script) == [
        "CREATE TABLE a (x int);",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n    RETURN 1;\nEND $$;",
        "SELECT 1",
    ]


async def test_portable_time_ordered_ids_carry_the_clock_milliseconds(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    """The SQL body that 0003 installs, and undoing 0004 brings back, is UUID v7 too: its
    first 48 bits are the Unix milliseconds of the insert."""
    url = await make_database("crmsync_migration_portable_uuid")
    db.migrate(url)
    db.migrate(url, "0003")
    conn = await asyncpg.connect(url)
    try:
        before = datetime.now(UTC)
        made = await conn.fetchval("SELECT time_ordered_uuid()")
        after = datetime.now(UTC)
    finally:
        await conn.close()
    made = uuid.UUID(str(made))
    assert (made.version, made.variant) == (7, uuid.RFC_4122)
    assert before.timestamp() * 1000 - 1 <= made.int >> 80 <= after.timestamp() * 1000 + 1


async def test_libpq_options_in_the_url_reach_migrations_as_they_reach_the_pool(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    """operations.md tells operators to add `?sslmode=verify-full`; SQLAlchemy used to pass
    URL options to asyncpg.connect as keyword arguments (TypeError: 'sslmode')."""
    url = await make_database("crmsync_migration_sslmode")
    url += ("&" if "?" in url else "?") + "sslmode=disable&application_name=crmsync-migrate"
    db.migrate(url)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") is not None
    finally:
        await conn.close()


async def test_0012_rekeys_calls_to_local_only_numbers_by_their_spelling(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    url = await make_database("crmsync_migration_0012")
    db.migrate(url)
    db.migrate(url, "0011")
    conn = await asyncpg.connect(url)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (name, email, password_hash) VALUES ('U', 'u@x.io', 'h') RETURNING id"
        )
        contact = await conn.fetchval(
            "INSERT INTO contacts (name, phone_raw, phone_normalized, created_by)"
            " VALUES ('Local', '555-0150', '+15550150', $1) RETURNING id",
            user,
        )
        # (raw, normalized, contact, minute): local-only, local-only again at another time,
        # a full number, and a local-only call whose new key a stored call already has.
        calls = [
            ("555-0150", "+15550150", contact, 1),
            ("5550150", "+15550150", None, 2),
            ("(415) 555-0150", "+14155550150", None, 1),
            ("555-0199", "+15550199", None, 3),
            ("555-0199", None, None, 3),
        ]
        await conn.executemany(
            "INSERT INTO call_logs (user_id, phone_raw, phone_normalized, contact_id, direction,"
            " duration_seconds, timestamp)"
            " VALUES ($1, $2, $3, $4, 'incoming', 0, timestamptz '2026-01-01' + $5 * interval '1 m')",
            [(user, *c) for c in calls],
        )
        db.migrate(url)  # 0012
        rows = await conn.fetch(
            "SELECT phone_raw, phone_normalized, contact_id, extract(minute FROM timestamp)::int"
            " AS minute FROM call_logs ORDER BY minute, phone_raw, phone_normalized"
        )
        assert [tuple(r) for r in rows] == [
            ("(415) 555-0150", "+14155550150", None, 1),
            ("555-0150", None, contact, 1),
            ("5550150", None, None, 2),
            ("555-0199", "+15550199", None, 3),
            ("555-0199", None, None, 3),
        ]
        assert await conn.fetchval("SELECT phone_normalized FROM contacts") == "+15550150"
    finally:
        await conn.close()


async def test_0013_rekeys_calls_with_a_blank_number_as_no_number(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    url = await make_database("crmsync_migration_0013")
    db.migrate(url)
    db.migrate(url, "0012")
    conn = await asyncpg.connect(url)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (name, email, password_hash) VALUES ('U', 'u@x.io', 'h') RETURNING id"
        )
        # (raw, minute): blank; blank twice at one time (one keeps its spelling); blank
        # beside a stored "" and beside a call with no number (both keep theirs); numbers.
        calls = [
            (" ", 1),
            ("\t", 2),
            ("  ", 2),
            ("\u00a0", 3),
            ("", 3),
            (" ", 4),
            (None, 4),
            ("911", 5),
            (" 911", 5),
            ("\u2003\u3000", 6),  # blank to Python's str.strip(), not only to ASCII
        ]
        await conn.executemany(
            "INSERT INTO call_logs (user_id, phone_raw, direction, duration_seconds, timestamp)"
            " VALUES ($1, $2, 'missed', 0, timestamptz '2026-01-01' + $3 * interval '1 m')",
            [(user, *c) for c in calls],
        )
        db.migrate(url)  # 0013
        rows = await conn.fetch(
            "SELECT phone_raw, extract(minute FROM timestamp)::int AS minute FROM call_logs"
            ' ORDER BY minute, phone_raw COLLATE "C" NULLS FIRST'
        )
        kept_at_2 = rows[2]["phone_raw"]  # the one re-keyed is either
        assert kept_at_2 in ("\t", "  ")
        assert [tuple(r) for r in rows] == [
            ("", 1),
            ("", 2),
            (kept_at_2, 2),
            ("", 3),
            ("\u00a0", 3),
            (None, 4),
            (" ", 4),
            (" 911", 5),
            ("911", 5),
            ("", 6),
        ]
    finally:
        await conn.close()


async def test_a_database_not_folding_unicode_case_is_named_at_every_migration(
    make_database: Callable[[str], Awaitable[str]],
    server_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The contract's search is case-insensitive; in a "C" database, PostgreSQL folds only
    ASCII letters. crmsync cannot change a database's locale, so it says so at every start."""
    good = await make_database("crmsync_locale_unicode")
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute("DROP DATABASE IF EXISTS crmsync_locale_c")
        await conn.execute("CREATE DATABASE crmsync_locale_c TEMPLATE template0 LOCALE 'C'")
        await conn.execute("DROP DATABASE IF EXISTS crmsync_latin1")
        await conn.execute(
            "CREATE DATABASE crmsync_latin1 TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C'"
        )
    finally:
        await conn.close()
    with caplog.at_level(logging.WARNING, logger="crmsync.db"):
        db.migrate(good)
        assert not caplog.records
        db.migrate(db.with_database(server_url, "crmsync_locale_c"))
    [record] = caplog.records
    assert record.getMessage().startswith(
        "database crmsync_locale_c has the locale C, which folds case in ASCII only"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crmsync.db"):
        db.migrate(db.with_database(server_url, "crmsync_locale_c"))  # nothing left to apply
    assert len(caplog.records) == 1
    # A LATIN1 database is migrated (0013 sends it only the blanks it can hold) and named.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crmsync.db"):
        db.migrate(db.with_database(server_url, "crmsync_latin1"))
    [record] = caplog.records
    assert record.getMessage().startswith(
        "database crmsync_latin1 has the encoding LATIN1, not UTF8"
    )


async def test_0014_recomposes_contact_names_into_nfc_as_changes(
    make_database: Callable[[str], Awaitable[str]],
) -> None:
    url = await make_database("crmsync_migration_0014")
    db.migrate(url)
    db.migrate(url, "0013")
    conn = await asyncpg.connect(url)
    try:
        expands = "\u0344" * 101  # NFC makes each of these two characters: 202, left alone
        await conn.executemany(
            "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ($1, $2, $2)",
            [
                ("E\u0301lodie", "+14155550001"),  # decomposed
                ("\u00c9lodie", "+14155550002"),  # composed already
                ("Ana", "+14155550003"),
                (expands, "+14155550004"),
            ],
        )
        before = dict(await conn.fetch("SELECT phone_raw, change_seq FROM contacts"))
        db.migrate(url)  # 0014
        rows = await conn.fetch("SELECT phone_raw, name, change_seq FROM contacts ORDER BY 1")
        assert [r["name"] for r in rows] == ["\u00c9lodie", "\u00c9lodie", "Ana", expands]
        moved = [r["phone_raw"] for r in rows if r["change_seq"] != before[r["phone_raw"]]]
        assert moved == ["+14155550001"]  # a write the changes feed reports, the others not
    finally:
        await conn.close()
