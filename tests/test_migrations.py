"""The migrations build exactly what tables.py describes, and can be undone and redone."""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from crmsync import db
from crmsync.tables import metadata


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection)
    with warnings.catch_warnings():
        # Alembic cannot compare expression indexes and says so; their names still count.
        warnings.simplefilter("ignore")
        return list(compare_metadata(context, metadata))


async def test_migrated_schema_matches_tables_py(database_url: str) -> None:
    engine = create_async_engine(db._sqlalchemy_url(database_url))
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
