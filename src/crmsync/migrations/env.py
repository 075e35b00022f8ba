"""Alembic environment: runs migrations on the async engine, one migrator at a time."""

from __future__ import annotations

import asyncio
import contextlib

from alembic import context
from sqlalchemy import Connection, text

from crmsync import db
from crmsync.tables import metadata


def _run(connection: Connection) -> None:
    # Several server processes may start at once; they take turns (the lock is released at
    # the end of the session), and the later ones find nothing left to do.
    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": db.MIGRATION_LOCK_ID})
    try:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    except BaseException:
        # The failure has aborted the transaction, where the unlock would fail too and
        # replace the error the operator needs. Roll back (a session lock outlives that),
        # then unlock if the connection still can: closing it releases the lock anyway.
        with contextlib.suppress(Exception):
            connection.rollback()
            _unlock(connection)
        raise
    _unlock(connection)


def _unlock(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": db.MIGRATION_LOCK_ID})
    connection.commit()


async def _main() -> None:
    engine = db.engine(context.config.attributes["url"])
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


asyncio.run(_main())
