"""The command line: `crmsync serve | migrate | create-admin | reset-password | backup |
restore`. Calls the same services as the routes."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import asyncpg
import orjson
import typer
import uvicorn
from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from crmsync import db
from crmsync.config import SUPERVISOR_ENV, WORKERS_DIR_ENV, Settings
from crmsync.errors import EmailTaken
from crmsync.middleware import ProblemHttpProtocol
from crmsync.observability import configure_logging, logging_config

_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _database_cause(exc: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrappers (Alembic's connections), which
    name it only in a message of several lines; `exc` itself when there is none."""
    found: BaseException | None = exc
    while found is not None and not isinstance(found, _DATABASE_ERRORS):
        found = getattr(found, "orig", None) or found.__cause__
    return found or exc


def _what_failed(cause: BaseException) -> str:
    """Which part an error is about, for an operator who sees only its class and message
    (a file's error names its path itself)."""
    if isinstance(cause, ConnectionError | socket.gaierror | TimeoutError):
        return "cannot reach the database (CRMSYNC_DATABASE_URL): "
    if isinstance(
        cause, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidCatalogNameError
    ):
        return "the database refused the connection (CRMSYNC_DATABASE_URL): "
    if isinstance(cause, asyncpg.PostgresError | asyncpg.InterfaceError):
        return "database error: "
    return ""


class _App(typer.Typer):
    """An operator's mistake (a database that does not answer, a file that is in the way)
    is one line on stderr and exit 1, not a traceback."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        try:
            return super().__call__(*args, **kwargs)
        except db.NoDatabase as exc:
            typer.echo(f"crmsync: {exc}", err=True)
            raise SystemExit(1) from None
        except (*_DATABASE_ERRORS, DBAPIError) as exc:
            cause = _database_cause(exc)
            message = str(cause).partition("\n")[0]
            typer.echo(f"crmsync: {_what_failed(cause)}{type(cause).__name__}: {message}", err=True)
            raise SystemExit(1) from None
        except CommandError as exc:  # Alembic: most likely a database a newer crmsync migrated
            typer.echo(
                f"crmsync: the database's schema is not one this version knows ({exc}); was it"
                " migrated by a newer crmsync? Run that version, or restore a backup of this one.",
                err=True,
            )
            raise SystemExit(1) from None


app = _App(
    no_args_is_help=True, add_completion=False, help="crmsync server", rich_markup_mode="markdown"
)


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = "_".join(str(part) for part in error["loc"]).upper()
            where = f" CRMSYNC_{name}" if name else "s"
            typer.echo(f"invalid setting{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    return settings


PEM: dict[str, Any] = {"exists": True, "dir_okay": False, "readable": True}


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)", **PEM)] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM)", **PEM)] = None,
) -> None:
    """Run the API (starting the embedded PostgreSQL when CRMSYNC_DATABASE_URL is unset)."""
    if (ssl_certfile is None) != (ssl_keyfile is None):
        typer.echo("give both --ssl-certfile and --ssl-keyfile, or neither", err=True)
        raise typer.Exit(2)
    if ssl_certfile is not None:
        try:  # before any work, not as a traceback once the database is up
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                ssl_certfile, ssl_keyfile
            )
        except ssl.SSLError as exc:
            typer.echo(f"the TLS certificate and key do not load together: {exc}", err=True)
            raise typer.Exit(2) from None
    settings = _settings()
    try:
        settings.secret  # noqa: B018 - a missing or short secret stops us before any work
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    url = db.database_url(settings)
    if settings.embedded:
        db.watch_embedded(settings.data_dir)
    db.migrate(url)
    # Workers are fresh processes configured from the environment: hand them the
    # database and the signing key this process settled on.
    os.environ["CRMSYNC_DATABASE_URL"] = url
    os.environ["CRMSYNC_JWT_SECRET"] = settings.secret
    if workers > 1:
        os.environ[SUPERVISOR_ENV] = str(os.getpid())  # see main.exit_with_the_supervisor
        # Workers are separate processes: their metrics meet in files in a fresh directory,
        # set before any worker imports prometheus_client.
        metrics_dir = _metrics_dir()
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ[WORKERS_DIR_ENV] = metrics_dir  # see crmsync.balance
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; exiting normally instead
    # lets atexit stop the embedded PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = uvicorn.Config(
        "crmsync.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=ProblemHttpProtocol,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        proxy_headers=False,  # crmsync.middleware decides which proxies to trust
        server_header=False,
        date_header=True,
        log_config=logging_config(settings.log_level),  # applied in each worker too
        access_log=False,  # crmsync.access writes the request lines
        timeout_graceful_shutdown=20,
    )
    if workers == 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:  # the log says why
            raise typer.Exit(STARTUP_FAILURE)
        return
    supervisor = _Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    if not supervisor.told_to_stop:
        typer.echo(
            "crmsync: a worker could not start (the log above says why), so the server "
            f"stopped; exit status {STARTUP_FAILURE} lets a service manager start it again",
            err=True,
        )
        raise typer.Exit(STARTUP_FAILURE)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of `serve --workers N`, remembering whether it was told to stop.
    It also stops by itself when a worker it started in place of a dead one fails to start
    (the database away longer than main.STARTUP_WAIT_SECONDS), and then returns as after
    SIGTERM: `serve` would exit 0, and a service manager restarting only on failure (a
    container's `restart: on-failure`) would leave the service down."""

    told_to_stop = False

    def handle_int(self) -> None:
        self.told_to_stop = True
        super().handle_int()

    def handle_term(self) -> None:
        self.told_to_stop = True
        super().handle_term()


