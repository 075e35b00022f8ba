"""The command line: `crmsync serve | migrate | create-admin`. Calls the same services as
the routes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import asyncpg
import typer

from crmsync import db
from crmsync.config import Settings
from crmsync.errors import EmailTaken
from crmsync.observability import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help="crmsync server")


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings.log_level)
    return settings


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
) -> None:
    """Run the API (starting the embedded PostgreSQL when CRMSYNC_DATABASE_URL is unset)."""
    import uvicorn

    settings = _settings()
    url = db.database_url(settings)
    db.migrate(url)
    # Workers are fresh processes configured from the environment: hand them the
    # database and the signing key this process settled on.
    os.environ["CRMSYNC_DATABASE_URL"] = url
    os.environ["CRMSYNC_JWT_SECRET"] = settings.secret
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; exiting normally instead
    # lets atexit stop the embedded PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    typer.echo(f"crmsync listening on http{'s' if ssl_certfile else ''}://{host}:{port}", err=True)
    uvicorn.run(
        "crmsync.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        proxy_headers=False,  # crmsync.middleware decides which proxies to trust
        server_header=False,
        date_header=True,
        log_config=None,
        timeout_graceful_shutdown=20,
    )


@app.command()
def migrate() -> None:
    """Apply pending database migrations."""
    settings = _settings()
    db.migrate(db.database_url(settings))
    typer.echo("database is up to date")


@app.command("create-admin")
def create_admin(
    email: Annotated[str, typer.Option(help="The admin's email (sign-in name)")],
    name: Annotated[str, typer.Option(help="The admin's display name")],
) -> None:
    """Create an admin user. The password comes from CRMSYNC_ADMIN_PASSWORD, else it is
    asked twice on the terminal. An existing email is left as it is (exit 0)."""
    from pydantic import TypeAdapter, ValidationError

    from crmsync.users.schemas import Password, UserCreate
    from crmsync.users.service import user_create

    settings = _settings()
    password = os.environ.get("CRMSYNC_ADMIN_PASSWORD") or typer.prompt(
        "Password", hide_input=True, confirmation_prompt=True
    )
    try:
        TypeAdapter(Password).validate_python(password)
        data = UserCreate(name=name, email=email, password=password, is_admin=True)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "password"
            typer.echo(f"{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None
    url = db.database_url(settings)
    db.migrate(url)

    async def run() -> bool:
        conn = await asyncpg.connect(url)
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
            return True
        except EmailTaken:
            return False
        finally:
            await conn.close()

    if asyncio.run(run()):
        typer.echo(f"admin {data.email} created")
    else:
        typer.echo(f"a user with email {data.email} already exists; nothing changed")
