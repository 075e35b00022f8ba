"""Alembic environment: runs migrations on the async engine, one migrator at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from alembic import context
from sqlalchemy import Connection, text

from crmsync import db
from crmsync.tables import metadata

log = logging.getLogger("crmsync.db")


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
    _check_locale(connection)


def _check_locale(connection: Connection) -> None:
    """Warn, after every migration run (so at every start), when the database is not UTF-8
    or its locale folds case in ASCII only: the contract's case-insensitive name search
    then is not."""
    database, ctype, encoding = connection.execute(text(db.DATABASE_LOCALE_SQL)).one()
    if encoding != "UTF8":
        log.warning(
            "database %s has the encoding %s, not UTF8, which crmsync needs to store and search"
            " names in every script. Move the data to a UTF-8 database: docs/operations.md,"
            ' "The database\'s locale"',
            database,
            encoding,
        )
    elif not connection.execute(text(db.FOLDS_CASE_SQL)).scalar():
        log.warning(
            "database %s has the locale %s, which folds case in ASCII only: a search for"
            ' "élodie" does not find "Élodie", and names in other scripts are searched'
            " without the trigram index. Move the data to a database with a UTF-8 locale:"
            ' docs/operations.md, "The database\'s locale"',
            database,
            ctype,
        )
    connection.commit()


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
