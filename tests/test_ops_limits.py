"""Operations: a statement_timeout guards every query on the server's connections."""

from __future__ import annotations

import time

import asyncpg
import pytest

from crmsync import db
from tests.conftest import make_settings


async def test_statement_timeout_cancels_a_long_query(database_url: str) -> None:
    pool = await db.create_pool(database_url, make_settings(database_url, statement_timeout_ms=200))
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "200ms"
            started = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
                await conn.fetchval("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 2
            assert await conn.fetchval("SELECT 1") == 1  # the connection stays usable
    finally:
        await pool.close()