METRICS_DIR_PREFIX = "crmsync-metrics-"


def _metrics_dir() -> str:
    """A fresh directory for the workers' metrics files, named after this process. Those a
    supervisor that died without removing its own left behind (kill -9, the OOM killer)
    are removed first: nothing reads them again."""
    for left in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = left.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
        if pid.isdigit() and not db.process_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


@app.command()
def migrate() -> None:
    """Apply pending database migrations."""
    settings = _settings()
    url = db.database_url(settings)
    db.migrate(url)

    async def revision() -> str:
        async with db.connect(url) as conn:
            return str(await conn.fetchval("SELECT version_num FROM alembic_version"))

    where = urlsplit(url)
    place = (
        f"the embedded database in {settings.data_dir.resolve() / 'pgdata'}"
        if settings.embedded
        else f"database {where.path.lstrip('/')} on {where.hostname or 'the local socket'}"
    )
    typer.echo(f"{place} is at the newest schema, revision {asyncio.run(revision())}")


def _invalid(exc: ValidationError) -> NoReturn:
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "password"
        typer.echo(f"{where}: {error['msg']}", err=True)
    raise typer.Exit(2) from None


def _new_password() -> str:
    """From CRMSYNC_ADMIN_PASSWORD, else asked twice on the terminal; checked as the API
    checks a password (exit 2 with the reason)."""
    from pydantic import TypeAdapter

    from crmsync.users.schemas import Password

    password = os.environ.get("CRMSYNC_ADMIN_PASSWORD") or typer.prompt(
        "Password", hide_input=True, confirmation_prompt=True
    )
    try:
        return TypeAdapter(Password).validate_python(password)
    except ValidationError as exc:
        _invalid(exc)


@app.command("create-admin")
def create_admin(
    email: Annotated[str, typer.Option(help="The admin's email (sign-in name)")],
    name: Annotated[str, typer.Option(help="The admin's display name")],
) -> None:
    """Create an admin user. The password comes from CRMSYNC_ADMIN_PASSWORD, else it is
    asked twice on the terminal. An existing email is left as it is (exit 0)."""
    from crmsync.auth.service import registered_email
    from crmsync.users.schemas import UserCreate, UserUpdate
    from crmsync.users.service import user_create

    settings = _settings()
    pgdata = settings.data_dir.resolve() / "pgdata"
    if settings.embedded and not pgdata.is_dir():
        # From the wrong directory, a new, empty database here would get an admin that the
        # server never sees; so, as for backup, there must be one already (serve makes it).
        typer.echo(
            f"no database in {pgdata} yet: start the server first (`crmsync serve`, or"
            " `make run` in a checkout), which creates it, then run create-admin in another"
            " terminal; or set CRMSYNC_DATA_DIR to the service's data directory",
            err=True,
        )
        raise typer.Exit(1)
    url = db.database_url(settings, create=False)
    db.migrate(url)

    async def live_user(conn: db.Connection, email: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT email, is_admin FROM users WHERE lower(email) = lower($1)"
            " AND deleted_at IS NULL",
            email,
        )
        return row

    async def find() -> asyncpg.Record | None:
        async with db.connect(url) as conn:
            return await live_user(conn, registered_email(email))

    async def create(data: UserCreate) -> asyncpg.Record | None:
        """None when `data` was created; the live user with its email when there was one."""
        async with db.connect(url) as conn:
            try:
                async with conn.transaction():
                    await user_create(
                        conn,
                        name=data.name,
                        email=data.email,
                        password=data.password,
                        is_admin=True,
                        rounds=settings.bcrypt_rounds,
                    )
                return None
            except EmailTaken:  # created meanwhile by another run
                return await live_user(conn, data.email)

    # An existing email first: a re-run needs no password (none set, or not the one the
    # admin has since chosen) to be the no-op the contract promises.
    existing = asyncio.run(find())
    if existing is None:
        try:  # the name and email as the API checks them, before the password is asked for
            UserUpdate(name=name, email=email)
        except ValidationError as exc:
            _invalid(exc)
        password = _new_password()
        try:
            data = UserCreate(name=name, email=email, password=password, is_admin=True)
        except ValidationError as exc:
            _invalid(exc)
        existing = asyncio.run(create(data))
        if existing is None:
            typer.echo(f"admin {data.email} created")
            return
    if existing["is_admin"]:
        typer.echo(f"an admin with email {existing['email']} already exists; nothing changed")
    else:
        typer.echo(
            f"a user with email {existing['email']} already exists and is NOT an admin;"
            " nothing changed (an admin can make it one: PATCH /users/{id} with is_admin"
            f" true; or crmsync reset-password --email {existing['email']} --admin)"
        )


@app.command("reset-password")
def reset_password(
    email: Annotated[str, typer.Option(help="The user's email (sign-in name)")],
    admin: Annotated[bool, typer.Option("--admin", help="Also make the user an admin")] = False,
) -> None:
    """Set a user's password (from CRMSYNC_ADMIN_PASSWORD, else asked twice on the
    terminal): signs the user out everywhere and lifts a login lockout. The way back in
    when the last admin's password is lost; --admin also gives the admin right."""
    from crmsync.users.service import user_reset_password

    settings = _settings()
    url = db.database_url(settings, create=False)
    password = _new_password()
    db.migrate(url)

    async def run() -> str | None:
        async with db.connect(url) as conn, conn.transaction():
            return await user_reset_password(
                conn,
                email=email,
                password=password,
                make_admin=admin,
                rounds=settings.bcrypt_rounds,
            )

    user = asyncio.run(run())
    if user is None:
        typer.echo(f"no user with email {email}; nothing changed", err=True)
        raise typer.Exit(1)
    role = "an admin" if orjson.loads(user)["is_admin"] else "not an admin"
    typer.echo(f"password of {email} set ({role}); its earlier sessions are signed out")


@app.command("backup")
def backup_command(
    out: Annotated[
        Path | None, typer.Option(help="Directory to write to \\[default: CRMSYNC_BACKUP_DIR]")
    ] = None,
    keep: Annotated[
        int, typer.Option(min=1, help="Newest backups to keep; older are deleted")
    ] = 14,
) -> None:
    """Write a timestamped pg_dump (custom format) of the database, then prune old ones."""
    from crmsync import backup

    settings = _settings()
    url = db.database_url(settings, create=False)
    major = asyncio.run(backup.server_major(url))
    tool = backup.pg_tool("pg_dump", server_major=major, embedded=settings.embedded)
    try:
        path = backup.backup(url, out or settings.backup_dir, keep=keep, tool=tool)
    except backup.BackupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"backup written to {path} ({path.stat().st_size} bytes)")


@app.command("restore")
def restore_command(
    file: Annotated[Path, typer.Argument(help="A file written by `crmsync backup`")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace what schema public holds (in the same transaction)"),
    ] = False,
    keep_sessions: Annotated[
        bool,
        typer.Option(
            "--keep-sessions",
            help="Leave users signed in: only for a backup taken with every server stopped"
            " (moving the data to another database), after which nothing was undone",
        ),
    ] = False,
) -> None:
    """Restore a backup into the database, whose schema public must be empty unless --force
    is given. All or nothing: a failed restore changes nothing. Stop the server first.
    Every user is signed out (a logout, password change or deletion made after the backup
    would otherwise be undone with the rest): phones sign in again."""
    from crmsync import backup

    settings = _settings()
    if not file.is_file():
        what = "a directory, not a backup file" if file.is_dir() else "no such backup file"
        typer.echo(f"{what}: {file}", err=True)
        raise typer.Exit(1)
    tool = backup.newest_tool("pg_restore")
    try:  # before anything else: a wrong file is the likeliest mistake, and touches nothing
        dumped_from = backup.check_archive(file, tool=tool)
    except backup.BackupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    url = db.database_url(settings)
    serving = asyncio.run(backup.serving_connections(url))
    if serving:
        # It would go on answering with what it read at its start (the changes feed's
        # origin) and with cached statements on tables the restore replaces.
        typer.echo(
            f"a crmsync server is running on this database (connections open: {serving}):"
            " stop it first (e.g. `systemctl stop crmsync`), then restore, then start it",
            err=True,
        )
        raise typer.Exit(1)
    existing = asyncio.run(backup.public_relations(url))
    if existing and not force:
        typer.echo(
            f"the database is not empty: its schema public has {len(existing)} tables and"
            f" sequences, e.g. {existing[0]}; restore into an empty one, or give --force to"
            " replace them",
            err=True,
        )
        raise typer.Exit(1)
    major = asyncio.run(backup.server_major(url))
    try:
        backup.check_server(file, dumped_from, server_major=major)
        backup.restore(
            url,
            file,
            tool=tool,
            server_major=major,
            replace=bool(existing),
            keep_sessions=keep_sessions,
        )
    except backup.BackupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    used = asyncio.run(backup.advance_transaction_ids(url))
    if used:
        typer.echo(f"advanced the transaction counter by {used} for the contacts changes feed")
    signed_out = "" if keep_sessions else "; every user is signed out and signs in again"
    typer.echo(f"restored {file}{signed_out}")
